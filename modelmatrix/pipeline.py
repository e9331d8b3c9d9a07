"""`invoke matrix` as a list of small steps (nox-style):
load -> plan -> select runner -> run each node (or reuse it) -> verify -> summarise -> exit code.

Knows nothing about Invoke; tasks.py is a thin shell over `run_matrix`.
"""
from __future__ import annotations

import contextlib
import json
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL

from targets.common.contract import atomic_write_json

from .config import Matrix
from .errors import ModelMatrixError, StageFailed
from .plan import Node, Ref, build_plan, node_key, short
from .runners.base import Runner, StageRequest
from .workspace import Workspace

DONE, CACHED, SKIPPED, FAILED = "done", "cached", "skipped", "failed"


@dataclass
class Outcome:
    node: Node
    status: str
    reason: str = ""
    key: str | None = None
    dir: Path | None = None
    stamp: dict | None = None
    seconds: float = 0.0
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (DONE, CACHED)


@dataclass
class RunSummary:
    outcomes: dict[str, Outcome]
    report: dict[str, Any] | None
    workspace: Path
    runner: str
    seconds: float
    notices: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.report and self.report.get("passed"))

    @property
    def did_work(self) -> bool:
        return any(o.status == DONE for o in self.outcomes.values())


def say(msg: str, echo: bool = True) -> None:
    if echo:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- runners

def select_runner(matrix: Matrix, choice: str | None, echo: bool = True) -> tuple[Runner, list[str]]:
    from .runners.local import LocalRunner
    choice = choice or matrix.raw["runner"]
    notices: list[str] = []
    if choice in ("auto", "docker"):
        from .runners import docker as docker_runner
        reason = docker_runner.engine_reason()
        if reason is None:
            return docker_runner.DockerRunner(matrix), notices
        if choice == "docker":
            raise ModelMatrixError(reason)
        notices.append(f"notice: no Docker engine ({reason.rstrip('.')}); using the local runner")
        say(notices[-1], echo)
    elif choice != "local":
        raise ModelMatrixError(f"--runner {choice!r}: expected auto, local or docker")
    return LocalRunner(), notices


# --------------------------------------------------------------------------- host nodes

def _host_source(matrix: Matrix, ws: Workspace, node: Node, tmp: Path, inputs: dict[str, Path]) -> dict:
    src = Path(node.params["path"])
    shutil.copyfile(src, tmp / "checkpoint")
    return {"source": str(src)}


def _host_prepare(matrix: Matrix, ws: Workspace, node: Node, tmp: Path, inputs: dict[str, Path]) -> dict:
    from . import data
    p = node.params
    return data.prepare(Path(p["dataset"]), tmp, p["contract"], tuple(p["contract"]["input_size"]),
                        limit=p["limit"], ascend_bins=p["ascend_bins"], workers=matrix.raw["data"]["workers"])


def _host_verify(matrix: Matrix, ws: Workspace, node: Node, tmp: Path, inputs: dict[str, Path]) -> dict:
    from . import data, report, verify
    p = node.params
    index = json.loads(inputs["index"].read_text())
    n = len(index["items"])
    features, failed = {}, dict(p["failed"])
    for name, path in inputs.items():
        if name.startswith("features:"):
            target = name.split(":", 1)[1]
            try:
                features[target] = data.load_features(path, n)
            except ModelMatrixError as exc:
                failed[target] = str(exc)
    rep = verify.verify_all(features, p["reference"], p["tolerances"], index, skipped=p["skipped"],
                            failed=failed, max_rank=p["max_rank"])
    meta = json.loads(inputs["meta"].read_text()) if "meta" in inputs else {}
    rep["model"] = {**p["model"], "random_weights": meta.get("random_weights"),
                    "checkpoint_sha256": meta.get("checkpoint_sha256")}
    rep["runner"] = p["runner"]
    rep["stages"] = p["stages"]
    report.write_reports(rep, tmp)
    return {"passed": rep["passed"]}


#: What host stages' outputs depend on besides their code: the decoder and the arithmetic.
HOST_FINGERPRINT = (f"host:python={platform.python_version()},numpy={np.__version__},"
                    f"pillow={PIL.__version__}")

HOST_NODES: dict[str, Callable[..., dict]] = {
    "source": _host_source, "prepare": _host_prepare, "verify": _host_verify,
}


# --------------------------------------------------------------------------- the run

class MatrixRun:
    def __init__(self, matrix: Matrix, runner: Runner, echo: bool = True, force: bool = False):
        self.matrix, self.runner, self.echo, self.force = matrix, runner, echo, force
        self.ws = Workspace(matrix.workspace)
        self.outcomes: dict[str, Outcome] = {}
        self._target_reason: dict[str, tuple[str | None, str]] = {}

    # -- helpers
    def _upstream_problem(self, node: Node) -> str | None:
        for ref in node.inputs.values():
            up = self.outcomes.get(ref.producer)
            if up is None:
                if ref.optional:
                    continue
                return f"needs {ref.producer}, which is not in the plan"
            if not up.ok and node.id != "verify":
                return f"needs {ref.producer} ({up.status}{': ' + up.reason if up.reason else ''})"
        return None

    def _target_state(self, target: str) -> tuple[str | None, str]:
        """(SKIPPED, why) when this host or runner cannot run the target (toolchain, device, stage
        code missing), (FAILED, why) when making it runnable failed (e.g. its image build), else
        (None, "")."""
        if target not in self._target_reason:
            tdef = self.matrix.targets[target]
            missing = [s for s in tdef.matrix_stages if not (tdef.folder / f"{s}.py").is_file()]
            reasons = [self.runner.unavailable_reason(tdef)]
            if missing:
                reasons.append(f"stage code {', '.join(f'targets/{target}/{s}.py' for s in missing)} "
                               "not written yet")
            reason = "; ".join(r for r in reasons if r)
            state: tuple[str | None, str] = (SKIPPED, reason) if reason else (None, "")
            if not reason:
                try:
                    self.runner.prepare(tdef, echo=self.echo)
                except ModelMatrixError as exc:
                    state = (FAILED, str(exc))
            self._target_reason[target] = state
        return self._target_reason[target]

    def _resolved_inputs(self, node: Node) -> tuple[dict[str, Path], dict[str, str]]:
        paths, digests = {}, {}
        for name, ref in node.inputs.items():
            up = self.outcomes.get(ref.producer)
            if up is None or not up.ok:
                continue
            paths[name] = up.dir / ref.file
            digests[name] = up.stamp["outputs"][ref.file]
        return paths, digests

    def _verify_params(self, node: Node) -> None:
        m = self.matrix
        skipped, failed = {}, {}
        for o in self.outcomes.values():
            t = o.node.target
            if t is None or o.ok:
                continue
            bucket = skipped if o.status == SKIPPED else failed
            bucket.setdefault(t, f"{o.node.id}: {o.reason}")
        node.params = {
            "reference": m.raw["verify"]["reference"], "max_rank": m.raw["verify"]["max_rank"],
            "tolerances": {t: m.target_cfg(t)["tolerance"] for t in m.enabled_targets()},
            "skipped": skipped, "failed": failed,
            "model": {k: m.model[k] for k in ("arch", "checkpoint", "neck_feat", "last_stride", "input_size")},
            "runner": self.runner.name,
            # Not timings, nor done vs up to date: they would change the key every run.
            "stages": {k: {"status": "ok" if o.ok else o.status, "reason": o.reason}
                       for k, o in self.outcomes.items()},
        }
        if "torch.export" in self.outcomes and self.outcomes["torch.export"].ok:
            node.inputs["meta"] = Ref("torch.export", "meta.json")

    # -- one node
    def run_node(self, node: Node) -> Outcome:
        if node.id == "verify":
            self._verify_params(node)
        problem = self._upstream_problem(node)
        if problem:
            return Outcome(node, SKIPPED, problem)
        if node.target is not None:
            status, reason = self._target_state(node.target)
            if status:
                return Outcome(node, status, reason)
            fingerprint = self.runner.fingerprint(self.matrix.targets[node.target])
        else:
            fingerprint = HOST_FINGERPRINT
        paths, digests = self._resolved_inputs(node)
        if node.id == "source":
            digests["file"] = self.ws.hashes.file(_existing(Path(node.params["path"]), "model.checkpoint"))
        elif node.id == "prepare":
            dataset = Path(node.params["dataset"])
            if not dataset.is_dir():
                from . import data
                data.scan_dataset(dataset)   # raises the one-line error for a missing folder
            digests["dataset"] = self.ws.hashes.tree(dataset)
        folder = self.matrix.targets[node.target].folder if node.target else None
        key = node_key(node, fingerprint, digests, folder)
        stamp = None if self.force else self.ws.lookup(node.id, key)
        if stamp is not None:
            return Outcome(node, CACHED, key=key, dir=self.ws.stage_dir(node.id, key), stamp=stamp)
        tmp = self.ws.begin(node.id, key)
        t0 = time.perf_counter()
        try:
            if node.host:
                result = HOST_NODES[node.id](self.matrix, self.ws, node, tmp, paths)
                atomic_write_json(tmp / "result.json", result or {})
            else:
                req = StageRequest(target=self.matrix.targets[node.target], stage=node.stage,
                                   workspace=self.ws.root,
                                   inputs={k: self.ws.rel(v) for k, v in paths.items()},
                                   out_dir=self.ws.rel(tmp), params=node.params,
                                   timeout_s=float(self.matrix.raw["stage_timeout_s"]),
                                   origins=self._origins(node))
                self.runner.run(req, echo=self.echo)
            stamp = self.ws.commit(node.id, key, tmp, node.outputs,
                                   extra={"seconds": round(time.perf_counter() - t0, 3), "runner": fingerprint})
        except StageFailed as exc:
            self.ws.abandon(tmp)
            self._save_failure_log(node, str(exc), exc.log_tail)
            return Outcome(node, FAILED, str(exc), key=key, seconds=time.perf_counter() - t0,
                           log_tail=exc.log_tail)
        except BaseException:
            self.ws.abandon(tmp)
            raise
        return Outcome(node, DONE, key=key, dir=self.ws.stage_dir(node.id, key), stamp=stamp,
                       seconds=time.perf_counter() - t0)

    def _origins(self, node: Node) -> dict[str, str]:
        """Inputs imported from the user's files are named by the user's path in messages."""
        src = self.outcomes.get("source")
        return {name: src.node.params["path"] for name, ref in node.inputs.items()
                if ref.producer == "source" and src is not None and src.ok}

    def _save_failure_log(self, node: Node, message: str, tail: str) -> None:
        log = self.ws.node_dir(node.id) / "last-failure.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(message + "\n\n" + tail + "\n")

    def _announce(self, o: Outcome) -> None:
        key = f" [{short(o.key)}]" if o.key else ""
        if o.status == DONE:
            say(f"  built      {o.node.id:<22} {o.seconds:7.2f} s{key}", self.echo)
        elif o.status == CACHED:
            say(f"  up to date {o.node.id:<22}{key}", self.echo)
        elif o.status == SKIPPED:
            say(f"  skipped    {o.node.id:<22} {o.reason}", self.echo)
        else:
            say(f"  FAILED     {o.node.id:<22} {o.reason}", self.echo)
            if o.log_tail:
                say("    last lines:\n" + "\n".join("      " + ln for ln in o.log_tail.splitlines()[-15:]),
                    self.echo)

    def run(self, plan: list[Node], on_node: Callable[[Node], None] | None = None) -> dict[str, Outcome]:
        for node in plan:
            if on_node:
                on_node(node)
            if node.target is None and node.id not in HOST_NODES:
                raise ModelMatrixError(f"{node.id}: no host implementation")
            o = self.run_node(node)
            self.outcomes[node.id] = o
            self._announce(o)
            if o.ok and node.target is not None:
                self.ws.point(node.target, node.stage, o.dir)
        return self.outcomes


def _existing(path: Path, key: str) -> Path:
    if not path.is_file():
        raise ModelMatrixError(f"{path}: checkpoint not found (matrix.yaml {key}); fix the path "
                               "or set it to null for seeded random weights")
    return path


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the running stage's process group is
    killed or its container removed, and its temporary folder deleted, instead of being orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_matrix(matrix: Matrix, runner_choice: str | None = None, echo: bool = True,
               force: bool = False) -> RunSummary:
    t0 = time.perf_counter()
    ws = Workspace(matrix.workspace)
    with ws.lock(), _sigterm_unwinds():
        ws.sweep()
        plan = build_plan(matrix)
        runner, notices = select_runner(matrix, runner_choice, echo)
        say(f"modelmatrix: {len(plan)} stages, runner {runner.name}, workspace {ws.root}", echo)
        try:
            run = MatrixRun(matrix, runner, echo=echo, force=force)
            outcomes = run.run(plan)
        finally:
            ws.hashes.save()
            runner.close()
        report = None
        v = outcomes.get("verify")
        if v and v.ok:
            for name in ("report.json", "report.md", "junit.xml"):
                ws.publish(v.dir / name, name)
            report = json.loads((v.dir / "report.json").read_text())
    summary = RunSummary(outcomes, report, ws.root, runner.name, time.perf_counter() - t0, notices)
    if not summary.did_work and not any(o.status == FAILED for o in outcomes.values()):
        say(f"nothing to do: all {sum(o.ok for o in outcomes.values())} runnable stages are up to date "
            f"({summary.seconds:.2f} s)", echo)
    return summary
