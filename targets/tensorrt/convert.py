"""Stage ``tensorrt.convert``: ONNX -> a strongly typed TensorRT engine, one build path for 10.x/11.x.

Strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; accepted and ignored by TensorRT 11,
where every network is): the tensor types in the ONNX are the precision. fp32 builds
torch.export's model.onnx, fp16 the shared model.fp16.onnx, int8 the shared QDQ model.qdq.onnx
(explicit quantisation, calibrated once by the quantize target). No FP16/INT8 builder flags and no
calibrator: TensorRT 11 removed them.

One optimization profile, batch min 1 / opt batch_size / max max_batch, so one engine serves every
batch; a workspace memory-pool limit; a timing cache saved beside the engine and reused by the next
build on the same GPU and TensorRT; the engine written atomically with a sidecar JSON
(:func:`targets.tensorrt.planning.make_sidecar`). Every ONNX parser error is listed, one line.

``python -m targets.tensorrt.convert --dry-run SPEC`` prints what would be built (and the equivalent
``trtexec`` line) without TensorRT.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from targets.common.contract import Spec, StageError, atomic_write_bytes, atomic_write_json, load_spec, main

from . import cudart, require_tensorrt
from .planning import (
    ENGINE_NAME,
    SIDECAR_NAME,
    TIMING_CACHE_NAME,
    Profile,
    describe_parser_errors,
    dims,
    dry_run_lines,
    file_sha256,
    make_sidecar,
    onnx_input,
    plan_profile,
    read_sidecar,
    stale_reason,
)

#: where the previous build's outputs are seen from a stage: the workspace's pointer to the current
#: tensorrt.convert folder (read-only; only ever a speed hint, never a result)
PREVIOUS = Path("targets") / "tensorrt" / "convert"


def build_params(params: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "precision": str(params.get("precision", "fp32")),
        "batch_size": int(params.get("batch_size", 16)),
        "max_batch": int(params.get("max_batch", 32)),
        "workspace_mib": int(params.get("workspace_mib", 1024)),
        "tf32": bool(params.get("tf32", False)),
    }
    if out["workspace_mib"] < 16:
        raise StageError(f"workspace_mib must be >= 16, got {out['workspace_mib']}")
    return out


# --------------------------------------------------------------------------- TensorRT (lazy)


def parser_errors(parser: Any) -> List[Dict[str, Any]]:
    """Every error of an ``OnnxParser``, as plain dicts (node index, node name, op, code, message)."""
    out = []
    for i in range(int(parser.num_errors)):
        e = parser.get_error(i)
        out.append(
            {
                "node": int(e.node()),
                "node_name": str(e.node_name()),
                "op": str(e.node_operator()),
                "code": getattr(e.code(), "name", str(e.code())),
                "desc": str(e.desc()),
            }
        )
    return out


def previous_timing_cache(root: Path, tensorrt_version: str, device: Dict[str, Any]) -> Tuple[bytes, str]:
    """(cache bytes, why) of the previous build when it was made by this TensorRT on this GPU; else b""."""
    folder = root / PREVIOUS
    cache, sidecar = folder / TIMING_CACHE_NAME, folder / SIDECAR_NAME
    if not cache.is_file() or not sidecar.is_file():
        return b"", "no previous build"
    try:
        stale = stale_reason(read_sidecar(sidecar), tensorrt_version, device)
    except StageError as exc:
        return b"", f"previous sidecar unreadable ({exc})"
    if stale:
        return b"", f"previous cache not reused: {stale}"
    return cache.read_bytes(), f"reused {cache}"


def build(onnx_path: Path, params: Dict[str, Any], out_dir: Path, root: Path) -> Dict[str, Any]:
    """Parse, configure, build; write engine, timing cache and sidecar. Returns the stage result."""
    version = require_tensorrt()
    import tensorrt as trt

    device = cudart.device_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        raise StageError(describe_parser_errors(onnx_path, parser_errors(parser)))
    if network.num_inputs != 1:
        raise StageError(f"{onnx_path}: has {network.num_inputs} inputs, expected one image input")
    image = network.get_input(0)
    profile = plan_profile(
        image.name, dims(image.shape), params["batch_size"], params["max_batch"], where=str(onnx_path)
    )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, params["workspace_mib"] << 20)
    if not params["tf32"] and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers in fp32: parity with the reference
    lo, opt, hi = profile.shapes()
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(profile.input, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(trt_profile)
    cache_bytes, cache_note = previous_timing_cache(root, version, device)
    timing_cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(timing_cache, False):
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, False)
        cache_note += " (TensorRT refused it; started a new one)"
    parse_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StageError(
            f"{onnx_path}: TensorRT could not build an engine (precision {params['precision']}, "
            f"workspace {params['workspace_mib']} MiB); its log above says why (raise "
            "workspace_mib if a tactic ran out of memory)"
        )
    build_s = time.perf_counter() - t1
    engine_bytes = bytes(memoryview(serialized))

    # Load what was built: its I/O as TensorRT reports it goes into the sidecar.
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise StageError(f"{onnx_path}: TensorRT built an engine it cannot deserialize; run again")
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        io.append(
            {
                "name": name,
                "mode": mode,
                "dtype": engine.get_tensor_dtype(name).name,
                "shape": list(dims(engine.get_tensor_shape(name))),
            }
        )

    atomic_write_bytes(out_dir / ENGINE_NAME, engine_bytes)
    atomic_write_bytes(out_dir / TIMING_CACHE_NAME, bytes(memoryview(config.get_timing_cache().serialize())))
    sidecar = make_sidecar(
        tensorrt_version=version,
        device=device,
        precision=params["precision"],
        profile=profile,
        io=io,
        onnx_file=onnx_path.name,
        onnx_sha256=file_sha256(onnx_path),
        engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
        builder={
            "strongly_typed": bool(flags),
            "workspace_mib": params["workspace_mib"],
            "tf32": params["tf32"],
            "timing_cache": cache_note,
        },
    )
    atomic_write_json(out_dir / SIDECAR_NAME, sidecar)
    return {
        "precision": params["precision"],
        "profile": profile.as_json(),
        "engine_bytes": len(engine_bytes),
        "parse_seconds": parse_s,
        "build_seconds": build_s,
        "timing_cache": cache_note,
        "device": device,
        "versions": {"tensorrt": version},
    }


def run(spec: Spec) -> Dict[str, Any]:
    params = build_params(spec.params)
    _name, onnx_path = onnx_input(params["precision"], spec.inputs)
    return build(onnx_path, params, spec.out_dir, spec.root)


# --------------------------------------------------------------------------- dry run (no TensorRT)


def onnx_image_input(path: Path) -> Tuple[str, Tuple[int, ...]]:
    """Name and shape (-1 for a symbolic dim) of the ONNX's one input, read with the onnx package."""
    try:
        import onnx
    except ImportError:
        raise StageError("a dry run reads the ONNX input with the onnx package, which is not installed here") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others: one line
        raise StageError(f"{path}: not a readable ONNX model ({type(exc).__name__}); run its producer again") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise StageError(f"{path}: has {len(inputs)} inputs, expected one image input")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)


def dry_run(spec: Spec) -> List[str]:
    params = build_params(spec.params)
    _name, onnx_path = onnx_input(params["precision"], spec.inputs)
    name, shape = onnx_image_input(onnx_path)
    profile: Profile = plan_profile(name, shape, params["batch_size"], params["max_batch"], where=str(onnx_path))
    return dry_run_lines(params["precision"], onnx_path, profile, params["workspace_mib"], spec.out_dir, params["tf32"])


def _cli(argv: List[str]) -> Optional[int]:
    if len(argv) == 2 and argv[0] == "--dry-run":
        try:
            print("\n".join(dry_run(load_spec(argv[1]))))
        except StageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    return None


if __name__ == "__main__":
    code = _cli(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    main(run)
