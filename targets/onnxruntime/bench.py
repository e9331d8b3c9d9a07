"""Stage ``onnxruntime.bench`` (run by ``invoke bench``): throughput and latency per batch size.

Params: ``batch_sizes`` (default [1, 8, 16, 32]), ``warmup`` runs (default 3), then ``iterations``
runs (default 10) or as many as fit in ``seconds``; batches cycle through inputs.npy. Also times,
over the whole inputs.npy at ``matrix_batch_size`` (default: ``batch_size``), a bare
``sess.run(None, {name: batch})`` loop against the infer stage's own loop in the same process, so
the host can tell the harness's overhead from the runtime's speed. Writes bench.json.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import numpy as np

from targets.common.arrays import bench_params, cycled_batches, measure
from targets.common.contract import Spec, StageError, atomic_write_json, main

from .infer import check_batch, infer, prepare, versions

DEFAULT_BATCH_SIZES = [1, 8, 16, 32]


def bare_loop(sess, name: str, arr: np.ndarray, batch_size: int) -> float:
    """What a user would write by hand; returns images per second (wall clock)."""
    n = arr.shape[0]
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        sess.run(None, {name: arr[start : start + batch_size]})
    return n / (time.perf_counter() - t0)


def matrix_loop(sess, name: str, arr: np.ndarray, batch_size: int) -> float:
    """The infer stage's loop, wall clock (output copies included); images per second."""
    t0 = time.perf_counter()
    infer(sess, name, arr, batch_size)
    return arr.shape[0] / (time.perf_counter() - t0)


def compare(sess, name: str, arr: np.ndarray, batch_size: int, repeats: int) -> Dict[str, Any]:
    """Best of ``repeats`` for each loop, in alternating order so drift hits both alike."""
    bare: List[float] = []
    matrix: List[float] = []
    for i in range(repeats):
        order = (bare_loop, matrix_loop) if i % 2 == 0 else (matrix_loop, bare_loop)
        for fn in order:
            (bare if fn is bare_loop else matrix).append(fn(sess, name, arr, batch_size))
    return {
        "batch_size": batch_size,
        "images": int(arr.shape[0]),
        "repeats": repeats,
        "bare_images_per_second": max(bare),
        "matrix_images_per_second": max(matrix),
        "matrix_over_bare": max(matrix) / max(bare),
    }


def run(spec: Spec) -> Dict[str, Any]:
    cfg = bench_params(spec, DEFAULT_BATCH_SIZES)
    sess, name, arr, batch_size = prepare(spec)
    fixed = sess.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and any(b != fixed for b in cfg["batch_sizes"]):
        raise StageError(
            f"{spec.input('onnx')}: exported with a fixed batch of {fixed}; set "
            f"batch_sizes: [{fixed}] or export with model.export.dynamic_batch: true"
        )
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
    report = {
        "target": spec.target,
        "results": results,
        "comparison": comparison,
        "providers": sess.get_providers(),
        "versions": versions(),
        "params": {k: v for k, v in cfg.items() if k != "batch_sizes"},
    }
    atomic_write_json(spec.output("bench.json"), report)
    return report


if __name__ == "__main__":
    main(run)
