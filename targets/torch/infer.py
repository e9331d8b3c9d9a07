"""Stage ``torch.infer``: the reference features, PyTorch eager on CPU.

Rebuilds the model from ``meta.json``, loads ``weights.pt`` strictly (no re-initialisation),
runs ``inputs.npy`` in batches of ``batch_size`` (the last one partial) and writes
``features.npy`` (float32, N x D, row i = image i).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from targets.common.arrays import load_inputs as common_load_inputs
from targets.common.contract import Spec, StageError, batched_timings, main, save_npy

from . import checkpoint as ckpt
from .models import ARCHS, build_model

META_KEYS = ("arch", "num_classes", "last_stride", "neck_feat", "input_size")


def versions() -> Dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__}


def read_meta(path: Path) -> Dict[str, Any]:
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run torch.export first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); run torch.export again") from None
    if not isinstance(meta, dict):
        raise StageError(f"{path}: expected a JSON object; run torch.export again")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise StageError(f"{path}: missing {', '.join(missing)}; run torch.export again")
    if meta["arch"] not in ARCHS:
        raise StageError(f"{path}: unknown arch {meta['arch']!r}; run torch.export again")
    return meta


def load_inputs(path: Path, input_size) -> np.ndarray:
    """inputs.npy for a model of this input size (memory-mapped float32 (N, 3, H, W))."""
    return common_load_inputs(path, (3, *input_size))


def set_threads(threads: int) -> None:
    if int(threads) < 0:
        raise StageError(f"threads must be >= 0, got {threads}")
    if int(threads) > 0:
        torch.set_num_threads(int(threads))


def load_model(weights: Path, meta: Dict[str, Any]) -> torch.nn.Module:
    model = build_model(meta)
    ckpt.load_into(model, weights)
    return model.eval()


def infer(model: torch.nn.Module, arr: np.ndarray, batch_size: int):
    """Features (N, D) and the seconds of each batch."""
    features = None
    seconds = []
    with torch.inference_mode():
        for start, stop in batched_timings(arr.shape[0], batch_size):
            batch = torch.from_numpy(np.array(arr[start:stop]))  # writable copy of the mmap
            t0 = time.perf_counter()
            out = model(batch)
            seconds.append(time.perf_counter() - t0)
            if features is None:
                features = np.empty((arr.shape[0], out.shape[1]), dtype=np.float32)
            features[start:stop] = out.numpy()
    return features, seconds


def run(spec: Spec) -> Dict[str, Any]:
    meta = read_meta(spec.input("meta"))
    arr = load_inputs(spec.input("inputs"), meta["input_size"])
    batch_size = int(spec.param("batch_size", 16))
    if batch_size < 1:
        raise StageError(f"batch_size must be >= 1, got {batch_size}")
    set_threads(spec.param("threads", 0))
    model = load_model(spec.input("weights"), meta)
    features, seconds = infer(model, arr, batch_size)
    save_npy(spec.output("features.npy"), features)
    return {
        "batch_size": batch_size,
        "images": int(arr.shape[0]),
        "batch_seconds": seconds,
        "images_per_second": arr.shape[0] / sum(seconds),
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


if __name__ == "__main__":
    main(run)
