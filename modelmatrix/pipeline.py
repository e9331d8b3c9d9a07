"""`invoke matrix` as a list of small steps (nox-style):
load -> plan -> select runner -> run each node (or reuse it) -> verify -> summarise -> exit code.

Knows nothing about Invoke; tasks.py is a thin shell over `run_matrix`. Talks through stdlib
logging only (logger ``modelmatrix.pipeline``): one line per stage at INFO.

Truthfulness rules kept here:
- one broken target fails alone: any ModelMatrixError raised for a target's stage (a missing
  declared output, an image that vanished, an engine error, a manifest problem) marks that stage
  FAILED with a one-line reason; the other targets and verify still run;
- a target that was asked for (``--require``, ``--target``, ``required: true``, or any enabled
  target under ``CI=true`` unless its stanza says ``allow_skip: <reason>``) and is skipped fails
  the run (exit 3);
- a run that ends before verify leaves no report behind that could be mistaken for its own.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL

from targets.common.contract import atomic_write_json

from .config import Matrix, TargetDef
from .errors import EXIT_UNAVAILABLE, ConfigError, ModelMatrixError, StageFailed
from .plan import Node, Ref, build_plan, node_key, short
from .runners.base import Runner, StageRequest
from .workspace import REPORT_FILES, Workspace, disk_error

log = logging.getLogger(__name__)

DONE, CACHED, SKIPPED, FAILED = "done", "cached", "skipped", "failed"


@dataclass
class Outcome:
    node: Node
    status: str
    reason: str = ""
    key: str | None = None
    dir: Path | None = None
    stamp: dict[str, Any] | None = None
    seconds: float = 0.0
    log_tail: str = ""
    kind: str = ""            # for FAILED: "bad input", "timed out" or "failed"
    rebuilt: str = ""         # why a stored result was refused and rebuilt ("" when it was not)

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
    def exit_code(self) -> int:
        if self.report is None:
            return EXIT_UNAVAILABLE
        return int(self.report.get("exit_code", 0 if self.passed else 1))

    @property
    def did_work(self) -> bool:
        return any(o.status == DONE for o in self.outcomes.values())


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def required_targets(matrix: Matrix, require: tuple[str, ...] | list[str] = (), ci: bool | None = None) -> dict[str, str]:
    """target -> why it must not be skipped."""
    ci = in_ci() if ci is None else ci
    out: dict[str, str] = {}
    for name in matrix.enabled_targets():
        cfg = matrix.target_cfg(name)
        if name in require:
            out[name] = "asked for on the command line"
        elif cfg.get("required"):
            out[name] = f"targets.{name}.required is true"
        elif ci and not cfg.get("allow_skip"):
            out[name] = f"CI=true and targets.{name} has no allow_skip"
    return out


# --------------------------------------------------------------------------- runners

def select_runner(matrix: Matrix, choice: str | None) -> tuple[Runner, list[str]]:
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
        notices.append(f"no Docker engine ({reason.rstrip('.')}); using the local runner")
        log.warning("notice: %s", notices[-1])
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
                failed[target] = {"stage": f"{target}.infer", "reason": str(exc), "kind": "failed"}
    rep = verify.verify_all(features, p["reference"], p["tolerances"], index, skipped=p["skipped"],
                            failed=failed, max_rank=p["max_rank"], required=p["required"],
                            allow_skip=p["allow_skip"])
    meta = json.loads(inputs["meta"].read_text()) if "meta" in inputs else {}
    rep["model"] = report.model_facts(p["model"], meta)
    rep["runner"] = p["runner"]
    rep["stages"] = p["stages"]
    report.write_reports(rep, tmp)
    return {"passed": rep["passed"], "exit_code": rep["exit_code"]}


#: What host stages' outputs depend on besides their code: the decoder and the arithmetic.
HOST_FINGERPRINT = (f"host:python={platform.python_version()},numpy={np.__version__},"
                    f"pillow={PIL.__version__}")

HOST_NODES: dict[str, Callable[..., dict]] = {
    "source": _host_source, "prepare": _host_prepare, "verify": _host_verify,
}


def _own(message: str, node_id: str) -> str:
    """A reason as shown after the node's name: without a repeated ``<node>:`` prefix."""
    for prefix in (f"{node_id}: ", f"stage {node_id}: "):
        message = message.removeprefix(prefix)
    return message


def _failure_kind(exc: ModelMatrixError) -> str:
    if isinstance(exc, StageFailed):
        if exc.user_error:
            return "bad input"
        if getattr(exc, "timed_out", False) or " timed out " in f" {exc} ":
            return "timed out"
        return "failed"
    return "bad input" if type(exc) in (ModelMatrixError, ConfigError) or exc.exit_code == 2 else "failed"


# --------------------------------------------------------------------------- what would run (shared with doctor)

def upstream_problem(node: Node, status_of: Callable[[str], str | None]) -> str | None:
    """Why ``node`` cannot run because of its inputs, or None. ``status_of(producer)``: None when the
    producer is not in the plan, "ok", or its status. The upstream's own reason is said on its own
    line, once: not again here."""
    for ref in node.inputs.values():
        up = status_of(ref.producer)
        if up is None:
            if ref.optional:
                continue
            return f"needs {ref.producer}, which is not in the plan"
        if up != "ok":
            return f"needs {ref.producer} ({up})"
    return None


def target_probe(tdef: TargetDef, unavailable: str | None) -> tuple[str | None, str, str]:
    """(SKIPPED, why, "") when this host or runner cannot run the target (``unavailable``: the
    runner's own probe; no stage code at all), (FAILED, why, kind) for a stage module missing beside
    the others, else (None, "", ""). Never builds (``Runner.prepare`` is the caller's)."""
    stages = list(tdef.matrix_stages)
    missing = [s for s in stages if not (tdef.folder / f"{s}.py").is_file()]
    if missing and len(missing) < len(stages):
        files = ", ".join(f"targets/{tdef.name}/{s}.py" for s in missing)
        return FAILED, (f"stage module {files} is missing, while the target has its other stages' "
                        "code: restore it, or remove the stage from target.yaml"), "failed"
    reasons = [unavailable]
    if missing:
        reasons.append(f"stage code {', '.join(f'targets/{tdef.name}/{s}.py' for s in missing)} "
                       "not written yet")
    reason = "; ".join(r for r in reasons if r)
    return (SKIPPED, reason, "") if reason else (None, "", "")


# --------------------------------------------------------------------------- the run

class MatrixRun:
    def __init__(self, matrix: Matrix, runner: Runner, force: bool = False,
                 required: dict[str, str] | None = None, broken: dict[str, str] | None = None,
                 ws: Workspace | None = None):
        self.matrix, self.runner, self.force = matrix, runner, force
        self.required = dict(required or {})
        self.broken = dict(broken or {})       # target -> its manifest problem (found while planning)
        self.ws = ws or Workspace(matrix.workspace)
        self.outcomes: dict[str, Outcome] = {}
        self._target_reason: dict[str, tuple[str | None, str, str]] = {}

    # -- helpers
    def _upstream_problem(self, node: Node) -> str | None:
        if node.id == "verify":
            return None           # verify runs whatever happened upstream: it reports it
        return upstream_problem(node, lambda p: None if p not in self.outcomes else
                                ("ok" if self.outcomes[p].ok else self.outcomes[p].status))

    def _target_state(self, target: str) -> tuple[str | None, str, str]:
        """(SKIPPED, why, "") when this host or runner cannot run the target (toolchain, device, no
        stage code at all), (FAILED, why, kind) when making it runnable failed (its image build, a
        stage module missing beside others), else (None, "", "")."""
        if target not in self._target_reason:
            tdef = self.matrix.targets[target]
            self._target_reason[target] = self._probe_target(tdef)
        return self._target_reason[target]

    def _probe_target(self, tdef: TargetDef) -> tuple[str | None, str, str]:
        state = target_probe(tdef, self.runner.unavailable_reason(tdef))
        if state[0]:
            return state
        try:
            self.runner.prepare(tdef)
        except ModelMatrixError as exc:
            return FAILED, str(exc), _failure_kind(exc)
        return None, "", ""

    def _resolved_inputs(self, node: Node) -> tuple[dict[str, Path], dict[str, str]]:
        paths, digests = {}, {}
        for name, ref in node.inputs.items():
            up = self.outcomes.get(ref.producer)
            if up is None or not up.ok or up.dir is None or up.stamp is None:
                continue
            paths[name] = up.dir / ref.file
            digests[name] = up.stamp["outputs"][ref.file]
        return paths, digests

    def _verify_params(self, node: Node) -> None:
        m = self.matrix
        skipped: dict[str, str] = {}
        failed: dict[str, dict[str, str]] = {}
        for target, problem in self.broken.items():
            failed[target] = {"stage": target, "reason": problem, "kind": "bad input"}
        for o in self.outcomes.values():
            t = o.node.target
            if t is None or o.ok or t in failed or t in skipped:
                continue
            if o.status == SKIPPED:
                skipped[t] = f"{o.node.id}: {o.reason}"
            else:
                failed[t] = {"stage": o.node.id, "reason": f"{o.node.id}: {o.reason}", "kind": o.kind or "failed"}
        enabled = m.enabled_targets()
        node.params = {
            "reference": m.raw["verify"]["reference"], "max_rank": m.raw["verify"]["max_rank"],
            "tolerances": {t: m.target_cfg(t)["tolerance"] for t in enabled},
            "skipped": skipped, "failed": failed,
            "required": {t: why for t, why in self.required.items() if t in enabled},
            "allow_skip": {t: m.target_cfg(t)["allow_skip"] for t in enabled if m.target_cfg(t).get("allow_skip")},
            "model": {k: m.model[k] for k in ("arch", "checkpoint", "neck_feat", "last_stride", "input_size",
                                              "seed")},
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
        if node.target is not None and node.target in self.broken:
            return Outcome(node, FAILED, self.broken[node.target], kind="bad input")
        problem = self._upstream_problem(node)
        if problem:
            return Outcome(node, SKIPPED, problem)
        if node.target is None:
            return self._run(node, HOST_FINGERPRINT)
        # Any error raised for one target's stage fails that stage alone.
        try:
            status, reason, kind = self._target_state(node.target)
            if status:
                return Outcome(node, status, reason, kind=kind)
            tdef = self.matrix.targets[node.target]
            device = self.runner.device_fingerprint(tdef)     # GPU name, compute capability, driver
            return self._run(node, self.runner.fingerprint(tdef) + (f";{device}" if device else ""))
        except ModelMatrixError as exc:
            tail = getattr(exc, "log_tail", "")
            self._save_failure_log(node, str(exc), tail)
            return Outcome(node, FAILED, _own(str(exc), node.id), log_tail=tail, kind=_failure_kind(exc))

    def _input_digests(self, node: Node) -> tuple[dict[str, Path], dict[str, str]]:
        paths, digests = self._resolved_inputs(node)
        if node.id == "source":
            # external: a checkpoint re-saved within the same mtime tick with the same size is re-read
            digests["file"] = self.ws.hashes.file(_existing(Path(node.params["path"]), "model.checkpoint"),
                                                  external=True)
        elif node.id == "prepare":
            from . import data
            # exactly the files prepare reads (one line for a missing folder or a hostile file)
            digests["dataset"] = data.dataset_digest(Path(node.params["dataset"]), self.ws.hashes,
                                                     node.params["limit"])
        return paths, digests

    def _run(self, node: Node, fingerprint: str) -> Outcome:
        paths, digests = self._input_digests(node)
        folder = self.matrix.targets[node.target].folder if node.target else None
        key = node_key(node, fingerprint, digests, folder)
        t0 = time.perf_counter()
        try:
            return self._produce(node, key, fingerprint, paths, t0)
        except ModelMatrixError as exc:
            if node.target is None:
                raise                      # a host node's error (dataset, checkpoint) stops the run
            tail = getattr(exc, "log_tail", "")
            self._save_failure_log(node, str(exc), tail)
            return Outcome(node, FAILED, _own(str(exc), node.id), key=key, seconds=time.perf_counter() - t0,
                           log_tail=tail, kind=_failure_kind(exc))

    def _produce(self, node: Node, key: str, fingerprint: str, paths: dict[str, Path], t0: float) -> Outcome:
        with self.ws.stage(node.id, key, node.outputs, force=self.force) as slot:
            if slot.cached:
                return Outcome(node, CACHED, key=key, dir=slot.dir, stamp=slot.stamp)
            assert slot.tmp is not None
            if node.host:
                result = HOST_NODES[node.id](self.matrix, self.ws, node, slot.tmp, paths)
                atomic_write_json(slot.tmp / "result.json", result or {})
            else:
                assert node.target is not None
                req = StageRequest(target=self.matrix.targets[node.target], stage=node.stage,
                                   workspace=self.ws.root,
                                   inputs={k: self.ws.rel(v) for k, v in paths.items()},
                                   out_dir=self.ws.rel(slot.tmp), params=node.params,
                                   timeout_s=float(self.matrix.raw["stage_timeout_s"]),
                                   origins=self._origins(node))
                self.runner.run(req)
            slot.extra = {"seconds": round(time.perf_counter() - t0, 3), "runner": fingerprint}
        return Outcome(node, DONE, key=key, dir=slot.dir, stamp=slot.stamp,
                       seconds=time.perf_counter() - t0, rebuilt=slot.damaged or "")

    def _origins(self, node: Node) -> dict[str, str]:
        """Inputs imported from the user's files are named by the user's path in messages."""
        src = self.outcomes.get("source")
        return {name: src.node.params["path"] for name, ref in node.inputs.items()
                if ref.producer == "source" and src is not None and src.ok}

    def _save_failure_log(self, node: Node, message: str, tail: str) -> None:
        path = self.ws.node_dir(node.id) / "last-failure.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path.with_suffix(".json"), {"message": message})
            path.write_text(message + "\n\n" + tail + "\n")
        except OSError as exc:
            log.debug("could not save %s: %s", path, exc)

    def _announce(self, o: Outcome) -> None:
        key = f" [{short(o.key)}]" if o.key else ""
        if o.status == DONE:
            again = f"  (rebuilt: the stored result was damaged: {o.rebuilt})" if o.rebuilt else ""
            log.info("  built      %-22s %7.2f s%s%s", o.node.id, o.seconds, key, again)
        elif o.status == CACHED:
            log.info("  up to date %-22s%s", o.node.id, key)
        elif o.status == SKIPPED:
            log.info("  skipped    %-22s %s", o.node.id, o.reason)
        else:
            log.info("  FAILED     %-22s %s", o.node.id, o.reason)
            if o.log_tail:
                log.info("             %-22s log: %s", "", self.ws.node_dir(o.node.id) / "last-failure.log")
                log.debug("    last lines:\n%s", "\n".join("      " + ln for ln in o.log_tail.splitlines()[-15:]))

    def run(self, plan: list[Node], on_node: Callable[[Node], None] | None = None) -> dict[str, Outcome]:
        for node in plan:
            if on_node:
                on_node(node)
            if node.target is None and node.id not in HOST_NODES:
                raise ModelMatrixError(f"{node.id}: no host implementation")
            o = self.run_node(node)
            self.outcomes[node.id] = o
            self._announce(o)
            if o.ok and node.target is not None and o.dir is not None:
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

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_matrix(matrix: Matrix, runner_choice: str | None = None, force: bool = False,
               require: tuple[str, ...] | list[str] = (), ci: bool | None = None) -> RunSummary:
    """Run what is out of date, verify, publish the reports. Raises a ModelMatrixError for what stops
    the whole run (bad config or dataset, a full disk, no engine for --runner docker)."""
    t0 = time.perf_counter()
    ws = Workspace(matrix.workspace)
    with ws.lock(), _sigterm_unwinds():
        report = None
        try:
            ws.sweep()
            plan, broken = build_plan(matrix, per_target_errors=True)
            runner, notices = select_runner(matrix, runner_choice)
            log.info("modelmatrix: %d stages, runner %s, workspace %s", len(plan), runner.name, ws.root)
            try:
                # One Workspace (and so one hash cache) for the whole run: the one saved below.
                run = MatrixRun(matrix, runner, force=force, required=required_targets(matrix, require, ci),
                                broken=broken, ws=ws)
                outcomes = run.run(plan)
            finally:
                ws.hashes.save()
                runner.close()
            v = outcomes.get("verify")
            if v and v.ok and v.dir is not None:
                for name in REPORT_FILES:
                    ws.publish(v.dir / name, name)
                report = json.loads((v.dir / "report.json").read_text())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):
                raise disk_error(exc, ws.root, "running the matrix") from None
            raise
        finally:
            if report is None:
                with contextlib.suppress(OSError):
                    stale = ws.unpublish()
                    if stale:
                        log.info("removed the previous %s: this run did not reach verify", ", ".join(stale))
    summary = RunSummary(outcomes, report, ws.root, runner.name, time.perf_counter() - t0, notices)
    if not summary.did_work and not any(o.status == FAILED for o in outcomes.values()):
        log.info("nothing to do: all %d runnable stages are up to date (%.2f s)",
                 sum(o.ok for o in outcomes.values()), summary.seconds)
    return summary
