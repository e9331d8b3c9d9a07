"""Building target images through the Docker SDK: labels, content-addressed tags, no-op rebuilds,
failing Dockerfiles, bases that cannot be had."""

from __future__ import annotations

import json
import logging

import pytest

from modelmatrix import bases, images
from modelmatrix.docker_client import Engine
from modelmatrix.errors import BuildFailed, ImageMissing

from mm_docker_support import CI_BASE, make_project


def test_onnxruntime_image_is_labelled(ort_image, docker_engine, ci_base, real_matrix):
    assert ort_image["up_to_date"] and ort_image["tag"] == f"modelmatrix/onnxruntime:{ort_image['recipe_hash'][:16]}"
    img = docker_engine.image(ort_image["tag"])
    labels = img["Config"]["Labels"]
    assert labels["io.modelmatrix.recipe-hash"] == ort_image["recipe_hash"]
    assert labels["io.modelmatrix.target"] == "onnxruntime"
    assert labels["io.modelmatrix.base-id"] == ci_base["Id"]
    assert labels["org.opencontainers.image.base.digest"] == ci_base["Id"]
    assert labels["org.opencontainers.image.version"] and "org.opencontainers.image.revision" not in labels
    assert labels["io.modelmatrix.source-date-epoch"] == ci_base["Config"]["Labels"]["io.modelmatrix.base.epoch"]
    versions = json.loads(labels["io.modelmatrix.versions"])
    assert versions["onnxruntime"] == "1.31.1" and versions["python"].startswith("3.11")
    assert ort_image["versions"] == versions
    ca = images.ca_bundle(real_matrix)
    assert labels["io.modelmatrix.ca-bundle"] == (f"sha256:{images._sha256(ca)}" if ca else "none")
    assert labels["io.modelmatrix.wheelhouse"] == "none"  # onnxruntime needs no local wheel
    assert img["Config"]["User"] == "mm"  # a non-root user
    assert img["Config"]["WorkingDir"] == "/opt/modelmatrix"


def test_unchanged_recipe_is_not_rebuilt(real_matrix, ort_image, monkeypatch):
    def no_builder(*args, **kwargs):
        raise AssertionError("the builder was called for an unchanged recipe")

    monkeypatch.setattr(Engine, "build", no_builder)
    again = images.build(real_matrix, "onnxruntime")
    assert again["built"] is False and again["image_id"] == ort_image["image_id"]
    rows = {r["target"]: r for r in images.list_images(real_matrix)}
    assert rows["onnxruntime"]["up_to_date"] and rows["onnxruntime"]["size"] > 0
    assert rows["onnxruntime"]["versions"]["onnxruntime"] == "1.31.1"


def test_changed_recipe_is_rebuilt(tmp_path, ort_image):
    m = make_project(
        tmp_path,
        "changing",
        """
        ARG BASE_IMAGE
        FROM ${BASE_IMAGE}
        COPY targets /opt/modelmatrix/targets
        """,
        ort_image["tag"],
        stages={"noop.py": "print('v1')\n"},
    )
    first = images.build(m, "changing")
    assert first["built"]
    (tmp_path / "targets" / "changing" / "noop.py").write_text("print('v2')\n")
    second = images.build(m, "changing")
    assert second["built"] and second["tag"] != first["tag"]
    assert first["tag"] in second["other_tags"]
    Engine().remove_image(first["tag"], force=True)
    Engine().remove_image(second["tag"], force=True)


def _tags(engine: Engine, repo: str) -> list[str]:
    return [t for img in engine.api.images(name=repo) for t in img.get("RepoTags") or []]


def test_failing_dockerfile_shows_the_step_and_leaves_no_tag(tmp_path, ci_base, docker_engine, caplog):
    caplog.set_level(logging.INFO, logger="modelmatrix")
    m = make_project(
        tmp_path,
        "broken",
        """
        ARG BASE_IMAGE
        FROM ${BASE_IMAGE}
        RUN echo "marker-7f3a: about to fail" && exit 3
        RUN echo never
        """,
        CI_BASE,
        stages={},
    )
    with pytest.raises(BuildFailed) as err:
        images.build(m, "broken")
    msg = str(err.value)
    assert "\n" not in msg
    assert 'Dockerfile: step 3/4 (RUN echo "marker-7f3a: about to fail" && exit 3) failed: exited 3' in msg
    assert msg.endswith("last output: marker-7f3a: about to fail")
    assert "marker-7f3a: about to fail" in err.value.log_tail
    assert "[broken] Step 3/4 : RUN" in caplog.text  # the live step display
    assert _tags(docker_engine, "modelmatrix/broken") == []


def test_image_without_versions_file_is_refused(tmp_path, ci_base, docker_engine):
    m = make_project(
        tmp_path,
        "noversions",
        """
        ARG BASE_IMAGE
        FROM ${BASE_IMAGE}
        COPY targets /opt/modelmatrix/targets
        """,
        CI_BASE,
        stages={},
    )
    with pytest.raises(BuildFailed, match=r"has no /opt/modelmatrix/versions\.json"):
        images.build(m, "noversions")
    assert _tags(docker_engine, "modelmatrix/noversions") == []


def test_base_that_cannot_be_had_names_invoke_bases(real_matrix, ci_base):
    tag = "modelmatrix/base:absent-minbase"
    upstream = "localhost:1/library/debian:absent"  # a registry that does not answer
    decls = real_matrix.raw["images"]["bases"]
    decls["absent"] = {"suite": "bookworm", "variant": "minbase", "mirror": "auto", "tag": tag}
    decls[upstream] = dict(decls["absent"])
    cfg = real_matrix.target_cfg("onnxruntime")["image"]
    where = "targets.onnxruntime.image.base"
    try:
        cfg["base"] = tag  # the bootstrap tag itself: never pulled
        with pytest.raises(ImageMissing) as err:
            images.build(real_matrix, "onnxruntime")
        assert (
            str(err.value) == f"{where}: {tag} is not built; it is images.bases.absent in matrix.yaml: "
            "run `invoke bases`"
        )
        row = images.image_status(real_matrix, "onnxruntime")  # status reports, never raises
        assert not row["up_to_date"] and "invoke bases" in row["problem"]
        cfg["base"] = upstream  # declared: pull fails, bootstrap missing
        with pytest.raises(ImageMissing) as err:
            images.build(real_matrix, "onnxruntime")
        assert str(err.value).startswith(f"{where}: {upstream} is not available (not local; pull failed: ")
        assert str(err.value).endswith(
            f"and its bootstrap {tag} (images.bases.{upstream}) is not built; run `invoke bases`"
        )
        del decls[upstream]  # undeclared: say how to declare it
        with pytest.raises(ImageMissing) as err:
            images.build(real_matrix, "onnxruntime")
        assert (
            "`docker load` it, or declare it under images.bases in matrix.yaml (suite, mirror, tag) and "
            "run `invoke bases`" in str(err.value)
        )
    finally:
        cfg["base"] = CI_BASE
        decls.pop("absent")
        decls.pop(upstream, None)


def test_declared_bootstrap_base_is_used_and_said(real_matrix, ort_image, ci_base, caplog):
    caplog.set_level(logging.INFO, logger="modelmatrix")
    # A ref that cannot be pulled, declared in images.bases: the build uses the bootstrapped tag
    # (same base image ID, so the same recipe: nothing is rebuilt) and says so.
    ref = "localhost:1/library/python:3.11-slim-bookworm"
    real_matrix.raw["images"]["bases"][ref] = {
        "suite": "bookworm",
        "variant": "minbase",
        "mirror": "auto",
        "tag": CI_BASE,
    }
    cfg = real_matrix.target_cfg("onnxruntime")["image"]
    try:
        cfg["base"] = ref
        row = images.build(real_matrix, "onnxruntime")
    finally:
        cfg["base"] = CI_BASE
        del real_matrix.raw["images"]["bases"][ref]
    assert row["built"] is False and row["tag"] == ort_image["tag"] and row["base_source"] == "bootstrap"
    shown = caplog.text
    assert f"{ref} is not local (pull failed:" in shown
    assert f"using {CI_BASE}, bootstrapped from images.bases.{ref}" in shown


def test_bases_listing_and_no_second_bootstrap(real_matrix, ci_base):
    result = bases.bootstrap(real_matrix, CI_BASE)
    assert result["created"] is False and result["image_id"] == ci_base["Id"]
    rows = {r["base"]: r for r in bases.list_bases(real_matrix)}
    assert rows["bookworm-minbase"]["image_id"] == ci_base["Id"]
    assert set(rows["bookworm-minbase"]["used_by"]) == {"torch", "onnxruntime"}
