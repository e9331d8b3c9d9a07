"""`invoke bench`: backend speed (img/s, p50/p95 per batch size) and the pipeline's own costs.

Measured, then written to a JSON file and printed; never asserted in tests:
- each target's `bench` stage (targets/<t>/bench.py), run by the chosen runner on the same
  preprocessed inputs and model files the matrix made;
- ONNX Runtime inside the matrix vs a bare `InferenceSession.run` loop (target: within 10%);
- host preprocessing img/s (target: >= 300 on 2 cores);
- a no-op re-run of `invoke matrix` (target: < 2 s);
- with the Docker runner, per-stage container overhead (target: < 1 s).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from targets.common.contract import atomic_write_json

from .config import Matrix
from .errors import ModelMatrixError
from .pipeline import run_matrix, say, select_runner
from .plan import stage_node
from .runners.base import StageRequest

DEFAULT_BATCH_SIZES = {"caffe": [1, 8, 16]}
BENCH_BATCH_SIZES = [1, 8, 16, 32]


def _bench_target(matrix: Matrix, summary, runner, target: str) -> dict[str, Any]:
    tdef = matrix.targets[target]
    if "bench" not in tdef.stages or not (tdef.folder / "bench.py").is_file():
        return {"status": "skipped", "reason": f"targets/{target} declares no bench stage"}
    infer = summary.outcomes.get(f"{target}.infer")
    if infer is None or not infer.ok:
        reason = infer.reason if infer else "not in the plan"
        return {"status": "skipped", "reason": f"{target}.infer did not run ({reason})"}
    node = stage_node(matrix, target, "bench")
    inputs = {}
    for name, ref in node.inputs.items():
        up = summary.outcomes.get(ref.producer)
        if up is None or not up.ok:
            return {"status": "skipped", "reason": f"needs {ref.producer}, which did not run"}
        inputs[name] = os.path.relpath(up.dir / ref.file, summary.workspace)
    out = Path(tempfile.mkdtemp(prefix=f".bench-{target}-", dir=summary.workspace))
    params = dict(node.params)
    params.update({"batch_sizes": DEFAULT_BATCH_SIZES.get(target, BENCH_BATCH_SIZES), "warmup": 2,
                   "seconds": 3.0, "matrix_batch_size": matrix.target_cfg(target)["params"].get("batch_size", 16),
                   "compare_repeats": 3})
    req = StageRequest(target=tdef, stage="bench", workspace=summary.workspace, inputs=inputs,
                       out_dir=os.path.relpath(out, summary.workspace), params=params,
                       timeout_s=float(matrix.raw["stage_timeout_s"]))
    try:
        runner.prepare(tdef)
        runner.run(req)
        result = json.loads((out / "result.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
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
        summary = data.prepare(dataset, Path(tmp), contract, tuple(contract["input_size"]),
                               limit=matrix.raw["data"]["limit"], ascend_bins=matrix.raw["data"]["ascend_bins"],
                               workers=matrix.raw["data"]["workers"])
        seconds = time.perf_counter() - t0
    n = summary.get("images") or summary.get("count") or 0
    return {"images": n, "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 1),
            "ascend_bins": matrix.raw["data"]["ascend_bins"], "cores": os.cpu_count(),
            "target": ">= 300 img/s on 2 cores"}


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
        run_matrix(matrix, name, echo=False)            # images built, inputs prepared: not timed
        t0 = time.perf_counter()
        forced = run_matrix(matrix, name, echo=False, force=True)
        seconds[name] = round(time.perf_counter() - t0, 2)
        if not forced.passed:
            return {"status": "skipped", "reason": f"the forced {name} run did not pass: "
                    + "; ".join(f"{k}: {o.reason}" for k, o in forced.outcomes.items() if not o.ok)}
    return {"status": "measured", "seconds": seconds,
            "docker_over_local": round(seconds["docker"] / seconds["local"], 3), "target": "<= 1.3"}


def run_bench(matrix: Matrix, targets: list[str], runner_choice: str | None,
              out_path: Path | None = None, compare_runners: bool = False) -> Path:
    for t in targets:
        if t not in matrix.raw["targets"]:
            raise ModelMatrixError(f"--target {t}: not a target of {matrix.path}")
    ref = matrix.raw["verify"]["reference"]
    for name, stanza in matrix.raw["targets"].items():
        stanza["enabled"] = name in targets or name == ref
    say("bench: bringing the matrix up to date first")
    summary = run_matrix(matrix, runner_choice)
    t0 = time.perf_counter()
    again = run_matrix(matrix, runner_choice, echo=False)
    noop = time.perf_counter() - t0
    runner, _ = select_runner(matrix, runner_choice, echo=False)
    results: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "runner": runner.name,
        "noop_rerun": {"seconds": round(noop, 3), "did_work": again.did_work, "target": "< 2 s"},
        "preprocessing": _preprocessing(matrix),
        "targets": {},
    }
    try:
        for t in targets:
            say(f"bench: {t}")
            results["targets"][t] = _bench_target(matrix, summary, runner, t)
        if runner.name == "docker":
            from .runners.docker import bench_container_overhead
            results["container_overhead"] = bench_container_overhead(matrix)
    finally:
        runner.close()
    if compare_runners:
        say("bench: a forced matrix run with each runner")
        results["runners"] = _compare_runners(matrix)
    path = out_path or (matrix.workspace / "bench" / "bench.json")
    atomic_write_json(path, results)
    for line in summary_lines(results):
        print(line)
    return path


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = [f"runner {results['runner']}, {results['machine']['cores']} cores",
             f"no-op re-run of invoke matrix: {results['noop_rerun']['seconds']:.2f} s (target < 2 s)",
             f"preprocessing: {results['preprocessing']['images_per_second']} img/s "
             f"(target >= 300)"]
    for t, r in results["targets"].items():
        if r.get("status") != "measured":
            lines.append(f"{t}: {r.get('status')} ({r.get('reason')})")
            continue
        for row in r.get("results", []):
            lines.append(f"{t:<12} batch {row['batch_size']:>3}: {row['images_per_second']:7.1f} img/s  "
                         f"p50 {row['latency_ms_p50']:8.1f} ms  p95 {row['latency_ms_p95']:8.1f} ms")
        cmp_ = r.get("comparison")
        if cmp_:
            lines.append(f"{t:<12} matrix loop {cmp_['matrix_images_per_second']:.1f} img/s vs bare loop "
                         f"{cmp_['bare_images_per_second']:.1f} img/s (ratio {cmp_['matrix_over_bare']:.3f}, "
                         "target >= 0.9)")
    if results.get("runners", {}).get("status") == "measured":
        r = results["runners"]
        lines.append(f"forced matrix run: local {r['seconds']['local']} s, docker {r['seconds']['docker']} s "
                     f"(ratio {r['docker_over_local']}, target <= 1.3)")
    if "container_overhead" in results:
        lines.append(f"container overhead per stage: {json.dumps(results['container_overhead'])}")
    return lines
