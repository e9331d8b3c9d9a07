"""numpy helpers every target's stages share: reading inputs.npy and timing a bench.

numpy is in every target image (Caffe's is Debian's 1.19: keep this module to old numpy APIs).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from .contract import Spec, StageError


def load_inputs(path: Path, chw: Sequence[int], consumer: str = "this model") -> np.ndarray:
    """inputs.npy memory-mapped as float32 (N, C, H, W), or one line saying what is wrong.

    Memory-mapped: the full Market1501 query+gallery is about 7.6 GB at 256x128."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run the prepare stage") from None
    except (ValueError, OSError, EOFError) as exc:
        raise StageError(f"{path}: not a readable .npy file ({exc}); run the prepare stage again") from None
    chw = tuple(int(v) for v in chw)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != chw:
        raise StageError(
            f"{path}: shape {tuple(arr.shape)}, but {consumer} takes (N, "
            f"{', '.join(map(str, chw))}); run prepare and export with the same model.input_size"
        )
    if arr.dtype != np.float32:
        raise StageError(f"{path}: dtype {arr.dtype}, expected float32; run the prepare stage again")
    if arr.shape[0] == 0:
        raise StageError(f"{path}: holds no images; check the dataset and data.limit")
    return arr


# --------------------------------------------------------------------------- bench stages


def bench_params(spec: Spec, batch_sizes: List[int], warmup: int = 3, iterations: int = 10) -> Dict[str, Any]:
    """batch_sizes, warmup, and either iterations or seconds (the defaults are the caller's)."""
    sizes = spec.param("batch_sizes", batch_sizes)
    if not (
        isinstance(sizes, list)
        and sizes
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)
    ):
        raise StageError(f"batch_sizes: expected a list of integers >= 1, got {sizes!r}")
    warm = int(spec.param("warmup", warmup))
    seconds = spec.param("seconds", None)
    iters = spec.param("iterations", None if seconds is not None else iterations)
    if warm < 0 or (iters is not None and int(iters) < 1) or (seconds is not None and float(seconds) <= 0):
        raise StageError("warmup must be >= 0, iterations >= 1, seconds > 0")
    return {
        "batch_sizes": sizes,
        "warmup": warm,
        "iterations": None if iters is None else int(iters),
        "seconds": None if seconds is None else float(seconds),
    }


def cycled_batches(arr: np.ndarray, batch_size: int, distinct: int = 8) -> List[np.ndarray]:
    """A few distinct contiguous batches cycling through the images (built before timing)."""
    n = arr.shape[0]
    count = max(1, min(distinct, math.ceil(n / batch_size)))
    return [np.ascontiguousarray(arr[(np.arange(batch_size) + k * batch_size) % n]) for k in range(count)]


def measure(call: Callable[[Any], Any], batches: List[Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Warm up, then time ``call(batch)`` per batch: img/s and p50/p95/mean latency."""
    for i in range(cfg["warmup"]):
        call(batches[i % len(batches)])
    latencies: List[float] = []
    started = time.perf_counter()
    while True:
        batch = batches[len(latencies) % len(batches)]
        t0 = time.perf_counter()
        call(batch)
        latencies.append(time.perf_counter() - t0)
        if cfg["iterations"] is not None:
            if len(latencies) >= cfg["iterations"]:
                break
        elif time.perf_counter() - started >= cfg["seconds"]:
            break
    lat = np.asarray(latencies)
    bs = batches[0].shape[0]
    return {
        "batch_size": bs,
        "iterations": len(latencies),
        "warmup": cfg["warmup"],
        "images_per_second": bs * len(lat) / float(lat.sum()),
        "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
        "latency_ms_p95": float(np.percentile(lat, 95) * 1e3),
        "latency_ms_mean": float(lat.mean() * 1e3),
    }
