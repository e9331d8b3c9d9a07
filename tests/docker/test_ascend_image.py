"""The Ascend image recipe built for real with the FAKE CANN toolkit (tests/fake_cann), and its stages run
in it through the Docker runner.

NOT the real toolkit and NOT the real base: Ubuntu's archive and python.org are not reachable from this
project's machines, so the recipe is built FROM the bootstrapped Debian base (modelmatrix/base:bookworm-
minbase) with MM_PYTHON=system (the base's python3 in a venv instead of Python 3.7.5 compiled from the
user's tarball) and MM_REQUIREMENTS=requirements-fake-toolkit.txt (numpy + ONNX Runtime for the fake).
The project tree is copied to a temporary folder whose targets/ascend/target.yaml declares the fake
installer's and fake benchmark's sha256 instead of Huawei's, and no Python tarball. Everything else is
the shipped recipe: the user files checked and streamed into the context, the toolkit installed with
--install --quiet, the guide's environment, the non-root user, versions.json from version.info.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from modelmatrix import images
from modelmatrix.config import load_matrix
from modelmatrix.errors import ConfigError, UserFileMissing
from modelmatrix.runners.base import StageRequest
from modelmatrix.runners.docker import DockerRunner

from mm_docker_support import CI_BASE, write_yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "fake_cann"))
from build_run import build_run  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from test_ascend import H, W, tiny_onnx  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("ascend_project")
    made = build_run(root / "downloads")
    shutil.copytree(REPO / "targets", root / "targets", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "images" / "ascend", root / "images" / "ascend")
    manifest = root / "targets" / "ascend" / "target.yaml"
    spec = yaml.safe_load(manifest.read_text())
    spec["image"]["files"] = [
        {**f, "sha256": made[f["name"]]["sha256"], "where": f"tests/fake_cann (FAKE {f['filename']})"}
        for f in spec["image"]["files"]
        if f["name"] != "python"
    ]
    manifest.write_text(yaml.safe_dump(spec, sort_keys=False))
    matrix = load_matrix(
        write_yaml(
            root / "matrix.yaml",
            {
                "workspace": str(root / "ws"),
                "model": {"input_size": [H, W]},
                "images": {"memory_limit": "2g", "bases": {"bookworm-minbase": {"suite": "bookworm", "tag": CI_BASE}}},
                "targets": {
                    "torch": {"enabled": False},
                    "ascend": {
                        "params": {"batch_sizes": [1, 4], "batch_size": 4},
                        "image": {
                            "base": CI_BASE,
                            "build_args": {"MM_PYTHON": "system", "MM_REQUIREMENTS": "requirements-fake-toolkit.txt"},
                        },
                    },
                },
            },
        ),
        targets_dir=root / "targets",
    )
    return {"root": root, "made": made, "matrix": matrix}


def test_missing_and_wrong_user_files_are_one_line_before_any_build(project):
    m, made = project["matrix"], project["made"]
    # not given: the image cannot be built here (the target is skipped, saying how to supply it)
    with pytest.raises(UserFileMissing) as exc:
        images.user_files(m, "ascend", {"toolkit": str(made["toolkit"]["path"])})
    msg = str(exc.value)
    assert (
        msg.startswith(
            "ascend: the build needs benchmark.x86_64 (targets/ascend/target.yaml image.files "
            f"benchmark, sha256 {made['benchmark']['sha256']}; get it from tests/fake_cann"
        )
        and "pass --file benchmark=PATH" in msg
        and "\n" not in msg
    )
    wrong = project["root"] / "wrong.run"
    wrong.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(
        ConfigError,
        match=rf"wrong.run: sha256 [0-9a-f]{{64}} is not the expected "
        rf"{made['toolkit']['sha256']} of Ascend-cann-toolkit_5.0.1_linux-x86_64.run",
    ):
        images.user_files(m, "ascend", {"toolkit": str(wrong), "benchmark": str(made["benchmark"]["path"])})
    with pytest.raises(ConfigError, match="--file tookit=...: targets/ascend/target.yaml declares no such file"):
        images.user_files(m, "ascend", {"tookit": "x"})
    # hashed once: a second check reads nothing (persisted cache keyed by path, size, mtime)
    given = {"toolkit": str(made["toolkit"]["path"]), "benchmark": str(made["benchmark"]["path"])}
    assert len(images.user_files(m, "ascend", given)) == 2
    from modelmatrix.hashing import HashCache

    cache = HashCache(m.workspace / ".cache" / "user-files.json")
    assert cache.file(made["toolkit"]["path"]) == made["toolkit"]["sha256"] and cache.hashed == 0


def test_the_shipped_manifest_refuses_unrecorded_checksums(tmp_path):
    m = load_matrix(
        write_yaml(
            tmp_path / "matrix.yaml", {"workspace": str(tmp_path / "ws"), "targets": {"torch": {}, "ascend": {}}}
        )
    )
    f = tmp_path / "Ascend-cann-toolkit_5.0.1_linux-x86_64.run"
    f.write_bytes(b"x")
    with pytest.raises(
        ConfigError, match="image.files toolkit: no sha256 recorded for Ascend-cann-toolkit_5.0.1_linux-x86_64.run"
    ):
        images.user_files(m, "ascend", {"toolkit": str(f), "benchmark": str(f), "python": str(f)})


@pytest.fixture(scope="module")
def ascend_image(project, docker_engine, ci_base):
    made = project["made"]
    return images.build(
        project["matrix"],
        "ascend",
        engine=docker_engine,
        files={"toolkit": str(made["toolkit"]["path"]), "benchmark": str(made["benchmark"]["path"])},
    )


def test_the_recipe_builds_with_the_fake_toolkit(ascend_image, docker_engine):
    v = ascend_image["versions"]
    assert v["cann"] == "5.0.1" and v["toolkit_test_double"] == "true" and v["soc_version"] == "Ascend310", v
    img = docker_engine.image(ascend_image["tag"])
    cfg = img["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert cfg["User"] == "mm" and cfg["WorkingDir"] == "/opt/modelmatrix"
    assert env["install_path"] == "/usr/local/Ascend/ascend-toolkit/latest"
    assert env["ASCEND_OPP_PATH"] == "/usr/local/Ascend/ascend-toolkit/latest/opp"
    assert "/usr/local/Ascend/ascend-toolkit/latest/atc/bin" in env["PATH"].split(":")
    assert env["PYTHONPATH"] == "/usr/local/Ascend/ascend-toolkit/latest/atc/python/site-packages"
    assert cfg["Labels"]["io.modelmatrix.ascend.python"] == "system"
    assert "Ascend-cann-toolkit_5.0.1_linux-x86_64.run=sha256:" in cfg["Labels"]["io.modelmatrix.user-files"]


def test_convert_runs_in_the_image_and_infer_is_skipped_without_an_npu(project, ascend_image, docker_engine):
    """convert through the Docker runner (atc needs no NPU); infer's per-stage requires skip it on this host;
    then infer's container, run with the same runner code minus the device check, reads the fake's dumpOutput."""
    from modelmatrix import data

    m = project["matrix"]
    ws = m.workspace
    ds = project["root"] / "ds"
    data.make_synthetic(ds, identities=4, cameras=2, gallery_per_camera=1, junk=1, distractors=1)
    data.prepare(ds, ws / "prepare", m.contract(), (H, W))
    (ws / "export").mkdir(parents=True)
    tiny_onnx(ws / "export" / "model.onnx")
    runner = DockerRunner(m, engine=docker_engine)
    tdef = m.targets["ascend"]
    assert runner.unavailable_reason(tdef) is None
    assert runner.stage_unavailable_reason(tdef, "convert") is None
    reason = runner.stage_unavailable_reason(tdef, "infer")
    assert reason == "ascend needs ascend-npu (requires.devices): no /dev/davinci* on this host"
    (ws / "conv").mkdir()
    params = m.target_cfg("ascend")["params"]
    runner.run(
        StageRequest(
            tdef,
            "convert",
            ws,
            {"onnx": "export/model.onnx"},
            "conv",
            {k: params[k] for k in tdef.stages["convert"].params},
            timeout_s=300,
        )
    )
    side = json.loads((ws / "conv" / "om" / "model_bs4.om.json").read_text())
    assert side["toolkit_test_double"] is True and side["command"][:2] == [
        "/usr/local/Ascend/ascend-toolkit/latest/atc/bin/atc",
        "--framework=5",
    ]
    assert (ws / "conv" / "logs" / "atc_bs4.log").read_text().count("ATC run success") == 1
    (ws / "inf").mkdir()
    req = StageRequest(
        tdef,
        "infer",
        ws,
        {"om": "conv/om", "bins": "prepare/ascend", "index": "prepare/index.json"},
        "inf",
        {"batch_size": 4, "device_id": 0, "chips_per_card": 4},
        timeout_s=300,
    )
    req.write_spec("/workspace")
    from modelmatrix.runners.base import LogTail

    container = runner.container_for(StageRequest(tdef, "convert", ws, req.inputs, "inf", req.params))
    tail = LogTail("ascend.infer")
    container.command[-1] = "/workspace/inf/spec.json"
    container.command[-2] = "targets.ascend.infer"
    with container:
        rc = container.run(tail, 300)
    assert rc == 0, tail.text()
    feats = np.load(ws / "inf" / "features.npy")
    result = json.loads((ws / "inf" / "result.json").read_text())
    assert feats.shape == (len(json.loads((ws / "prepare" / "index.json").read_text())["items"]), 8)
    assert result["test_double"] is True and result["images_per_second"] > 0
    assert (ws / "inf" / "prep_bin.info").read_text().split("\n")[0].split()[1].startswith("/workspace/prepare/ascend/")
