"""Stage ``torch.bench`` (run by ``invoke bench``): PyTorch eager throughput and latency.

Inputs as ``torch.infer`` (weights, meta, inputs). Params: ``batch_sizes`` (default
[1, 8, 16, 32]), ``warmup`` runs (default 3), then ``iterations`` runs (default 10) or as many as
fit in ``seconds``; ``threads`` as in infer. Batches cycle through inputs.npy. Writes bench.json.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from targets.common.arrays import bench_params, cycled_batches, measure
from targets.common.contract import Spec, atomic_write_json, main

from .infer import load_inputs, load_model, read_meta, set_threads, versions

DEFAULT_BATCH_SIZES = [1, 8, 16, 32]


def run(spec: Spec) -> Dict[str, Any]:
    cfg = bench_params(spec, DEFAULT_BATCH_SIZES)
    meta = read_meta(spec.input("meta"))
    arr = load_inputs(spec.input("inputs"), meta["input_size"])
    set_threads(spec.param("threads", 0))
    model = load_model(spec.input("weights"), meta)
    results = []
    with torch.inference_mode():
        for bs in cfg["batch_sizes"]:
            # torch.from_numpy shares memory: nothing is copied inside the timed call
            results.append(measure(lambda b: model(torch.from_numpy(b)), cycled_batches(arr, bs), cfg))
    report = {
        "target": spec.target,
        "results": results,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "params": {k: v for k, v in cfg.items() if k != "batch_sizes"},
    }
    atomic_write_json(spec.output("bench.json"), report)
    return report


if __name__ == "__main__":
    main(run)
