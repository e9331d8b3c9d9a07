"""Stage ``onnxruntime.bench`` (run by ``invoke bench``): throughput and latency per batch size.

Params: ``batch_sizes`` (default [1, 8, 16, 32]), ``warmup`` runs (default 3), then ``iterations``
runs (default 10) or as many as fit in ``seconds``; batches cycle through inputs.npy. Also times,
over the whole inputs.npy at ``matrix_batch_size`` (default: ``batch_size``), a bare
``sess.run(None, {name: batch})`` loop against the infer stage's own loop in the same process, so
the host can tell the harness's overhead from the runtime's speed. Writes bench.json.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List

import numpy as np

from targets.common.contract import Spec, StageError, atomic_write_json, main

from .infer import check_batch, infer, prepare, versions

DEFAULT_BATCH_SIZES = [1, 8, 16, 32]
MAX_DISTINCT_BATCHES = 8


def bench_params(spec: Spec) -> Dict[str, Any]:
    sizes = spec.param("batch_sizes", DEFAULT_BATCH_SIZES)
    if not (isinstance(sizes, list) and sizes and all(isinstance(b, int) and b >= 1 for b in sizes)):
        raise StageError(f"batch_sizes: expected a list of integers >= 1, got {sizes!r}")
    warmup = int(spec.param("warmup", 3))
    seconds = spec.param("seconds", None)
    iterations = spec.param("iterations", None if seconds is not None else 10)
    if warmup < 0 or (iterations is not None and int(iterations) < 1) or \
            (seconds is not None and float(seconds) <= 0):
        raise StageError("warmup must be >= 0, iterations >= 1, seconds > 0")
    return {"batch_sizes": sizes, "warmup": warmup,
            "iterations": None if iterations is None else int(iterations),
            "seconds": None if seconds is None else float(seconds)}


def cycled_batches(arr: np.ndarray, batch_size: int) -> List[np.ndarray]:
    """A few distinct contiguous batches, cycling through the images (prebuilt: not timed)."""
    n = arr.shape[0]
    count = max(1, min(MAX_DISTINCT_BATCHES, math.ceil(n / batch_size)))
    return [np.ascontiguousarray(arr[(np.arange(batch_size) + k * batch_size) % n]) for k in range(count)]


def measure(call: Callable[[np.ndarray], Any], batches: List[np.ndarray], cfg: Dict[str, Any]) -> Dict[str, Any]:
    for i in range(cfg["warmup"]):
        call(batches[i % len(batches)])
    latencies = []
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
    return {"batch_size": bs, "iterations": len(latencies), "warmup": cfg["warmup"],
            "images_per_second": bs * len(lat) / float(lat.sum()),
            "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
            "latency_ms_p95": float(np.percentile(lat, 95) * 1e3),
            "latency_ms_mean": float(lat.mean() * 1e3)}


def bare_loop(sess, name: str, arr: np.ndarray, batch_size: int) -> float:
    """What a user would write by hand; returns images per second (wall clock)."""
    n = arr.shape[0]
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        sess.run(None, {name: arr[start:start + batch_size]})
    return n / (time.perf_counter() - t0)


def matrix_loop(sess, name: str, arr: np.ndarray, batch_size: int) -> float:
    """The infer stage's loop, wall clock (output copies included); images per second."""
    t0 = time.perf_counter()
    infer(sess, name, arr, batch_size)
    return arr.shape[0] / (time.perf_counter() - t0)


def compare(sess, name: str, arr: np.ndarray, batch_size: int, repeats: int) -> Dict[str, Any]:
    """Best of ``repeats`` for each loop, in alternating order so drift hits both alike."""
    bare, matrix = [], []
    for i in range(repeats):
        order = (bare_loop, matrix_loop) if i % 2 == 0 else (matrix_loop, bare_loop)
        for fn in order:
            (bare if fn is bare_loop else matrix).append(fn(sess, name, arr, batch_size))
    return {"batch_size": batch_size, "images": int(arr.shape[0]), "repeats": repeats,
            "bare_images_per_second": max(bare), "matrix_images_per_second": max(matrix),
            "matrix_over_bare": max(matrix) / max(bare)}


def run(spec: Spec) -> Dict[str, Any]:
    cfg = bench_params(spec)
    sess, name, arr, batch_size = prepare(spec)
    fixed = sess.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and any(b != fixed for b in cfg["batch_sizes"]):
        raise StageError(f"{spec.input('onnx')}: exported with a fixed batch of {fixed}; set "
                         f"batch_sizes: [{fixed}] or export with model.export.dynamic_batch: true")
    results = []
    for bs in cfg["batch_sizes"]:
        batches = cycled_batches(arr, bs)
        results.append(measure(lambda b: sess.run(None, {name: b}), batches, cfg))
    matrix_bs = int(spec.param("matrix_batch_size", batch_size))
    check_batch(matrix_bs, fixed if isinstance(fixed, int) else None, arr.shape[0], spec.input("onnx"))
    repeats = int(spec.param("compare_repeats", 1))
    if repeats < 1:
        raise StageError(f"compare_repeats must be >= 1, got {repeats}")
    comparison = compare(sess, name, arr, matrix_bs, repeats)
    report = {"target": spec.target, "results": results, "comparison": comparison,
              "providers": sess.get_providers(), "versions": versions(),
              "params": {k: v for k, v in cfg.items() if k != "batch_sizes"}}
    atomic_write_json(spec.output("bench.json"), report)
    return report


if __name__ == "__main__":
    main(run)
