"""Stage ``caffe.bench``: pycaffe throughput and latency per batch size (CPU).

Inputs as ``caffe.infer`` (prototxt, caffemodel, inputs.npy). Params: ``batch_sizes`` (default
[1, 8, 16]), ``warmup`` forwards per size (default 1), then ``iterations`` forwards (default 5)
or as many as fit in ``seconds``; batches cycle through inputs.npy. Each timed call is what
``caffe.infer`` times: input copy (with a reshape when the size changes), ``net.forward()``, the
output view. Writes bench.json (the same dict as result.json).
"""

from __future__ import annotations

from typing import Any, Dict

from targets.common.arrays import bench_params, cycled_batches, measure
from targets.common.contract import Spec, atomic_write_json, main

from .infer import forward, prepare, versions

DEFAULT_BATCH_SIZES = [1, 8, 16]
MAX_DISTINCT_BATCHES = 4


def run(spec: Spec) -> Dict[str, Any]:
    cfg = bench_params(spec, DEFAULT_BATCH_SIZES, warmup=1, iterations=5)
    caffe, net, input_name, output, arr, _ = prepare(spec)
    results = []
    for bs in cfg["batch_sizes"]:
        batches = cycled_batches(arr, bs, MAX_DISTINCT_BATCHES)
        results.append(measure(lambda b: forward(net, input_name, output, b), batches, cfg))
    report = {
        "target": spec.target,
        "results": results,
        "versions": versions(caffe),
        "params": {k: v for k, v in cfg.items() if k != "batch_sizes"},
    }
    atomic_write_json(spec.output("bench.json"), report)
    return report


if __name__ == "__main__":
    main(run)
