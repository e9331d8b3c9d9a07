"""Stage ``onnxruntime.infer``: features from model.onnx with ONNX Runtime.

The loop is kept as bare as a hand-written ``sess.run`` loop: contiguous slices of the
(memory-mapped) input, one ``run`` per batch, the output copied once into a preallocated array.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from targets.common.arrays import load_inputs as common_load_inputs
from targets.common.contract import Spec, StageError, batched_timings, main, save_npy

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
#: What ONNX Runtime raises for a file it cannot use as a model.
LOAD_ERRORS = (
    ort_state.InvalidProtobuf,
    ort_state.InvalidGraph,
    ort_state.Fail,
    ort_state.NoSuchFile,
    ort_state.InvalidArgument,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)


def versions() -> Dict[str, str]:
    return {"onnxruntime": ort.__version__, "numpy": np.__version__}


def session_options(params: Dict[str, Any]) -> Tuple[ort.SessionOptions, List[str]]:
    opts = ort.SessionOptions()
    threads = int(params.get("intra_op_threads", 0))
    if threads < 0:
        raise StageError(f"intra_op_threads must be >= 0, got {threads}")
    if threads > 0:
        opts.intra_op_num_threads = threads
    level = params.get("graph_optimization", "all")
    if level not in OPT_LEVELS:
        raise StageError(f"graph_optimization: expected one of {', '.join(OPT_LEVELS)}, got {level!r}")
    opts.graph_optimization_level = OPT_LEVELS[level]
    providers = list(params.get("providers") or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise StageError(
            f"providers: {', '.join(map(str, unknown))} not available in this ONNX Runtime "
            f"{ort.__version__} (available: {', '.join(available)})"
        )
    return opts, providers


def open_session(path: Path, params: Dict[str, Any]) -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run torch.export first")
    opts, providers = session_options(params)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except LOAD_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", first)
        first = first.replace(f"Load model from {path} failed:", "").strip()[:200]
        raise StageError(
            f"{path}: ONNX Runtime cannot load it ({first}); truncated or corrupt? run torch.export again"
        ) from None


def input_spec(sess: ort.InferenceSession, onnx_path: Path) -> Tuple[str, Any, int, int]:
    """Input name, fixed batch (None when dynamic), height, width."""
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise StageError(f"{onnx_path}: has {len(inputs)} inputs, expected one image input")
    shape = inputs[0].shape
    if len(shape) != 4 or not all(isinstance(v, int) for v in shape[1:]):
        raise StageError(f"{onnx_path}: input shape {shape}, expected (batch, 3, H, W) with fixed H, W")
    batch = shape[0] if isinstance(shape[0], int) else None
    return inputs[0].name, batch, shape[2], shape[3]


def load_inputs(path: Path, height: int, width: int) -> np.ndarray:
    """inputs.npy for this ONNX model (memory-mapped float32 (N, 3, H, W))."""
    return common_load_inputs(path, (3, height, width))


def check_batch(batch_size: int, fixed_batch, n_images: int, onnx_path: Path) -> None:
    if batch_size < 1:
        raise StageError(f"batch_size must be >= 1, got {batch_size}")
    if fixed_batch is not None and (batch_size != fixed_batch or n_images % fixed_batch):
        raise StageError(
            f"{onnx_path}: exported with a fixed batch of {fixed_batch}, cannot run "
            f"{n_images} images in batches of {batch_size}; export with "
            "model.export.dynamic_batch: true"
        )


def infer(sess: ort.InferenceSession, name: str, arr: np.ndarray, batch_size: int):
    """Features (N, D) and the seconds of each session.run."""
    run = sess.run
    features = None
    seconds = []
    for start, stop in batched_timings(arr.shape[0], batch_size):
        feed = {name: np.ascontiguousarray(arr[start:stop])}  # a view: slices are contiguous
        t0 = time.perf_counter()
        out = run(None, feed)[0]
        seconds.append(time.perf_counter() - t0)
        if features is None:
            features = np.empty((arr.shape[0],) + out.shape[1:], dtype=np.float32)
        features[start:stop] = out
    if features is None:
        raise StageError(f"no images to run (inputs of shape {tuple(arr.shape)}); prepare at least one")
    return features.reshape(arr.shape[0], -1), seconds


def prepare(spec: Spec):
    """Session, input name, memory-mapped inputs and the checked batch size."""
    onnx_path = spec.input("onnx")
    sess = open_session(onnx_path, spec.params)
    name, fixed_batch, height, width = input_spec(sess, onnx_path)
    arr = load_inputs(spec.input("inputs"), height, width)
    batch_size = int(spec.param("batch_size", 16))
    check_batch(batch_size, fixed_batch, arr.shape[0], onnx_path)
    return sess, name, arr, batch_size


def run(spec: Spec) -> Dict[str, Any]:
    sess, name, arr, batch_size = prepare(spec)
    features, seconds = infer(sess, name, arr, batch_size)
    save_npy(spec.output("features.npy"), features)
    return {
        "batch_size": batch_size,
        "images": int(arr.shape[0]),
        "batch_seconds": seconds,
        "images_per_second": arr.shape[0] / sum(seconds),
        "providers": sess.get_providers(),
        "versions": versions(),
    }


if __name__ == "__main__":
    main(run)
