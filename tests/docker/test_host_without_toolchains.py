"""The host needs no toolchain: `pip install modelmatrix` (no extras) runs the SHIPPED matrix.yaml
with `--runner docker`, torch, onnx and onnxruntime living only in the target images.

This is also the test that the shipped matrix.yaml passes as a fresh clone runs it (`invoke bases`,
`invoke build`, `invoke data --synthetic`, `invoke matrix --runner docker`): the shipped model
(reid-strong-baseline, 256x128, seeded random weights), the default synthetic set and the shipped
tolerances, on torch + onnxruntime + caffe in their images. It fails when a shipped threshold does
not hold for this machine's fp32 noise (benchmarks/fp32-retrieval-noise.md): a threshold the shipped
run cannot meet is a bug in matrix.yaml. Only `workspace` and `data.dataset` are moved (into tmp).

One venv per test session, made here with the test's own interpreter (``-m venv``), gets this
checkout installed WITHOUT extras: pip builds it from a copy in tmp (so no build/ folder lands in the
checkout) and resolves the base dependencies from the configured index / PIP_FIND_LINKS. The
interpreter's site-packages are not on the venv's path: only what `pip install modelmatrix` brings. The tasks
then run from the checkout (invoke puts tasks.py's folder first on sys.path) with that venv's
interpreter, so every third-party module they import comes from the bare venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from modelmatrix import REPO_ROOT

from mm_docker_support import write_yaml

TOOLCHAINS = ("torch", "onnx", "onnxruntime")
IN_IMAGES = ("torch", "onnxruntime", "caffe")  # the shipped runnable targets
COMPARED = ("onnxruntime", "caffe")  # checked against the reference, torch
PACKAGED = ("pyproject.toml", "README.md", "modelmatrix", "targets")


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return env


def _run(venv: Path, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        check=False,
        cwd=cwd,
        env=_env(venv),
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _tail(r: subprocess.CompletedProcess[str], n: int = 3000) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-n:]}\n--- stderr\n{r.stderr[-n:]}"


@pytest.fixture(scope="session")
def bare_venv(tmp_path_factory) -> Path:
    """A venv with this checkout installed without extras (built from a copy in tmp)."""
    root = tmp_path_factory.mktemp("bare")
    src = root / "src"
    src.mkdir()
    for name in PACKAGED:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copyfile(path, src / name)
    venv = root / "venv"
    # --without-pip (ensurepip costs ~10 s): the test interpreter's pip installs into it (--python);
    # --no-compile: byte-compiling numpy & co. would double the install time.
    r = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=False,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert r.returncode == 0, _tail(r)
    t0 = time.perf_counter()
    r = _run(
        venv,
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-compile",
            str(src),
        ],
        root,
        900,
    )
    assert r.returncode == 0, _tail(r)
    print(f"bare venv: pip install (no extras) took {time.perf_counter() - t0:.1f} s")
    return venv


def test_bare_install_has_no_toolchain_and_imports_every_host_module(bare_venv, tmp_path):
    probe = """
import importlib, json, pkgutil, sys
out = {"toolchains": {}}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        out["toolchains"][name] = "imported"
    except ImportError as exc:
        out["toolchains"][name] = type(exc).__name__
import modelmatrix
out["file"] = modelmatrix.__file__
out["modules"] = []
for info in pkgutil.walk_packages(modelmatrix.__path__, "modelmatrix."):
    importlib.import_module(info.name)
    out["modules"].append(info.name)
out["loaded_toolchains"] = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:])
print(json.dumps(out))
"""
    # cwd is tmp, not the checkout: `modelmatrix` must come from the venv's site-packages.
    r = _run(bare_venv, [str(bare_venv / "bin" / "python"), "-c", probe, *TOOLCHAINS], tmp_path, 300)
    assert r.returncode == 0, _tail(r)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["toolchains"] == {t: "ModuleNotFoundError" for t in TOOLCHAINS}, out["toolchains"]
    assert Path(out["file"]).is_relative_to(bare_venv), out["file"]
    assert {
        "modelmatrix.pipeline",
        "modelmatrix.runners.docker",
        "modelmatrix.runners.local",
        "modelmatrix.images",
        "modelmatrix.data",
        "modelmatrix.verify",
    } <= set(out["modules"])
    assert out["loaded_toolchains"] == []

    # The tasks load too (rich, invoke from the bare venv).
    r = _run(bare_venv, [str(bare_venv / "bin" / "python"), "-m", "invoke", "--list"], REPO_ROOT, 120)
    assert r.returncode == 0, _tail(r)
    assert "matrix" in r.stdout and "build" in r.stdout


def _shipped_copy(tmp_path: Path) -> tuple[dict, Path]:
    """The shipped matrix.yaml with workspace and data.dataset moved into tmp_path (absolute);
    nothing else changed."""
    shipped = yaml.safe_load((REPO_ROOT / "matrix.yaml").read_text())
    cfg = json.loads(json.dumps(shipped))
    cfg["workspace"] = str(tmp_path / "ws")
    cfg["data"]["dataset"] = str(tmp_path / "data" / "market1501-synthetic")
    assert {k: v for k, v in cfg.items() if k != "workspace"} == {
        k: v for k, v in shipped.items() if k != "workspace"
    } | {"data": cfg["data"]}
    assert {k: v for k, v in cfg["data"].items() if k != "dataset"} == {
        k: v for k, v in shipped["data"].items() if k != "dataset"
    }
    return shipped, write_yaml(tmp_path / "matrix.yaml", cfg)


def test_bare_install_runs_the_shipped_matrix_with_the_docker_runner(
    bare_venv, tmp_path, docker_engine, ci_base, bullseye_base
):
    tmp_path.chmod(0o755)  # keep the tree readable for the stage containers
    shipped, cfg = _shipped_copy(tmp_path)
    py = str(bare_venv / "bin" / "python")

    r = _run(bare_venv, [py, "-m", "invoke", "data", "--synthetic", "--config", str(cfg)], REPO_ROOT, 600)
    assert r.returncode == 0, _tail(r)
    r = _run(bare_venv, [py, "-m", "invoke", "matrix", "--runner", "docker", "--config", str(cfg)], REPO_ROOT, 1800)
    matrix_run = r

    ws = tmp_path / "ws"
    assert (ws / "report.json").is_file(), _tail(r)
    report = json.loads((ws / "report.json").read_text())
    assert report["runner"] == "docker"
    assert report["reference"] == "torch" and report["targets"]["torch"]["status"] == "reference"
    assert report["num_query"] > 0 and report["num_gallery"] > 0

    # Every stage of torch, onnxruntime and caffe ran in its target's image (the stamp's runner is
    # the image id, and that image is labelled with the target).
    ran: dict[str, set[str]] = {t: set() for t in IN_IMAGES}
    for stamp_path in (ws / "stages").glob("*/*/stamp.json"):
        stamp = json.loads(stamp_path.read_text())
        target = stamp["node"].split(".")[0]
        if target not in ran:
            continue
        assert stamp["runner"].startswith("docker:"), (stamp["node"], stamp["runner"])
        image = docker_engine.image(stamp["runner"][len("docker:") :])
        assert image, (stamp["node"], stamp["runner"])
        assert image["Config"]["Labels"]["io.modelmatrix.target"] == target, stamp["node"]
        ran[target].add(stamp["node"])
    assert all(ran.values()), ran

    # The report compares both against torch, with every check run, at the SHIPPED thresholds.
    for t in COMPARED:
        res = report["targets"][t]
        assert res["status"] in ("passed", "failed"), (t, res["status"], res.get("reason"))
        assert {c["name"] for c in res["checks"] if c["enabled"]} == {"allclose", "cosine", "retrieval"}, (
            t,
            res["checks"],
        )
        assert res["metrics"]["retrieval"]["num_query"] == report["num_query"]
        for key, value in shipped["targets"][t]["tolerance"].items():
            assert res["tolerance"][key] == value, (t, key)

    assert matrix_run.returncode == 0, (
        _tail(matrix_run)
        + "\n"
        + json.dumps(
            {t: [(c["name"], c["passed"], c["message"]) for c in report["targets"][t]["checks"]] for t in COMPARED}
        )
    )
    assert report["passed"] is True and report["exit_code"] == 0
    assert sorted(t for t, res in report["targets"].items() if res["status"] == "passed") == sorted(COMPARED)
    # tensorrt and ascend cannot run here: skipped with the shipped allowance, never passed
    for t in ("tensorrt", "ascend"):
        assert report["targets"][t]["status"] == "skipped"
        assert report["targets"][t]["allowed"] == shipped["targets"][t]["allow_skip"]
