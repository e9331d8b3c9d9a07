"""Stage ``onnxruntime_int8.bench`` (run by ``invoke bench``): as ``onnxruntime.bench``, on the QDQ model infer runs."""

from __future__ import annotations

import resource
from typing import Any, Dict

from targets.common.contract import Spec, atomic_write_json, main
from targets.onnxruntime import bench as ort_bench

from .infer import qdq_input


def run(spec: Spec) -> Dict[str, Any]:
    report = ort_bench.run(qdq_input(spec))
    # the process's peak resident set over every batch size (Linux reports KiB)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    atomic_write_json(spec.output("bench.json"), report)
    return report


if __name__ == "__main__":
    main(run)
