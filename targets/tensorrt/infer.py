"""Stage ``tensorrt.infer``: features from the engine, with TensorRT's name-based I/O API.

Before TensorRT sees the engine, its sidecar is checked: the engine's sha256 (a corrupt or replaced
file is refused), the TensorRT version and the GPU it was built for (an engine of another version
or GPU is never loaded: the stage refuses it and names the rebuild; the device fingerprint in the
stage keys makes a normal run rebuild it on its own). Then: deserialize, one execution context,
one stream, pinned host buffers sized for the largest batch, and per batch ``set_input_shape`` ->
copy in -> ``execute_async_v3`` -> copy out -> synchronize, the last partial batch included. A
batch larger than the profile's max is refused before any work.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from targets.common.arrays import load_inputs
from targets.common.contract import Spec, StageError, main, save_npy

from . import cudart, require_tensorrt
from .planning import check_engine_file, dims, io_tensor, plan_batches, read_sidecar, stale_reason

DTYPES = {"FLOAT": np.float32, "HALF": np.float16}


def checked_engine(spec: Spec, version: str, device: Dict[str, Any]) -> Tuple[bytes, Dict[str, Any]]:
    """The engine bytes and its sidecar, once both say the engine belongs here."""
    engine_path, sidecar_path = spec.input("engine"), spec.input("sidecar")
    sidecar = read_sidecar(sidecar_path)
    stale = stale_reason(sidecar, version, device)
    if stale:
        raise StageError(
            f"{engine_path}: not loaded: {stale}; rebuild it here (invoke matrix --target "
            "tensorrt --force): an engine only runs on the TensorRT and GPU that built it"
        )
    return check_engine_file(engine_path, sidecar, sidecar_path), sidecar


def io_plan(sidecar: Dict[str, Any], where: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    inp, out = io_tensor(sidecar, "input", where), io_tensor(sidecar, "output", where)
    for t in (inp, out):
        if t.get("dtype") not in DTYPES:
            raise StageError(
                f"{where}: {t['mode']} {t['name']!r} is {t.get('dtype')}; expected FLOAT or HALF "
                "(export the reduced-precision ONNX with fp32 inputs/outputs)"
            )
    if len(inp.get("shape", [])) != 4:
        raise StageError(f"{where}: input {inp['name']!r} has shape {inp.get('shape')}, expected (batch, 3, H, W)")
    return inp, out


def run(spec: Spec) -> Dict[str, Any]:
    version = require_tensorrt()
    import tensorrt as trt

    device = cudart.device_info()
    engine_bytes, sidecar = checked_engine(spec, version, device)
    sidecar_path = spec.input("sidecar")
    inp, out = io_plan(sidecar, sidecar_path)
    chw = tuple(int(v) for v in inp["shape"][1:])
    arr = load_inputs(spec.input("inputs"), chw, consumer="this engine")
    batch_size = int(spec.param("batch_size", 16))
    prof = sidecar["profile"]
    batches = plan_batches(arr.shape[0], batch_size, int(prof["max"][0]), int(prof["min"][0]))
    largest = max(stop - start for start, stop in batches)

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise StageError(
            f"{spec.input('engine')}: TensorRT {version} cannot deserialize it (corrupt, or "
            "built by another TensorRT); run tensorrt.convert again"
        )
    context = engine.create_execution_context()
    if context is None:
        raise StageError(f"{spec.input('engine')}: no execution context (out of GPU memory?)")

    in_dtype, out_dtype = DTYPES[inp["dtype"]], DTYPES[out["dtype"]]
    stream = cudart.Stream()
    buffers: List[cudart.Buffer] = []
    try:
        per_in = int(np.prod(chw)) * np.dtype(in_dtype).itemsize
        if not context.set_input_shape(inp["name"], trt.Dims([largest, *chw])):
            raise StageError(f"batch {largest}: outside the engine's profile {prof['min']}..{prof['max']}")
        out_shape = dims(context.get_tensor_shape(out["name"]))
        per_out_items = int(np.prod(out_shape[1:]))
        per_out = per_out_items * np.dtype(out_dtype).itemsize
        host_in = cudart.Buffer(largest * per_in, pinned=True)
        buffers.append(host_in)
        host_out = cudart.Buffer(largest * per_out, pinned=True)
        buffers.append(host_out)
        dev_in = cudart.Buffer(largest * per_in, pinned=False)
        buffers.append(dev_in)
        dev_out = cudart.Buffer(largest * per_out, pinned=False)
        buffers.append(dev_out)
        in_view = host_in.array((largest,) + chw, in_dtype)
        out_view = host_out.array((largest, per_out_items), out_dtype)
        assert dev_in.ptr is not None and dev_out.ptr is not None
        context.set_tensor_address(inp["name"], dev_in.ptr)
        context.set_tensor_address(out["name"], dev_out.ptr)

        features = np.empty((arr.shape[0], per_out_items), dtype=np.float32)
        seconds: List[float] = []
        for start, stop in batches:
            b = stop - start
            t0 = time.perf_counter()
            in_view[:b] = arr[start:stop]
            if not context.set_input_shape(inp["name"], trt.Dims([b, *chw])):
                raise StageError(f"batch {b}: outside the engine's profile {prof['min']}..{prof['max']}")
            cudart.copy_async(dev_in, host_in, b * per_in, stream)
            if not context.execute_async_v3(stream.ptr):
                raise StageError(f"execute_async_v3 failed on images {start}..{stop - 1}; TensorRT's log says why")
            cudart.copy_async(host_out, dev_out, b * per_out, stream)
            stream.synchronize()
            features[start:stop] = out_view[:b]
            seconds.append(time.perf_counter() - t0)
    finally:
        for buf in reversed(buffers):
            buf.close()
        stream.close()
    save_npy(spec.output("features.npy"), features)
    return {
        "batch_size": batch_size,
        "images": int(arr.shape[0]),
        "batch_seconds": seconds,
        "images_per_second": arr.shape[0] / sum(seconds),
        "precision": sidecar.get("precision"),
        "profile": prof,
        "device": device,
        "versions": {"tensorrt": version, "numpy": np.__version__},
    }


if __name__ == "__main__":
    main(run)
