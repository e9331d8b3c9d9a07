"""Stage ``quantize.int8``: static QDQ int8 from model.onnx, calibrated on the first N prepared inputs.

The exported model (opset 11, for ATC) is upgraded to opset 13 (per-channel DequantizeLinear needs
it), then ONNX Runtime's ``quantize_static`` writes QuantizeLinear/DequantizeLinear pairs: int8
weights, symmetric, per output channel; int8 activations, symmetric (zero point 0). That is what
TensorRT's explicit quantisation accepts, and ONNX Runtime's CPU provider runs the same file.

``keep_fp32`` (default ``stem``): the first Conv (the one reading the image: 3 input channels, 2% of
the MACs) gets no Q/DQ and stays fp32; ``none`` quantises every Conv. Measured on the fine-tuned
checkpoint (report: targets/quantize/target.yaml) it lifts the cosine to fp32 in every case, and a
QDQ graph with an unquantised layer is still what TensorRT's explicit quantisation accepts (that
layer runs in the tensor's own precision).

Calibration: the first ``calibration_images`` rows of prepare/inputs.npy (the same tensor every
backend reads; all of them, said in the sidecar and the log, when there are fewer), method minmax,
entropy or percentile. Sidecar quantization.json: method, N (requested and used), the sha256 of the
calibration images' bytes, opset, source sha256, tool versions.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from targets.common.arrays import load_inputs
from targets.common.contract import Spec, StageError, atomic_write_bytes, atomic_write_json, main

from .common import default_opset, load_model, sha256_file, upgrade, versions

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
CALIBRATION_BATCH = 8
KEEP_FP32 = ("none", "stem")


def fp32_nodes(model: onnx.ModelProto, keep: str) -> List[str]:
    """The node names ``keep_fp32`` leaves unquantised (named: quantize_static excludes by name)."""
    if keep == "none":
        return []
    first = next((n for n in model.graph.node if n.op_type == "Conv"), None)
    if first is None:
        return []
    if not first.name:
        first.name = "modelmatrix_stem_conv"
    return [first.name]


class Reader(CalibrationDataReader):
    def __init__(self, name: str, images: np.ndarray):
        self.name, self.images, self.pos = name, images, 0

    def get_next(self):
        if self.pos >= self.images.shape[0]:
            return None
        batch = np.ascontiguousarray(self.images[self.pos : self.pos + CALIBRATION_BATCH])
        self.pos += CALIBRATION_BATCH
        return {self.name: batch}

    def rewind(self) -> None:
        self.pos = 0


def run(spec: Spec) -> Dict[str, Any]:
    path = spec.input("onnx")
    method = spec.param("method", "minmax")
    if method not in METHODS:
        raise StageError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    requested = int(spec.param("calibration_images", 64))
    if requested < 1:
        raise StageError(f"calibration_images must be >= 1, got {requested}")
    opset = int(spec.param("opset", 13))
    keep = str(spec.param("keep_fp32", "stem"))
    if keep not in KEEP_FP32:
        raise StageError(f"keep_fp32: expected one of {', '.join(KEEP_FP32)}, got {keep!r}")
    model = upgrade(load_model(path), opset, path)
    exclude = fp32_nodes(model, keep)
    inp = model.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    arr = load_inputs(spec.input("calibration"), dims[1:], str(path))
    used = min(requested, arr.shape[0])
    notes = []
    if used < requested:
        notes.append(f"calibration_images {requested} > the {arr.shape[0]} prepared images: calibrated on all {used}")
        print(f"warning: {spec.label('calibration')}: {notes[-1]}", flush=True)
    if used == 1:
        notes.append("calibrated on ONE image: the activation ranges are those of that image only")
        print(f"warning: {notes[-1]}", flush=True)
    images = np.ascontiguousarray(arr[:used], dtype=np.float32)
    calib_sha = hashlib.sha256(images.tobytes()).hexdigest()
    extra: Dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True}
    if method == "percentile":
        extra["CalibPercentile"] = float(spec.param("percentile", 99.999))
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=spec.out_dir) as tmp:
        src = Path(tmp) / "model.opset.onnx"
        onnx.save(model, str(src))
        dst = Path(tmp) / "model.qdq.onnx"
        try:
            quantize_static(
                str(src),
                str(dst),
                Reader(inp.name, images),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=METHODS[method],
                extra_options=extra,
                nodes_to_exclude=exclude,
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise StageError(f"{path}: ONNX Runtime's quantize_static failed ({type(exc).__name__}: {first})") from None
        data = dst.read_bytes()
    qmodel = onnx.load_from_string(data)
    counts: Dict[str, int] = {}
    for node in qmodel.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts.get("QuantizeLinear"):
        raise StageError(f"{path}: quantize_static wrote no QuantizeLinear node: nothing was quantised")
    atomic_write_bytes(spec.output("model.qdq.onnx"), data)
    side = {
        "method": method,
        "calibration_images": used,
        "calibration_images_requested": requested,
        "calibration_sha256": calib_sha,
        "calibration_source": spec.label("calibration"),
        "opset": default_opset(qmodel),
        "source_sha256": sha256_file(path),
        "weights": "int8 symmetric per-channel",
        "activations": "int8 symmetric per-tensor",
        "percentile": extra.get("CalibPercentile"),
        "qdq_nodes": counts,
        "notes": notes,
        "keep_fp32": keep,
        "fp32_nodes": exclude,
        "versions": versions(),
    }
    atomic_write_json(spec.output("quantization.json"), side)
    return side


if __name__ == "__main__":
    main(run)
