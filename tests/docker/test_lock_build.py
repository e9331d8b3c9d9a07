"""A lock whose hash no longer matches fails a real build, and the failure is one line naming the package.

A scratch recipe FROM the onnxruntime image the session already builds on modelmatrix/base:bookworm-minbase
(it has pip; nothing else is built): its requirements.txt is lock.lock_image's real lock of one tiny wheel
(six 1.16.0), with the wheel's hash then changed, as when the index serves other bytes under that name.
"""

from __future__ import annotations

import re

import pytest

from modelmatrix import images, lock
from modelmatrix.errors import BuildFailed

DOCKERFILE = """\
FROM {image}
COPY requirements.txt ca.pem /tmp/lockcheck/
RUN if [ -s /tmp/lockcheck/ca.pem ]; then export PIP_CERT=/tmp/lockcheck/ca.pem; fi; \\
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 pip install --no-compile --no-deps --require-hashes \\
        --only-binary :all: --target /tmp/lockcheck-site -r /tmp/lockcheck/requirements.txt
"""


def test_a_stale_lock_fails_the_build_naming_the_package(tmp_path, docker_engine, real_matrix, ort_image):
    (tmp_path / "requirements.in").write_text("six==1.16.0\n")
    locked = lock.lock_image(tmp_path, python_version="3.11").read_text()
    wheel_hash = "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254"  # six-1.16.0-py2.py3-none-any
    assert f"--hash=sha256:{wheel_hash}" in locked
    stale = locked.replace(wheel_hash, "0" * 64)
    ca = images.ca_bundle(real_matrix)
    files: dict[str, object] = {
        "Dockerfile": DOCKERFILE.format(image=ort_image["tag"]).encode(),
        "requirements.txt": stale.encode(),
        "ca.pem": ca.read_bytes() if ca else b"",
    }
    stream = images.BuildStream("lockcheck", "scratch/Dockerfile")
    with pytest.raises(BuildFailed) as err:
        images._build_context(docker_engine, files, buildargs={}, labels={}, stream=stream, nocache=True)  # type: ignore[arg-type]
    tail = stream.tail().splitlines()
    assert any("THESE PACKAGES DO NOT MATCH THE HASHES" in ln for ln in tail), stream.tail()
    msg = lock.explain_build_failure(tail, "scratch/requirements.txt")
    assert msg is not None and "\n" not in msg
    assert re.match(r"scratch/requirements\.txt: six==1\.16\.0 no longer matches its locked hash", msg), msg
    # images.BuildStream puts that line into the build's one-line error
    assert "six==1.16.0 no longer matches its locked hash" in str(err.value) and "invoke lock" in str(err.value)
    assert "\n" not in str(err.value)

    # the same lock with the real hash builds: the failure was the hash, not the recipe
    stream = images.BuildStream("lockcheck", "scratch/Dockerfile")
    files["requirements.txt"] = locked.encode()
    image_id = images._build_context(docker_engine, files, buildargs={}, labels={}, stream=stream, nocache=True)  # type: ignore[arg-type]
    docker_engine.remove_image(image_id, force=True)
