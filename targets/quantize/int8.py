"""Stage ``quantize.int8``: static QDQ int8 from model.onnx, calibrated on the first N prepared inputs.

The exported model (opset 11, for ATC) is upgraded to opset 13 (per-channel DequantizeLinear needs
it), then ONNX Runtime's ``quantize_static`` writes QuantizeLinear/DequantizeLinear pairs: int8
weights, symmetric, per output channel; int8 activations, symmetric (zero point 0). That is what
TensorRT's explicit quantisation accepts; ONNX Runtime's CPU provider runs it too, but at fp32
speed on x86, so ``quantize.int8_u8`` (int8_u8.py) writes the CPU's file from the same code with
uint8 activations (``quantize``'s ``activations`` argument).

``keep_fp32`` (default ``stem+neck``): the first Conv (the one reading the image: 3 input channels,
2% of the MACs) gets no Q/DQ and stays fp32 (measured: it lifts the cosine to fp32 in every case),
and so does the BNNeck (the last BatchNormalization, on the pooled feature: 2048 multiply-adds);
``stem`` keeps the stem only, ``none`` quantises every Conv. A QDQ graph with an unquantised layer
is still what TensorRT's explicit quantisation accepts (that layer runs in its tensor's precision).

``bias_correction`` (default ``neck``): the BNNeck subtracts a running mean and divides by a spread
that is a small fraction of the pooled feature's mean, so the int8 trunk's small per-channel mean
shift of the pooled feature becomes a large constant offset of the BNNeck feature. The shift is
measured on the calibration images (the same images through the fp32 and the QDQ model, paired)
and added to the fp32 BNNeck's running mean in model.qdq.onnx (empirical bias correction); the
sidecar says by how much. Measured in targets/onnxruntime_int8/target.yaml.

Calibration: the first ``calibration_images`` rows of prepare/inputs.npy (the same tensor every
backend reads; all of them, said in the sidecar and the log, when there are fewer), method minmax,
entropy or percentile. Sidecar quantization.json: method, N (requested and used), the sha256 of the
calibration images' bytes, opset, source sha256, tool versions.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper
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
KEEP_FP32 = ("none", "stem", "neck", "stem+neck")
#: the activation encodings: int8 symmetric (zero point 0: TensorRT's explicit quantisation) for
#: quantize.int8, uint8 asymmetric for quantize.int8_u8 (ONNX Runtime's fast x86 path, U8S8)
ACTIVATIONS = {
    "int8": (QuantType.QInt8, True, "int8 symmetric per-tensor"),
    "uint8": (QuantType.QUInt8, False, "uint8 asymmetric per-tensor"),
}
CORRECTIONS = ("none", "neck")


def neck_node(model: onnx.ModelProto) -> Optional[onnx.NodeProto]:
    """The BNNeck: the last BatchNormalization, when it normalises a pooled (N x C) feature."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        return None
    last = bns[-1]
    producers = {o: n for n in model.graph.node for o in n.output}
    src = producers.get(last.input[0])
    while src is not None and src.op_type in ("DequantizeLinear", "QuantizeLinear"):  # the QDQ pair in front
        src = producers.get(src.input[0])
    if src is None or src.op_type not in ("Flatten", "Reshape", "Squeeze", "GlobalAveragePool"):
        return None
    if not last.name:
        last.name = "modelmatrix_neck_bn"
    return last


def fp32_nodes(model: onnx.ModelProto, keep: str) -> List[str]:
    """The node names ``keep_fp32`` leaves unquantised (named: quantize_static excludes by name)."""
    out: List[str] = []
    first = next((n for n in model.graph.node if n.op_type == "Conv"), None)
    if first is not None and keep in ("stem", "stem+neck"):
        if not first.name:
            first.name = "modelmatrix_stem_conv"
        out.append(first.name)
    if keep in ("neck", "stem+neck"):
        neck = neck_node(model)
        if neck is not None:
            out.append(neck.name)
    return out


def _with_output(model: onnx.ModelProto, name: str) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m.SerializeToString()


def _tensor(model: bytes, input_name: str, output: str, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    outs = [
        sess.run([output], {input_name: np.ascontiguousarray(images[i : i + CALIBRATION_BATCH])})[0]
        for i in range(0, images.shape[0], CALIBRATION_BATCH)
    ]
    return np.concatenate(outs).reshape(images.shape[0], -1).astype(np.float64)


def correct_neck_bias(
    fp32: onnx.ModelProto, qmodel: onnx.ModelProto, input_name: str, images: np.ndarray
) -> Dict[str, Any]:
    """Empirical bias correction of the fp32 BNNeck (Nagel et al. 2019, "Data-free quantization",
    sec. 4.2, measured instead of modelled): the int8 trunk shifts the pooled feature's mean per
    channel; the BNNeck subtracts a running mean that is a fraction of that feature's spread
    across images, so an uncorrected shift becomes a constant offset of the BNNeck feature. The
    shift is the mean over the calibration images of (int8 pooled - fp32 pooled), paired image by
    image (the same images through both models); it is added to the BNNeck's running mean in the
    QDQ model. Returns what was done (for the sidecar)."""
    neck, ref_neck = neck_node(qmodel), neck_node(fp32)
    if neck is None or ref_neck is None:
        return {"applied": False, "reason": "no BatchNormalization on a pooled feature (no BNNeck)"}
    inits = {i.name for i in qmodel.graph.initializer}
    if neck.input[1] not in inits:  # its scale comes from a DequantizeLinear: the neck is int8
        return {"applied": False, "reason": f"{neck.name} is quantised (keep_fp32 neck or stem+neck keeps it fp32)"}
    # the same tensor in both graphs (quantize_static renames the neck's input to a DQ output)
    ref = _tensor(_with_output(fp32, ref_neck.input[0]), input_name, ref_neck.input[0], images)
    got = _tensor(_with_output(qmodel, neck.input[0]), input_name, neck.input[0], images)
    shift = (got - ref).mean(axis=0)
    mean_init = next((i for i in qmodel.graph.initializer if i.name == neck.input[3]), None)
    var_init = next((i for i in qmodel.graph.initializer if i.name == neck.input[4]), None)
    if mean_init is None or var_init is None:
        return {"applied": False, "reason": f"{neck.name}: running mean/var are not initializers"}
    mean = numpy_helper.to_array(mean_init).astype(np.float64)
    std = np.sqrt(numpy_helper.to_array(var_init).astype(np.float64))
    if shift.shape != mean.shape or not np.isfinite(shift).all():
        return {"applied": False, "reason": f"{neck.name}: the measured shift is not finite or has another shape"}
    mean_init.CopyFrom(numpy_helper.from_array((mean + shift).astype(np.float32), mean_init.name))
    return {
        "applied": True,
        "node": neck.name,
        "images": int(images.shape[0]),
        "shift_over_running_std": {
            "median": round(float(np.median(np.abs(shift) / np.maximum(std, 1e-12))), 4),
            "max": round(float(np.max(np.abs(shift) / np.maximum(std, 1e-12))), 4),
        },
    }


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
    """quantize.int8: the file TensorRT compiles (int8 symmetric activations)."""
    return quantize(spec, "int8", "keep_fp32", "stem+neck")


def quantize(spec: Spec, activations: str, keep_key: str, keep_default: str) -> Dict[str, Any]:
    act_type, act_symmetric, act_label = ACTIVATIONS[activations]
    path = spec.input("onnx")
    method = spec.param("method", "minmax")
    if method not in METHODS:
        raise StageError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    requested = int(spec.param("calibration_images", 64))
    if requested < 1:
        raise StageError(f"calibration_images must be >= 1, got {requested}")
    opset = int(spec.param("opset", 13))
    keep = str(spec.param(keep_key, keep_default))
    if keep not in KEEP_FP32:
        raise StageError(f"{keep_key}: expected one of {', '.join(KEEP_FP32)}, got {keep!r}")
    correction = str(spec.param("bias_correction", "neck"))
    if correction not in CORRECTIONS:
        raise StageError(f"bias_correction: expected one of {', '.join(CORRECTIONS)}, got {correction!r}")
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
    extra: Dict[str, Any] = {"ActivationSymmetric": act_symmetric, "WeightSymmetric": True}
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
                activation_type=act_type,
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
    corrected: Dict[str, Any] = {"applied": False, "reason": "bias_correction: none"}
    if correction == "neck":
        corrected = correct_neck_bias(model, qmodel, inp.name, images)
        if corrected["applied"]:
            data = qmodel.SerializeToString()
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
        "activations": act_label,
        "percentile": extra.get("CalibPercentile"),
        "qdq_nodes": counts,
        "notes": notes,
        "keep_fp32": keep,
        "fp32_nodes": exclude,
        "bias_correction": {"method": correction, **corrected},
        "versions": versions(),
    }
    atomic_write_json(spec.output("quantization.json"), side)
    return side


if __name__ == "__main__":
    main(run)
