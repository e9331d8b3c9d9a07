"""Stage ``caffe.bench``: pycaffe throughput and latency per batch size (CPU).

Inputs as ``caffe.infer`` (prototxt, caffemodel, inputs.npy). Params: ``batch_sizes`` (default
[1, 8, 16]), ``warmup`` forwards per size (default 1), then ``iterations`` forwards (default 5)
or as many as fit in ``seconds``; batches cycle through inputs.npy. Each timed call is what
``caffe.infer`` times: input copy (with a reshape when the size changes), ``net.forward()``, the
output view. Writes bench.json (the same dict as result.json).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List

import numpy as np

from targets.common.contract import Spec, StageError, atomic_write_json, main

from .infer import forward, prepare, versions

DEFAULT_BATCH_SIZES = [1, 8, 16]
MAX_DISTINCT_BATCHES = 4


def bench_params(spec: Spec) -> Dict[str, Any]:
    sizes = spec.param("batch_sizes", DEFAULT_BATCH_SIZES)
    if not (isinstance(sizes, list) and sizes and
            all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)):
        raise StageError(f"batch_sizes: expected a list of integers >= 1, got {sizes!r}")
    warmup = int(spec.param("warmup", 1))
    seconds = spec.param("seconds", None)
    iterations = spec.param("iterations", None if seconds is not None else 5)
    if warmup < 0 or (iterations is not None and int(iterations) < 1) or \
            (seconds is not None and float(seconds) <= 0):
        raise StageError("warmup must be >= 0, iterations >= 1, seconds > 0")
    return {"batch_sizes": sizes, "warmup": warmup,
            "iterations": None if iterations is None else int(iterations),
            "seconds": None if seconds is None else float(seconds)}


def cycled_batches(arr: np.ndarray, batch_size: int) -> List[np.ndarray]:
    """A few distinct batches cycling through the images (built before timing)."""
    n = arr.shape[0]
    count = max(1, min(MAX_DISTINCT_BATCHES, math.ceil(n / batch_size)))
    return [np.ascontiguousarray(arr[(np.arange(batch_size) + k * batch_size) % n]) for k in range(count)]


def measure(call: Callable[[np.ndarray], Any], batches: List[np.ndarray], cfg: Dict[str, Any]) -> Dict[str, Any]:
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
    return {"batch_size": bs, "iterations": len(latencies), "warmup": cfg["warmup"],
            "images_per_second": bs * len(lat) / float(lat.sum()),
            "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
            "latency_ms_p95": float(np.percentile(lat, 95) * 1e3),
            "latency_ms_mean": float(lat.mean() * 1e3)}


def run(spec: Spec) -> Dict[str, Any]:
    cfg = bench_params(spec)
    caffe, net, input_name, output, arr, _ = prepare(spec)
    results = []
    for bs in cfg["batch_sizes"]:
        batches = cycled_batches(arr, bs)
        results.append(measure(lambda b: forward(net, input_name, output, b), batches, cfg))
    report = {"target": spec.target, "results": results, "versions": versions(caffe),
              "params": {k: v for k, v in cfg.items() if k != "batch_sizes"}}
    atomic_write_json(spec.output("bench.json"), report)
    return report


if __name__ == "__main__":
    main(run)
