"""invoke matrix across machines: ci-plan, per-target jobs in separate workspaces, export-results,
verify --from, the GitHub Actions workflow that does it (checked offline), and the progress lines
of long stages (the stage contract's ``::progress``, relayed to the live line, never the log)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from modelmatrix import REPO_ROOT
from modelmatrix.config import load_matrix
from modelmatrix.pipeline import StageProgress, run_matrix

from mm_testing import REPO, run_invoke, write_matrix

WORKFLOW = REPO / ".github" / "workflows" / "matrix.yml"
TRT_SKIP = "no GPU on this test machine"
TARGETS = {
    "torch": {"params": {"batch_size": 8}},
    "onnxruntime": {"params": {"batch_size": 8}},
    "tensorrt": {"allow_skip": TRT_SKIP},
}


def _config(root: Path, **extra) -> Path:
    """One matrix.yaml (its own workspace) over a shared dataset folder."""
    return write_matrix(root, targets=TARGETS, data__dataset=str(root.parent / "data"), **extra)


def _invoke_bg(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "invoke", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def _finish(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str]]:
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[name] = (p.returncode, stdout + stderr)
    return out


@pytest.fixture(scope="module")
def fanned(tmp_path_factory):
    """Three per-target jobs (torch, onnxruntime, tensorrt: skipped here) in separate workspaces,
    each exported, plus one `invoke matrix` over the same targets; a job of another model seed."""
    root = tmp_path_factory.mktemp("fanout")
    single = _config(root / "single")
    r = run_invoke(["data", "--synthetic", "--config", str(single)])
    assert r.returncode == 0, r.stderr
    jobs = {t: _config(root / f"job-{t}") for t in ("torch", "onnxruntime", "tensorrt")}
    other_seed = _config(root / "job-seed1", model__seed=1)
    procs = {t: _invoke_bg(["matrix", "--target", t, "--config", str(cfg)]) for t, cfg in jobs.items()}
    procs["single"] = _invoke_bg(["matrix", "--config", str(single)])
    procs["seed1"] = _invoke_bg(["matrix", "--target", "onnxruntime", "--config", str(other_seed)])
    results = _finish(procs)
    # a job's exit code is its own view (torch alone compares nothing: 3; tensorrt named but skipped: 3)
    assert results["single"][0] == 0, results["single"][1]
    assert results["onnxruntime"][0] == 0 and results["seed1"][0] == 0, results
    assert results["torch"][0] == 3 and results["tensorrt"][0] == 3, results
    exports = {}
    for t, cfg in [*jobs.items(), ("seed1", other_seed)]:
        target = "onnxruntime" if t == "seed1" else t
        out = root / "exports" / t
        r = run_invoke(["export-results", "--target", target, "--out", str(out), "--config", str(cfg)])
        assert r.returncode == 0, r.stdout + r.stderr
        exports[t] = out
    return {"root": root, "single": single, "jobs": jobs, "exports": exports}


def test_ci_plan_labels_and_stages(tmp_path):
    cfg = write_matrix(tmp_path, targets={**TARGETS, "caffe": {}, "ascend": {"allow_skip": "no card"}})
    r = run_invoke(["ci-plan", "--config", str(cfg)])
    assert r.returncode == 0, r.stderr
    jobs = {j["target"]: j for j in json.loads(r.stdout)["include"]}
    assert set(jobs) == {"torch", "onnxruntime", "tensorrt", "caffe", "ascend"}
    assert {t: j["labels"] for t, j in jobs.items()} == {
        "torch": [],
        "onnxruntime": [],
        "caffe": [],
        "tensorrt": ["gpu"],
        "ascend": ["ascend"],
    }
    assert jobs["torch"]["runs_on"] == "ubuntu-latest"
    assert jobs["tensorrt"]["runs_on"] == ["self-hosted", "linux", "gpu"]
    assert jobs["ascend"]["runs_on"] == ["self-hosted", "linux", "ascend"]
    assert jobs["caffe"]["stages"] == [
        "prepare",
        "torch.export",
        "caffe.convert",
        "caffe.infer",
        "torch.infer",
        "verify",
    ]
    assert jobs["torch"]["stages"] == ["prepare", "torch.export", "torch.infer", "verify"]
    assert jobs["torch"]["reference"] is True and jobs["tensorrt"]["allow_skip"] == TRT_SKIP


def test_gathered_report_equals_one_matrix_run(fanned):
    ex = fanned["exports"]
    gather = _config(fanned["root"] / "gather")
    r = run_invoke(
        [
            "verify",
            "--config",
            str(gather),
            *[a for t in ("torch", "onnxruntime", "tensorrt") for a in ("--from", str(ex[t]))],
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ws = fanned["root"] / "gather" / "ws"
    gathered = json.loads((ws / "report.json").read_text())
    single = json.loads((fanned["root"] / "single" / "ws" / "report.json").read_text())
    info = gathered.pop("gathered")
    assert gathered == single  # same verdict, metrics, skip reasons, stages
    assert gathered["targets"]["onnxruntime"]["status"] == "passed"
    assert gathered["targets"]["tensorrt"]["status"] == "skipped"
    assert gathered["targets"]["tensorrt"]["allowed"] == TRT_SKIP
    assert [e["target"] for e in info["exports"]] == ["torch", "onnxruntime", "tensorrt"]
    assert set(info["digests"]) == {"prepare/inputs.npy", "prepare/index.json", "torch.export/model.onnx"}
    for name in ("report.md", "junit.xml", "report.html"):
        assert (ws / name).is_file()
    junit = (ws / "junit.xml").read_text()
    assert junit == (fanned["root"] / "single" / "ws" / "junit.xml").read_text()
    # again: verify is a stored stage like any other
    again = run_invoke(
        [
            "verify",
            "--config",
            str(gather),
            *[a for t in ("torch", "onnxruntime", "tensorrt") for a in ("--from", str(ex[t]))],
        ]
    )
    assert again.returncode == 0 and "up to date verify" in again.stderr, again.stderr


def test_export_carries_what_the_report_needs_only(fanned):
    out = fanned["exports"]["onnxruntime"]
    manifest = json.loads((out / "manifest.json").read_text())
    files = set(manifest["files"])
    assert {
        "onnxruntime.infer/features.npy",
        "torch.infer/features.npy",
        "prepare/index.json",
        "torch.export/meta.json",
        "prepare/stamp.json",
        "onnxruntime.infer/result.json",
        "onnxruntime.infer/features.npy.provenance.json",  # the provenance travels with the artifact
        "torch.export/meta.json.provenance.json",
    } <= files
    assert not any(f.endswith(("model.onnx", "inputs.npy", "weights.pt")) for f in files)
    ws = fanned["root"] / "job-onnxruntime" / "ws"
    onnx_stamp = json.loads((ws / "targets" / "torch" / "export" / "stamp.json").read_text())
    assert manifest["digests"]["torch.export/model.onnx"] == onnx_stamp["outputs"]["model.onnx"]
    assert not list(out.parent.glob(".*tmp-*"))  # written beside, renamed into place


def test_mismatched_onnx_is_one_line_naming_both(fanned):
    ex = fanned["exports"]
    r = run_invoke(
        [
            "verify",
            "--config",
            str(_config(fanned["root"] / "gather-bad")),
            "--from",
            str(ex["torch"]),
            "--from",
            str(ex["seed1"]),
        ]
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(ex["torch"]) in lines[0] and str(ex["seed1"]) in lines[0]
    assert "not computed from the same ONNX" in lines[0] and "torch.export/model.onnx" in lines[0]
    assert not (fanned["root"] / "gather-bad" / "ws" / "report.json").exists()


def test_damaged_or_duplicate_exports_are_refused(fanned, tmp_path):
    ex = fanned["exports"]
    cfg = _config(tmp_path / "g")
    dup = run_invoke(
        ["verify", "--config", str(cfg), "--from", str(ex["onnxruntime"]), "--from", str(ex["onnxruntime"])]
    )
    assert dup.returncode == 2 and "are both exports of onnxruntime" in dup.stderr, dup.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(ex["onnxruntime"], damaged)
    feats = damaged / "onnxruntime.infer" / "features.npy"
    feats.write_bytes(feats.read_bytes()[:-8] + b"\0" * 8)
    r = run_invoke(["verify", "--config", str(cfg), "--from", str(damaged)])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {feats}: does not match the sha256 in manifest.json (damaged in transfer?); export it again"
    ]
    none = run_invoke(["verify", "--config", str(cfg), "--from", str(tmp_path)])
    assert none.returncode == 2 and "not an export (no manifest.json)" in none.stderr


def test_export_without_a_run_is_one_line(tmp_path):
    cfg = write_matrix(tmp_path)
    r = run_invoke(["export-results", "--target", "onnxruntime", "--out", str(tmp_path / "x"), "--config", str(cfg)])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'ws' / 'report.json'}: no report")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the workflow


def _jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("check-jsonschema")
    if not exe.exists():
        pytest.fail("check-jsonschema is not installed: pip install -e '.[dev]'", pytrace=False)
    return subprocess.run(
        [str(exe), "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_workflow_is_valid_and_gets_its_matrix_from_ci_plan(tmp_path):
    r = _jsonschema(WORKFLOW)
    assert r.returncode == 0, r.stdout + r.stderr
    wf = yaml.safe_load(WORKFLOW.read_text())
    jobs = wf["jobs"]
    assert "invoke ci-plan" in " ".join(s.get("run", "") for s in jobs["plan"]["steps"])
    target = jobs["target"]
    assert target["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.jobs) }}"
    assert target["runs-on"] == "${{ matrix.runs_on }}"
    runs = " ".join(s.get("run", "") for s in target["steps"])
    assert 'invoke matrix --target "$TARGET"' in runs and 'invoke export-results --target "$TARGET"' in runs
    gather = jobs["gather"]
    assert gather["needs"] == "target"
    assert "invoke verify" in " ".join(s.get("run", "") for s in gather["steps"])
    uses = [s.get("uses", "") for s in gather["steps"]]
    assert any(u.startswith("actions/upload-artifact@") for u in uses)  # the report
    assert any(u.startswith("mikepenz/action-junit-report@") for u in uses)  # the JUnit published
    # every matrix.<key> the workflow reads is a key ci-plan emits
    plan = run_invoke(["ci-plan", "--config", str(write_matrix(tmp_path, targets=TARGETS))])
    keys = set(json.loads(plan.stdout)["include"][0])
    import re

    used = set(re.findall(r"matrix\.([a-z_]+)", WORKFLOW.read_text()))
    assert used and used <= keys, used - keys
    # the check is real: a job without runs-on is refused
    head, sep, tail = WORKFLOW.read_text().partition("\n  gather:\n")
    assert "    runs-on: ubuntu-latest\n" in tail
    bad = tmp_path / "bad.yml"
    bad.write_text(head + sep + tail.replace("    runs-on: ubuntu-latest\n", "", 1))
    assert _jsonschema(bad).returncode != 0


def test_workflow_passes_zizmor_offline():
    exe = Path(sys.executable).with_name("zizmor")
    if not exe.exists() and shutil.which("zizmor") is None:
        pytest.skip("zizmor not installed (optional: pip install zizmor)")
    r = subprocess.run(
        [str(exe) if exe.exists() else "zizmor", "--offline", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- progress (stage contract -> live line)
STAGE = """
    import time
    from targets.common import contract
    from targets.common.contract import atomic_write_bytes, batched_timings, main

    contract.PROGRESS_INTERVAL_S = 0.0          # a line per batch, for the test

    def run(spec):
        print("starting the loop", flush=True)
        for start, stop in batched_timings(10, 4):
            time.sleep(0.05)
        print("loop done", flush=True)
        if spec.param("crash", False):
            raise RuntimeError("boom after the loop")
        atomic_write_bytes(spec.output("out.txt"), b"done")
        return {}

    if __name__ == "__main__":
        main(run)
    """


class Recorder(StageProgress):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, node_id: str) -> None:
        self.events.append(("start", node_id))

    def update(self, node_id: str, done: int, total: int) -> None:
        self.events.append(("update", node_id, done, total))

    def finish(self, node_id: str) -> None:
        self.events.append(("finish", node_id))


def _project(root: Path, crash: bool) -> Path:
    targets = root / "targets"
    shutil.copytree(REPO_ROOT / "targets" / "common", targets / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO_ROOT / "targets" / "__init__.py", targets / "__init__.py")
    (targets / "prog").mkdir()
    (targets / "prog" / "__init__.py").write_text("")
    (targets / "prog" / "work.py").write_text(textwrap.dedent(STAGE).lstrip())
    (targets / "prog" / "target.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "prog",
                "image": {"base": "none"},
                "params": {"crash": {"type": "bool", "default": False}},
                "stages": {"work": {"params": ["crash"], "outputs": ["out.txt"]}},
            }
        )
    )
    from modelmatrix import data

    data.make_synthetic(root / "data", identities=2, cameras=2, gallery_per_camera=1, junk=0, distractors=0)
    cfg = root / "matrix.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "workspace": str(root / "ws"),
                "runner": "local",
                "verify": {"reference": "prog"},
                "data": {"dataset": str(root / "data"), "ascend_bins": False},
                "model": {"input_size": [32, 16]},
                "targets": {"prog": {"params": {"crash": crash}}},
            }
        )
    )
    return cfg


def test_local_runner_relays_progress_not_into_the_log(tmp_path, caplog):
    m = load_matrix(_project(tmp_path, crash=False), targets_dir=tmp_path / "targets")
    shown = Recorder()
    with caplog.at_level(logging.DEBUG, logger="modelmatrix"):
        summary = run_matrix(m, "local", progress=shown, ci=False)
    assert summary.outcomes["prog.work"].ok
    updates = [e for e in shown.events if e[0] == "update"]
    assert updates == [("update", "prog.work", 4, 10), ("update", "prog.work", 8, 10), ("update", "prog.work", 10, 10)]
    assert shown.events.index(("start", "prog.work")) < shown.events.index(updates[0])
    assert shown.events.index(("finish", "prog.work")) > shown.events.index(updates[-1])
    stage_lines = [r.getMessage() for r in caplog.records if r.name == "modelmatrix.stage"]
    assert any("starting the loop" in ln for ln in stage_lines)  # -v still shows the stage's output
    assert not any("::progress" in ln for ln in stage_lines)


def test_failure_tail_has_no_progress_lines(tmp_path, caplog):
    m = load_matrix(_project(tmp_path, crash=True), targets_dir=tmp_path / "targets")
    shown = Recorder()
    with caplog.at_level(logging.INFO, logger="modelmatrix"):
        summary = run_matrix(m, "local", progress=shown, ci=False)
    o = summary.outcomes["prog.work"]
    assert o.status == "failed" and "boom after the loop" in o.reason
    assert [e[2:] for e in shown.events if e[0] == "update"] == [(4, 10), (8, 10), (10, 10)]
    assert "loop done" in o.log_tail and "::progress" not in o.log_tail
    saved = (tmp_path / "ws" / "stages" / "prog.work" / "last-failure.log").read_text()
    assert "loop done" in saved and "::progress" not in saved


def test_plain_progress_says_start_and_finish_only(tmp_path, caplog):
    m = load_matrix(_project(tmp_path, crash=False), targets_dir=tmp_path / "targets")
    with caplog.at_level(logging.INFO, logger="modelmatrix"):
        run_matrix(m, "local", ci=False)
    lines = [r.getMessage().split() for r in caplog.records if r.name == "modelmatrix.pipeline"]
    mine = [ln for ln in lines if "prog.work" in ln]
    assert [ln[:2] for ln in mine] == [["started", "prog.work"], ["built", "prog.work"]]
    assert not any("::progress" in " ".join(ln) or "10/10" in ln for ln in lines)
