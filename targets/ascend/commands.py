"""The vendor command lines the Ascend stages would run, for `invoke matrix --dry-run` on the host.

Standard library only (the host imports this; it never imports a toolchain). ``facts``: the model's
``input_name`` and ``input_size`` [H, W] (from matrix.yaml: the ONNX may not exist yet), the stage's
``inputs`` (name -> path) and ``out_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from . import cann


def commands(stage: str, params: Dict[str, Any], facts: Dict[str, Any]) -> List[List[str]]:
    height, width = (int(v) for v in facts["input_size"])
    inputs = facts.get("inputs", {})
    out_dir = Path(str(facts.get("out_dir", ".")))
    if stage == "convert":
        return [
            cann.atc_command(
                str(inputs.get("onnx", "model.onnx")),
                str(out_dir / "om" / cann.om_name(b)[:-3]),
                str(facts.get("input_name", "image")),
                b,
                height,
                width,
                soc_version=str(params.get("soc_version", "Ascend310")),
                precision_mode=str(params.get("precision_mode", "force_fp16")),
                log=str(params.get("atc_log", "error")),
                auto_tune_mode=str(params.get("auto_tune_mode", "") or ""),
            )
            for b in cann.batch_sizes(params)
        ]
    if stage == "infer":
        batch = int(params.get("batch_size", 1))
        om = Path(str(inputs.get("om", "om"))) / cann.om_name(batch)
        return [
            cann.benchmark_command(
                str(om), "./prep_bin.info", batch, height, width, int(params.get("device_id", 0)), exe=cann.BENCHMARK
            )
        ]
    return []
