"""Stage ``ascend.convert``: ONNX -> one offline model (.om) per batch size with CANN 5.0.1's atc.

As the ModelZoo ReID guide (section 3.2), one atc run per batch size (default 1 and 16)::

    atc --framework=5 --model=model.onnx --output=om/model_bs1 --input_format=NCHW
        --input_shape=image:1,3,256,128 --log=error --soc_version=Ascend310 --precision_mode=force_fp16

The input name and H, W are read from the ONNX file itself (targets.ascend.onnxinfo, standard
library only). Before atc: the opset must be 11 and every operator on ATC 5.0.1's list (refused
with the list otherwise). atc needs the toolkit but no NPU: this stage runs on any x86 host with the
image. atc's own logs (ASCEND_PROCESS_LOG_PATH) and its console output are kept in ``logs/``, not
lost in the container's /tmp. After each run: the .om exists and is not empty, and a sidecar JSON
(batch, shapes, precision, atc version, ONNX and OM sha256, the command line) is written beside it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from targets.common.contract import Spec, atomic_write_json

from . import cann
from .onnxinfo import image_input, output_dim, read_onnx

NO_TOOLKIT = (
    "this environment has no CANN toolkit (atc); run the stage in the ascend image "
    "(`invoke build --target ascend --file toolkit=Ascend-cann-toolkit_5.0.1_linux-x86_64.run`)"
)
#: the first bytes of an offline model (unverified for 5.0.1: a mismatch is noted, not refused)
OM_MAGIC = b"IMOD"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(str(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def conversions(spec: Spec, info: Dict[str, Any], onnx_path: Path, atc: str = "atc") -> List[Dict[str, Any]]:
    """One {batch, stem, command} per configured batch size: what the stage runs (and --dry-run prints)."""
    name, _c, height, width = image_input(info, onnx_path)
    out = []
    for batch in cann.batch_sizes(spec.params):
        stem = spec.out_dir / "om" / cann.om_name(batch)[:-3]
        cmd = cann.atc_command(
            str(onnx_path),
            str(stem),
            name,
            batch,
            height,
            width,
            soc_version=str(spec.param("soc_version", "Ascend310")),
            precision_mode=str(spec.param("precision_mode", "force_fp16")),
            log=str(spec.param("atc_log", "error")),
            auto_tune_mode=str(spec.param("auto_tune_mode", "") or ""),
            atc=atc,
        )
        out.append({"batch": batch, "stem": stem, "command": cmd})
    return out


def _run_atc(cmd: List[str], log_path: Path, log_dir: Path, work: Path) -> int:
    env = dict(os.environ)
    env["ASCEND_PROCESS_LOG_PATH"] = str(log_dir)  # atc's plog, else under $HOME/ascend/log
    env.setdefault("ASCEND_SLOG_PRINT_TO_STDOUT", "0")
    work.mkdir(parents=True, exist_ok=True)  # atc writes fusion_result.json, kernel_meta/ here
    with open(str(log_path), "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.run(
            cmd, cwd=str(work), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return proc.returncode


def _last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or ln.startswith("E")]
    return (errors or lines or ["no output"])[-1][:300]


def run(spec: Spec) -> Dict[str, Any]:
    onnx_path = spec.input("onnx")
    info = read_onnx(onnx_path)
    cann.check_onnx_for_atc(info, onnx_path)
    name, channels, height, width = image_input(info, onnx_path)
    dim = output_dim(info, onnx_path)
    atc = cann.find_tool("atc", NO_TOOLKIT)
    toolkit = cann.toolkit_version()
    (spec.out_dir / "om").mkdir(parents=True, exist_ok=True)
    logs = spec.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    models = []
    for conv in conversions(spec, info, onnx_path, atc):
        batch, stem = conv["batch"], conv["stem"]
        log_path = logs / ("atc_bs%d.log" % batch)
        t0 = time.perf_counter()
        code = _run_atc(conv["command"], log_path, logs / "plog", spec.out_dir / ".atc-work")
        seconds = time.perf_counter() - t0
        om = Path(str(stem) + ".om")
        if code != 0:
            # not the user's input (it passed the checks above): a toolkit failure, exit 1
            print(
                "atc exited %d for batch %d: %s (log: %s)" % (code, batch, _last_error(log_path), log_path),
                file=sys.stderr,
            )
            sys.exit(1)
        if not om.is_file() or om.stat().st_size == 0:
            print(
                "atc exited 0 for batch %d but wrote %s %s (log: %s)"
                % (batch, "an empty" if om.is_file() else "no", om.name, log_path),
                file=sys.stderr,
            )
            sys.exit(1)
        with open(str(om), "rb") as fh:
            magic = fh.read(4)
        sidecar = {
            "batch": batch,
            "om": om.name,
            "om_sha256": _sha256(om),
            "om_bytes": om.stat().st_size,
            "om_magic_ok": magic == OM_MAGIC,
            "input": {"name": name, "shape": [batch, channels, height, width], "format": "NCHW", "dtype": "float32"},
            "output": {"name": info["outputs"][0][0], "shape": [batch, dim], "dtype": "float32"},
            "precision_mode": str(spec.param("precision_mode", "force_fp16")),
            "soc_version": str(spec.param("soc_version", "Ascend310")),
            "atc_version": toolkit.get("version", "?"),
            "toolkit_test_double": toolkit["test_double"],
            "onnx_sha256": info["sha256"],
            "command": conv["command"],
            "seconds": round(seconds, 3),
        }
        atomic_write_json(Path(str(om) + ".json"), sidecar)
        models.append(sidecar)
    result = {
        "models": models,
        "onnx_sha256": info["sha256"],
        "opset": info["opsets"].get(""),
        "toolkit": toolkit,
        "operators": len(info["ops"]),
    }
    if toolkit["test_double"]:
        result["note"] = "produced with the project's FAKE CANN toolkit (tests/fake_cann), not Huawei's"
    return result


def dry_run(spec: Spec) -> List[str]:
    """The atc command lines the stage would run (ONNX read and checked; atc not run)."""
    onnx_path = spec.input("onnx")
    info = read_onnx(onnx_path)
    cann.check_onnx_for_atc(info, onnx_path)
    return [" ".join(c["command"]) for c in conversions(spec, info, onnx_path)]


if __name__ == "__main__":
    cann.entry(run, dry_run)
