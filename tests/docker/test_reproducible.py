"""Reproducible images, proven by rebuilding (issue 15): bases, layers, the shipped archive.

The cheap tests use a tiny recipe on the bookworm base (seconds); the proofs the README names
(`invoke bases --force` twice, `invoke verify-image --target onnxruntime` and `--target caffe`)
run the real thing: two debuerreotype runs, no-cache rebuilds of the real images."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelmatrix import REPO_ROOT, bases, images
from modelmatrix.config import load_matrix
from modelmatrix.errors import ConfigError

from mm_docker_support import BULLSEYE_BASE, CI_BASE, make_project, write_yaml

# A step that writes the build's own time into a file (and leaves the mtimes as they fall).
STAMPED = """
    ARG BASE_IMAGE
    FROM ${BASE_IMAGE}
    RUN mkdir -p /opt/modelmatrix && echo '{"tiny": "1"}' > /opt/modelmatrix/versions.json && \\
        date +%s.%N > /opt/modelmatrix/built-at
    """

# The same step, clamped to the epoch the build is given (images/README.md rule 9).
CLAMPED = """
    ARG BASE_IMAGE
    FROM ${BASE_IMAGE}
    ARG SOURCE_DATE_EPOCH
    RUN mkdir -p /opt/modelmatrix && echo '{"tiny": "1"}' > /opt/modelmatrix/versions.json && \\
        touch -h -d @${SOURCE_DATE_EPOCH} /opt/modelmatrix/versions.json /opt/modelmatrix /opt /
    """


def _invoke(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=3000,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"invoke {' '.join(args)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def _tiny(root, name, recipe, docker_engine):
    m = make_project(root / name, name, recipe, CI_BASE, stages={})
    return m, images.build(m, name)


def test_a_step_that_writes_the_build_time_is_named_by_verify_image(tmp_path, ci_base, docker_engine):
    m, row = _tiny(tmp_path, "stamped", STAMPED, docker_engine)
    try:
        r = images.verify_image(m, "stamped")
        assert not r["identical"] and r["diff_ids"][0] == r["rebuild_diff_ids"][0]  # the base layer agrees
        (diff,) = r["differences"]
        assert diff["layer"] == 1 and diff["current"] != diff["rebuild"]
        named = "\n".join(diff["paths"])
        assert "/opt/modelmatrix/built-at: content" in named, named
        assert r["archive_sha256"] != r["rebuild_archive_sha256"]
        assert not docker_engine.image(f"modelmatrix/stamped:verify-{row['recipe_hash'][:16]}")  # scratch removed
    finally:
        docker_engine.remove_image(row["tag"], force=True)


def test_a_clamped_step_rebuilds_identical_and_ships_the_same_bytes(tmp_path, ci_base, docker_engine):
    m, row = _tiny(tmp_path, "clamped", CLAMPED, docker_engine)
    try:
        epoch = ci_base["Config"]["Labels"][bases.EPOCH_LABEL]
        img = docker_engine.image(row["tag"])
        assert img["Config"]["Labels"]["io.modelmatrix.source-date-epoch"] == epoch
        r = images.verify_image(m, "clamped")
        assert r["identical"], r["differences"]
        assert r["diff_ids"] == r["rebuild_diff_ids"] and r["archive_sha256"] == r["rebuild_archive_sha256"]
        assert r["image_ids"][0] != r["image_ids"][1]  # the classic builder's config holds build times

        first = images.ship(m, "clamped", tmp_path / "a")
        second = images.ship(m, "clamped", tmp_path / "b")
        assert first.read_bytes() == second.read_bytes()
        manifest = json.loads(images.manifest_path(first).read_text())
        assert manifest["archive_sha256"] == r["archive_sha256"]  # what verify-image hashed is what ships
        assert manifest["built_image_id"] == row["image_id"] != manifest["image_id"]
        assert manifest["recipe_inputs"]["build_args"]["SOURCE_DATE_EPOCH"] == epoch
        assert manifest["recipe_inputs"]["files"]["Dockerfile"] == images._sha256(
            images.plan(m, "clamped", bases.resolve(m, CI_BASE, docker_engine, allow_pull=False)).files["Dockerfile"]
        )
        dpkg = {p["package"]: p["version"] for p in manifest["sbom"]["dpkg"]}
        assert dpkg["base-files"] and dpkg["dpkg"]  # read from the shipped layers
        assert manifest["sbom"]["python"]["bomFormat"] == "CycloneDX"

        docker_engine.remove_image(row["tag"], force=True)
        loaded = images.load(first)  # checks the sha256 first, the image ID and layers after
        assert loaded["image_id"] == manifest["image_id"]
        assert docker_engine.image(row["tag"])["RootFS"]["Layers"] == manifest["diff_ids"]
    finally:
        if docker_engine.image(row["tag"]):
            docker_engine.remove_image(row["tag"], force=True)


def test_verify_image_task_exits_1_naming_the_path(tmp_path, ci_base, docker_engine, monkeypatch, capsys):
    import invoke

    sys.path.insert(0, str(REPO_ROOT))
    import tasks

    m, row = _tiny(tmp_path, "stampcli", STAMPED, docker_engine)
    monkeypatch.setattr(tasks, "_load", lambda config, *a, **k: m)  # the throwaway project's targets
    monkeypatch.setattr(tasks, "_known", lambda matrix, config, name: name)
    try:
        with pytest.raises(invoke.Exit) as exc:
            tasks.verify_image.body(invoke.Context(), target="stampcli", out=str(tmp_path / "r.json"))
        assert exc.value.code == 1 and "differs: the rebuild is not identical" in str(exc.value.message)
        printed = capsys.readouterr().out
        assert "/opt/modelmatrix/built-at: content" in printed and "identical\n" not in printed
        assert json.loads((tmp_path / "r.json").read_text())["identical"] is False
    finally:
        docker_engine.remove_image(row["tag"], force=True)


def test_an_unreachable_mirror_is_one_line_naming_the_url(tmp_path, docker_engine):
    path = write_yaml(
        tmp_path / "m.yaml",
        {
            "images": {
                "bases": {
                    "x:1": {"suite": "bookworm", "mirror": "http://127.0.0.1:9/debian", "tag": "modelmatrix/base:nope"}
                }
            },
            "targets": {"torch": {}},
        },
    )
    with pytest.raises(ConfigError) as exc:
        bases.bootstrap(load_matrix(path), "x:1")
    msg = str(exc.value)
    assert (
        "\n" not in msg
        and "images.bases.x:1: the mirror does not answer: http://127.0.0.1:9/debian/dists/bookworm/InRelease" in msg
    )
    assert not docker_engine.image("modelmatrix/base:nope")


def test_a_timestamp_must_be_a_utc_time(tmp_path):
    path = write_yaml(
        tmp_path / "m.yaml",
        {
            "images": {"bases": {"x:1": {"suite": "bookworm", "timestamp": "May 2025", "tag": "t:1"}}},
            "targets": {"torch": {}},
        },
    )
    with pytest.raises(
        ConfigError, match=r"images\.bases\.x:1\.timestamp: expected a UTC time like 2025-05-20T00:00:00Z"
    ):
        load_matrix(path)
    path.write_text(
        "images:\n  bases:\n    x:1: {suite: bookworm, timestamp: 2025-05-20T00:00:00Z, tag: 't:1'}\n"
        "targets: {torch: {}}\n"
    )
    assert load_matrix(path).raw["images"]["bases"]["x:1"]["timestamp"] == "2025-05-20T00:00:00Z"


# --------------------------------------------------------------------------- the proofs (slow)


def test_bases_twice_give_the_same_layer_and_image(tmp_path, docker_engine, ci_base):
    """`invoke bases --force` on a scratch tag, compared with the real bookworm base when that one
    was made from the same mirror state (the same epoch: `invoke bases` in .ci/run, or any earlier
    run), else with a second `--force` run. Either way two independent debuerreotype runs."""
    decl = load_matrix(REPO_ROOT / "matrix.yaml").raw["images"]["bases"]["python:3.11-slim-bookworm"]
    path = write_yaml(
        tmp_path / "m.yaml",
        {
            "images": {"bases": {"repro:bookworm": {**decl, "tag": "modelmatrix/base:repro-test"}}},
            "targets": {"torch": {}},
        },
    )
    try:
        first = _invoke("bases", "--force", "--config", str(path))
        img = docker_engine.image("modelmatrix/base:repro-test")
        labels = img["Config"]["Labels"]
        if ci_base["Config"]["Labels"].get(bases.EPOCH_LABEL) == labels[bases.EPOCH_LABEL]:
            other = ci_base
        else:  # the mirror moved on since the real base was made: build once more
            _invoke("bases", "--force", "--config", str(path))
            other = docker_engine.image("modelmatrix/base:repro-test")
        assert img["RootFS"]["Layers"] == other["RootFS"]["Layers"] and len(img["RootFS"]["Layers"]) == 1
        assert img["Id"] == other["Id"], first.stdout
        assert labels["io.modelmatrix.base.suite"] == "bookworm"
        assert labels["io.modelmatrix.base.mirror"].startswith("http")
        assert labels["io.modelmatrix.base.rootfs-sha256"] == img["RootFS"]["Layers"][0]
        assert labels["io.modelmatrix.base.tool"].startswith("debuerreotype ")
        assert img["Created"].startswith(bases.iso_epoch(int(labels[bases.EPOCH_LABEL]))[:19])
        assert f"image {img['Id'][7:19]} layer {img['RootFS']['Layers'][0][7:19]}" in first.stdout
    finally:
        if docker_engine.image("modelmatrix/base:repro-test"):
            docker_engine.remove_image("modelmatrix/base:repro-test", force=True)


@pytest.mark.parametrize(("target", "base"), [("onnxruntime", CI_BASE), ("caffe", BULLSEYE_BASE)])
def test_verify_image_of_the_real_images_prints_identical(target, base, tmp_path, docker_engine, ci_base):
    if not docker_engine.image(base):
        pytest.fail(f"{base} is not built; run `invoke bases`", pytrace=False)
    path = write_yaml(
        tmp_path / "m.yaml",
        {
            "workspace": str(tmp_path / "ws"),
            "images": {"bases": load_matrix(REPO_ROOT / "matrix.yaml").raw["images"]["bases"]},
            "targets": {"torch": {"enabled": False}, target: {"image": {"base": base}}},
        },
    )
    out = _invoke("verify-image", "--target", target, "--config", str(path), "--out", str(tmp_path / "r.json"))
    assert out.stdout.strip().endswith("identical"), out.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["identical"] and r["archive_sha256"] == r["rebuild_archive_sha256"] and r["layers"] >= 3
