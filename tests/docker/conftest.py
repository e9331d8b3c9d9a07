"""Docker tests: real builds and real containers on the local engine.

Without an engine (or without the CI base image) these tests are skipped with the reason - except
under CI=true, where they fail: CI must never silently skip them.

Images are content-addressed, so what one test (or an earlier run) built is reused: the session
fixtures below build each image at most once, and a second run of the suite builds nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from modelmatrix import images
from modelmatrix.config import Matrix, load_matrix
from modelmatrix.docker_client import Engine, engine_reason

from mm_docker_support import BULLSEYE_BASE, CI_BASE, ON_TOP, make_project, unavailable, write_yaml

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "docker: builds and runs real Docker images (needs a Docker engine)")


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session", autouse=True)
def docker_engine() -> Engine:
    reason = engine_reason()
    if reason:
        unavailable(reason)
    return Engine()


def _bootstrapped(engine: Engine, ref: str) -> dict:
    img = engine.image(ref)
    if not img:
        unavailable(f"{ref} is not in the engine; run `invoke bases`")
    return img


@pytest.fixture(scope="session")
def ci_base(docker_engine) -> dict:
    return _bootstrapped(docker_engine, CI_BASE)


@pytest.fixture(scope="session")
def bullseye_base(docker_engine) -> dict:
    return _bootstrapped(docker_engine, BULLSEYE_BASE)


@pytest.fixture(scope="session")
def real_matrix(tmp_path_factory, ci_base) -> Matrix:
    """The real torch and onnxruntime targets, built FROM the CI base."""
    root = tmp_path_factory.mktemp("real")
    path = write_yaml(
        root / "matrix.yaml",
        {
            "workspace": str(root / "ws"),
            "images": {"memory_limit": "2g", "bases": {"bookworm-minbase": {"suite": "bookworm", "tag": CI_BASE}}},
            "targets": {"torch": {"image": {"base": CI_BASE}}, "onnxruntime": {"image": {"base": CI_BASE}}},
        },
    )
    return load_matrix(path)


@pytest.fixture(scope="session")
def ort_image(real_matrix) -> dict:
    return images.build(real_matrix, "onnxruntime")


@pytest.fixture(scope="session")
def shared_root():
    """A world-readable folder (tests run stages as another uid, who must read the project)."""
    root = Path(tempfile.mkdtemp(prefix="mm-docker-tests-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="session")
def mm_matrix(shared_root, ort_image) -> Matrix:
    """Target ``mmtest`` (stages noop/crash/hang/nothing/probe) on top of the onnxruntime image."""
    return make_project(shared_root / "mm", "mmtest", ON_TOP, ort_image["tag"])


@pytest.fixture(scope="session")
def mm_image(mm_matrix) -> dict:
    return images.build(mm_matrix, "mmtest")
