"""The matrix tells the truth (issue 8) and speaks with one voice (issue 14), on real runs.

A throwaway project holds the real torch and onnxruntime targets (linked) beside small targets
that misbehave in one way each - real stage code run by the real local runner, not mocks:

- ``omits``    its infer stage finishes without the features.npy its manifest declares
- ``badref``   its manifest reads an output its producer does not declare (does not plan)
- ``halfcode`` declares convert + infer but only has infer.py
- ``nanfeat``  writes features that are all NaN, with only the retrieval check enabled
- ``slow``     sleeps past the stage timeout
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml

from modelmatrix import data
from modelmatrix.config import load_matrix
from modelmatrix.errors import ModelMatrixError
from modelmatrix.pipeline import CACHED, DONE, FAILED, SKIPPED, run_matrix

from mm_testing import REPO, run_invoke, write_matrix

FEATURES = """
    import numpy as np
    from targets.common.contract import main, save_npy

    def run(spec):
        n = np.load(spec.input("inputs"), mmap_mode="r").shape[0]
        {body}
        return {{}}

    if __name__ == "__main__":
        main(run)
"""

FAULTS = {
    "omits": (
        {"infer": {"inputs": {"inputs": "prepare/inputs.npy"}, "outputs": ["features.npy"]}},
        {"infer.py": FEATURES.format(body="pass  # writes nothing")},
    ),
    "badref": (
        {
            "infer": {
                "inputs": {"inputs": "prepare/inputs.npy", "engine": "torch.export/model.engine"},
                "outputs": ["features.npy"],
            }
        },
        {"infer.py": FEATURES.format(body="pass")},
    ),
    "halfcode": (
        {
            "convert": {"inputs": {"onnx": "torch.export/model.onnx"}, "outputs": ["x.bin"]},
            "infer": {"inputs": {"inputs": "prepare/inputs.npy"}, "outputs": ["features.npy"]},
        },
        {"infer.py": FEATURES.format(body="save_npy(spec.output('features.npy'), np.zeros((n, 2048), 'f4'))")},
    ),
    "nanfeat": (
        {"infer": {"inputs": {"inputs": "prepare/inputs.npy"}, "outputs": ["features.npy"]}},
        {"infer.py": FEATURES.format(body="save_npy(spec.output('features.npy'), np.full((n, 2048), np.nan, 'f4'))")},
    ),
    "slow": (
        {"infer": {"inputs": {"inputs": "prepare/inputs.npy"}, "outputs": ["features.npy"]}},
        {"infer.py": FEATURES.format(body="import time; time.sleep(60)")},
    ),
}


def _project(root: Path) -> Path:
    targets = root / "targets"
    targets.mkdir(parents=True)
    shutil.copy(REPO / "targets" / "__init__.py", targets / "__init__.py")
    for name in ("common", "torch", "onnxruntime", "caffe", "ascend", "tensorrt"):
        (targets / name).symlink_to(REPO / "targets" / name)
    for name, (stages, files) in FAULTS.items():
        folder = targets / name
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / "target.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "summary": f"test target that misbehaves: {name}",
                    "requires": {"modules": ["numpy"]},
                    "stages": stages,
                }
            )
        )
        for fname, code in files.items():
            (folder / fname).write_text(textwrap.dedent(code))
    return targets


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(tmp, targets_dir, matrix.yaml path) with torch + onnxruntime already built once."""
    tmp = tmp_path_factory.mktemp("truth")
    targets_dir = _project(tmp / "project")
    cfg = write_matrix(tmp)
    m = load_matrix(cfg, targets_dir=targets_dir)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    first = run_matrix(m, "local", ci=False)
    assert first.passed, first.report["reason"]
    return tmp, targets_dir, cfg


def _variant(project, name: str, targets: dict | None = None, **top) -> tuple[Path, Path]:
    tmp, targets_dir, cfg = project
    raw = yaml.safe_load(cfg.read_text())
    if targets:
        raw["targets"].update(targets)
    raw.update(top)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, targets_dir


def _run(project, name: str, targets: dict | None = None, ci: bool = False, require=(), **top):
    path, targets_dir = _variant(project, name, targets, **top)
    return run_matrix(load_matrix(path, targets_dir=targets_dir), "local", ci=ci, require=require)


# ============================================================================ one broken target fails alone


def test_each_broken_target_fails_alone_and_the_rest_still_runs(project):
    s = _run(project, "broken", {"omits": {}, "badref": {}, "halfcode": {}})
    o = s.outcomes
    assert o["omits.infer"].status == FAILED
    assert "without its declared output features.npy" in o["omits.infer"].reason
    assert "badref.infer" not in o  # did not plan: failed as a target
    assert o["halfcode.infer"].status == FAILED and o["halfcode.convert"].status == FAILED
    assert "targets/halfcode/convert.py is missing" in o["halfcode.convert"].reason
    assert o["onnxruntime.infer"].ok and o["verify"].ok  # the others ran, verify ran
    t = s.report["targets"]
    assert t["onnxruntime"]["status"] == "passed"
    assert {t[n]["status"] for n in ("omits", "badref", "halfcode")} == {"error"}
    assert "torch.export has no output 'model.engine'" in t["badref"]["reason"]
    assert s.exit_code in (2, 3) and not s.passed
    for name in ("report.json", "report.md", "junit.xml"):
        assert (s.workspace / name).is_file()
    ET.parse(s.workspace / "junit.xml")


def test_a_timed_out_stage_is_named_as_the_cause(project):
    s = _run(project, "slow", {"slow": {}}, stage_timeout_s=3)
    assert s.outcomes["slow.infer"].status == FAILED and s.outcomes["slow.infer"].kind == "timed out"
    assert s.exit_code == 3
    assert "slow.infer timed out" in s.report["cause"]
    assert s.report["targets"]["onnxruntime"]["status"] == "passed"


# ============================================================================ skipped is never passed


def test_required_and_ci_make_a_skip_fail_and_allow_skip_says_why(project):
    # caffe cannot run on this host with the local runner (no pycaffe): it is skipped.
    plain = _run(project, "skip", {"caffe": {}})
    assert plain.outcomes["caffe.convert"].status == SKIPPED
    assert plain.passed and plain.exit_code == 0
    assert plain.report["targets"]["caffe"]["status"] == "skipped"

    for s in (
        _run(project, "skip", {"caffe": {}}, ci=True),
        _run(project, "skip", {"caffe": {}}, require=["caffe"]),
        _run(project, "skip", {"caffe": {"required": True}}),
    ):
        assert not s.passed and s.exit_code == 3
        assert s.report["targets"]["caffe"]["status"] == "error"
        assert "caffe" in s.report["cause"] and "required" in s.report["cause"]
        assert s.report["counts"]["error"] == 1 and s.report["counts"]["passed"] == 1

    allowed = _run(project, "skip", {"caffe": {"allow_skip": "no pycaffe on developer machines"}}, ci=True)
    assert allowed.passed and allowed.exit_code == 0
    assert allowed.report["targets"]["caffe"]["allowed"] == "no pycaffe on developer machines"
    assert "no pycaffe on developer machines" in (allowed.workspace / "report.md").read_text()


def test_shipped_matrix_allows_only_tensorrt_and_ascend_to_skip():
    m = load_matrix(REPO / "matrix.yaml")
    allowed = {t for t in m.raw["targets"] if m.target_cfg(t).get("allow_skip")}
    assert allowed == {"tensorrt", "ascend"}
    assert all(len(m.target_cfg(t)["allow_skip"]) > 20 for t in allowed)  # a reason, not a flag


# ============================================================================ non-finite features


def test_nan_features_fail_every_enabled_check_even_retrieval_only(project):
    s = _run(project, "nan", {"nanfeat": {"tolerance": {"checks": ["retrieval"]}}})
    r = s.report["targets"]["nanfeat"]
    assert r["status"] == "failed" and r["failed_checks"] == ["retrieval"]
    assert "not finite" in r["reason"] and "first: row 0" in r["reason"]
    assert s.exit_code == 1


# ============================================================================ the store never serves damage


@pytest.mark.parametrize(
    "node,name", [("onnxruntime.infer", "features.npy"), ("torch.export", "model.onnx"), ("prepare", "inputs.npy")]
)
def test_a_damaged_stored_output_is_rebuilt_and_said(project, node, name):
    tmp, targets_dir, cfg = project
    m = load_matrix(cfg, targets_dir=targets_dir)
    before = run_matrix(m, "local", ci=False)
    assert before.passed
    stored = before.outcomes[node].dir / name
    stored.write_bytes(stored.read_bytes()[:100])  # truncated: size and mtime change
    s = run_matrix(load_matrix(cfg, targets_dir=targets_dir), "local", ci=False)
    assert s.outcomes[node].status == DONE and "no longer matches" in s.outcomes[node].rebuilt
    assert s.passed
    again = run_matrix(load_matrix(cfg, targets_dir=targets_dir), "local", ci=False)
    assert again.outcomes[node].status == CACHED and not again.did_work


# ============================================================================ keys


def test_verify_key_covers_every_host_module():
    from modelmatrix import plan

    hashed = {
        f.relative_to(REPO).as_posix()
        for d in plan.HOST_CODE_DIRS
        for f in __import__("modelmatrix.hashing").hashing.iter_files(REPO / d)
    }
    for module in (REPO / "modelmatrix").rglob("*.py"):
        if "__pycache__" not in module.parts:
            assert module.relative_to(REPO).as_posix() in hashed


# ============================================================================ reports cannot mislead


def test_a_run_that_stops_before_verify_removes_the_old_reports(project):
    tmp, targets_dir, cfg = project
    ok = run_matrix(load_matrix(cfg, targets_dir=targets_dir), "local", ci=False)
    assert (ok.workspace / "junit.xml").is_file()
    path, _ = _variant(project, "nodata")
    raw = yaml.safe_load(path.read_text())
    raw["data"]["dataset"] = str(tmp / "no-such-dataset")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelMatrixError):
        run_matrix(load_matrix(path, targets_dir=targets_dir), "local", ci=False)
    for name in ("report.json", "report.md", "junit.xml"):
        assert not (ok.workspace / name).exists()


def test_junit_stays_well_formed_with_control_characters_in_file_names():
    from modelmatrix import report, verify

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 8))
    items = [
        {"file": f"query/000{i}_c1s1_\x1b[31m\x07_{i}.jpg", "pid": i % 2, "camid": 0, "split": "query"}
        for i in range(2)
    ] + [
        {"file": f"bounding_box_test/000{i}_c2s1_\x0c_{i}.jpg", "pid": i % 2, "camid": 1, "split": "gallery"}
        for i in range(2)
    ]
    bad = ref.copy()
    bad[0, 0] += 1.0
    rep = verify.verify_all(
        {"torch": ref, "t": bad},
        "torch",
        {"t": {"atol": 1e-3, "rtol": 1e-3}},
        {"items": items},
        skipped={"x": "no \x1b device"},
    )
    text = report.to_junit(rep)
    root = ET.fromstring(text.encode())  # parses: no raw control characters
    assert root.get("failures") == "1"
    assert "\\x1b" in text and "\x1b" not in text


# ============================================================================ workspace writers take the lock


def test_every_workspace_writer_takes_the_lock(tmp_path):
    cfg = write_matrix(tmp_path)
    m = load_matrix(cfg)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    (m.workspace / "stages").mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from modelmatrix.workspace import Workspace
        with Workspace({str(m.workspace)!r}).lock():
            print("locked", flush=True)
            time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["matrix"], ["clean", "--workspace"], ["data", "--synthetic", "--force"]):
            r = run_invoke([*args, "--config", str(cfg)])
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert "another modelmatrix run holds this workspace" in r.stderr
        assert (m.workspace / "stages").is_dir()  # nothing was removed
    finally:
        holder.kill()
        holder.wait()
    r = run_invoke(["clean", "--workspace", "--config", str(cfg)])
    assert r.returncode == 0 and "removed" in r.stdout and "stages" in r.stdout, r.stdout
    assert not (m.workspace / "stages").exists()


# ============================================================================ one voice, exit codes


def _whole_pickle(tmp_path: Path) -> Path:
    path = tmp_path / "whole.pth"
    subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import torch
        class Baseline(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(2, 2)
        torch.save(Baseline(), {str(path)!r})
        """),
        ],
        check=True,
    )
    return path


def test_exit_codes_mean_one_thing_each(project, tmp_path):
    tmp, targets_dir, cfg = project
    # 0: every enabled check passed (the real targets, the real CLI)
    good = write_matrix(tmp_path / "good", workspace=str(tmp / "ws"), data__dataset=str(tmp / "data"))
    r = run_invoke(["matrix", "--config", str(good)])
    assert r.returncode == 0, r.stdout + r.stderr
    # 1: a check failed (a cosine floor no fp32 backend can meet on these features)
    strict = write_matrix(
        tmp_path / "strict",
        workspace=str(tmp / "ws"),
        data__dataset=str(tmp / "data"),
        targets={
            "torch": {"params": {"batch_size": 8}},
            "onnxruntime": {"params": {"batch_size": 8}, "tolerance": {"atol": 1e-9, "rtol": 1e-9}},
        },
    )
    r = run_invoke(["matrix", "--config", str(strict)])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "a check failed" in r.stdout.splitlines()[-2]
    # 2: bad configuration
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  torch: {tolerance: {rtol: x}}\n")
    r = run_invoke(["matrix", "--config", str(bad)])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "rtol" in r.stderr
    # 3: a required target could not run
    r = run_invoke(["matrix", "--config", str(good), "--require", "onnxruntime"])
    assert r.returncode == 0, r.stdout + r.stderr
    caffe = write_matrix(
        tmp_path / "caffe",
        workspace=str(tmp / "ws"),
        data__dataset=str(tmp / "data"),
        targets={"torch": {"params": {"batch_size": 8}}, "caffe": {}},
    )
    r = run_invoke(["matrix", "--config", str(caffe), "--require", "caffe"])
    assert r.returncode == 3, r.stdout + r.stderr
    assert "required" in r.stdout.splitlines()[-2]


def test_a_whole_pickled_checkpoint_is_said_at_most_twice_and_exits_2(project, tmp_path):
    tmp, _, _ = project
    ckpt = _whole_pickle(tmp_path)
    cfg = write_matrix(tmp_path, model__checkpoint=str(ckpt), data__dataset=str(tmp / "data"))
    r = run_invoke(["matrix", "--config", str(cfg)])
    assert r.returncode == 2, r.stdout + r.stderr
    out = (r.stdout + r.stderr).splitlines()
    carrying = [ln for ln in out if "whole pickled model" in ln]
    assert 1 <= len(carrying) <= 2, "\n".join(out)
    assert not any("torch.export: torch.export" in ln for ln in out)
    report = (tmp_path / "ws" / "report.md").read_text()
    assert report.count("whole pickled model") == 1
    assert "None" not in report


def test_ctrl_c_says_interrupted_exits_130_and_leaves_a_trustworthy_workspace(tmp_path):
    cfg = write_matrix(tmp_path, model__seed=11)
    m = load_matrix(cfg)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "matrix", "--config", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        # a terminal's Ctrl-C: a parent started in the background (`cmd &` without job control)
        # hands SIGINT down ignored, and Python then keeps it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((m.workspace / "stages").glob("torch.export/.tmp-*")):
        time.sleep(0.2)
    assert list((m.workspace / "stages").glob("torch.export/.tmp-*")), "the export never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in err
    assert not list((m.workspace / "stages").glob("*/.tmp-*"))
    assert not (m.workspace / "report.json").exists()


# ============================================================================ workspace faults, one line each


def _mount_or_skip(cmd: list[str]) -> None:
    """Tests of full and read-only file systems mount real ones (root: as in CI)."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and `{' '.join(cmd)}` failed: {r.stderr.strip()}")
        pytest.skip(f"cannot mount here ({r.stderr.strip()}); CI runs this as root")


def test_a_workspace_that_is_a_file_or_read_only_is_one_line(tmp_path):
    as_file = tmp_path / "file-ws"
    as_file.write_text("not a folder")
    cfg = write_matrix(tmp_path / "a", workspace=str(as_file))
    r = run_invoke(["matrix", "--config", str(cfg)])
    assert r.returncode == 2 and "is not a folder" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    ro = tmp_path / "ro-ws"
    (ro / "stages").mkdir(parents=True)
    _mount_or_skip(["mount", "--bind", str(ro), str(ro)])
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        cfg = write_matrix(tmp_path / "b", workspace=str(ro))
        r = run_invoke(["matrix", "--config", str(cfg)])
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "cannot take the workspace lock" in r.stderr and str(ro) in r.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_no_op_run_on_a_full_disk_passes_and_a_stage_on_it_fails_in_one_line(project, tmp_path):
    tmp, targets_dir, cfg = project
    mnt = tmp_path / "small"
    mnt.mkdir()
    _mount_or_skip(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mnt)])
    try:
        shutil.copytree(tmp / "data", mnt / "data")
        small = write_matrix(mnt, data__dataset=str(mnt / "data"))
        assert run_invoke(["matrix", "--config", str(small)]).returncode == 0
        filler = mnt / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=400"], capture_output=True)
        r = run_invoke(["matrix", "--config", str(small)])
        assert r.returncode == 0, r.stdout + r.stderr  # nothing re-written
        assert "nothing to do" in r.stderr
        raw = yaml.safe_load(small.read_text())
        raw["model"]["seed"] = 5  # a new export must be written
        small.write_text(yaml.safe_dump(raw))
        r = run_invoke(["matrix", "--config", str(small)])
        assert r.returncode == 2, r.stdout + r.stderr
        assert "Traceback" not in r.stdout + r.stderr
        assert "no space left" in r.stdout + r.stderr
        assert not list((mnt / "ws" / "stages").glob("*/.tmp-*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_bare_namespace_folder_is_not_a_toolchain(tmp_path, monkeypatch):
    """tensorrt-stubs leaves a site-packages/tensorrt/ folder without __init__: `import tensorrt`
    then "works" as an empty namespace package. The local runner must not take it for TensorRT."""
    from modelmatrix.runners.local import missing_requirements

    (tmp_path / "fake_toolchain_ns").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fake_toolchain_ns" in missing_requirements({"modules": ["fake_toolchain_ns"]})
    assert missing_requirements({"modules": ["numpy", "json"]}) is None


# ============================================================================ the hash cache persists


def test_the_hash_cache_is_persisted_and_a_no_op_reads_no_dataset_file(project):
    """run_matrix saves the one hash cache the run used (once it saved a second, empty instance,
    so every run re-read the whole dataset and checkpoint)."""
    import json as _json

    from modelmatrix.hashing import HashCache

    tmp, targets_dir, cfg = project
    s = run_matrix(load_matrix(cfg, targets_dir=targets_dir), "local", ci=False)
    cache = s.workspace / ".cache" / "hashes.json"
    text = cache.read_text()
    dataset = str((tmp / "data").resolve())
    assert dataset in text, "the dataset's digests are not in the persisted cache"
    before = cache.stat().st_mtime_ns
    again = run_matrix(load_matrix(cfg, targets_dir=targets_dir), "local", ci=False)
    assert not again.did_work
    assert cache.stat().st_mtime_ns == before  # nothing re-hashed, nothing re-written
    assert _json.loads(cache.read_text()) is not None and isinstance(HashCache(cache), HashCache)


# ============================================================================ reports show only what applies


def test_reports_name_the_checkpoint_by_sha256_and_give_the_reference_no_tolerance(project, tmp_path):
    import hashlib

    tmp, targets_dir, cfg = project
    first = run_matrix(load_matrix(cfg, targets_dir=targets_dir), "local", ci=False)
    weights = first.outcomes["torch.export"].dir / "weights.pt"  # a plain state dict
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(weights.read_bytes())
    path, _ = _variant(project, "ckpt")
    raw = yaml.safe_load(path.read_text())
    raw["model"]["checkpoint"] = str(ckpt)
    raw["workspace"] = str(tmp_path / "ws")
    path.write_text(yaml.safe_dump(raw))
    s = run_matrix(load_matrix(path, targets_dir=targets_dir), "local", ci=False)
    assert s.passed, s.report["reason"]
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert s.report["model"]["checkpoint_sha256"] == sha and s.report["model"]["random_weights"] is False
    md = (s.workspace / "report.md").read_text()
    assert sha in md and "None" not in md and "Random weights" not in md
    torch_section = md.split("### torch")[1].split("###")[0]
    assert "tolerance" not in torch_section  # the reference is not checked
    assert "tolerance" not in s.report["targets"]["torch"]
    # random weights: said as such, with the seed, and no None either
    md0 = (first.workspace / "report.md").read_text()
    assert "random weights, seed 0" in md0 and "None" not in md0


# ============================================================================ dry run


def _tree_state(root: Path) -> dict[str, int]:
    return {str(p): p.lstat().st_mtime_ns for p in root.rglob("*")}


def test_dry_run_predicts_runs_nothing_and_lists_vendor_commands(project):
    tmp, targets_dir, cfg = project
    assert run_matrix(load_matrix(cfg, targets_dir=targets_dir), "local", ci=False).passed
    path, _ = _variant(project, "dry", {"ascend": {}, "tensorrt": {}})
    m = load_matrix(path, targets_dir=targets_dir)
    before = _tree_state(m.workspace)
    from modelmatrix.pipeline import dry_run

    lines = {d.node: d for d in dry_run(m, "local", ci=False)}
    assert _tree_state(m.workspace) == before  # nothing written, not even the cache
    for node in ("prepare", "torch.export", "torch.infer", "onnxruntime.infer"):
        assert lines[node].status == "up to date", (node, lines[node])
    assert lines["verify"].status == "would run"  # the tolerances' set of targets changed
    atc = [c for c in lines["ascend.convert"].commands]
    assert lines["ascend.convert"].status == "skipped" and len(atc) == 2  # the guide's bs1 and bs16
    for batch, cmd in zip((1, 16), atc, strict=True):
        assert cmd[0] == "atc" and "--framework=5" in cmd and f"--input_shape=image:{batch},3,64,32" in cmd
    assert lines["tensorrt.convert"].commands[0][0] == "trtexec"
    # a new export: it and everything after it would run; nothing before it
    raw = yaml.safe_load(path.read_text())
    raw["model"]["seed"] = 123
    path.write_text(yaml.safe_dump(raw))
    lines = {d.node: d for d in dry_run(load_matrix(path, targets_dir=targets_dir), "local", ci=False)}
    assert lines["prepare"].status == "up to date"
    assert lines["torch.export"].status == "would run" and lines["onnxruntime.infer"].status == "would run"
    assert _tree_state(m.workspace) == before


def test_a_target_that_uses_another_targets_image_is_keyed_on_that_targets_code_too():
    from modelmatrix import plan
    from modelmatrix.config import discover_targets

    known = discover_targets()
    int8 = known["onnxruntime_int8"]
    assert int8.image.get("use") == "onnxruntime"
    node = plan.Node("onnxruntime_int8.infer", "onnxruntime_int8", "infer")
    plan._code_cache.clear()
    before = plan.code_hash(node, int8.folder)
    plan._code_cache.clear()
    # the same hash as a manual one over both folders proves the used folder is in it
    import hashlib

    h = hashlib.sha256()
    common = REPO / "targets"
    from modelmatrix.hashing import iter_files

    files = [
        (f"targets/{f.relative_to(common).as_posix()}", f)
        for f in [common / "__init__.py", *iter_files(common / "common")]
    ]
    files += [(f"target/{f.relative_to(int8.folder).as_posix()}", f) for f in iter_files(int8.folder)]
    other = common / "onnxruntime"
    files += [(f"uses/onnxruntime/{f.relative_to(other).as_posix()}", f) for f in iter_files(other)]
    for name, f in files:
        h.update(name.encode() + b"\0" + f.read_bytes())
    assert before == h.hexdigest()
