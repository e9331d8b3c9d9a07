"""Stage ``torch.bench`` (run by ``invoke bench``): PyTorch eager throughput and latency.

Inputs as ``torch.infer`` (weights, meta, inputs). Params: ``batch_sizes`` (default
[1, 8, 16, 32]), ``warmup`` runs (default 3), then ``iterations`` runs (default 10) or as many as
fit in ``seconds``; ``threads`` as in infer. Batches cycle through inputs.npy. Writes bench.json.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch

from targets.common.contract import Spec, StageError, atomic_write_json, main

from .infer import load_inputs, load_model, read_meta, set_threads, versions

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


def cycled_batches(arr: np.ndarray, batch_size: int) -> List[torch.Tensor]:
    """A few distinct batches, cycling through the images (prebuilt: not timed)."""
    n = arr.shape[0]
    count = max(1, min(MAX_DISTINCT_BATCHES, math.ceil(n / batch_size)))
    return [torch.from_numpy(np.ascontiguousarray(arr[(np.arange(batch_size) + k * batch_size) % n]))
            for k in range(count)]


def measure(call: Callable[[torch.Tensor], Any], batches: List[torch.Tensor],
            cfg: Dict[str, Any]) -> Dict[str, Any]:
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


def run(spec: Spec) -> Dict[str, Any]:
    cfg = bench_params(spec)
    meta = read_meta(spec.input("meta"))
    arr = load_inputs(spec.input("inputs"), meta["input_size"])
    set_threads(spec.param("threads", 0))
    model = load_model(spec.input("weights"), meta)
    results = []
    with torch.inference_mode():
        for bs in cfg["batch_sizes"]:
            results.append(measure(model, cycled_batches(arr, bs), cfg))
    report = {"target": spec.target, "results": results, "threads": torch.get_num_threads(),
              "versions": versions(), "params": {k: v for k, v in cfg.items() if k != "batch_sizes"}}
    atomic_write_json(spec.output("bench.json"), report)
    return report


if __name__ == "__main__":
    main(run)
