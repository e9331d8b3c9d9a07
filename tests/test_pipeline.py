"""`invoke matrix` on the embedded default: real torch, real ONNX Runtime, real files.

A small matrix (64x32 inputs, 8 identities) keeps each run to seconds; the shipped 256x128
default is exercised by the README command and the docker tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from modelmatrix import data
from modelmatrix.config import load_matrix
from modelmatrix.errors import StageFailed
from modelmatrix.pipeline import CACHED, DONE, FAILED, SKIPPED, run_matrix
from modelmatrix.runners.local import LocalRunner

from mm_testing import run_invoke, write_matrix


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full run, shared: the synthetic set, the matrix, the first summary. These tests are of the
    plain (not CI) semantics: caffe, tensorrt and ascend are skipped here, which CI=true would make a
    failure (tests/test_truth.py tests that)."""
    tmp = tmp_path_factory.mktemp("pipe")
    cfg = write_matrix(
        tmp,
        targets={
            "torch": {"params": {"batch_size": 8}},
            "onnxruntime": {"params": {"batch_size": 8}},
            "caffe": {},
            "tensorrt": {},
            "ascend": {},
        },
    )
    m = load_matrix(cfg)
    s = m.raw["data"]["synthetic"]
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **s)
    first = run_matrix(m, "local", ci=False)
    return tmp, cfg, first


def _statuses(summary):
    return {k: o.status for k, o in summary.outcomes.items()}


def test_first_run_builds_everything_and_passes(built):
    _, _, first = built
    st = _statuses(first)
    for node in ("prepare", "torch.export", "torch.infer", "onnxruntime.infer", "verify"):
        assert st[node] == DONE, (node, first.outcomes[node].reason)
    assert first.passed, json.dumps(first.report, indent=1)[:2000]
    rep = first.report
    assert rep["model"]["random_weights"] is True
    ort = rep["targets"]["onnxruntime"]
    assert ort["status"] == "passed"


def test_missing_toolchains_are_skipped_with_reason_never_passed(built):
    _, _, first = built
    st = _statuses(first)
    # This host has no caffe module, no TensorRT, no atc: skipped with the reason, not passed.
    for t in ("caffe", "tensorrt", "ascend"):
        assert st[f"{t}.convert"] == SKIPPED
        assert first.report["targets"][t]["status"] == "skipped"
        assert first.report["targets"][t]["reason"]
    assert "caffe" in first.outcomes["caffe.convert"].reason
    junit = (first.workspace / "junit.xml").read_text()
    assert "<skipped" in junit


def test_rerun_does_no_work(built):
    _, cfg, _ = built
    again = run_matrix(load_matrix(cfg), "local", ci=False)
    assert not again.did_work
    assert all(s in (CACHED, SKIPPED) for s in _statuses(again).values())
    assert again.passed


def test_changing_a_tolerance_reruns_only_verify(built):
    tmp, cfg, _ = built
    raw = yaml.safe_load(cfg.read_text())
    raw["targets"]["onnxruntime"]["tolerance"] = {"rtol": 2e-3}
    cfg2 = tmp / "tol.yaml"
    cfg2.write_text(yaml.safe_dump(raw))
    s = run_matrix(load_matrix(cfg2), "local", ci=False)
    done = [k for k, v in _statuses(s).items() if v == DONE]
    assert done == ["verify"]


def test_changing_the_checkpoint_reruns_export_and_after(built):
    tmp, cfg, first = built
    # A real state dict: the export's own weights, one BN statistic perturbed.
    sd = torch.load(first.outcomes["torch.export"].dir / "weights.pt", weights_only=True)
    sd["bottleneck.running_mean"] = sd["bottleneck.running_mean"] + 0.01
    ckpt = tmp / "model.pth"
    torch.save(sd, ckpt)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["checkpoint"] = str(ckpt)
    cfg2 = tmp / "ckpt.yaml"
    cfg2.write_text(yaml.safe_dump(raw))
    s = run_matrix(load_matrix(cfg2), "local", ci=False)
    st = _statuses(s)
    assert st["prepare"] == CACHED
    for node in ("source", "torch.export", "torch.infer", "onnxruntime.infer", "verify"):
        assert st[node] == DONE, node
    assert s.report["model"]["random_weights"] is False
    assert s.passed


def test_a_killed_stage_leaves_nothing_mistaken_for_a_result(built):
    """A stage killed half-way (here by its timeout) commits nothing; the next run builds it."""
    tmp, cfg, _ = built
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["seed"] = 7  # a new export, so the stage really runs
    raw["stage_timeout_s"] = 1
    cfg2 = tmp / "kill.yaml"
    cfg2.write_text(yaml.safe_dump(raw))
    s = run_matrix(load_matrix(cfg2), "local", ci=False)
    assert s.outcomes["torch.export"].status == FAILED
    assert "timed out" in s.outcomes["torch.export"].reason
    node_dir = s.workspace / "stages" / "torch.export"
    key = s.outcomes["torch.export"].key[:16]
    assert not (node_dir / key).exists()
    assert not list(node_dir.glob(".tmp-*"))
    assert not s.passed
    raw["stage_timeout_s"] = 600
    cfg2.write_text(yaml.safe_dump(raw))
    s2 = run_matrix(load_matrix(cfg2), "local", ci=False)
    assert s2.outcomes["torch.export"].status == DONE and s2.passed


def test_outputs_are_where_the_report_says(built):
    _, _, first = built
    ws = first.workspace
    feats = np.load(ws / "targets" / "onnxruntime" / "infer" / "features.npy")
    index = json.loads((ws / "stages" / "prepare").glob("*/index.json").__next__().read_text())
    assert feats.shape == (len(index["items"]), 2048) and feats.dtype == np.float32
    assert (ws / "report.md").is_file() and (ws / "report.json").is_file()


# ------------------------------------------------------------------ the CLI, as users type it


def test_cli_matrix_passes_and_reports(built):
    _, cfg, _ = built
    r = run_invoke(["matrix", "--config", str(cfg)], env={"CI": ""})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to do" in r.stderr
    assert "onnxruntime" in r.stdout


def test_cli_bad_matrix_is_one_line_exit_2(tmp_path):
    cfg = write_matrix(tmp_path, targets={"torch": {}, "onnxruntime": {"tolerance": {"rtol": "x"}}})
    r = run_invoke(["matrix", "--config", str(cfg)], env={"CI": ""})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {cfg}: targets.onnxruntime.tolerance.rtol: expected a number, got 'x'"
    ]
    assert not (tmp_path / "ws").exists()


def test_cli_missing_dataset(tmp_path):
    cfg = write_matrix(tmp_path)
    r = run_invoke(["matrix", "--config", str(cfg)], env={"CI": ""})
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert "dataset folder not found" in err and "invoke data --synthetic" in err
    assert not list((tmp_path / "ws" / "stages").glob("*/*"))


def test_cli_bad_checkpoint_fails_export_cleanly(tmp_path):
    cfg = write_matrix(tmp_path)
    m = load_matrix(cfg)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    bad = tmp_path / "notastatedict.pth"
    torch.save([1, 2, 3], bad)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["checkpoint"] = str(bad)
    cfg.write_text(yaml.safe_dump(raw))
    r = run_invoke(["matrix", "--config", str(cfg)], env={"CI": ""})
    assert r.returncode != 0
    failed = [ln for ln in r.stderr.splitlines() if "FAILED" in ln and "torch.export" in ln]
    assert len(failed) == 1 and str(bad) in failed[0], r.stderr
    assert not list((tmp_path / "ws" / "stages" / "torch.export").glob("[0-9a-f]*"))


def test_random_weights_retrieve_synthetic_identities_well_above_chance(tmp_path):
    """The shipped synthetic set (30 identities) is distinct enough that even seeded random
    weights retrieve: Rank-1 at least 3x chance (measured: 4.5x at 128x64, 5.5x at 256x128)."""
    cfg = write_matrix(
        tmp_path,
        model__input_size=[128, 64],
        model__calibration_batches=4,
        data__ascend_bins=False,
        data__synthetic={
            "identities": 30,
            "cameras": 6,
            "gallery_per_camera": 2,
            "junk": 4,
            "distractors": 6,
            "seed": 0,
        },
        targets={"torch": {"params": {"batch_size": 32}}},
    )
    m = load_matrix(cfg)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    s = run_matrix(m, "local", ci=False)
    ret = s.report["reference_retrieval"]
    assert s.report["model"]["random_weights"] is True
    assert ret["num_valid_queries"] == 60
    assert ret["rank1"] >= 3 * (1 / 30), ret


class FakeRunnerWhoseImageBuildFails(LocalRunner):
    """A test double of the runner interface only (not of any toolchain): prepare() fails as a
    broken image build would."""

    def prepare(self, target):
        if target.name == "onnxruntime":
            raise StageFailed("onnxruntime image: images/onnxruntime/Dockerfile: step 3/9 failed")


def test_a_target_that_cannot_be_made_ready_is_failed_not_skipped(built):
    from modelmatrix.pipeline import MatrixRun
    from modelmatrix.plan import build_plan

    _, cfg, _ = built
    m = load_matrix(cfg)
    outcomes = MatrixRun(m, FakeRunnerWhoseImageBuildFails()).run(build_plan(m))
    assert outcomes["onnxruntime.infer"].status == FAILED
    assert "step 3/9 failed" in outcomes["onnxruntime.infer"].reason
    assert outcomes["verify"].ok
    report = json.loads((outcomes["verify"].dir / "report.json").read_text())
    assert report["passed"] is False and report["targets"]["onnxruntime"]["status"] == "error"
