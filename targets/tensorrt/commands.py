"""The vendor command line the TensorRT stages would run, for `invoke matrix --dry-run` on the host.

Standard library only (the host imports this; it never imports a toolchain). ``facts``: the model's
``input_name`` and ``input_size`` [H, W] (from matrix.yaml: the ONNX may not exist yet), the stage's
``inputs`` (name -> path) and ``out_dir``. The engine build itself goes through TensorRT's Python
API (convert.py); ``trtexec`` with these flags builds the same strongly typed engine by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from . import planning


def commands(stage: str, params: Dict[str, Any], facts: Dict[str, Any]) -> List[List[str]]:
    if stage != "convert":
        return []
    height, width = (int(v) for v in facts["input_size"])
    inputs = {k: Path(str(v)) for k, v in facts.get("inputs", {}).items()}
    name, file, producer = planning.PRECISION_INPUTS[str(params["precision"])]
    onnx = inputs.get(name, Path(producer) / file)  # it may not exist yet: nothing is read
    profile = planning.plan_profile(
        str(facts.get("input_name", "image")),
        (-1, 3, height, width),
        int(params["batch_size"]),
        int(params["max_batch"]),
    )
    out_dir = Path(str(facts.get("out_dir", ".")))
    return [
        planning.trtexec_command(
            onnx,
            profile,
            int(params["workspace_mib"]),
            out_dir / planning.ENGINE_NAME,
            out_dir / planning.TIMING_CACHE_NAME,
            bool(params.get("tf32", False)),
        )
    ]
