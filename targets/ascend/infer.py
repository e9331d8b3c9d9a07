"""Stage ``ascend.infer``: features from the OM with CANN's benchmark tool, exactly as the guide runs it.

From the stage's own folder (so ``result/`` lands there, as the guide's working folder)::

    benchmark.x86_64 -model_type=vision -device_id=0 -batch_size=1 -om_path=.../model_bs1.om
        -input_text_path=prep_bin.info -input_width=128 -input_height=256 -output_binary=True -useDvpp=False

on prepare's ``ascend/<stem>.bin`` files, with a ``prep_bin.info`` rewritten to paths valid where the
stage runs (prepare writes them relative to its folder). Afterwards ``result/dumpOutput_device<N>/
<stem>_1.bin`` is read back into features.npy in prep_bin.info's order (= inputs.npy = index.json),
never the folder's; a missing or wrong-sized file is named. ``result/perf_vision_batchsize_<bs>_
device_<N>.txt`` gives img/s: the [infer] line's Interface throughputRate x chips per card (4 on a
310, as the guide: 361.547 x 4 = 1446.188), in result.json (``images_per_second``, read by
`invoke bench`). The result/ folder is kept: the guide's ReID_postprocess.py reads it as is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from targets.common.contract import Spec, StageError, atomic_write_bytes, save_npy

from . import cann

NO_BENCHMARK = (
    "this environment has no CANN benchmark tool (benchmark.x86_64); run the stage in the ascend "
    "image (`invoke build --target ascend --file toolkit=... --file benchmark=...`)"
)


def _sidecar(om_dir: Path, batch: int) -> Dict[str, Any]:
    path = om_dir / (cann.om_name(batch) + ".json")
    if not path.is_file():
        have = sorted(p.name[:-5] for p in om_dir.glob("model_bs*.om.json"))
        raise StageError(
            "%s: no OM for batch_size %d (converted: %s); add %d to targets.ascend.params."
            "batch_sizes" % (om_dir, batch, ", ".join(have) or "none", batch)
        )
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise StageError("%s: not valid JSON (%s); run ascend.convert again" % (path, exc)) from None


def plan(spec: Spec) -> Dict[str, Any]:
    """What the stage will run: the OM, its sidecar, the inputs (checked) and the command line."""
    batch = int(spec.param("batch_size", 1))
    device_id = int(spec.param("device_id", 0))
    om_dir, bins = spec.input("om"), spec.input("bins")
    sidecar = _sidecar(om_dir, batch)
    om = om_dir / sidecar["om"]
    if not om.is_file() or om.stat().st_size != sidecar.get("om_bytes"):
        raise StageError("%s: missing or not the file its sidecar describes; run ascend.convert again" % om)
    _n, c, h, w = sidecar["input"]["shape"]
    rows = cann.read_info(bins / "prep_bin.info")
    cann.check_bins(rows, bins, (c, h, w))
    info_text = cann.rewrite_info(rows, bins)
    exe = cann.find_tool(cann.BENCHMARK, NO_BENCHMARK)
    cmd = cann.benchmark_command(str(om), "./prep_bin.info", batch, h, w, device_id, exe=exe)
    stems = [Path(r[1]).name[:-4] for r in rows]
    return {
        "batch": batch,
        "device_id": device_id,
        "sidecar": sidecar,
        "rows": rows,
        "info": info_text,
        "command": cmd,
        "stems": stems,
    }


def run(spec: Spec) -> Dict[str, Any]:
    p = plan(spec)
    index = json.loads(spec.input("index").read_text())
    if len(index["items"]) != len(p["rows"]):
        raise StageError(
            "%s: lists %d images, index.json %d; run prepare again"
            % (spec.input("bins") / "prep_bin.info", len(p["rows"]), len(index["items"]))
        )
    atomic_write_bytes(spec.out_dir / "prep_bin.info", p["info"].encode())
    log_path = spec.out_dir / "benchmark.log"
    t0 = time.perf_counter()
    with open(str(log_path), "wb") as log:
        log.write(("$ " + " ".join(p["command"]) + "\n").encode())
        log.flush()
        code = subprocess.run(
            p["command"], cwd=str(spec.out_dir), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        print(
            "benchmark.x86_64 exited %d: %s (log: %s)" % (code, (lines or ["no output"])[-1][:300], log_path),
            file=sys.stderr,
        )
        sys.exit(1)
    result_dir = spec.out_dir / "result"
    dim = p["sidecar"]["output"]["shape"][1]
    features = cann.read_dump(result_dir, p["device_id"], p["stems"], dim)
    perf = cann.parse_perf(
        cann.perf_file(result_dir, p["batch"], p["device_id"]), int(spec.param("chips_per_card", cann.CHIPS_PER_CARD))
    )
    save_npy(spec.output("features.npy"), features)
    toolkit = cann.toolkit_version()
    out: Dict[str, Any] = {
        "images": len(p["stems"]),
        "batch_size": p["batch"],
        "device_id": p["device_id"],
        "images_per_second": perf["card_fps"],
        "chip_images_per_second": perf["chip_fps"],
        "chips_per_card": perf["chips_per_card"],
        "perf": perf["stages"],
        "wall_seconds_benchmark": round(seconds, 3),
        "om_sha256": p["sidecar"]["om_sha256"],
        "command": p["command"],
        "toolkit": toolkit,
    }
    if toolkit["test_double"] or p["sidecar"].get("toolkit_test_double"):
        out["note"] = "produced with the project's FAKE CANN toolkit (tests/fake_cann), not Huawei's"
        out["test_double"] = True
    return out


def dry_run(spec: Spec) -> List[str]:
    return [" ".join(plan(spec)["command"])]


if __name__ == "__main__":
    cann.entry(run, dry_run)
