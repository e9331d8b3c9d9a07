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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from targets.common.contract import atomic_write_json

from .config import Matrix, TargetDef
from .errors import EXIT_UNAVAILABLE, ConfigError, ModelMatrixError, StageFailed, TargetUnavailable
from .plan import Node, Ref, build_plan, code_hash, node_key, short
from .provenance import host_environment, nondeterministic_artifacts
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
    kind: str = ""  # for FAILED: "bad input", "timed out" or "failed"
    rebuilt: str = ""  # why a stored result was refused and rebuilt ("" when it was not)

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


def required_targets(
    matrix: Matrix, require: tuple[str, ...] | list[str] = (), ci: bool | None = None
) -> dict[str, str]:
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
    return data.prepare(
        Path(p["dataset"]),
        tmp,
        p["contract"],
        tuple(p["contract"]["input_size"]),
        limit=p["limit"],
        ascend_bins=p["ascend_bins"],
        workers=matrix.raw["data"]["workers"],
    )


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
    rep = verify.verify_all(
        features,
        p["reference"],
        p["tolerances"],
        index,
        skipped=p["skipped"],
        failed=failed,
        max_rank=p["max_rank"],
        required=p["required"],
        allow_skip=p["allow_skip"],
    )
    meta = json.loads(inputs["meta"].read_text()) if "meta" in inputs else {}
    rep["model"] = report.model_facts(p["model"], meta)
    rep["runner"] = p["runner"]
    rep["stages"] = p["stages"]
    rep["nondeterministic"] = p.get("nondeterministic", [])
    if p.get("gathered"):
        rep["gathered"] = p["gathered"]
    html = None
    if p.get("html", False):
        from .html_report import HtmlInputs

        html = HtmlInputs(
            features=features,
            index=index,
            dataset=Path(p["dataset"]) if p.get("dataset") else None,
            bench=p.get("bench") or {},
        )
    report.write_reports(rep, tmp, html=html)
    return {"passed": rep["passed"], "exit_code": rep["exit_code"]}


#: What host stages' outputs depend on besides their code: the decoder and the arithmetic.
HOST_FINGERPRINT = f"host:python={platform.python_version()},numpy={np.__version__},pillow={PIL.__version__}"

HOST_NODES: dict[str, Callable[..., dict]] = {
    "source": _host_source,
    "prepare": _host_prepare,
    "verify": _host_verify,
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
        return (
            FAILED,
            (
                f"stage module {files} is missing, while the target has its other stages' "
                "code: restore it, or remove the stage from target.yaml"
            ),
            "failed",
        )
    reasons = [unavailable]
    if missing:
        reasons.append(f"stage code {', '.join(f'targets/{tdef.name}/{s}.py' for s in missing)} not written yet")
    reason = "; ".join(r for r in reasons if r)
    return (SKIPPED, reason, "") if reason else (None, "", "")


# --------------------------------------------------------------------------- progress


class StageProgress:
    """What is shown while a stage runs. This plain one (CI logs, pipes) says only that a stage
    started (its finish is the stage's own ``built``/``FAILED`` line); :class:`RichProgress` draws
    a live line on a terminal. Stages report images done / total with ``::progress`` lines (the
    stage contract), relayed here by :func:`relay_progress` instead of to the stage's log."""

    def start(self, node_id: str) -> None:
        log.info("  started    %s", node_id)

    def update(self, node_id: str, done: int, total: int) -> None:  # noqa: B027 - optional
        """A stage said it has done ``done`` of ``total`` images."""

    def finish(self, node_id: str) -> None:  # noqa: B027 - optional
        """The stage's process ended (its outcome line follows)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class RichProgress(StageProgress):
    """A live line per running stage on a terminal (rich): ``torch.infer  12.3 s  128/426 images``,
    redrawn four times a second; nothing of it stays in the scrollback."""

    def __init__(self, console: Any = None):
        from rich.console import Console
        from rich.live import Live

        self.console = console or _rich_console() or Console(stderr=True)
        self.live = Live("", console=self.console, transient=True, refresh_per_second=4, get_renderable=self._render)
        self.running: dict[str, list[Any]] = {}  # node -> [t0, done, total]
        self.started = False

    def _render(self) -> Any:
        from rich.text import Text

        now = time.perf_counter()
        lines = []
        for node_id, (t0, done, total) in list(self.running.items()):
            count = f"  {done}/{total} images" if total else ""
            lines.append(f"  running    {node_id:<22} {now - t0:7.1f} s{count}")
        return Text("\n".join(lines))

    def start(self, node_id: str) -> None:
        if not self.started:
            self.live.start()
            self.started = True
        self.running[node_id] = [time.perf_counter(), 0, 0]

    def update(self, node_id: str, done: int, total: int) -> None:
        if node_id in self.running:
            self.running[node_id][1:] = [done, total]

    def finish(self, node_id: str) -> None:
        self.running.pop(node_id, None)

    def close(self) -> None:
        self.running.clear()
        if self.started:
            self.live.stop()
            self.started = False


def _rich_console() -> Any:
    """The console of the RichHandler on the modelmatrix logger (tasks.py's), so that log lines and
    the live line share one console and do not tear each other."""
    from rich.logging import RichHandler

    for h in logging.getLogger("modelmatrix").handlers:
        if isinstance(h, RichHandler):
            return h.console
    return None


def without_progress(text: str) -> str:
    """A stage's log tail without its ``::progress`` lines (they are not the stage's log)."""
    from targets.common.contract import PROGRESS_PREFIX

    return "\n".join(ln for ln in text.splitlines() if not ln.startswith(PROGRESS_PREFIX))


class _ProgressRelay(logging.Filter):
    """On the ``modelmatrix.stage`` logger (every line a runner reads from a stage, as
    ``"  [%s] %s" % (label, line)``): ``::progress`` lines go to the StageProgress and no further;
    other lines pass only where the logger would have let them (the level it had before)."""

    def __init__(self, shown: StageProgress, level: int):
        super().__init__()
        self.shown, self.level = shown, level

    def filter(self, record: logging.LogRecord) -> bool:
        from targets.common.contract import parse_progress

        args = record.args
        if isinstance(args, tuple) and len(args) == 2:
            seen = parse_progress(str(args[1]))
            if seen is not None:
                with contextlib.suppress(Exception):  # a display problem must never fail a stage
                    self.shown.update(str(args[0]), *seen)
                return False
        return record.levelno >= self.level


@contextlib.contextmanager
def relay_progress(shown: StageProgress) -> Iterator[StageProgress]:
    """Relay the stages' progress lines to ``shown`` while the block runs."""
    stage_logger = logging.getLogger("modelmatrix.stage")
    saved = stage_logger.level
    relay = _ProgressRelay(shown, stage_logger.getEffectiveLevel())
    stage_logger.addFilter(relay)
    stage_logger.setLevel(logging.DEBUG)  # so that progress lines reach the filter at all
    try:
        yield shown
    finally:
        stage_logger.removeFilter(relay)
        stage_logger.setLevel(saved)
        shown.close()


# --------------------------------------------------------------------------- verify's parameters

#: report.html: a verify output (beside workspace.REPORT_FILES) unless --no-html
HTML_REPORT = "report.html"


def bench_throughput(ws_root: Path) -> dict[str, dict[str, float]]:
    """target -> {batch size: img/s} from the last `invoke bench` (workspace/bench/bench.json), or {}."""
    try:
        bench = json.loads((ws_root / "bench" / "bench.json").read_text())
        return {
            t: {str(row["batch_size"]): float(row["images_per_second"]) for row in r.get("results", [])}
            for t, r in bench.get("targets", {}).items()
            if r.get("status") == "measured"
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def verify_params(
    m: Matrix,
    required: dict[str, str],
    runner: str,
    skipped: dict[str, str],
    failed: dict[str, dict[str, str]],
    stages: dict[str, Any],
    html: bool = True,
    gathered: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What verify is keyed on and reads besides its inputs (one place for `invoke matrix` and the
    gather of `invoke verify --from`)."""
    enabled = m.enabled_targets()
    params = {
        "reference": m.raw["verify"]["reference"],
        "max_rank": m.raw["verify"]["max_rank"],
        "tolerances": {t: m.target_cfg(t)["tolerance"] for t in enabled},
        "skipped": skipped,
        "failed": failed,
        "required": {t: why for t, why in required.items() if t in enabled},
        "allow_skip": {t: m.target_cfg(t)["allow_skip"] for t in enabled if m.target_cfg(t).get("allow_skip")},
        "model": {k: m.model[k] for k in ("arch", "checkpoint", "neck_feat", "last_stride", "input_size", "seed")},
        "runner": runner,
        "stages": stages,
        # artifacts whose bytes differ between runs (target.yaml nondeterministic): judged by outputs
        "nondeterministic": nondeterministic_artifacts(m.targets, enabled),
    }
    if html:
        # report.html: thumbnails of the worst images come from the dataset, throughput from the last bench
        params.update(html=True, dataset=str(m.resolve(m.raw["data"]["dataset"])), bench=bench_throughput(m.workspace))
    if gathered:
        params["gathered"] = gathered
    return params


# --------------------------------------------------------------------------- the run


class MatrixRun:
    def __init__(
        self,
        matrix: Matrix,
        runner: Runner,
        force: bool = False,
        required: dict[str, str] | None = None,
        broken: dict[str, str] | None = None,
        ws: Workspace | None = None,
        html: bool = True,
    ):
        self.matrix, self.runner, self.force = matrix, runner, force
        self.html = html
        self.progress = StageProgress()
        self.required = dict(required or {})
        self.broken = dict(broken or {})  # target -> its manifest problem (found while planning)
        self.ws = ws or Workspace(matrix.workspace)
        self.outcomes: dict[str, Outcome] = {}
        self._target_reason: dict[str, tuple[str | None, str, str]] = {}

    # -- helpers
    def _upstream_problem(self, node: Node) -> str | None:
        if node.id == "verify":
            return None  # verify runs whatever happened upstream: it reports it
        return upstream_problem(
            node,
            lambda p: None if p not in self.outcomes else ("ok" if self.outcomes[p].ok else self.outcomes[p].status),
        )

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
        except TargetUnavailable as exc:  # e.g. its image's base or a vendor file is not here
            return SKIPPED, str(exc), ""
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
        # Not timings, nor done vs up to date: they would change the key every run.
        stages = {k: {"status": "ok" if o.ok else o.status, "reason": o.reason} for k, o in self.outcomes.items()}
        node.params = verify_params(m, self.required, self.runner.name, skipped, failed, stages, html=self.html)
        if self.html and HTML_REPORT not in node.outputs:
            node.outputs.append(HTML_REPORT)
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
            # per-stage requires: ascend.convert needs the toolkit only, ascend.infer also an NPU
            stage_reason = self.runner.stage_unavailable_reason(tdef, node.stage)
            if stage_reason:
                return Outcome(node, SKIPPED, stage_reason)
            device = self.runner.device_fingerprint(tdef)  # GPU name, compute capability, driver
            return self._run(node, self.runner.fingerprint(tdef) + (f";{device}" if device else ""))
        except ModelMatrixError as exc:
            tail = without_progress(getattr(exc, "log_tail", ""))
            self._save_failure_log(node, str(exc), tail)
            return Outcome(node, FAILED, _own(str(exc), node.id), log_tail=tail, kind=_failure_kind(exc))

    def _input_digests(self, node: Node) -> tuple[dict[str, Path], dict[str, str]]:
        paths, digests = self._resolved_inputs(node)
        if node.id == "source":
            # external: a checkpoint re-saved within the same mtime tick with the same size is re-read
            digests["file"] = self.ws.hashes.file(
                _existing(Path(node.params["path"]), "model.checkpoint"), external=True
            )
        elif node.id == "prepare":
            from . import data

            # exactly the files prepare reads (one line for a missing folder or a hostile file)
            digests["dataset"] = data.dataset_digest(Path(node.params["dataset"]), self.ws.hashes, node.params["limit"])
        return paths, digests

    def _run(self, node: Node, fingerprint: str) -> Outcome:
        paths, digests = self._input_digests(node)
        folder = self.matrix.targets[node.target].folder if node.target else None
        key = node_key(node, fingerprint, digests, folder)
        t0 = time.perf_counter()
        try:
            return self._produce(node, key, fingerprint, paths, t0, digests)
        except ModelMatrixError as exc:
            if node.target is None:
                raise  # a host node's error (dataset, checkpoint) stops the run
            tail = without_progress(getattr(exc, "log_tail", ""))
            self._save_failure_log(node, str(exc), tail)
            return Outcome(
                node,
                FAILED,
                _own(str(exc), node.id),
                key=key,
                seconds=time.perf_counter() - t0,
                log_tail=tail,
                kind=_failure_kind(exc),
            )

    def _provenance(self, node: Node, fingerprint: str, digests: dict[str, str]) -> dict[str, Any]:
        """What the sidecars of ``node``'s outputs say besides node, key and digests (provenance.py)."""
        if node.target is None:
            env = host_environment("host", ["numpy", "pillow"], fingerprint)
            folder = None
            nondet: dict[str, str] = {}
        else:
            tdef = self.matrix.targets[node.target]
            env = {**self.runner.provenance(tdef), "fingerprint": fingerprint}
            folder = tdef.folder
            nondet = dict(tdef.stages[node.stage].nondeterministic)
        inputs: dict[str, dict[str, Any]] = {}
        for name, digest in sorted(digests.items()):
            ref = node.inputs.get(name)
            if ref is not None:
                origin = f"{ref.producer}/{ref.file}"
            else:  # the files a host node reads itself: the checkpoint (source), the dataset (prepare)
                origin = str(node.params.get("path" if node.id == "source" else "dataset", name))
            inputs[name] = {"from": origin, "sha256": digest}
        return {
            "target": node.target,
            "stage": node.stage,
            "code": code_hash(node, folder),
            "environment": env,
            "inputs": inputs,
            "params": node.params,
            "nondeterministic": nondet,
        }

    def _produce(
        self,
        node: Node,
        key: str,
        fingerprint: str,
        paths: dict[str, Path],
        t0: float,
        digests: dict[str, str] | None = None,
    ) -> Outcome:
        with self.ws.stage(node.id, key, node.outputs, force=self.force) as slot:
            if slot.cached:
                return Outcome(node, CACHED, key=key, dir=slot.dir, stamp=slot.stamp)
            assert slot.tmp is not None
            slot.provenance = self._provenance(node, fingerprint, digests or {})
            self.progress.start(node.id)
            if node.host:
                try:
                    result = HOST_NODES[node.id](self.matrix, self.ws, node, slot.tmp, paths)
                finally:
                    self.progress.finish(node.id)
                atomic_write_json(slot.tmp / "result.json", result or {})
            else:
                assert node.target is not None
                req = StageRequest(
                    target=self.matrix.targets[node.target],
                    stage=node.stage,
                    workspace=self.ws.root,
                    inputs={k: self.ws.rel(v) for k, v in paths.items()},
                    out_dir=self.ws.rel(slot.tmp),
                    params=node.params,
                    timeout_s=float(self.matrix.raw["stage_timeout_s"]),
                    origins=self._origins(node),
                )
                try:
                    self.runner.run(req)
                finally:
                    self.progress.finish(node.id)
            slot.extra = {"seconds": round(time.perf_counter() - t0, 3), "runner": fingerprint}
        return Outcome(
            node,
            DONE,
            key=key,
            dir=slot.dir,
            stamp=slot.stamp,
            seconds=time.perf_counter() - t0,
            rebuilt=slot.damaged or "",
        )

    def _origins(self, node: Node) -> dict[str, str]:
        """Inputs imported from the user's files are named by the user's path in messages."""
        src = self.outcomes.get("source")
        return {
            name: src.node.params["path"]
            for name, ref in node.inputs.items()
            if ref.producer == "source" and src is not None and src.ok
        }

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


# --------------------------------------------------------------------------- the dry run

WOULD_RUN = "would run"


@dataclass
class DryLine:
    node: str
    status: str  # "up to date", "would run", "skipped", "FAILED"
    reason: str = ""
    commands: list[list[str]] = field(default_factory=list)


class DryRun(MatrixRun):
    """`invoke matrix --dry-run`: the same plan, probes and keys as a run, with nothing run, built,
    written or locked. A stage is "up to date" when its key is in the store (outputs re-checked),
    "would run" otherwise (and so is everything after it); skips and failures are predicted by the
    same probes (an image the docker runner would build first is said). Stages that drive a vendor
    tool list the command lines they would run (``targets/<t>/commands.py``, stdlib only)."""

    def __init__(self, matrix: Matrix, runner: Runner, **kw: Any):
        super().__init__(matrix, runner, html=False, **kw)
        self.notes: dict[str, str] = {}

    def _probe_target(self, tdef: TargetDef) -> tuple[str | None, str, str]:
        state = target_probe(tdef, self.runner.unavailable_reason(tdef))
        if state[0] or self.runner.name != "docker":
            return state
        from . import images

        row = images.image_status(self.matrix, tdef.name, getattr(self.runner, "engine", None))
        if not row["up_to_date"]:
            if not row.get("tag"):
                return FAILED, f"{tdef.name} image: {row['problem']}", "failed"
            self.notes[tdef.name] = f"builds {row['tag']} first"
        return None, "", ""

    def _upstream_problem(self, node: Node) -> str | None:
        if node.id == "verify":
            return None
        return upstream_problem(
            node,
            lambda p: (
                None
                if p not in self.outcomes
                else ("ok" if self.outcomes[p].ok or self.outcomes[p].status == WOULD_RUN else self.outcomes[p].status)
            ),
        )

    def run_node(self, node: Node) -> Outcome:
        after = [
            r.producer
            for r in node.inputs.values()
            if r.producer in self.outcomes and self.outcomes[r.producer].status == WOULD_RUN
        ]
        if node.id == "verify" and any(o.status == WOULD_RUN for o in self.outcomes.values()):
            return Outcome(node, WOULD_RUN, "after the stages that would run")
        if after and node.id != "verify":
            o = super().run_node(node) if node.target is None else self._probe_only(node)
            if o.status in (SKIPPED, FAILED):
                return o
            return Outcome(node, WOULD_RUN, f"after {', '.join(dict.fromkeys(after))}")
        if node.target is not None and node.target in self.notes:
            o = self._probe_only(node)
            return o if o.status in (SKIPPED, FAILED) else Outcome(node, WOULD_RUN, self.notes[node.target])
        return super().run_node(node)

    def _probe_only(self, node: Node) -> Outcome:
        assert node.target is not None
        if node.target in self.broken:
            return Outcome(node, FAILED, self.broken[node.target], kind="bad input")
        status, reason, kind = self._target_state(node.target)
        if status:
            return Outcome(node, status, reason, kind=kind)
        stage_reason = self.runner.stage_unavailable_reason(self.matrix.targets[node.target], node.stage)
        return Outcome(node, SKIPPED, stage_reason) if stage_reason else Outcome(node, WOULD_RUN)

    def _produce(
        self,
        node: Node,
        key: str,
        fingerprint: str,
        paths: dict[str, Path],
        t0: float,
        digests: dict[str, str] | None = None,
    ) -> Outcome:
        stamp, damaged = (None, None) if self.force else self.ws.find(node.id, key)
        if stamp is not None:
            return Outcome(node, CACHED, key=key, dir=self.ws.stage_dir(node.id, key), stamp=stamp)
        why = "--force" if self.force else (f"the stored result is damaged: {damaged}" if damaged else "")
        return Outcome(node, WOULD_RUN, why, key=key)

    def _announce(self, o: Outcome) -> None:
        pass

    def _save_failure_log(self, node: Node, message: str, tail: str) -> None:
        pass  # a dry run writes nothing

    def run(self, plan: list[Node], on_node: Callable[[Node], None] | None = None) -> dict[str, Outcome]:
        for node in plan:
            self.outcomes[node.id] = self.run_node(node)
        return self.outcomes

    def commands(self, node: Node) -> list[list[str]]:
        """The vendor command lines ``node`` would run, from its target's commands.py (if any)."""
        if node.target is None:
            return []
        import importlib

        try:
            module = importlib.import_module(f"targets.{node.target}.commands")
        except ModuleNotFoundError:
            return []
        inputs = {}
        for name, ref in node.inputs.items():
            up = self.outcomes.get(ref.producer)
            inputs[name] = (
                str(up.dir / ref.file)
                if up is not None and up.ok and up.dir is not None
                else f"<{ref.producer}>/{ref.file}"
            )
        o = self.outcomes.get(node.id)
        out_dir = (
            str(self.ws.stage_dir(node.id, o.key)) if o is not None and o.key else f"<{self.ws.node_dir(node.id)}/KEY>"
        )
        facts = {
            "input_name": self.matrix.model["export"]["input_name"],
            "input_size": self.matrix.model["input_size"],
            "inputs": inputs,
            "out_dir": out_dir,
        }
        try:
            return [list(map(str, c)) for c in module.commands(node.stage, node.params, facts)]
        except Exception as exc:  # a stage's own check (e.g. batch > max): said, not raised
            return [[f"(cannot list the command: {exc})"]]


def dry_run(
    matrix: Matrix,
    runner_choice: str | None = None,
    force: bool = False,
    require: tuple[str, ...] | list[str] = (),
    ci: bool | None = None,
) -> list[DryLine]:
    """What `invoke matrix` would do, stage by stage, without running, building or writing anything."""
    plan, broken = build_plan(matrix, per_target_errors=True)
    runner, _ = select_runner(matrix, runner_choice)
    try:
        run = DryRun(matrix, runner, force=force, required=required_targets(matrix, require, ci), broken=broken)
        outcomes = run.run(plan)
        lines = []
        for node in plan:
            o = outcomes[node.id]
            status = {CACHED: "up to date", DONE: "up to date", SKIPPED: "skipped", FAILED: "FAILED"}.get(
                o.status, o.status
            )
            lines.append(DryLine(node.id, status, o.reason, run.commands(node)))
        return lines
    finally:
        runner.close()


def _existing(path: Path, key: str) -> Path:
    if not path.is_file():
        raise ModelMatrixError(
            f"{path}: checkpoint not found (matrix.yaml {key}); fix the path "
            "or set it to null for seeded random weights"
        )
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


def run_matrix(
    matrix: Matrix,
    runner_choice: str | None = None,
    force: bool = False,
    require: tuple[str, ...] | list[str] = (),
    ci: bool | None = None,
    html: bool = True,
    progress: StageProgress | None = None,
) -> RunSummary:
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
                run = MatrixRun(
                    matrix,
                    runner,
                    force=force,
                    required=required_targets(matrix, require, ci),
                    broken=broken,
                    ws=ws,
                    html=html,
                )
                with relay_progress(progress or StageProgress()) as run.progress:
                    outcomes = run.run(plan)
            finally:
                ws.hashes.save()
                runner.close()
            v = outcomes.get("verify")
            if v and v.ok and v.dir is not None:
                report = _publish_reports(ws, v.dir)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):
                raise disk_error(exc, ws.root, "running the matrix") from None
            raise
        finally:
            if report is None:
                with contextlib.suppress(OSError):
                    stale = ws.unpublish((*REPORT_FILES, HTML_REPORT))
                    if stale:
                        log.info("removed the previous %s: this run did not reach verify", ", ".join(stale))
    summary = RunSummary(outcomes, report, ws.root, runner.name, time.perf_counter() - t0, notices)
    if not summary.did_work and not any(o.status == FAILED for o in outcomes.values()):
        log.info(
            "nothing to do: all %d runnable stages are up to date (%.2f s)",
            sum(o.ok for o in outcomes.values()),
            summary.seconds,
        )
    return summary


def _publish_reports(ws: Workspace, folder: Path) -> dict[str, Any]:
    """Copy verify's reports to the workspace root; a report.html of an earlier run is removed when
    this verify wrote none (--no-html), so the published files always describe one run."""
    for name in REPORT_FILES:
        ws.publish(folder / name, name)
    if (folder / HTML_REPORT).is_file():
        ws.publish(folder / HTML_REPORT, HTML_REPORT)
    else:
        ws.unpublish((HTML_REPORT,))
    return json.loads((folder / "report.json").read_text())


def run_verify(
    matrix: Matrix,
    *,
    features: dict[str, Path],
    index: Path,
    meta: Path | None,
    skipped: dict[str, str],
    failed: dict[str, dict[str, str]],
    stages: dict[str, Any],
    runner: str,
    required: dict[str, str],
    gathered: dict[str, Any] | None = None,
    html: bool = True,
    force: bool = False,
) -> RunSummary:
    """Verify alone, on inputs that other runs computed (`invoke verify --from`: fanout.gather): the
    same host node as in `invoke matrix`, keyed and stored in ``matrix``'s workspace, its reports
    published there."""
    t0 = time.perf_counter()
    ws = Workspace(matrix.workspace)
    ref = matrix.raw["verify"]["reference"]
    node = Node(
        "verify",
        None,
        "verify",
        inputs={f"features:{t}": Ref(f"{t}.infer", "features.npy") for t in features},
        outputs=list(REPORT_FILES) + ([HTML_REPORT] if html else []),
    )
    node.inputs["index"] = Ref("prepare", "index.json")
    paths: dict[str, Path] = {**{f"features:{t}": p for t, p in features.items()}, "index": index}
    if meta is not None:
        node.inputs["meta"] = Ref(f"{ref}.export", "meta.json")
        paths["meta"] = meta
    node.params = verify_params(matrix, required, runner, skipped, failed, stages, html=html, gathered=gathered)
    with ws.lock():
        digests = {name: ws.hashes.file(path, external=True) for name, path in paths.items()}
        key = node_key(node, HOST_FINGERPRINT, digests)
        try:
            with ws.stage(node.id, key, node.outputs, force=force) as slot:
                if not slot.cached:
                    assert slot.tmp is not None
                    slot.provenance = {
                        "target": None,
                        "stage": node.stage,
                        "code": code_hash(node),
                        "environment": host_environment("host", ["numpy", "pillow"], HOST_FINGERPRINT),
                        "inputs": {n: {"from": str(paths[n]), "sha256": d} for n, d in sorted(digests.items())},
                        "params": node.params,
                    }
                    atomic_write_json(slot.tmp / "result.json", _host_verify(matrix, ws, node, slot.tmp, paths))
                    slot.extra = {"seconds": round(time.perf_counter() - t0, 3), "runner": HOST_FINGERPRINT}
            outcome = Outcome(
                node,
                CACHED if slot.cached else DONE,
                key=key,
                dir=slot.dir,
                stamp=slot.stamp,
                seconds=time.perf_counter() - t0,
            )
            report = _publish_reports(ws, slot.dir)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):
                raise disk_error(exc, ws.root, "verifying the gathered results") from None
            raise
        finally:
            ws.hashes.save()
    _announce_verify(outcome)
    return RunSummary({"verify": outcome}, report, ws.root, runner, time.perf_counter() - t0)


def _announce_verify(o: Outcome) -> None:
    if o.status == DONE:
        log.info("  built      %-22s %7.2f s [%s]", o.node.id, o.seconds, short(o.key or ""))
    else:
        log.info("  up to date %-22s [%s]", o.node.id, short(o.key or ""))
