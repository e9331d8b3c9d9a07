"""Ship and load: a deterministic archive (docker save re-written) + a manifest, loaded back with
the manifest's image ID and layers."""

from __future__ import annotations

import json

import pytest

from modelmatrix import images
from modelmatrix.errors import DataError, ImageMissing

from mm_docker_support import CI_BASE, make_project

TINY = """
    ARG BASE_IMAGE
    FROM ${BASE_IMAGE}
    RUN mkdir -p /opt/modelmatrix && echo '{"tiny": "1"}' > /opt/modelmatrix/versions.json
    """


@pytest.fixture
def tiny(tmp_path, ci_base, docker_engine):
    m = make_project(tmp_path / "project", "tiny", TINY, CI_BASE, stages={})
    row = images.build(m, "tiny")
    yield m, row
    if docker_engine.image(row["tag"]):
        docker_engine.remove_image(row["tag"], force=True)


def test_ship_and_load_round_trip(tiny, tmp_path, docker_engine):
    m, row = tiny
    archive = images.ship(m, "tiny", tmp_path / "shipped")
    assert archive.name == f"modelmatrix-tiny-{row['recipe_hash'][:16]}.tar.gz"
    manifest = json.loads(images.manifest_path(archive).read_text())
    img = docker_engine.image(row["tag"])
    assert manifest["built_image_id"] == row["image_id"] and manifest["tag"] == row["tag"]
    assert manifest["diff_ids"] == img["RootFS"]["Layers"] and len(manifest["diff_ids"]) == 2
    assert manifest["recipe_hash"] == row["recipe_hash"] == manifest["labels"]["io.modelmatrix.recipe-hash"]
    assert manifest["size"] == img["Size"] and manifest["versions"] == {"tiny": "1"}
    assert manifest["archive_bytes"] == archive.stat().st_size
    assert not [p for p in archive.parent.iterdir() if p.name.endswith(".tmp")]

    docker_engine.remove_image(row["tag"], force=True)
    assert not images.image_status(m, "tiny")["up_to_date"]
    loaded = images.load(archive)
    assert loaded["image_id"] == manifest["image_id"] and loaded["tag"] == row["tag"]
    assert docker_engine.image(row["tag"])["RootFS"]["Layers"] == manifest["diff_ids"]
    assert images.image_status(m, "tiny")["up_to_date"]
    docker_engine.remove_image(row["tag"], force=True)


def test_load_refuses_a_damaged_or_unexplained_archive(tiny, tmp_path):
    m, _row = tiny
    archive = images.ship(m, "tiny", tmp_path / "shipped")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / "damaged" / archive.name
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(data))
    images.manifest_path(damaged).write_text(images.manifest_path(archive).read_text())
    with pytest.raises(DataError, match="sha256 differs"):
        images.load(damaged)
    images.manifest_path(damaged).unlink()
    with pytest.raises(DataError, match=r"manifest\.json: not found next to the archive; `invoke ship` writes both"):
        images.load(damaged)


def test_ship_needs_a_built_image(tmp_path, ci_base):
    m = make_project(tmp_path, "unbuilt", TINY + "RUN echo never built\n", CI_BASE, stages={})
    with pytest.raises(ImageMissing, match=r"is not built; run `invoke build --target unbuilt`"):
        images.ship(m, "unbuilt", tmp_path / "out")
