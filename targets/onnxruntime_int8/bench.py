"""Stage ``onnxruntime_int8.bench`` (run by ``invoke bench``): as ``onnxruntime.bench``, on the QDQ model."""
from __future__ import annotations

from typing import Any, Dict

from targets.common.contract import Spec, main
from targets.onnxruntime import bench as ort_bench

PARAMS = {"providers": ["CPUExecutionProvider"], "graph_optimization": "all"}


def run(spec: Spec) -> Dict[str, Any]:
    spec.params = {**PARAMS, **spec.params}
    return ort_bench.run(spec)


if __name__ == "__main__":
    main(run)
