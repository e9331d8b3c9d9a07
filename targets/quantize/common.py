"""What both quantize stages share: reading model.onnx, naming the ops a tool cannot handle, the opset upgrade."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
from onnx import version_converter

from targets.common.contract import StageError


def versions() -> Dict[str, str]:
    import onnxruntime

    out = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import onnxconverter_common

        out["onnxconverter_common"] = onnxconverter_common.__version__
    except ImportError:
        pass
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run torch.export first")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise StageError(f"{path}: not a readable ONNX model ({type(exc).__name__}); run torch.export again") from None
    unknown = unsupported_ops(model)
    if unknown:
        raise StageError(
            f"{path}: the quantiser cannot handle {unknown[0]}"
            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}: not a standard "
            "ONNX operator; export the model with standard ONNX ops only"
        )
    return model


def unsupported_ops(model: onnx.ModelProto) -> List[str]:
    """'node NAME: op TYPE (domain D)' for every node that is not a standard ONNX operator."""
    out = []
    for node in model.graph.node:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type, domain):
            out.append(f"node {node.name or '?'}: op {node.op_type!r}" + (f" (domain {domain!r})" if domain else ""))
    return out


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade(model: onnx.ModelProto, opset: int, path: Path) -> onnx.ModelProto:
    """The model at ``opset`` (never downgraded); the op that cannot be converted is named."""
    current = default_opset(model)
    if current >= opset:
        return model
    try:
        out = version_converter.convert_version(model, opset)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StageError(f"{path}: cannot upgrade from opset {current} to {opset} ({first})") from None
    # the converter keeps the IR version (6 from an opset-11 export), below what opset 13 needs (7):
    # raised to the minimum, never to the newest (older runtimes and parsers refuse IR they do not know)
    need = onnx.helper.find_min_ir_version_for(list(out.opset_import))
    if out.ir_version < need:
        out.ir_version = need
    return out
