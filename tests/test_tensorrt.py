"""The TensorRT target without a GPU: everything that can run here runs for real.

Profile and batch planning, the engine sidecar and its staleness, the ONNX each precision builds
(conditional inputs: an fp32 engine reads no calibration data), the stage refusing bad input in one
line (a QDQ model missing for int8, a corrupt engine, a batch over the profile's max), the dry run's
trtexec line on a real ONNX, the GPU probes (a fake /dev and the fake nvidia-smi in this folder, fake
`docker info` answers), the device fingerprint in the keys, and mypy over targets/tensorrt against
TensorRT's own type stubs. The tests that need TensorRT and a GPU are marked ``gpu`` and skip with
the reason: they are not run here, never passed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelmatrix import REPO_ROOT
from modelmatrix.config import load_matrix
from modelmatrix.errors import ConfigError
from modelmatrix.plan import build_plan, node_key, stage_node
from modelmatrix.runners import base as runners_base
from modelmatrix.runners.docker import DockerRunner, device_options
from modelmatrix.runners.local import LocalRunner
from targets.common.contract import StageError, spec_to_json
from targets.tensorrt import planning, require_tensorrt
from targets.tensorrt.convert import parser_errors
from targets.tensorrt.probe import driver_floor, image_versions

HERE = Path(__file__).resolve().parent
FAKE_SMI = HERE / "fake_nvidia_smi"
H200 = "0,GPU-1111,NVIDIA H200,9.0,570.86.15"
L4 = "1,GPU-2222,NVIDIA L4,8.9,570.86.15"
#: `docker info` answers of three engines (the parts the probe reads), as the Docker API returns them
FAKE_INFO_PLAIN = {
    "Runtimes": {"io.containerd.runc.v2": {"path": "runc"}, "runc": {"path": "runc"}},
    "DefaultRuntime": "runc",
}
FAKE_INFO_NVIDIA_RUNTIME = {"Runtimes": {"nvidia": {"path": "nvidia-container-runtime"}, "runc": {"path": "runc"}}}
FAKE_INFO_CDI = {
    "Runtimes": {"runc": {"path": "runc"}},
    "CDISpecDirs": ["/etc/cdi", "/var/run/cdi"],
    "DiscoveredDevices": [{"Source": "cdi", "ID": "nvidia.com/gpu=0"}, {"Source": "cdi", "ID": "nvidia.com/gpu=all"}],
}


def _matrix(tmp_path: Path, tensorrt: dict, extra: dict | None = None):
    path = tmp_path / "matrix.yaml"
    path.write_text(
        yaml.safe_dump(
            {"workspace": str(tmp_path / "ws"), "targets": {"torch": {}, "tensorrt": tensorrt, **(extra or {})}}
        )
    )
    return load_matrix(path)


@pytest.fixture()
def fake_smi(tmp_path, monkeypatch):
    """PATH with the fake nvidia-smi first; GPUs set per test through FAKE_NVIDIA_SMI_*."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").symlink_to(FAKE_SMI)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for var in ("FAKE_NVIDIA_SMI_GPUS", "FAKE_NVIDIA_SMI_FAIL", "FAKE_NVIDIA_SMI_HANG", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# --------------------------------------------------------------------------- which ONNX each precision builds


def test_each_precision_reads_one_shared_onnx_and_none_reads_calibration_data(tmp_path):
    seen = {}
    for precision in ("fp32", "fp16", "int8"):
        m = _matrix(tmp_path, {"params": {"precision": precision}})
        convert = stage_node(m, "tensorrt", "convert")
        seen[precision] = {k: f"{r.producer}/{r.file}" for k, r in convert.inputs.items()}
    assert seen == {
        "fp32": {"onnx": "torch.export/model.onnx"},
        "fp16": {"fp16": "quantize.fp16/model.fp16.onnx"},
        "int8": {"qdq": "quantize.int8/model.qdq.onnx"},
    }
    # the convert stage itself never reads prepare/inputs.npy: a dataset change does not rebuild engines
    assert not any(r.startswith("prepare/") for refs in seen.values() for r in refs.values())
    # and the names agree with what convert.py looks up
    assert {p: planning.PRECISION_INPUTS[p][0] for p in seen} == {p: next(iter(r)) for p, r in seen.items()}


def test_int8_without_the_quantize_target_fails_alone_naming_the_stage_to_run(tmp_path):
    m = _matrix(tmp_path, {"params": {"precision": "int8"}})
    plan, broken = build_plan(m, per_target_errors=True)
    msg = broken["tensorrt"]
    assert "needs quantize.int8/model.qdq.onnx" in msg and "enable targets.quantize" in msg, msg
    assert "is its target enabled" in msg and "\n" not in msg
    assert "torch.infer" in {n.id for n in plan} and not any(n.id.startswith("tensorrt.") for n in plan)
    # fp32 plans without quantize
    plan, broken = build_plan(_matrix(tmp_path, {}), per_target_errors=True)
    assert "tensorrt" not in broken and {"tensorrt.convert", "tensorrt.infer"} <= {n.id for n in plan}


def _spec(tmp_path: Path, params: dict, inputs: dict) -> Path:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            spec_to_json(
                "tensorrt",
                "convert",
                str(tmp_path),
                inputs,
                "out",
                {"precision": "fp32", "batch_size": 16, "max_batch": 32, "workspace_mib": 1024, **params},
            )
        )
    )
    return spec


def _stage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "targets.tensorrt.convert", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_convert_without_the_qdq_model_is_one_line_naming_the_stage(tmp_path):
    spec = _spec(tmp_path, {"precision": "int8"}, {})
    proc = _stage(str(spec))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "quantize.int8/model.qdq.onnx" in lines[0], proc.stderr
    assert "run quantize.int8 first" in lines[0] and not (tmp_path / "out" / "result.json").exists()
    # given, but the file is not there
    spec = _spec(tmp_path, {"precision": "int8"}, {"qdq": "nowhere/model.qdq.onnx"})
    proc = _stage(str(spec))
    assert proc.returncode == 2 and "nowhere/model.qdq.onnx: not found" in proc.stderr, proc.stderr


def _tiny_onnx(path: Path, op: str = "GlobalAveragePool", domain: str = "") -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 256, 128])
    y = helper.make_tensor_value_info("class", TensorProto.FLOAT, ["batch", 3, 1, 1])
    node = helper.make_node(op, ["image"], ["class"], name=f"{op}_0", domain=domain)
    opsets = [helper.make_opsetid("", 11)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph([node], "tiny", [x], [y]), opset_imports=opsets)
    onnx.save(model, str(path))
    return path


def test_dry_run_lists_the_strongly_typed_build_and_its_trtexec_line(tmp_path):
    _tiny_onnx(tmp_path / "model.onnx")
    proc = _stage("--dry-run", str(_spec(tmp_path, {"batch_size": 8}, {"onnx": "model.onnx"})))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "profile image: min [1, 3, 256, 128] opt [8, 3, 256, 128] max [32, 3, 256, 128]" in text
    trtexec = next(line for line in text.splitlines() if "same as:" in line)
    for flag in (
        "--stronglyTyped",
        "--minShapes=image:1x3x256x128",
        "--optShapes=image:8x3x256x128",
        "--maxShapes=image:32x3x256x128",
        "--memPoolSize=workspace:1024M",
        "--noTF32",
        f"--saveEngine={tmp_path / 'out' / 'model.engine'}",
    ):
        assert flag in trtexec, trtexec
    assert "--fp16" not in text and "--int8" not in text and "calib" not in text
    assert not any((tmp_path / "out").iterdir())  # a dry run writes nothing
    # batch_size over max_batch is refused before anything is built
    proc = _stage("--dry-run", str(_spec(tmp_path, {"batch_size": 64}, {"onnx": "model.onnx"})))
    assert proc.returncode == 2 and "batch_size 64 is larger than max_batch 32" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- profile and batches


def test_profile_min_one_opt_batch_size_max_max_batch():
    p = planning.plan_profile("image", (-1, 3, 256, 128), 16, 32)
    assert p.shapes() == ((1, 3, 256, 128), (16, 3, 256, 128), (32, 3, 256, 128))
    assert p.as_json() == {
        "input": "image",
        "min": [1, 3, 256, 128],
        "opt": [16, 3, 256, 128],
        "max": [32, 3, 256, 128],
    }
    fixed = planning.plan_profile("image", (8, 3, 256, 128), 8, 32)
    assert (fixed.min_batch, fixed.opt_batch, fixed.max_batch) == (8, 8, 8)
    for shape, bs, mb, msg in (
        ((-1, 3, 256, 128), 33, 32, "batch_size 33 is larger than max_batch 32"),
        ((8, 3, 256, 128), 16, 32, "fixed batch of 8"),
        ((-1, 3, -1, -1), 16, 32, "dynamic C/H/W"),
        ((-1, 2048), 16, 32, "expected (batch, 3, H, W)"),
    ):
        with pytest.raises(StageError, match=re.escape(msg)):
            planning.plan_profile("image", shape, bs, mb)


def test_batches_keep_the_last_partial_one_and_refuse_more_than_the_profile_max():
    batches = planning.plan_batches(426, 16, 32)
    assert len(batches) == 27 and batches[0] == (0, 16) and batches[-1] == (416, 426)
    assert sum(b - a for a, b in batches) == 426
    assert planning.plan_batches(5, 32, 32) == [(0, 5)]
    with pytest.raises(StageError) as exc:
        planning.plan_batches(426, 64, 32)
    assert "batch_size 64 is larger than the engine's optimization profile max 32" in str(exc.value)
    assert "max_batch >= 64" in str(exc.value)
    with pytest.raises(StageError, match="below the engine's profile min 8"):
        planning.plan_batches(20, 8, 8, profile_min=8)


# --------------------------------------------------------------------------- the sidecar

DEVICE = {"name": "NVIDIA H200", "compute_capability": "9.0", "cuda_driver": "12.8"}


def _built(tmp_path: Path, trt_version: str = "10.8.0.43", device=DEVICE) -> tuple[Path, Path]:
    engine = tmp_path / planning.ENGINE_NAME
    engine.write_bytes(b"not really an engine, but bytes with a digest" * 100)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx bytes")
    profile = planning.plan_profile("image", (-1, 3, 256, 128), 16, 32)
    sidecar = planning.make_sidecar(
        tensorrt_version=trt_version,
        device=device,
        precision="fp32",
        profile=profile,
        io=[
            {"name": "image", "mode": "input", "dtype": "FLOAT", "shape": [-1, 3, 256, 128]},
            {"name": "class", "mode": "output", "dtype": "FLOAT", "shape": [-1, 2048]},
        ],
        onnx_file=onnx.name,
        onnx_sha256=planning.file_sha256(onnx),
        engine_sha256=planning.file_sha256(engine),
        builder={"strongly_typed": True, "workspace_mib": 1024},
    )
    path = tmp_path / planning.SIDECAR_NAME
    path.write_text(json.dumps(sidecar))
    return engine, path


def test_sidecar_names_what_built_the_engine_and_a_stale_engine_is_refused(tmp_path):
    engine, path = _built(tmp_path)
    side = planning.read_sidecar(path)
    assert side["tensorrt"] == "10.8.0.43" and side["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert side["profile"]["max"] == [32, 3, 256, 128] and side["onnx"]["sha256"] == planning.file_sha256(
        tmp_path / "model.onnx"
    )
    assert planning.stale_reason(side, "10.8.0.43", DEVICE) is None
    assert planning.check_engine_file(engine, side, path) == engine.read_bytes()
    why = planning.stale_reason(side, "10.13.2.6", DEVICE)
    assert why == "it was built by TensorRT 10.8.0.43, this is TensorRT 10.13.2.6"
    why = planning.stale_reason(side, "10.8.0.43", {"name": "NVIDIA L4", "compute_capability": "8.9"})
    assert why and "NVIDIA H200 (compute capability 9.0)" in why and "NVIDIA L4 (compute capability 8.9)" in why
    assert planning.io_tensor(side, "output", path)["name"] == "class"


def test_infer_refuses_a_stale_or_corrupt_engine_before_tensorrt_sees_it(tmp_path):
    from targets.common.contract import load_spec
    from targets.tensorrt.infer import checked_engine

    engine, path = _built(tmp_path)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(
        json.dumps(
            spec_to_json("tensorrt", "infer", str(tmp_path), {"engine": engine.name, "sidecar": path.name}, "out", {})
        )
    )
    spec = load_spec(spec_path)
    data, _side = checked_engine(spec, "10.8.0.43", DEVICE)
    assert data == engine.read_bytes()
    with pytest.raises(StageError) as exc:
        checked_engine(spec, "10.8.0.43", {"name": "NVIDIA L4", "compute_capability": "8.9"})
    assert "not loaded: it was built for NVIDIA H200" in str(exc.value) and "--force" in str(exc.value)
    engine.write_bytes(engine.read_bytes()[:-7])  # truncated
    with pytest.raises(StageError) as exc:
        checked_engine(spec, "10.8.0.43", DEVICE)
    assert "corrupt or was replaced" in str(exc.value) and "\n" not in str(exc.value)
    path.write_text("{not json")
    with pytest.raises(StageError, match="not a readable engine sidecar"):
        checked_engine(spec, "10.8.0.43", DEVICE)


# --------------------------------------------------------------------------- parser errors


class FakeParserError:
    """Stands in for tensorrt.ParserError (its documented accessors)."""

    def __init__(self, node: int, name: str, op: str, desc: str):
        self._v = (node, name, op, desc)

    def node(self) -> int:
        return self._v[0]

    def node_name(self) -> str:
        return self._v[1]

    def node_operator(self) -> str:
        return self._v[2]

    def desc(self) -> str:
        return self._v[3]

    def code(self) -> str:
        return "UNSUPPORTED_NODE"


class FakeOnnxParser:
    def __init__(self, errors):
        self._errors = errors

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, i: int) -> FakeParserError:
        return self._errors[i]


def test_every_parser_error_is_listed_in_one_line():
    errors = parser_errors(
        FakeOnnxParser(
            [
                FakeParserError(3, "NoSuchOp_0", "NoSuchOp", "No importer registered for op: NoSuchOp"),
                FakeParserError(7, "Mod_2", "Mod", "Mod with fmod=0\nis not supported"),
                FakeParserError(-1, "", "", "graph input has a dynamic rank"),
            ]
        )
    )
    msg = planning.describe_parser_errors(Path("/ws/model.onnx"), errors)
    assert msg.startswith("/ws/model.onnx: TensorRT's ONNX parser refused it (3 errors): ")
    assert "node 3 'NoSuchOp_0' (op NoSuchOp): No importer registered for op: NoSuchOp" in msg
    assert "node 7 'Mod_2' (op Mod): Mod with fmod=0 is not supported" in msg
    assert "graph (op ?): graph input has a dynamic rank" in msg and "\n" not in msg
    many = planning.describe_parser_errors(Path("m.onnx"), errors * 3)
    assert "(9 errors)" in many and "and 4 more" in many


# --------------------------------------------------------------------------- probes


def test_gpu_probe_names_what_is_missing(tmp_path, fake_smi):
    dev = tmp_path / "dev"
    dev.mkdir()
    assert runners_base.nvidia_reason(dev) == f"no {dev}/nvidiactl on this host"
    (dev / "nvidiactl").touch()
    fake_smi.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi anywhere
    assert (
        runners_base.nvidia_reason(dev) == "nvidia-smi is not on PATH (the NVIDIA driver's utilities are not installed)"
    )
    fake_smi.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin:/bin")
    fake_smi.setenv(
        "FAKE_NVIDIA_SMI_FAIL",
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
        "driver. Make sure that the latest NVIDIA driver is installed and running.",
    )
    why = runners_base.nvidia_reason(dev)
    assert (
        why
        and why.startswith("nvidia-smi failed (exit 9: NVIDIA-SMI has failed because it couldn't")
        and "\n" not in why
    )
    fake_smi.delenv("FAKE_NVIDIA_SMI_FAIL")
    assert runners_base.nvidia_reason(dev) == "nvidia-smi answered but lists no GPU"
    fake_smi.setenv("FAKE_NVIDIA_SMI_GPUS", H200)
    assert runners_base.nvidia_reason(dev) is None
    fake_smi.setenv("FAKE_NVIDIA_SMI_HANG", "5")
    gpus, why = runners_base.nvidia_gpus(timeout_s=0.5)
    assert gpus == [] and why == "nvidia-smi did not answer within 0.5 s"


def test_engine_probe_wants_an_nvidia_runtime_or_cdi_gpus():
    why = runners_base.engine_gpu_reason(FAKE_INFO_PLAIN)
    assert why and "no nvidia runtime and no CDI nvidia.com/gpu device" in why and "nvidia-ctk runtime configure" in why
    assert runners_base.engine_gpu_reason(FAKE_INFO_NVIDIA_RUNTIME) is None
    assert runners_base.engine_gpu_reason(FAKE_INFO_CDI) is None
    assert runners_base.engine_gpu_reason(
        {"Runtimes": {}, "DiscoveredDevices": [{"Source": "cdi", "ID": "vendor.com/fpga=0"}]}
    )


def test_a_device_id_that_does_not_exist_fails_the_target_before_any_build(tmp_path, fake_smi):
    fake_smi.setenv("FAKE_NVIDIA_SMI_GPUS", H200)
    listed = runners_base.nvidia_gpus()[0]
    assert listed == [
        {"index": "0", "uuid": "GPU-1111", "name": "NVIDIA H200", "compute_cap": "9.0", "driver_version": "570.86.15"}
    ]
    where = "targets.tensorrt.container.gpus"
    assert runners_base.gpu_request_reason({"device_ids": ["0"]}, listed, where) is None
    assert runners_base.gpu_request_reason({"device_ids": ["GPU-1111"]}, listed, where) is None
    assert runners_base.gpu_request_reason({"device_ids": ["3"]}, listed, where) == (
        "targets.tensorrt.container.gpus.device_ids: GPU '3' does not exist on this host "
        "(nvidia-smi lists: 0 (NVIDIA H200))"
    )
    assert "2 GPUs asked for, this host has 1" in runners_base.gpu_request_reason({"count": 2}, listed, where)
    # the docker runner refuses it in prepare, before it would build (or even reach) the engine
    m = _matrix(tmp_path, {"container": {"gpus": {"device_ids": ["3"]}}})
    with pytest.raises(ConfigError) as exc:
        DockerRunner(m, engine=None).prepare(m.targets["tensorrt"])
    assert "matrix.yaml: targets.tensorrt.container.gpus.device_ids: GPU '3' does not exist" in str(exc.value)


def test_the_device_fingerprint_is_in_the_keys_of_gpu_targets_only(tmp_path, fake_smi):
    m = _matrix(tmp_path, {}, {"onnxruntime": {}})
    trt, ort = m.targets["tensorrt"], m.targets["onnxruntime"]
    local = LocalRunner()
    fake_smi.setenv("FAKE_NVIDIA_SMI_GPUS", f"{H200};{L4}")
    assert local.device_fingerprint(ort) == ""  # CPU targets: keys as before
    both = local.device_fingerprint(trt)
    assert both == "nvidia-gpu=NVIDIA H200/sm9.0/driver570.86.15;NVIDIA L4/sm8.9/driver570.86.15"
    fake_smi.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert local.device_fingerprint(trt) == "nvidia-gpu=NVIDIA L4/sm8.9/driver570.86.15"
    fake_smi.delenv("CUDA_VISIBLE_DEVICES")
    # the docker runner fingerprints the GPUs it requests: device_ids, or the first `count`
    assert DockerRunner(m).device_fingerprint(trt) == "nvidia-gpu=NVIDIA H200/sm9.0/driver570.86.15"  # count: 1
    m1 = _matrix(tmp_path, {"container": {"gpus": {"device_ids": ["GPU-2222"]}}})
    assert DockerRunner(m1).device_fingerprint(m1.targets["tensorrt"]) == "nvidia-gpu=NVIDIA L4/sm8.9/driver570.86.15"
    # same code, params and inputs: another GPU is another key, so a shared workspace rebuilds the engine
    node = stage_node(m, "tensorrt", "convert")
    keys = set()
    for gpus in (H200, H200.replace("570.86.15", "575.51.03"), L4.replace("1,", "0,", 1)):
        fake_smi.setenv("FAKE_NVIDIA_SMI_GPUS", gpus)
        keys.add(
            node_key(node, "docker:sha256:abc;" + DockerRunner(m).device_fingerprint(trt), {"onnx": "d1"}, trt.folder)
        )
    assert len(keys) == 3
    fake_smi.setenv("FAKE_NVIDIA_SMI_FAIL", "No devices were found")
    with pytest.raises(Exception, match="cannot fingerprint the GPU for the stage keys: nvidia-smi failed"):
        local.device_fingerprint(trt)


def test_the_gpu_request_comes_from_the_validated_container_options(tmp_path):
    m = _matrix(tmp_path, {})
    trt = m.targets["tensorrt"]
    assert device_options(m, trt) == {
        "gpus": {"count": 1, "device_ids": []},
        "shm_size": "1g",
        "ulimits": {"memlock": {"soft": -1, "hard": -1}, "stack": {"soft": 67108864, "hard": 67108864}},
    }
    m = _matrix(tmp_path, {"container": {"gpus": {"device_ids": ["0", "2"]}, "shm_size": "2g"}})
    opts = device_options(m, m.targets["tensorrt"])
    assert opts["gpus"] == {"count": None, "device_ids": ["0", "2"]} and opts["shm_size"] == "2g"
    assert opts["ulimits"]["memlock"] == {"soft": -1, "hard": -1}  # the manifest's, kept
    assert device_options(m, m.targets["torch"]) == {}


# --------------------------------------------------------------------------- the image's probe


def test_image_probe_records_tensorrt_cuda_and_the_driver_floor():
    env = {
        "CUDA_VERSION": "12.8.0.038",
        "MM_CUDA_DRIVER_MIN": "570",
        "NVIDIA_REQUIRE_CUDA": "cuda>=12.8 brand=tesla,driver>=470,driver<471 brand=unknown,driver>=535,driver<536",
    }
    v = image_versions(env, "absent")
    assert v["tensorrt"] == "absent (built with MM_TENSORRT=absent)" and v["cuda"] == "12.8.0.038"
    assert v["cuda_driver_min"] == "570" and v["cuda_requires"] == "cuda>=12.8" and v["numpy"]
    assert driver_floor("") is None
    if importlib.util.find_spec("tensorrt") is None or not hasattr(__import__("tensorrt"), "Builder"):
        with pytest.raises(SystemExit) as exc:
            image_versions(env, "required")
        assert "MM_TENSORRT=absent" in str(exc.value)


def test_the_tensorrt_stubs_are_never_taken_for_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        expected = "TensorRT is not installed here"
    elif not hasattr(__import__("tensorrt"), "Builder"):
        expected = "only its type stubs (tensorrt-stubs), not TensorRT"
    else:
        pytest.skip("a real TensorRT is installed here")
    with pytest.raises(StageError, match=re.escape(expected)):
        require_tensorrt()


# --------------------------------------------------------------------------- typed against TensorRT's stubs


def _fixed_stubs(tmp_path: Path) -> Path:
    """A copy of tensorrt-stubs with its defects fixed so mypy can read it: parameters named ``in``
    (a keyword), a parameter without a default after defaults, and a module variable ``bool`` that
    shadows the builtin in every ``-> bool``."""
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1")
    out = tmp_path / "stubs"
    for f in dist.files or []:
        if f.suffix == ".pyi":
            text = Path(str(dist.locate_file(f))).read_text()
            text = re.sub(r"([(, ])in: ", r"\1in_: ", text)
            text = re.sub(r"^bool: ", "bool_: ", text, flags=re.M)
            fixed = []
            for line in text.splitlines():
                m = re.match(r"(\s*def \w+\()(.*)(\)\s*->.*)$", line)
                if m and "=" in m.group(2):
                    seen, params = False, []
                    for p in m.group(2).split(", "):
                        if p.startswith("*"):
                            seen = False
                        elif "=" in p:
                            seen = True
                        elif seen and ":" in p:
                            p += " = ..."
                        params.append(p)
                    line = m.group(1) + ", ".join(params) + m.group(3)
                fixed.append(line)
            dest = out / str(f)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text("\n".join(fixed) + "\n")
    return out


def _mypy(stubs: Path, *paths: str, cwd: Path = REPO_ROOT) -> list[str]:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed ([dev])")
    env = {**os.environ, "MYPYPATH": str(stubs)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--check-untyped-defs",
            "--cache-dir",
            str(stubs.parent / ".mypy_cache"),
            *paths,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # only our files' errors: the stubs have their own (unrelated) complaints
    return [
        ln
        for ln in proc.stdout.splitlines()
        if ": error:" in ln and not ln.startswith(str(stubs)) and ".venv" not in ln and "site-packages" not in ln
    ]


def test_targets_tensorrt_type_checks_against_tensorrt_stubs_and_old_api_is_caught(tmp_path):
    stubs = _fixed_stubs(tmp_path)
    bad = tmp_path / "old_api.py"
    bad.write_text(
        "import tensorrt as trt\n\n\ndef build() -> None:\n"
        "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "    config = builder.create_builder_config()\n"
        "    config.fp16_mode = True\n"
        "    builder.build_cuda_engine(builder.create_network(0))\n"
        "    config.max_workspace_size = 1 << 30\n"
    )
    errors = _mypy(stubs, "targets/tensorrt", str(bad))
    ours = [e for e in errors if e.startswith("targets/")]
    assert ours == [], "\n".join(ours)
    found = "\n".join(e for e in errors if e.startswith(str(bad)))
    assert '"IBuilderConfig" has no attribute "fp16_mode"' in found, errors
    assert '"Builder" has no attribute "build_cuda_engine"' in found, errors
    assert '"IBuilderConfig" has no attribute "max_workspace_size"' in found, errors


def test_no_weak_typing_api_in_the_target():
    """TensorRT 11 removed the precision builder flags and the calibrator: one strongly typed path
    (read from the code's syntax tree, so a comment naming them does not count)."""
    import ast

    used: set[str] = set()
    for path in (REPO_ROOT / "targets" / "tensorrt").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
                used.add(f"{base}.{node.attr}")
                used.add(node.attr)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                used.update(a.name for a in node.names)
                used.add(getattr(node, "module", None) or "")
    for gone in (
        "BuilderFlag.FP16",
        "BuilderFlag.INT8",
        "BuilderFlag.BF16",
        "int8_calibrator",
        "OBEY_PRECISION_CONSTRAINTS",
        "PREFER_PRECISION_CONSTRAINTS",
        "build_cuda_engine",
        "fp16_mode",
        "max_workspace_size",
        "pycuda",
        "pycuda.driver",
    ):
        assert gone not in used, gone
    assert {
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
        "execute_async_v3",
        "set_tensor_address",
        "set_input_shape",
        "set_memory_pool_limit",
        "build_serialized_network",
    } <= used


# --------------------------------------------------------------------------- with TensorRT and a GPU (not run here)


def _gpu_reason() -> str | None:
    why = runners_base.nvidia_reason()
    if why:
        return f"needs an NVIDIA GPU: {why}"
    try:
        require_tensorrt()
        from targets.tensorrt import cudart

        cudart.device_info()
    except StageError as exc:
        return f"needs TensorRT and cuda-python: {exc}"
    return None


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))


@gpu
@needs_gpu
def test_gpu_parser_lists_an_op_it_rejects(tmp_path):
    from targets.tensorrt.convert import build

    onnx = _tiny_onnx(tmp_path / "model.onnx", op="NoSuchOp", domain="com.example")
    with pytest.raises(StageError) as exc:
        build(
            onnx,
            {"precision": "fp32", "batch_size": 2, "max_batch": 4, "workspace_mib": 256, "tf32": False},
            tmp_path,
            tmp_path,
        )
    assert "TensorRT's ONNX parser refused it" in str(exc.value) and "NoSuchOp" in str(exc.value)
    assert not (tmp_path / planning.ENGINE_NAME).exists()


@gpu
@needs_gpu
def test_gpu_build_infer_and_reuse_the_timing_cache(tmp_path):
    import numpy as np

    from targets.common.contract import load_spec
    from targets.tensorrt import infer
    from targets.tensorrt.convert import build

    onnx = _tiny_onnx(tmp_path / "model.onnx")
    params = {"precision": "fp32", "batch_size": 4, "max_batch": 8, "workspace_mib": 256, "tf32": False}
    result = build(onnx, params, tmp_path, tmp_path)
    side = planning.read_sidecar(tmp_path / planning.SIDECAR_NAME)
    assert side["profile"]["max"][0] == 8 and (tmp_path / planning.TIMING_CACHE_NAME).stat().st_size > 0
    assert result["precision"] == "fp32"
    x = np.random.default_rng(0).standard_normal((11, 3, 256, 128)).astype(np.float32)
    np.save(tmp_path / "inputs.npy", x)
    (tmp_path / "out").mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            spec_to_json(
                "tensorrt",
                "infer",
                str(tmp_path),
                {"engine": planning.ENGINE_NAME, "sidecar": planning.SIDECAR_NAME, "inputs": "inputs.npy"},
                "out",
                {"batch_size": 4},
            )
        )
    )
    out = infer.run(load_spec(spec))
    feats = np.load(tmp_path / "out" / "features.npy")
    assert out["images"] == 11 and len(out["batch_seconds"]) == 3
    np.testing.assert_allclose(feats, x.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)
    with pytest.raises(StageError, match="larger than the engine's optimization profile max 8"):
        spec.write_text(spec.read_text().replace('"batch_size": 4', '"batch_size": 9'))
        infer.run(load_spec(spec))
