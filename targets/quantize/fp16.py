"""Stage ``quantize.fp16``: model.onnx converted to fp16 with fp32 inputs and outputs (onnxconverter-common's
float16 converter, ``keep_io_types=True``): what TensorRT fp16 (strongly typed) compiles and what the CPU
fp16 preview target runs. Writes model.fp16.onnx and fp16.json (opset, source sha256, tool versions)."""

from __future__ import annotations

from typing import Any, Dict

import onnx
from onnxconverter_common import float16

from targets.common.contract import Spec, StageError, atomic_write_bytes, atomic_write_json, main

from .common import default_opset, load_model, sha256_file, upgrade, versions


def run(spec: Spec) -> Dict[str, Any]:
    path = spec.input("onnx")
    model = upgrade(load_model(path), int(spec.param("opset", 13)), path)
    try:
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StageError(f"{path}: the fp16 converter failed ({first})") from None
    onnx.checker.check_model(half)
    atomic_write_bytes(spec.output("model.fp16.onnx"), half.SerializeToString())
    side = {
        "opset": default_opset(half),
        "source_sha256": sha256_file(path),
        "keep_io_types": True,
        "converter": "onnxconverter_common.float16.convert_float_to_float16",
        "versions": versions(),
    }
    atomic_write_json(spec.output("fp16.json"), side)
    return side


if __name__ == "__main__":
    main(run)
