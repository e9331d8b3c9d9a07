"""`invoke doctor`: what this host can do, found without doing anything.

One table: the Docker engine (reachable, its version and address, or why not), the runner
`invoke matrix` would use, the inputs (dataset, checkpoint), each base image (present, or the
command that makes it), and for each target its image (up to date, not built, or why it cannot be
built), the toolchain probe of each runner, the files a user must supply, and what `invoke matrix`
would do with it here: ``run``, ``skip: <reason>`` or ``FAIL: <reason>``, and whether a skip is
allowed or fails the run (the target is required).

Side-effect free by construction: it never builds, pulls or runs anything, never creates the
workspace and writes nothing. It inspects the engine's images (never pulls), hashes the recipes'
files (as `invoke images` does) and asks the runners' own probes.

The verdicts mirror :meth:`modelmatrix.pipeline.MatrixRun.run_node` and ``_probe_target`` node by
node (manifest problems, upstream outcomes, runner probes, missing stage code), except the one step
that would act: ``runner.prepare`` (for the Docker runner, an image build) is predicted from
:func:`modelmatrix.images.image_status` instead of performed. Host stages (prepare, source) are
assumed to run; the inputs rows say when their files are missing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Matrix, TargetDef
from .docker_client import Engine, engine_address
from .errors import ConfigError, DockerError, ModelMatrixError, TargetUnavailable
from .pipeline import SKIPPED, required_targets, target_probe, upstream_problem
from .plan import Node, build_plan

log = logging.getLogger(__name__)

RUNNERS = ("local", "docker")
RUN, SKIP, FAIL, OFF, STOP = "run", "skip", "fail", "off", "stop"
NO_ENGINE = "no Docker engine (see the engine row)"
HEADER = ("what", "check", "result")


@dataclass
class Row:
    what: str
    check: str
    result: str


@dataclass
class EngineState:
    reachable: bool
    address: str
    version: str | None = None
    api_version: str | None = None
    reason: str | None = None

    def text(self) -> str:
        if not self.reachable:
            return f"unreachable: {self.reason}"
        api = f" (API {self.api_version})" if self.api_version else ""
        return f"reachable: Docker {self.version or '?'}{api} at {self.address}"


@dataclass
class TargetState:
    name: str
    enabled: bool
    image: str  # one line: where its image stands
    image_tag: str | None  # the tag of its current recipe (None: cannot plan)
    image_up_to_date: bool
    image_problem: str | None  # why the recipe cannot be planned (base missing, ...)
    probes: dict[str, str | None]  # runner -> unavailable reason (None: can run)
    files: list[str]  # user-supplied files the target declares
    verdict: str = RUN  # run | skip | fail | off | stop
    reason: str = ""
    builds: str | None = None  # run: the image tag the docker runner builds first
    required: str | None = None  # why a skip fails the run
    allow_skip: str | None = None

    @property
    def can_run(self) -> bool:
        return self.verdict == RUN

    def matrix_text(self) -> str:
        req = f"required: {self.required}" if self.required else ""
        if self.verdict == RUN:
            text = "run" + (f" (builds {self.builds} first)" if self.builds else "")
            return text + (f"; {req}" if req else "")
        if self.verdict == SKIP:
            if self.required:
                return f"skip: {self.reason} -> run fails ({req})"
            return f"skip: {self.reason}" + (f" (allowed: {self.allow_skip})" if self.allow_skip else "")
        if self.verdict == FAIL:
            return f"FAIL: {self.reason}" + (f" ({req})" if req else "")
        return f"not run: {self.reason}"


@dataclass
class Diagnosis:
    config: Path
    runner_choice: str  # auto | local | docker, as asked
    runner_source: str  # "--runner" or "matrix.yaml runner"
    runner: str | None  # what invoke matrix would use; None: it would stop
    runner_note: str
    engine: EngineState
    inputs: list[Row]
    bases: list[Row]
    targets: dict[str, TargetState]
    require: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def rows(self) -> list[Row]:
        rows = [
            Row("engine", "docker", self.engine.text()),
            Row("runner", self.runner_choice, self.runner_note),
            *self.inputs,
            *self.bases,
        ]
        for t in self.targets.values():
            what = f"target {t.name}"
            rows += [Row(what, "image", t.image)]
            rows += [Row(what, r, "ok" if t.probes[r] is None else t.probes[r] or "") for r in RUNNERS]
            rows += [
                Row(
                    what, "files", ", ".join(t.files) if t.files else f"- (targets/{t.name}/target.yaml declares none)"
                ),
                Row(what, "matrix", t.matrix_text()),
            ]
        return rows

    def unrunnable_required(self) -> list[TargetState]:
        """The --require targets that cannot run here (the cause of exit 3)."""
        return [self.targets[t] for t in self.require if not self.targets[t].can_run]

    def check_required(self) -> None:
        """Raise TargetUnavailable (exit 3, one line) when a --require target cannot run here."""
        bad = self.unrunnable_required()
        if bad:
            runner = self.runner or self.runner_choice
            words = {FAIL: "FAIL", STOP: "not run"}
            raise TargetUnavailable(
                "; ".join(
                    f"--require {t.name} cannot run here ({runner} runner): "
                    f"{words.get(t.verdict, t.verdict)}: {t.reason}"
                    for t in bad
                )
            )


# --------------------------------------------------------------------------- the probes


def engine_state(timeout: int = 10) -> tuple[EngineState, Engine | None]:
    """The engine's version and address, or why it does not answer (the reason engine_reason gives)."""
    address = engine_address()
    try:
        engine = Engine(timeout=timeout)
        info = engine.info()
    except DockerError as exc:
        return EngineState(False, address, reason=str(exc)), None
    api = engine.api.api_version
    return EngineState(True, address, version=info.get("ServerVersion"), api_version=str(api) if api else None), engine


def declared_files(tdef: TargetDef, given: dict[str, str] | None = None) -> list[str]:
    """Files the user must supply for a target's image (a vendor toolkit: image.files in target.yaml),
    each with where it is expected and whether it is there (its sha256 is checked by the build)."""
    given = given or {}
    out = []
    for f in tdef.image.get("files") or []:
        path = given.get(f["name"])
        state = (
            ("given: " + path + ("" if Path(path).is_file() else " (missing)"))
            if path
            else f"not given: `invoke build --target {tdef.name} --file {f['name']}=PATH` ({f['where']})"
        )
        out.append(f"{f['name']} = {f['filename']}: {state}")
    return out


def _short_id(image_id: str | None) -> str:
    return (image_id or "")[7:19] or "?"


def _inputs(matrix: Matrix) -> list[Row]:
    rows = []
    dataset = matrix.resolve(matrix.raw["data"]["dataset"])
    if dataset.is_dir():
        rows.append(Row("dataset", "folder", f"found: {dataset} (`invoke data` scans it)"))
    else:
        rows.append(
            Row(
                "dataset",
                "folder",
                f"missing: {dataset} (data.dataset); `invoke data --synthetic` "
                "writes the synthetic set there, or point data.dataset at a "
                "Market1501 folder",
            )
        )
    ckpt = matrix.model["checkpoint"]
    if ckpt:
        path = matrix.resolve(ckpt)
        rows.append(
            Row(
                "checkpoint",
                "file",
                f"found: {path}"
                if path.is_file()
                else f"missing: {path} (model.checkpoint); fix the path or set it to null",
            )
        )
    else:
        rows.append(Row("checkpoint", "file", "none: seeded random weights (model.checkpoint is null)"))
    return rows


def _bases(matrix: Matrix, engine: Engine | None) -> list[Row]:
    """Every declared base and every base a target names, with what exists locally (never pulls)."""
    from .bases import declaration, list_bases

    if engine is not None:
        listed = list_bases(matrix, engine)
    else:
        listed = [
            {"base": k, "tag": d["tag"], "image_id": None, "used_by": []}
            for k, d in matrix.raw["images"]["bases"].items()
        ]
        by_key = {r["base"]: r for r in listed}
        for t in matrix.targets:
            ref = matrix.target_cfg(t)["image"]["base"]
            if ref:
                found = declaration(matrix, ref)
                key = found[0] if found else ref
                by_key.setdefault(key, {"base": key, "tag": None, "image_id": None, "used_by": []})
                by_key[key]["used_by"].append(t)
        listed = list(by_key.values())
    rows = []
    for b in listed:
        users = f"; for {', '.join(b['used_by'])}" if b["used_by"] else "; no target uses it"
        what = f"base {b['base']}"
        if engine is None:
            how = (
                f"`invoke bases` makes {b['tag']}"
                if b["tag"]
                else "not declared under images.bases: `docker load` it, or declare it"
            )
            rows.append(Row(what, "image", f"unknown: {NO_ENGINE}; {how}{users}"))
            continue
        own = engine.image(b["base"]) if b["tag"] and b["tag"] != b["base"] else None
        if own:
            rows.append(Row(what, "image", f"present: {b['base']} is a local image ({_short_id(own['Id'])}){users}"))
        elif b["image_id"]:
            where = f"bootstrapped as {b['tag']}" if b["tag"] else "a local image"
            rows.append(Row(what, "image", f"present: {where} ({_short_id(b['image_id'])}){users}"))
        elif b["tag"]:
            rows.append(
                Row(
                    what,
                    "image",
                    f"missing: `invoke bases` makes {b['tag']} (images.bases in {matrix.path.name}){users}",
                )
            )
        else:
            rows.append(
                Row(
                    what,
                    "image",
                    "missing: not local and not declared under images.bases; "
                    f"`docker load` it, or declare it (suite, mirror, tag){users}",
                )
            )
    return rows


def _image(matrix: Matrix, name: str, engine: Engine | None) -> tuple[str, str | None, bool, str | None]:
    """(text, tag, up to date, problem) of a target's image; never pulls or builds."""
    if engine is None:
        return f"unknown: {NO_ENGINE}", None, False, None
    from . import images

    try:
        row: dict[str, Any] = images.image_status(matrix, name, engine)
    except ModelMatrixError as exc:
        return f"cannot tell: {exc}", None, False, str(exc)
    if row["up_to_date"]:
        return f"up to date: {row['tag']} ({_short_id(row['image_id'])})", row["tag"], True, None
    if row["tag"]:
        return (
            f"not built: {row['tag']}; `invoke build --target {name}` (the docker runner builds it too)",
            row["tag"],
            False,
            None,
        )
    return f"cannot build: {row['problem']}", None, False, row["problem"]


# --------------------------------------------------------------------------- the verdicts


def _own_state(t: TargetState, tdef: TargetDef, runner: str) -> tuple[str | None, str]:
    """MatrixRun._probe_target without runner.prepare: (SKIPPED | FAILED | None, reason)."""
    status, reason, _ = target_probe(tdef, t.probes[runner])
    if status:
        return status, reason
    if runner == "docker":
        # DockerRunner.prepare builds the image unless its tag exists: predicted, not done.
        if t.image_tag is None:  # its base (or a vendor file) is not here: skipped, as the run does
            return SKIPPED, f"{tdef.name} image: {t.image_problem or t.image}"
        if not t.image_up_to_date:
            t.builds = t.image_tag
    return None, ""


def _simulate(
    matrix: Matrix, plan: list[Node], broken: dict[str, str], states: dict[str, TargetState], runner: str
) -> None:
    """Walk the plan as MatrixRun.run does; each target's verdict is its first stage that would not run."""
    outcome: dict[str, str] = {}
    own: dict[str, tuple[str | None, str]] = {}
    for node in plan:
        if node.target is None:
            outcome[node.id] = "ok"  # host stages: assumed to run (see the inputs rows)
            continue
        t = states[node.target]
        status: str | None
        problem = upstream_problem(node, outcome.get)
        if problem:
            status, reason = SKIPPED, problem
        else:
            if node.target not in own:
                own[node.target] = _own_state(t, matrix.targets[node.target], runner)
            status, reason = own[node.target]
        outcome[node.id] = status or "ok"
        if status and t.verdict == RUN:
            t.verdict, t.reason = (SKIP if status == SKIPPED else FAIL), reason
    for name, problem in broken.items():
        states[name].verdict, states[name].reason = FAIL, problem


def diagnose(
    matrix: Matrix, runner_choice: str | None = None, require: list[str] | tuple[str, ...] = (), ci: bool | None = None
) -> Diagnosis:
    """What this host can do with ``matrix``. Raises ConfigError (exit 2) for an unknown or disabled
    ``require`` target, or an unknown runner; never acts."""
    t0 = time.perf_counter()
    known = matrix.raw["targets"]
    for name in require:
        if name not in known:
            raise ConfigError(f"--require {name}: not a target in {matrix.path} (known: {', '.join(known)})")
        if not matrix.target_cfg(name)["enabled"]:
            raise ConfigError(
                f"--require {name}: the target is not enabled (targets.{name}.enabled in "
                f"{matrix.path}); enable it or drop --require"
            )
    source = "--runner" if runner_choice else f"{matrix.path.name} runner"
    choice = runner_choice or matrix.raw["runner"]
    if choice not in ("auto", "local", "docker"):
        raise ConfigError(f"--runner {choice!r}: expected auto, local or docker")
    eng, engine = engine_state()
    log.debug("engine probed in %.2f s", time.perf_counter() - t0)
    runner: str | None
    if choice == "local":
        runner, note = "local", f"local ({source}: local)"
    elif engine is not None:
        runner, note = "docker", f"docker ({source}: {choice}; an engine answers)"
    elif choice == "auto":
        runner, note = "local", f"local ({source}: auto; no Docker engine, so invoke matrix falls back to local)"
    else:
        runner, note = (
            None,
            (f"none: `invoke matrix` stops before any stage ({source}: docker, and there is no Docker engine)"),
        )

    from .runners.docker import DockerRunner
    from .runners.local import LocalRunner

    local = LocalRunner()
    docker = DockerRunner(matrix, engine=engine) if engine is not None else None
    required = required_targets(matrix, list(require), ci)
    states: dict[str, TargetState] = {}
    for name, tdef in matrix.targets.items():
        cfg = matrix.target_cfg(name)
        text, tag, fresh, problem = _image(matrix, name, engine)
        probes = {
            "local": local.unavailable_reason(tdef),
            "docker": docker.unavailable_reason(tdef) if docker is not None else NO_ENGINE,
        }
        states[name] = TargetState(
            name,
            cfg["enabled"],
            text,
            tag,
            fresh,
            problem,
            probes,
            declared_files(tdef, (cfg.get("image") or {}).get("files")),
            required=required.get(name),
            allow_skip=cfg.get("allow_skip"),
        )
        if not cfg["enabled"]:
            states[name].verdict, states[name].reason = OFF, f"targets.{name}.enabled is false in {matrix.path.name}"
        elif runner is None:
            states[name].verdict, states[name].reason = STOP, "`invoke matrix --runner docker` needs a Docker engine"
    log.debug("targets probed in %.2f s", time.perf_counter() - t0)
    if runner is not None:
        plan, broken = build_plan(matrix, per_target_errors=True)
        _simulate(matrix, plan, broken, states, runner)
    diag = Diagnosis(
        matrix.path,
        choice,
        source,
        runner,
        note,
        eng,
        _inputs(matrix),
        _bases(matrix, engine),
        states,
        list(require),
        time.perf_counter() - t0,
    )
    log.debug("doctor: %.2f s", diag.seconds)
    return diag


# --------------------------------------------------------------------------- the table


def plain_lines(diag: Diagnosis) -> list[str]:
    """The table as aligned plain-text lines (pipes, CI logs); the last column is not padded."""
    rows = [Row(*HEADER), *diag.rows()]
    w0 = max(len(r.what) for r in rows)
    w1 = max(len(r.check) for r in rows)
    return [f"{r.what:<{w0}}  {r.check:<{w1}}  {r.result}".rstrip() for r in rows]


def rich_table(diag: Diagnosis) -> Any:
    """The table as a rich Table (for a terminal); cells are plain text, never rich markup."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"modelmatrix doctor: {diag.config}", title_justify="left")
    for name in HEADER:
        table.add_column(name, overflow="fold", no_wrap=name != "result")
    previous = None
    for r in diag.rows():
        group = r.what.split(" ", 1)[0] if not r.what.startswith("target ") else r.what
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        table.add_row(Text(r.what), Text(r.check), Text(r.result))  # never read as markup
    return table
