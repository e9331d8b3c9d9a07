"""Stage ``onnxruntime_fp16.infer``: features from the shared fp16 model (quantize.fp16) with ONNX
Runtime's CPU provider: the same loop as ``onnxruntime.infer``, on the reduced-precision file."""

from __future__ import annotations

from typing import Any, Dict

from targets.common.contract import Spec, main
from targets.onnxruntime import infer as ort_infer

PARAMS = {"providers": ["CPUExecutionProvider"], "graph_optimization": "all"}


def run(spec: Spec) -> Dict[str, Any]:
    spec.params = {**PARAMS, **spec.params}
    return ort_infer.run(spec)


if __name__ == "__main__":
    main(run)
