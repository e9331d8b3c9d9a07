"""Stage ``onnxruntime_int8.infer``: features from a QDQ model with ONNX Runtime's CPU provider,
the same loop as ``onnxruntime.infer``: ``activations: uint8`` (default) runs quantize.int8_u8 (the
CPU's fast U8S8 file), ``int8`` runs quantize.int8, the very file TensorRT compiles."""

from __future__ import annotations

from typing import Any, Dict

from targets.common.contract import Spec, main
from targets.onnxruntime import infer as ort_infer

PARAMS = {"providers": ["CPUExecutionProvider"], "graph_optimization": "all"}


def qdq_input(spec: Spec) -> Spec:
    """The chosen QDQ file as the ``onnx`` input the ONNX Runtime loop reads."""
    if "shared" in spec.inputs:
        spec.inputs["onnx"] = spec.inputs.pop("shared")
    spec.params = {**PARAMS, **spec.params}
    return spec


def run(spec: Spec) -> Dict[str, Any]:
    return ort_infer.run(qdq_input(spec))


if __name__ == "__main__":
    main(run)
