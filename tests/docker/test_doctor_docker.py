"""`invoke doctor` against the running engine: the engine row shows the server's version, and the
base and image rows reflect what really is in the engine (a base made by `invoke bases`, a built
image, a recipe not built yet, a declared base that is not there) - and doctor builds nothing."""

from __future__ import annotations

import uuid

from modelmatrix import images
from modelmatrix.config import load_matrix
from modelmatrix.docker_client import engine_address

from mm_docker_support import CI_BASE, write_yaml
from mm_testing import run_invoke


def _rows(stdout: str) -> dict[tuple[str, str], str]:
    lines = stdout.splitlines()
    c1, c2 = lines[0].index("check"), lines[0].index("result")
    return {(ln[:c1].strip(), ln[c1:c2].strip()): ln[c2:] for ln in lines[1:]}


def test_rows_reflect_the_engine_and_nothing_is_built(tmp_path, docker_engine, ci_base, ort_image):
    nonce = uuid.uuid4().hex[:12]
    absent = f"modelmatrix/base:doctor-absent-{nonce}"
    cfg = write_yaml(
        tmp_path / "matrix.yaml",
        {
            "workspace": str(tmp_path / "ws"),
            "runner": "docker",
            "images": {
                "memory_limit": "2g",
                "bases": {
                    "bookworm-minbase": {"suite": "bookworm", "tag": CI_BASE},
                    "absent": {"suite": "bookworm", "tag": absent},
                },
            },
            "targets": {
                "torch": {"image": {"base": CI_BASE, "build_args": {"MM_DOCTOR_NONCE": nonce}}},
                "onnxruntime": {"image": {"base": CI_BASE}},
                "caffe": {"image": {"base": absent}},
            },
        },
    )
    torch_tag = images.image_status(load_matrix(cfg), "torch", docker_engine)["tag"]
    assert torch_tag and docker_engine.image(torch_tag) is None  # a recipe never built
    r = run_invoke(["doctor", "--config", str(cfg)], env={"CI": ""}, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = _rows(r.stdout)
    version = docker_engine.info()["ServerVersion"]
    assert rows[("engine", "docker")].startswith(f"reachable: Docker {version} (API ")
    assert rows[("engine", "docker")].endswith(f" at {engine_address()}")
    assert rows[("runner", "docker")] == "docker (matrix.yaml runner: docker; an engine answers)"
    # bases: the one `invoke bases` made is present (its real id); the other is not there
    assert rows[("base bookworm-minbase", "image")] == (
        f"present: bootstrapped as {CI_BASE} ({ci_base['Id'][7:19]}); for torch, onnxruntime"
    )
    assert rows[("base absent", "image")] == (
        f"missing: `invoke bases` makes {absent} (images.bases in matrix.yaml); for caffe"
    )
    # images: built and up to date; not built (the docker runner would build it); cannot be built
    assert rows[("target onnxruntime", "image")] == (f"up to date: {ort_image['tag']} ({ort_image['image_id'][7:19]})")
    assert rows[("target onnxruntime", "matrix")] == "run"
    assert rows[("target torch", "image")].startswith(f"not built: {torch_tag}; `invoke build --target torch`")
    assert rows[("target torch", "matrix")] == f"run (builds {torch_tag} first)"
    assert rows[("target torch", "docker")] == "ok"
    caffe_problem = (
        f"targets.caffe.image.base: {absent} is not built; it is images.bases.absent in matrix.yaml: run `invoke bases`"
    )
    assert rows[("target caffe", "image")] == f"cannot build: {caffe_problem}"
    assert rows[("target caffe", "matrix")] == f"skip: caffe image: {caffe_problem}"
    # --require a target whose image cannot be built: exit 3, one line
    r = run_invoke(["doctor", "--config", str(cfg), "--require", "caffe"], env={"CI": ""}, timeout=300)
    assert r.returncode == 3
    assert r.stderr.splitlines() == [
        f"error: --require caffe cannot run here (docker runner): skip: caffe image: {caffe_problem}"
    ]
    # doctor built, pulled and wrote nothing
    assert docker_engine.image(torch_tag) is None and docker_engine.image(absent) is None
    assert not (tmp_path / "ws").exists()
