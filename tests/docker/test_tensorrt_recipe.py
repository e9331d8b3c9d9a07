"""The TensorRT image recipe and the GPU request, on this engine (no GPU, no NGC base here).

The recipe is built FROM the bootstrapped Debian base with the TensorRT import left out of its probe
(build arg MM_TENSORRT=absent): that proves the rest of it (Python, the venv with system site
packages, the pinned cuda-python wheel, the target code, the non-root user, versions.json). A
container of it shows the stage code's one-line answers where there is no driver and no TensorRT.
The GPU request is checked on a created, never started container: what the engine was asked for.
"""

from __future__ import annotations

import os

import pytest

from modelmatrix import images
from modelmatrix.config import load_matrix
from modelmatrix.docker_client import owner_labels
from modelmatrix.errors import ImageMissing
from modelmatrix.runners.base import LogTail, engine_gpu_reason
from modelmatrix.runners.docker import STAGE_ENVIRONMENT, StageContainer, device_options

from mm_docker_support import CI_BASE, write_yaml


def _matrix(root, tensorrt: dict):
    return load_matrix(
        write_yaml(
            root / "matrix.yaml",
            {
                "workspace": str(root / "ws"),
                "images": {"memory_limit": "2g", "bases": {"bookworm-minbase": {"suite": "bookworm", "tag": CI_BASE}}},
                "targets": {"torch": {"image": {"base": CI_BASE}}, "tensorrt": tensorrt},
            },
        )
    )


@pytest.fixture(scope="module")
def trt_matrix(tmp_path_factory, ci_base):
    return _matrix(
        tmp_path_factory.mktemp("trt"),
        {
            "image": {"base": CI_BASE, "build_args": {"MM_TENSORRT": "absent"}},
            "container": {"gpus": {"device_ids": ["0"]}},
        },
    )


@pytest.fixture(scope="module")
def trt_image(trt_matrix):
    return images.build(trt_matrix, "tensorrt")


def _run(engine, image_id: str, code: str) -> tuple[int, str]:
    tail = LogTail("tensorrt-test")
    with StageContainer(
        engine,
        image_id,
        ["python3", "-c", code],
        label="tensorrt-test",
        user=f"{os.getuid()}:{os.getgid()}",
        mounts=[],
        labels={**owner_labels("tensorrt-test"), "io.modelmatrix.stage": "tensorrt-test"},
        environment=dict(STAGE_ENVIRONMENT),
        mem_limit="1g",
    ) as c:
        rc = c.run(tail, 120)
    return rc, tail.text()


def test_the_recipe_builds_on_debian_without_the_tensorrt_layer(docker_engine, trt_image):
    versions = trt_image["versions"]
    assert versions["tensorrt"] == "absent (built with MM_TENSORRT=absent)", versions
    assert versions["cuda-python"] == "12.8.0" and versions["cuda-bindings"] == "12.8.0"
    assert versions["numpy"] == "2.4.6" and versions["cuda_driver_min"] == "570"
    img = docker_engine.image(trt_image["tag"])
    assert img["Config"]["User"] == "mm" and img["Config"]["WorkingDir"] == "/opt/modelmatrix"
    assert "/opt/venv/bin" in next(e for e in img["Config"]["Env"] if e.startswith("PATH="))
    # the stage code's answers in a container without a driver and without TensorRT: one line each
    rc, out = _run(
        docker_engine,
        trt_image["image_id"],
        (
            "from targets.common.contract import StageError\n"
            "from targets.tensorrt import cudart, require_tensorrt\n"
            "for f in (cudart.device_info, require_tensorrt):\n"
            "    try:\n        f()\n    except StageError as e:\n        print('ERR', e)\n"
            "import sys, site; print('SITE', site.getsitepackages()[0], sys.flags.no_site)\n"
        ),
    )
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("ERR ")]
    assert lines[0] == (
        "ERR no CUDA driver in this container (Failed to dlopen libcuda.so.1); run it on a host "
        "with an NVIDIA GPU and the NVIDIA container toolkit, through the docker runner (it "
        "requests the GPU)"
    ), out
    assert lines[1].startswith("ERR TensorRT is not installed here"), out


def test_the_engine_is_asked_for_the_gpus_shm_and_ulimits_of_the_container_options(docker_engine, trt_matrix):
    built = docker_engine.images("io.modelmatrix.target")  # any built image will do: it never starts
    if not built:
        pytest.skip("no modelmatrix image is built in this engine yet (invoke build)")
    opts = device_options(trt_matrix, trt_matrix.targets["tensorrt"])
    c = StageContainer(
        docker_engine,
        built[0]["Id"],
        ["true"],
        label="tensorrt-gpu-request",
        user=f"{os.getuid()}:{os.getgid()}",
        mounts=[],
        labels={**owner_labels("tensorrt-gpu-request"), "io.modelmatrix.stage": "gpu-request"},
        environment=dict(STAGE_ENVIRONMENT),
        mem_limit="1g",
        device_options=opts,
    )
    with c:  # created, never started (there is no GPU to start it on)
        host = docker_engine.api.inspect_container(c.cid)["HostConfig"]
    reqs = host["DeviceRequests"]
    assert len(reqs) == 1 and reqs[0]["DeviceIDs"] == ["0"] and reqs[0]["Capabilities"] == [["gpu"]], reqs
    assert host["ShmSize"] == 1 << 30
    assert sorted((u["Name"], u["Soft"], u["Hard"]) for u in host["Ulimits"]) == [
        ("memlock", -1, -1),
        ("stack", 67108864, 67108864),
    ]


def test_this_engine_offers_no_gpu_and_says_what_to_install(docker_engine):
    info = docker_engine.info()
    if "nvidia" in (info.get("Runtimes") or {}):
        pytest.skip("this engine has the nvidia runtime")
    why = engine_gpu_reason(info)
    assert why and "nvidia-ctk runtime configure --runtime=docker" in why


def test_without_the_ngc_base_the_build_stops_in_one_line_naming_docker_load(docker_engine, tmp_path):
    m = _matrix(tmp_path, {})
    base = m.target_cfg("tensorrt")["image"]["base"]
    if docker_engine.image(base):
        pytest.skip(f"{base} is loaded in this engine")
    with pytest.raises(ImageMissing) as exc:
        images.build(m, "tensorrt", engine=docker_engine, allow_pull=False)
    msg = str(exc.value)
    assert base in msg and "`docker load` it" in msg and "\n" not in msg, msg
