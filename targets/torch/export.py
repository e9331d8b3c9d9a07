"""Stage ``torch.export``: build the model (checkpoint or seeded random weights), export ONNX.

Inputs, both optional: ``checkpoint`` (absent: seeded random weights) and ``calibration`` (the
prepared inputs.npy; with random weights, BatchNorm statistics are measured on up to
calibration_batches x 8 of its images, spread evenly over the file; absent: smooth random
images, whose statistics do not carry over to photographs).

Outputs (each written under a temporary name, then renamed):
- ``weights.pt``  the inference state dict actually used (``torch.infer`` loads it strictly);
- ``model.onnx``  TorchScript exporter (``dynamo=False``), opset/names/dynamic batch from
  ``params.model.export``, with metadata_props describing the model and its input contract;
- ``meta.json``   the same description plus ``random_weights`` and either ``checkpoint_sha256``
  or ``seed`` and ``calibration`` (source, image count, sha256 of the sample used).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
import torch

from targets.common.contract import Spec, StageError, atomic_write_bytes, atomic_write_json, main

from . import checkpoint as ckpt
from .infer import load_inputs
from .models import (
    ARCH_CONTRACTS,
    ARCHS,
    NECK_FEATS,
    build_model,
    calibration_count,
    inference_state_dict,
    init_random_model,
)

PRODUCER = "modelmatrix"
EXPORT_KEYS = ("opset", "input_name", "output_name", "dynamic_batch")
#: torch.onnx._constants.ONNX_MIN_OPSET / ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.13. Beyond
#: them the exporter fails with a dump of its IR graph instead of one line.
MIN_OPSET, MAX_OPSET = 7, 20


def versions() -> Dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "numpy": np.__version__}


def _bad(key: str, msg: str) -> StageError:
    return StageError(f"params.model.{key}: {msg}; check the model section of matrix.yaml")


def check_model_cfg(cfg: Any) -> Dict[str, Any]:
    """The resolved model section, checked for what this stage needs (the host validated types)."""
    if not isinstance(cfg, dict):
        raise StageError("params.model: expected a mapping (the resolved model section)")
    for key in ("arch", "num_classes", "last_stride", "neck_feat", "input_size", "export"):
        if key not in cfg:
            raise _bad(key, "required key is missing")
    if cfg["arch"] not in ARCHS:
        raise _bad("arch", f"unknown architecture {cfg['arch']!r} (known: {', '.join(ARCHS)})")
    if cfg["neck_feat"] not in NECK_FEATS:
        raise _bad("neck_feat", f"expected one of {', '.join(NECK_FEATS)}, got {cfg['neck_feat']!r}")
    size = cfg["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 16 for v in size)):
        raise _bad("input_size", f"expected [height, width] integers >= 16, got {size!r}")
    missing = [k for k in EXPORT_KEYS if k not in (cfg["export"] or {})]
    if missing:
        raise _bad("export", f"missing {', '.join(missing)}")
    opset = cfg["export"]["opset"]
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise _bad(
            "export.opset",
            f"torch {torch.__version__}'s TorchScript exporter writes opsets "
            f"{MIN_OPSET}..{MAX_OPSET}, got {opset!r} (ATC 5.0.1 needs 11)",
        )
    cfg = dict(cfg)
    cfg.setdefault("seed", 0)
    cfg.setdefault("calibration_batches", 4)
    cfg["contract"] = dict(cfg.get("contract") or ARCH_CONTRACTS[cfg["arch"]])
    cfg["contract"].setdefault("input_size", list(size))
    return cfg


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def calibration_sample(path: Path, cfg: Dict[str, Any]) -> Tuple[torch.Tensor, List[int]]:
    """Images spread evenly over the prepared inputs.npy (already in the input contract)."""
    arr = load_inputs(path, cfg["input_size"])
    count = min(arr.shape[0], calibration_count(cfg))
    if count < 2:
        raise StageError(
            f"{path}: {arr.shape[0]} image(s); calibrating random weights needs at least 2 (or give model.checkpoint)"
        )
    index = sorted({int(i) for i in np.linspace(0, arr.shape[0] - 1, count).round()})
    return torch.from_numpy(np.array(arr[index])), index


def make_model(
    cfg: Dict[str, Any], checkpoint: Optional[Path], calibration: Optional[Path], shown: Optional[str] = None
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The model, and how its weights came about (for meta.json). ``shown`` names the checkpoint
    in messages (the user's path; ``checkpoint`` may be the workspace copy)."""
    if checkpoint is not None:
        model = build_model(cfg)
        ckpt.load_into(model, checkpoint, shown)
        return model, {"checkpoint": Path(shown or checkpoint).name, "checkpoint_sha256": sha256_file(checkpoint)}
    how = {"seed": cfg["seed"], "calibration_batches": cfg["calibration_batches"]}
    if calibration is None:
        how["calibration"] = {"source": "synthetic", "images": calibration_count(cfg)}
        return init_random_model(cfg), how
    images, index = calibration_sample(calibration, cfg)
    # the hash of the images used, not of the file: inputs.npy of the full Market1501 is 7.6 GB
    how["calibration"] = {
        "source": calibration.name,
        "images": len(index),
        "sample_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
    }
    return init_random_model(cfg, images), how


def describe(cfg: Dict[str, Any], weights_from: Dict[str, Any]) -> Dict[str, Any]:
    """meta.json: everything torch.infer needs to rebuild the model, and what it was made from."""
    meta = {
        key: cfg[key] for key in ("arch", "num_classes", "last_stride", "neck_feat", "input_size", "contract", "export")
    }
    meta.update(producer=PRODUCER, random_weights="checkpoint" not in weights_from, versions=versions())
    meta.update(weights_from)
    return meta


def onnx_metadata(meta: Dict[str, Any]) -> Dict[str, str]:
    props = {
        "producer": PRODUCER,
        "arch": meta["arch"],
        "input_size": json.dumps(meta["input_size"]),
        "contract": json.dumps(meta["contract"], sort_keys=True),
        "neck_feat": meta["neck_feat"],
        "last_stride": str(meta["last_stride"]),
        "random_weights": json.dumps(meta["random_weights"]),
    }
    for key in ("seed", "checkpoint_sha256"):
        if key in meta:
            props[key] = str(meta[key])
    if "calibration" in meta:
        props["calibration"] = json.dumps(meta["calibration"], sort_keys=True)
    return props


def export_onnx(model: torch.nn.Module, cfg: Dict[str, Any], props: Dict[str, str]) -> onnx.ModelProto:
    exp = cfg["export"]
    height, width = cfg["input_size"]
    dummy = torch.zeros(1, 3, height, width)
    axes = {exp["input_name"]: {0: "batch"}, exp["output_name"]: {0: "batch"}} if exp["dynamic_batch"] else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # dynamo=False is deliberate (REFERENCE.md: the dynamo exporter needs onnxscript and
        # cannot write opset 11); its deprecation notice is not news to the user.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            export_params=True,
            opset_version=int(exp["opset"]),
            do_constant_folding=True,
            input_names=[exp["input_name"]],
            output_names=[exp["output_name"]],
            dynamic_axes=axes,
        )
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run(spec: Spec) -> Dict[str, Any]:
    cfg = check_model_cfg(spec.param("model"))
    t0 = time.perf_counter()
    checkpoint = spec.inputs.get("checkpoint")
    model, weights_from = make_model(
        cfg, checkpoint, spec.inputs.get("calibration"), spec.label("checkpoint") if checkpoint else None
    )
    model.eval()
    build_s = time.perf_counter() - t0

    meta = describe(cfg, weights_from)
    with torch.no_grad():
        height, width = cfg["input_size"]
        meta["feature_dim"] = int(model(torch.zeros(1, 3, height, width)).shape[1])

    buf = io.BytesIO()
    torch.save(inference_state_dict(model), buf)
    atomic_write_bytes(spec.output("weights.pt"), buf.getvalue())

    t1 = time.perf_counter()
    proto = export_onnx(model, cfg, onnx_metadata(meta))
    export_s = time.perf_counter() - t1
    atomic_write_bytes(spec.output("model.onnx"), proto.SerializeToString())
    atomic_write_json(spec.output("meta.json"), meta)
    return {
        "versions": versions(),
        "opset": int(cfg["export"]["opset"]),
        "random_weights": meta["random_weights"],
        "feature_dim": meta["feature_dim"],
        "build_seconds": build_s,
        "export_seconds": export_s,
    }


if __name__ == "__main__":
    main(run)
