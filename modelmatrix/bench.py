"""`invoke bench`: backend speed (img/s, p50/p95 per batch size) and the pipeline's own costs.

Measured, then written to a JSON file and printed; never asserted in tests:
- each target's `bench` stage (targets/<t>/bench.py), run by the chosen runner on the same
  preprocessed inputs and model files the matrix made;
- ONNX Runtime inside the matrix vs a bare `InferenceSession.run` loop (target: within 10%);
- host preprocessing img/s (target: >= 300 on 2 cores);
- a no-op re-run of `invoke matrix` (target: < 2 s);
- the no-op dataset digest on a Market1501-sized set (`noop_hash_bench`: 32,000 files; target:
  well under 1 s, so that a whole no-op `invoke matrix` stays under 1 s);
- with the Docker runner, per-stage container overhead (target: < 1 s);
- first of all, the machine's roofline (``quantize.roofline``, run by the same runner): fp32 GEMM
  (numpy), int8 GEMM (ONNX Runtime MatMulInteger), bf16 GEMM where torch is present, the CPU flags
  and the model's GFLOP/image from its ONNX graph; every backend x batch row then gets
  ``gflops`` (img/s x GFLOP/image) and ``roofline_fraction`` against the GEMM of its precision
  (int8 for *int8 targets, fp32 otherwise: this CPU has no fp16 arithmetic), and the run reports
  int8 / fp32 ONNX Runtime img/s at batch 16 (the issue's goal: >= 3x).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from targets.common.contract import atomic_write_json

from .config import Matrix, TargetDef, discover_targets
from .errors import ModelMatrixError
from .pipeline import RunSummary, run_matrix, select_runner
from .plan import stage_node
from .runners.base import Runner, StageRequest
from .workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = {"caffe": [1, 8, 16]}
BENCH_BATCH_SIZES = [1, 8, 16, 32]
ROOFLINE_TARGET, ROOFLINE_STAGE = "quantize", "roofline"
ROOFLINE_SECONDS = 1.0  # per GEMM kernel
RATIO_BATCH = 16  # int8 / fp32 img/s is compared at this batch size


def producers(matrix: Matrix, targets: list[str]) -> set[str]:
    """The targets whose stages feed the benched ones (quantize for onnxruntime_int8/fp16), so that
    enabling only the benched targets still runs what they read."""
    out: set[str] = set()
    todo = list(targets)
    while todo:
        tdef = matrix.targets.get(todo.pop())
        for stage in tdef.stages.values() if tdef else []:
            for ref in stage.inputs.values():
                producer = ref.split("/", 1)[0].split(".", 1)[0]
                if producer in matrix.raw["targets"] and producer not in out and producer not in targets:
                    out.add(producer)
                    todo.append(producer)
    return out


def precision_of(target: str) -> str:
    """The roofline a backend is held against: int8 for the int8 targets, fp32 for the rest (fp16
    targets too: the CPU has no fp16 arithmetic, ONNX Runtime computes them in fp32 or casts)."""
    return "int8" if "int8" in target else "fp32"


def _roofline(matrix: Matrix, summary: RunSummary, runner: Runner) -> dict[str, Any]:
    """quantize.roofline on the exported model, by the bench's runner (its image under docker)."""
    export = summary.outcomes.get("torch.export")
    if export is None or not export.ok or export.dir is None:
        return {"status": "skipped", "reason": "torch.export did not run"}
    tdef: TargetDef | None = matrix.targets.get(ROOFLINE_TARGET) or discover_targets().get(ROOFLINE_TARGET)
    if tdef is None or ROOFLINE_STAGE not in tdef.stages:
        return {"status": "skipped", "reason": f"targets/{ROOFLINE_TARGET} declares no {ROOFLINE_STAGE} stage"}
    reason = runner.unavailable_reason(tdef)
    if reason:
        return {"status": "skipped", "reason": reason}
    out = Path(tempfile.mkdtemp(prefix=".bench-roofline-", dir=summary.workspace))
    req = StageRequest(
        target=tdef,
        stage=ROOFLINE_STAGE,
        workspace=summary.workspace,
        inputs={"onnx": os.path.relpath(export.dir / "model.onnx", summary.workspace)},
        out_dir=os.path.relpath(out, summary.workspace),
        params={"seconds": ROOFLINE_SECONDS},
        timeout_s=float(matrix.raw["stage_timeout_s"]),
    )
    try:
        runner.prepare(tdef)
        runner.run(req)
        result: dict[str, Any] = json.loads((out / "result.json").read_text())
    except ModelMatrixError as exc:
        return {"status": "skipped", "reason": str(exc)}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result["status"] = "measured"
    return result


def against_roofline(results: dict[str, Any]) -> None:
    """Adds gflops / roofline_fraction to every measured row, and the int8 / fp32 ratio."""
    roof = results.get("roofline") or {}
    if roof.get("status") != "measured":
        return
    gflop = float(roof["model"]["gflop_per_image"])
    for target, r in results["targets"].items():
        if r.get("status") != "measured":
            continue
        precision = precision_of(target)
        peak = float(roof["gemm"][precision]["gflops"])
        r["roofline"] = {"precision": precision, "peak_gflops": peak, "gflop_per_image": gflop}
        for row in r.get("results", []):
            achieved = row["images_per_second"] * gflop
            row["gflops"] = round(achieved, 1)
            row["roofline_fraction"] = round(achieved / peak, 3) if peak > 0 else None
    rows = {
        t: {row["batch_size"]: row["images_per_second"] for row in r.get("results", [])}
        for t, r in results["targets"].items()
        if r.get("status") == "measured"
    }
    fp32, int8 = rows.get("onnxruntime", {}).get(RATIO_BATCH), rows.get("onnxruntime_int8", {}).get(RATIO_BATCH)
    if fp32 and int8:
        results["int8_over_fp32"] = {
            "batch_size": RATIO_BATCH,
            "ratio": round(int8 / fp32, 3),
            "onnxruntime": fp32,
            "onnxruntime_int8": int8,
            "goal": ">= 3",
        }


class PeakRss:
    """The peak resident set (VmHWM, the kernel's high-water mark) of the processes whose command
    line names ``marker`` (the bench stage's unique output folder), sampled from /proc by a thread
    while the stage runs: runner-agnostic (a local subprocess, or a container on this host's
    engine: the same kernel). VmHWM only grows, so a sample taken late holds the peak so far."""

    def __init__(self, marker: str, interval_s: float = 0.1):
        self.marker, self.interval_s = marker.encode(), interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def peak_mib(self) -> float | None:
        return round(self.peak_kib / 1024, 1) if self.peak_kib else None

    @property
    def source(self) -> str:
        if self.peak_kib:
            return "VmHWM of the stage process, sampled from /proc"
        return "not measured (no /proc, or the stage process was not visible from this host)"

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        proc = Path("/proc")
        if not proc.is_dir():
            return
        while True:
            for entry in proc.iterdir():
                if entry.name.isdigit():
                    self._sample(entry)
            if self._stop.wait(self.interval_s):
                return

    def _sample(self, entry: Path) -> None:
        try:
            if self.marker not in (entry / "cmdline").read_bytes():
                return
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass  # the process ended between the listing and the read


def _bench_target(matrix: Matrix, summary: RunSummary, runner: Runner, target: str) -> dict[str, Any]:
    tdef = matrix.targets[target]
    if "bench" not in tdef.stages or not (tdef.folder / "bench.py").is_file():
        return {"status": "skipped", "reason": f"targets/{target} declares no bench stage"}
    infer = summary.outcomes.get(f"{target}.infer")
    if infer is None or not infer.ok or infer.dir is None:
        reason = infer.reason if infer else "not in the plan"
        return {"status": "skipped", "reason": f"{target}.infer did not run ({reason})"}
    node = stage_node(matrix, target, "bench")
    inputs = {}
    for name, ref in node.inputs.items():
        up = summary.outcomes.get(ref.producer)
        if up is None or not up.ok or up.dir is None:
            return {"status": "skipped", "reason": f"needs {ref.producer}, which did not run"}
        inputs[name] = os.path.relpath(up.dir / ref.file, summary.workspace)
    out = Path(tempfile.mkdtemp(prefix=f".bench-{target}-", dir=summary.workspace))
    params = dict(node.params)
    params.update(
        {
            "batch_sizes": DEFAULT_BATCH_SIZES.get(target, BENCH_BATCH_SIZES),
            "warmup": 2,
            "seconds": 3.0,
            "matrix_batch_size": matrix.target_cfg(target)["params"].get("batch_size", 16),
            "compare_repeats": 3,
        }
    )
    req = StageRequest(
        target=tdef,
        stage="bench",
        workspace=summary.workspace,
        inputs=inputs,
        out_dir=os.path.relpath(out, summary.workspace),
        params=params,
        timeout_s=float(matrix.raw["stage_timeout_s"]),
    )
    try:
        runner.prepare(tdef)
        with PeakRss(out.name) as rss:
            runner.run(req)
        result = json.loads((out / "result.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # every backend's peak resident set, sampled by the host (the int8/fp16 stages also report
    # their own getrusage figure, kept as stage_peak_rss_mib: the two agree within the sampling)
    if "peak_rss_mib" in result:
        result["stage_peak_rss_mib"] = result.pop("peak_rss_mib")
    result["peak_rss_mib"] = rss.peak_mib
    result["peak_rss_source"] = rss.source
    infer_result = json.loads((infer.dir / "result.json").read_text())
    result["infer_stage_images_per_second"] = infer_result.get("images_per_second")
    result["status"] = "measured"
    return result


def _preprocessing(matrix: Matrix) -> dict[str, Any]:
    from . import data

    dataset = matrix.resolve(matrix.raw["data"]["dataset"])
    contract = matrix.contract()
    with tempfile.TemporaryDirectory(prefix=".bench-prep-", dir=matrix.workspace) as tmp:
        t0 = time.perf_counter()
        summary = data.prepare(
            dataset,
            Path(tmp),
            contract,
            tuple(contract["input_size"]),
            limit=matrix.raw["data"]["limit"],
            ascend_bins=matrix.raw["data"]["ascend_bins"],
            workers=matrix.raw["data"]["workers"],
        )
        seconds = time.perf_counter() - t0
    n = summary.get("images") or summary.get("count") or 0
    return {
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 1),
        "ascend_bins": matrix.raw["data"]["ascend_bins"],
        "cores": os.cpu_count(),
        "target": ">= 300 img/s on 2 cores",
    }


def _compare_runners(matrix: Matrix) -> dict[str, Any]:
    """A forced full `invoke matrix` with each runner on the same data (target: docker <= 1.3x local)."""
    from .runners.docker import engine_reason

    reason = engine_reason()
    if reason:
        return {"status": "skipped", "reason": reason}
    # Only targets both runners can run (pycaffe, for one, exists only in its image).
    matrix = dataclasses.replace(matrix, raw=copy.deepcopy(matrix.raw))
    for name, stanza in matrix.raw["targets"].items():
        stanza["enabled"] = name in ("torch", "onnxruntime")
    seconds = {}
    for name in ("local", "docker"):
        run_matrix(matrix, name)  # images built, inputs prepared: not timed
        t0 = time.perf_counter()
        forced = run_matrix(matrix, name, force=True)
        seconds[name] = round(time.perf_counter() - t0, 2)
        if not forced.passed:
            return {
                "status": "skipped",
                "reason": f"the forced {name} run did not pass: "
                + "; ".join(f"{k}: {o.reason}" for k, o in forced.outcomes.items() if not o.ok),
            }
    return {
        "status": "measured",
        "seconds": seconds,
        "docker_over_local": round(seconds["docker"] / seconds["local"], 3),
        "target": "<= 1.3",
    }


def noop_hash_bench(tmp_root: Path, files: int = 32000, runs: int = 5) -> dict[str, Any]:
    """Time the dataset digest that decides whether `prepare` re-runs, on a Market1501-sized set.

    Writes ``files`` images that prepare reads (``data.make_market_sized``, kept under
    ``tmp_root`` between bench runs), then times one cold digest (empty cache: every file read)
    and ``runs`` warm no-op digests, each with the persisted cache loaded fresh from disk as a
    new ``invoke matrix`` would (load + scan + stat + digest + save). Returns seconds (min and
    median) and the files read per run (a warm run reads none).
    """
    from . import data
    from .hashing import HashCache

    tmp_root = Path(tmp_root)
    dataset = tmp_root / f"market-sized-{files}"
    t0 = time.perf_counter()
    made = data.make_market_sized(dataset, files)
    setup_s = time.perf_counter() - t0
    cache_path = tmp_root / f"hashes-{files}.json"
    if cache_path.exists():
        cache_path.unlink()
    t0 = time.perf_counter()
    cold_cache = HashCache(cache_path)
    cold_digest = data.dataset_digest(dataset, cold_cache)
    cold_cache.save()
    cold_s = time.perf_counter() - t0
    warm, cpu, scan, load, read = [], [], [], [], []
    for _ in range(max(1, runs)):
        t0, c0 = time.perf_counter(), time.process_time()
        cache = HashCache(cache_path)
        t1 = time.perf_counter()
        digest = data.dataset_digest(dataset, cache)
        cache.save()
        warm.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        load.append(t1 - t0)
        read.append(cache.hashed)
        if digest != cold_digest:
            raise ModelMatrixError(f"{dataset}: warm digest differs from the cold one; the hash cache is broken")
        t0 = time.perf_counter()
        data.scan_dataset(dataset)
        scan.append(time.perf_counter() - t0)

    def stats(xs: list[float]) -> dict[str, float]:
        return {"min": round(min(xs), 4), "median": round(statistics.median(xs), 4)}

    return {
        "files_digested": cold_cache.hashed,
        "dataset": str(dataset),
        "set": made["status"],
        "setup_seconds": round(setup_s, 2),
        "cache_bytes": cache_path.stat().st_size,
        "cold": {"seconds": round(cold_s, 4), "files_read": cold_cache.hashed},
        "warm": {
            **stats(warm),
            "runs": len(warm),
            "files_read": read,
            "cpu_seconds": stats(cpu),
            "cache_load": stats(load),
            "scan_only": stats(scan),
        },
        "load_average": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
        "target": "warm well under 1 s (a whole no-op invoke matrix < 1 s)",
    }


def run_bench(
    matrix: Matrix,
    targets: list[str],
    runner_choice: str | None,
    out_path: Path | None = None,
    compare_runners: bool = False,
    market_sized: int = 0,
) -> Path:
    for t in targets:
        if t not in matrix.raw["targets"]:
            raise ModelMatrixError(f"--target {t}: not a target of {matrix.path}")
    ref = matrix.raw["verify"]["reference"]
    wanted = set(targets) | {ref} | producers(matrix, targets)
    for name, stanza in matrix.raw["targets"].items():
        stanza["enabled"] = name in wanted
    log.info("bench: bringing the matrix up to date first")
    summary = run_matrix(matrix, runner_choice)
    t0 = time.perf_counter()
    again = run_matrix(matrix, runner_choice)
    noop = time.perf_counter() - t0
    runner, _ = select_runner(matrix, runner_choice)
    results: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "runner": runner.name,
        "noop_rerun": {"seconds": round(noop, 3), "did_work": again.did_work, "target": "< 2 s"},
        "targets": {},
    }
    # The bench stages and the preprocessing timing write into the workspace: hold its lock, as
    # every workspace writer does.
    with Workspace(matrix.workspace).lock():
        results["preprocessing"] = _preprocessing(matrix)
        try:
            log.info("bench: the machine's roofline (fp32/int8/bf16 GEMM, the model's GFLOP/image)")
            results["roofline"] = _roofline(matrix, summary, runner)
            for t in targets:
                log.info("bench: %s", t)
                results["targets"][t] = _bench_target(matrix, summary, runner, t)
            if runner.name == "docker":
                from .runners.docker import bench_container_overhead

                results["container_overhead"] = bench_container_overhead(matrix)
        finally:
            runner.close()
        if market_sized:
            log.info("bench: the no-op dataset digest on a %d-file Market1501-sized set", market_sized)
            results["noop_dataset_digest"] = noop_hash_bench(
                matrix.workspace / "bench" / "market-sized", files=market_sized
            )
    against_roofline(results)
    if compare_runners:
        log.info("bench: a forced matrix run with each runner")
        results["runners"] = _compare_runners(matrix)
    path = out_path or (matrix.workspace / "bench" / "bench.json")
    atomic_write_json(path, results)
    return path


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = [
        f"runner {results['runner']}, {results['machine']['cores']} cores",
        f"no-op re-run of invoke matrix: {results['noop_rerun']['seconds']:.2f} s (target < 2 s)",
        f"preprocessing: {results['preprocessing']['images_per_second']} img/s (target >= 300)",
    ]
    roof = results.get("roofline") or {}
    if roof.get("status") == "measured":
        g = roof["gemm"]
        bf16 = f"{g['bf16']['gflops']} GFLOP/s" if "gflops" in g["bf16"] else g["bf16"].get("reason", "-")
        lines.append(
            f"roofline: fp32 GEMM {g['fp32']['gflops']} GFLOP/s, int8 GEMM {g['int8']['gflops']} GOP/s "
            f"({roof['int8_over_fp32']}x), bf16 {bf16}; CPU {roof['cpu']} [{' '.join(roof['flags'])}]; "
            f"model {roof['model']['gflop_per_image']} GFLOP/image"
        )
    elif roof:
        lines.append(f"roofline: {roof.get('status')} ({roof.get('reason')})")
    for t, r in results["targets"].items():
        if r.get("status") != "measured":
            lines.append(f"{t}: {r.get('status')} ({r.get('reason')})")
            continue
        for row in r.get("results", []):
            frac = row.get("roofline_fraction")
            lines.append(
                f"{t:<12} batch {row['batch_size']:>3}: {row['images_per_second']:7.1f} img/s  "
                f"p50 {row['latency_ms_p50']:8.1f} ms  p95 {row['latency_ms_p95']:8.1f} ms"
                + (
                    f"  {row['gflops']:6.1f} GFLOP/s = {frac:.0%} of {r['roofline']['precision']}"
                    if frac is not None
                    else ""
                )
                + (f"  peak RSS {r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else "  peak RSS -")
            )
        cmp_ = r.get("comparison")
        if cmp_:
            lines.append(
                f"{t:<12} matrix loop {cmp_['matrix_images_per_second']:.1f} img/s vs bare loop "
                f"{cmp_['bare_images_per_second']:.1f} img/s (ratio {cmp_['matrix_over_bare']:.3f}, "
                "target >= 0.9)"
            )
    if "int8_over_fp32" in results:
        q = results["int8_over_fp32"]
        lines.append(f"int8 / fp32 ONNX Runtime at batch {q['batch_size']}: {q['ratio']:.2f}x (goal >= 3)")
    if results.get("runners", {}).get("status") == "measured":
        r = results["runners"]
        lines.append(
            f"forced matrix run: local {r['seconds']['local']} s, docker {r['seconds']['docker']} s "
            f"(ratio {r['docker_over_local']}, target <= 1.3)"
        )
    if "noop_dataset_digest" in results:
        d = results["noop_dataset_digest"]
        lines.append(
            f"no-op dataset digest, {d['files_digested']} files: {d['warm']['median']:.3f} s median "
            f"(cold {d['cold']['seconds']:.1f} s; target well under 1 s)"
        )
    if "container_overhead" in results:
        lines.append(f"container overhead per stage: {json.dumps(results['container_overhead'])}")
    return lines
