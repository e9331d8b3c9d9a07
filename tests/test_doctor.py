"""`invoke doctor` without a Docker engine: the table, the exit codes, no side effects, and verdicts
that agree with what the real pipeline then does.

DOCKER_HOST points at a unix socket path that does not exist, so the engine is really unreachable
(no mock of the engine or of our code)."""

from __future__ import annotations

import io
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from modelmatrix import data
from modelmatrix.config import load_matrix
from modelmatrix.doctor import diagnose, plain_lines, rich_table
from modelmatrix.errors import ConfigError, TargetUnavailable
from modelmatrix.pipeline import run_matrix

from mm_testing import REPO, run_invoke, write_matrix

TRT_ALLOW = "no GPU on this test host"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"DOCKER_HOST": f"unix://{tmp_path}/nope.sock", "CI": "", **extra}


def _matrix(tmp_path: Path, **overrides) -> Path:
    targets = {
        "torch": {"params": {"batch_size": 8}},
        "onnxruntime": {"params": {"batch_size": 8}},
        "caffe": {},
        "tensorrt": {"allow_skip": TRT_ALLOW},
    }
    bases = {"python:3.11-slim-bookworm": {"suite": "bookworm", "tag": "modelmatrix/base:bookworm-minbase"}}
    return write_matrix(tmp_path, targets=targets, images={"bases": bases}, **overrides)


def _rows(stdout: str) -> dict[tuple[str, str], str]:
    """(what, check) -> result, parsed by the header's column positions."""
    lines = stdout.splitlines()
    header = lines[0]
    assert header.split() == ["what", "check", "result"], header
    c1, c2 = header.index("check"), header.index("result")
    rows = {}
    for line in lines[1:]:
        key = (line[:c1].strip(), line[c1:c2].strip())
        assert key not in rows, f"row {key} twice"
        rows[key] = line[c2:]
    return rows


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _doctor(tmp_path: Path, *args: str, **env: str):
    return run_invoke(["doctor", *args], env=_env(tmp_path, **env), timeout=120)


# ============================================================================ through `invoke doctor`


def test_table_without_an_engine_and_nothing_written(tmp_path):
    cfg = _matrix(tmp_path)
    before = _tree(tmp_path)
    r = _doctor(tmp_path, "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rows = _rows(r.stdout)
    engine = rows[("engine", "docker")]
    assert engine.startswith("unreachable: ") and f"unix://{tmp_path}/nope.sock (no socket there)" in engine
    assert rows[("runner", "local")] == "local (matrix.yaml runner: local)"
    assert rows[("dataset", "folder")].startswith(
        f"missing: {tmp_path / 'data'} (data.dataset); `invoke data --synthetic`"
    )
    assert rows[("base python:3.11-slim-bookworm", "image")].startswith("unknown: no Docker engine")
    assert rows[("base python:3.11-slim-bookworm", "image")].endswith(
        "`invoke bases` makes modelmatrix/base:bookworm-minbase; for onnxruntime, torch"
    )
    assert rows[("base debian:bullseye-slim", "image")].endswith(  # caffe's, not declared here
        "not declared under images.bases: `docker load` it, or declare it; for caffe"
    )
    for t in ("torch", "onnxruntime"):
        assert rows[(f"target {t}", "local")] == "ok"
        assert rows[(f"target {t}", "matrix")] == "run"
        assert rows[(f"target {t}", "image")] == "unknown: no Docker engine (see the engine row)"
        assert rows[(f"target {t}", "docker")] == "no Docker engine (see the engine row)"
        assert rows[(f"target {t}", "files")] == f"- (targets/{t}/target.yaml declares none)"
    caffe_why = "python module 'caffe' is not installed on this host (local runner)"
    assert rows[("target caffe", "local")] == caffe_why
    assert rows[("target caffe", "matrix")] == f"skip: {caffe_why}"  # neither required nor allowed
    trt = rows[("target tensorrt", "matrix")]
    assert trt.startswith("skip: python module 'tensorrt' is not installed on this host (local runner)")
    assert trt.endswith(f"(allowed: {TRT_ALLOW})")
    assert ("target ascend", "matrix") not in rows  # not in this matrix.yaml
    # side-effect free: no workspace, nothing created or touched
    assert not (tmp_path / "ws").exists()
    assert _tree(tmp_path) == before


def test_require_a_target_this_host_cannot_run_exits_3_in_one_line(tmp_path):
    cfg = _matrix(tmp_path)
    r = _doctor(tmp_path, "--config", str(cfg), "--require", "caffe", "--require", "torch")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [
        "error: --require caffe cannot run here (local runner): skip: python module "
        "'caffe' is not installed on this host (local runner)"
    ]
    rows = _rows(r.stdout)  # the table is still shown, above the verdict
    assert rows[("target caffe", "matrix")] == (
        "skip: python module 'caffe' is not installed on this host "
        "(local runner) -> run fails (required: asked for on the "
        "command line)"
    )
    assert rows[("target torch", "matrix")] == "run; required: asked for on the command line"


def test_unknown_target_exits_2_in_one_line(tmp_path):
    cfg = _matrix(tmp_path)
    r = _doctor(tmp_path, "--config", str(cfg), "--require", "cafe")
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: --require cafe: not a target in {cfg} (known: caffe, onnxruntime, tensorrt, torch)"
    ]


def test_runner_docker_without_an_engine_and_auto_falls_back(tmp_path):
    cfg = _matrix(tmp_path)
    r = _doctor(tmp_path, "--config", str(cfg), "--runner", "docker", "--require", "torch")
    assert r.returncode == 3
    rows = _rows(r.stdout)
    assert rows[("runner", "docker")].startswith("none: `invoke matrix` stops before any stage")
    assert rows[("target torch", "matrix")] == "not run: `invoke matrix --runner docker` needs a Docker engine"
    assert rows[("target torch", "local")] == "ok"  # the other runner's probe is still shown
    assert r.stderr.splitlines() == [
        "error: --require torch cannot run here (docker runner): not run: "
        "`invoke matrix --runner docker` needs a Docker engine"
    ]
    r = _doctor(tmp_path, "--config", str(cfg), "--runner", "auto", "--require", "torch")
    assert r.returncode == 0, r.stderr
    rows = _rows(r.stdout)
    assert rows[("runner", "auto")].startswith("local (--runner: auto; no Docker engine, so invoke matrix falls back")
    assert rows[("target torch", "matrix")] == "run; required: asked for on the command line"


def test_ci_and_required_true_make_a_skip_fail_the_run_but_allow_skip_says_why(tmp_path):
    cfg = _matrix(tmp_path, targets__onnxruntime={"enabled": False}, targets__caffe={"required": True})
    r = _doctor(tmp_path, "--config", str(cfg), CI="true")
    assert r.returncode == 0, r.stderr  # only --require turns a skip into exit 3
    rows = _rows(r.stdout)
    assert rows[("target caffe", "matrix")].endswith("-> run fails (required: targets.caffe.required is true)")
    assert rows[("target torch", "matrix")] == "run; required: CI=true and targets.torch has no allow_skip"
    assert rows[("target tensorrt", "matrix")].endswith(f"(allowed: {TRT_ALLOW})")
    assert rows[("target onnxruntime", "matrix")] == "not run: targets.onnxruntime.enabled is false in matrix.yaml"
    r = _doctor(tmp_path, "--config", str(cfg), "--require", "onnxruntime")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: --require onnxruntime: the target is not enabled "
        f"(targets.onnxruntime.enabled in {cfg}); enable it or drop --require"
    ]


# ============================================================================ in-process, on a throwaway project

FEATURES = """
    import numpy as np
    from targets.common.contract import main, save_npy

    def run(spec):
        x = np.load(spec.input("inputs"), mmap_mode="r")
        save_npy(spec.output("features.npy"), np.asarray(x.reshape(x.shape[0], -1)[:, :64], dtype="f4"))
        return {}

    if __name__ == "__main__":
        main(run)
"""
WRITES_BIN = """
    from targets.common.contract import atomic_write_bytes, main

    def run(spec):
        atomic_write_bytes(spec.output("out.bin"), b"x")
        return {}

    if __name__ == "__main__":
        main(run)
"""
INFER = {"inputs": {"inputs": "prepare/inputs.npy"}, "outputs": ["features.npy"]}
#: name -> (requires, stages, files): each target stands for one of the pipeline's outcomes
PROJECT = {
    "ref": ({"modules": ["numpy"]}, {"infer": INFER}, {"infer.py": FEATURES}),
    "half": (
        {"modules": ["numpy"]},
        {"convert": {"inputs": {"inputs": "prepare/inputs.npy"}, "outputs": ["out.bin"]}, "infer": INFER},
        {"convert.py": WRITES_BIN},
    ),  # infer.py missing
    "child": (
        {"modules": ["numpy"]},
        {
            "infer": {
                "inputs": {"inputs": "prepare/inputs.npy", "bin": "half.convert/out.bin"},
                "outputs": ["features.npy"],
            }
        },
        {"infer.py": FEATURES},
    ),
    "nocode": ({"modules": ["numpy"]}, {"infer": INFER}, {}),
    "needs": ({"modules": ["mm_no_such_module_0x5f"]}, {"infer": INFER}, {"infer.py": FEATURES}),
    "badref": (
        {"modules": ["numpy"]},
        {
            "infer": {
                "inputs": {"inputs": "prepare/inputs.npy", "x": "ref.infer/nothing.bin"},
                "outputs": ["features.npy"],
            }
        },
        {"infer.py": FEATURES},
    ),
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nope.sock")
    monkeypatch.delenv("CI", raising=False)
    targets = tmp_path / "project" / "targets"
    targets.mkdir(parents=True)
    shutil.copy(REPO / "targets" / "__init__.py", targets / "__init__.py")
    (targets / "common").symlink_to(REPO / "targets" / "common")
    for name, (requires, stages, files) in PROJECT.items():
        (targets / name).mkdir()
        (targets / name / "__init__.py").write_text("")
        (targets / name / "target.yaml").write_text(
            yaml.safe_dump({"name": name, "requires": requires, "stages": stages})
        )
        for fname, code in files.items():
            (targets / name / fname).write_text(textwrap.dedent(code))
    cfg = write_matrix(tmp_path, verify={"reference": "ref"}, targets={n: {} for n in PROJECT})
    return cfg, targets


def test_verdicts_agree_with_what_the_pipeline_then_does(project, tmp_path):
    cfg, targets = project
    m = load_matrix(cfg, targets_dir=targets)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    before = _tree(tmp_path)
    diag = diagnose(m, None, ["ref"])
    assert _tree(tmp_path) == before and not m.workspace.exists()
    want = {
        "ref": "run; required: asked for on the command line",
        "half": (
            "FAIL: stage module targets/half/infer.py is missing, while the target has its other stages' "
            "code: restore it, or remove the stage from target.yaml"
        ),
        "child": "skip: needs half.convert (failed)",
        "nocode": "skip: stage code targets/nocode/infer.py not written yet",
        "needs": "skip: python module 'mm_no_such_module_0x5f' is not installed on this host (local runner)",
        "badref": (
            "FAIL: targets/badref/target.yaml: stages.infer.inputs.x: ref.infer has no output "
            "'nothing.bin' (it declares features.npy)"
        ),
    }
    assert {t: s.matrix_text() for t, s in diag.targets.items()} == want
    assert diag.rows()[0].result.startswith("unreachable: ") and diag.engine.reachable is False
    diag.check_required()  # ref can run: no error
    # the real run, with the same runner: each target ends as the doctor said
    summary = run_matrix(load_matrix(cfg, targets_dir=targets), "local", require=["ref"], ci=False)
    firsts: dict[str, tuple[str, str]] = {}
    for o in summary.outcomes.values():
        if o.node.target and not o.ok and o.node.target not in firsts:
            firsts[o.node.target] = (o.status, o.reason)
    for t, (status, reason) in firsts.items():  # stage by stage: the same status and reason
        verdict = diag.targets[t]
        assert (status, reason) == ({"skip": "skipped", "fail": "failed"}[verdict.verdict], verdict.reason), t
    results = summary.report["targets"]  # the report (also has badref, which never planned)
    assert set(results) == set(diag.targets)
    for t, verdict in diag.targets.items():
        status = {"run": "reference", "skip": "skipped", "fail": "error"}[verdict.verdict]
        assert results[t]["status"] == status and results[t]["reason"].endswith(verdict.reason), t
    assert {t for t in PROJECT if t not in firsts} - {"badref"} == {"ref"}


def test_require_and_runner_errors_are_one_line(project):
    cfg, targets = project
    m = load_matrix(cfg, targets_dir=targets)
    with pytest.raises(TargetUnavailable) as err:
        diagnose(m, "local", ["needs", "ref", "half"]).check_required()
    assert str(err.value) == (
        "--require needs cannot run here (local runner): skip: python module 'mm_no_such_module_0x5f' is not "
        "installed on this host (local runner); --require half cannot run here (local runner): FAIL: stage "
        "module targets/half/infer.py is missing, while the target has its other stages' code: restore it, "
        "or remove the stage from target.yaml"
    )
    assert err.value.exit_code == 3
    with pytest.raises(ConfigError, match=r"^--runner 'podman': expected auto, local or docker$"):
        diagnose(m, "podman")


def test_the_terminal_table_shows_every_row_and_no_markup(project, tmp_path):
    cfg, targets = project
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["dataset"] = str(tmp_path / "data[bold]x[/bold]")  # brackets are text, not markup
    cfg.write_text(yaml.safe_dump(raw))
    diag = diagnose(load_matrix(cfg, targets_dir=targets))
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(rich_table(diag))
    text = out.getvalue()
    assert "data[bold]x[/bold]" in text
    for row in diag.rows():
        assert row.result in text and row.what in text
    assert len(plain_lines(diag)) == len(diag.rows()) + 1
