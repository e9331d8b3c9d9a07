"""`invoke matrix --runner docker` end to end: every stage in its target's real image.

torch and onnxruntime build FROM the shipped default `python:3.11-slim-bookworm`, caffe FROM
`debian:bullseye-slim`; with no registry here, both resolve to the bootstrapped bases that the
shipped matrix.yaml declares (`invoke bases`), and the build output says so.
"""

from __future__ import annotations

import logging

import yaml

from modelmatrix import REPO_ROOT, data
from modelmatrix.config import load_matrix
from modelmatrix.pipeline import CACHED, DONE, SKIPPED, run_matrix

from mm_testing import run_invoke, write_matrix


def _matrix(tmp_path):
    shipped = yaml.safe_load((REPO_ROOT / "matrix.yaml").read_text())
    cfg = write_matrix(
        tmp_path,
        runner="docker",
        images=shipped["images"],
        targets={
            "torch": {"params": {"batch_size": 8}},
            "onnxruntime": {"params": {"batch_size": 8}},
            "caffe": {"params": {"batch_size": 8}},
            # as shipped: allowed to be skipped here (no GPU, no CANN), with the reason in the report
            "tensorrt": {"allow_skip": shipped["targets"]["tensorrt"]["allow_skip"]},
            "ascend": {"allow_skip": shipped["targets"]["ascend"]["allow_skip"]},
        },
    )
    m = load_matrix(cfg)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    return cfg


def test_containerised_matrix_passes_and_reruns_as_a_no_op(tmp_path, caplog, ci_base, bullseye_base):
    caplog.set_level(logging.INFO, logger="modelmatrix")
    tmp_path.chmod(0o755)
    cfg = _matrix(tmp_path)
    first = run_matrix(load_matrix(cfg))
    err = caplog.text
    assert first.runner == "docker"
    st = {k: o.status for k, o in first.outcomes.items()}
    for node in ("torch.export", "torch.infer", "onnxruntime.infer", "caffe.convert", "caffe.infer"):
        assert st[node] in (DONE, CACHED), (node, first.outcomes[node].reason)
    assert first.passed, first.report
    for t in ("onnxruntime", "caffe"):
        assert first.report["targets"][t]["status"] == "passed"
    # No GPU, no Ascend card here: skipped with the device named, never passed.
    assert st["tensorrt.convert"] == SKIPPED and "nvidia" in first.outcomes["tensorrt.convert"].reason
    assert st["ascend.convert"] == SKIPPED
    # The shipped bases are not local here and a matrix run never pulls: the build output says
    # which bootstrapped base it used instead, for both images.
    assert "using modelmatrix/base:bookworm-minbase, bootstrapped from" in err
    assert "using modelmatrix/base:bullseye-minbase, bootstrapped from" in err

    again = run_matrix(load_matrix(cfg))
    assert not again.did_work
    assert all(o.status in (CACHED, SKIPPED) for o in again.outcomes.values())


def test_cli_runner_docker_and_local_agree(tmp_path, ci_base, bullseye_base):
    """The same matrix through both runners: the local run reuses nothing of the docker one
    (the runner environment is part of every key) and both pass with the same retrieval."""
    tmp_path.chmod(0o755)
    cfg = _matrix(tmp_path)
    r = run_invoke(["matrix", "--config", str(cfg), "--runner", "docker", "--target", "onnxruntime"])
    assert r.returncode == 0, r.stderr[-3000:]
    docker_report = yaml.safe_load((tmp_path / "ws" / "report.json").read_text())
    r = run_invoke(["matrix", "--config", str(cfg), "--runner", "local", "--target", "onnxruntime"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "built      torch.export" in r.stderr  # not reused from the docker run
    local_report = yaml.safe_load((tmp_path / "ws" / "report.json").read_text())
    assert local_report["runner"] == "local" and docker_report["runner"] == "docker"
    for key in ("rank1", "mAP"):
        assert local_report["reference_retrieval"][key] == docker_report["reference_retrieval"][key]


def test_a_target_whose_image_base_is_not_here_is_skipped_not_failed(tmp_path, ci_base):
    """ascend's base (ubuntu:18.04) and vendor files are not on this host: the target cannot run here.
    That is a skip with the reason (allowed by the shipped allow_skip), never a FAILED that turns the
    shipped matrix red; a Dockerfile step that fails is still FAILED (test_build)."""
    tmp_path.chmod(0o755)
    shipped = yaml.safe_load((REPO_ROOT / "matrix.yaml").read_text())
    cfg = write_matrix(
        tmp_path,
        runner="docker",
        images=shipped["images"],
        targets={
            "torch": {"params": {"batch_size": 8}},
            "onnxruntime": {"params": {"batch_size": 8}},
            "ascend": {"allow_skip": shipped["targets"]["ascend"]["allow_skip"]},
        },
    )
    m = load_matrix(cfg)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    s = run_matrix(load_matrix(cfg), ci=True)
    o = s.outcomes["ascend.convert"]
    assert o.status == SKIPPED and "ascend image:" in o.reason and "ubuntu:18.04" in o.reason
    assert s.report["targets"]["ascend"]["status"] == "skipped" and s.passed and s.exit_code == 0
    strict = run_matrix(load_matrix(cfg), ci=True, require=["ascend"])
    assert strict.exit_code == 3 and strict.report["targets"]["ascend"]["status"] == "error"
