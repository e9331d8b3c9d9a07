"""The Docker runner: each stage runs in its target's image, in a fresh container.

One class owns a container's whole life (as cibuildwheel's OCIContainer does): create it from the
image *ID* (``create`` never pulls) -> start -> stream its log live -> wait with a real limit
(killed on expiry) -> remove it in ``finally``. The container sees the workspace read-only at
/workspace with only the stage's own output folder writable on top, runs as the invoking
user's uid:gid with networking disabled, a memory limit and the hardening of :data:`HARDENING`
(no capabilities, no privilege gain, a pid limit, a read-only root with a tmpfs /tmp), and
carries labels (io.modelmatrix.session = the run, io.modelmatrix.owner.* = the creating process,
io.modelmatrix.stage) so that leftovers of a crash can be found: :func:`clean`. An engine fault
while a stage runs is a one-line StageFailed, never a docker/requests traceback.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from targets.common.contract import SPEC_NAME

from .. import REPO_ROOT, images
from ..config import Matrix, TargetDef
from ..docker_client import SESSION_LABEL, Engine, engine_reason, owner_labels, owner_state
from ..errors import ConfigError, DockerError, ImageMissing, ModelMatrixError, StageFailed, TargetUnavailable
from ..provenance import docker_environment
from .base import (
    LogTail,
    Runner,
    StageRequest,
    device_fingerprint,
    device_reason,
    engine_gpu_reason,
    gpu_request_reason,
    nvidia_gpus,
    stage_exit_failure,
    stage_requires,
)

CONTAINER_WORKSPACE = "/workspace"
STAGE_LABEL = "io.modelmatrix.stage"
IMAGE_LABEL = "io.modelmatrix.image"
KILL_GRACE_S = 10.0
LOG_DRAIN_S = 10.0

#: Every stage container runs with these (Engine.create_container keywords).
HARDENING: dict[str, Any] = {
    "cap_drop": ["ALL"],  # a stage reads files and computes: no capability needed
    "security_opt": ["no-new-privileges"],  # no setuid/file-capability gain inside the container
    # A fork bomb or a thread leak stops here instead of exhausting the host's pids. Threads count
    # as pids: torch/OpenMP start about one thread per core per pool (a few hundred on a big host),
    # DataLoader workers add their own; 4096 is ten times that and still far below the kernel's
    # default pid_max of 32768 (4194304 on large hosts).
    "pids_limit": 4096,
    # Nothing writes into the image: the stage writes its output folder only, and HOME (=/tmp),
    # caches and temporary files go to a tmpfs /tmp, whose pages count against the memory limit.
    # Not noexec: libraries (cffi, JIT compilers) put code they load into the temp folder.
    "read_only": True,
    "tmpfs": {"/tmp": "rw,nosuid,nodev,mode=1777"},
}
#: Environment of every stage container; with a read-only root Python must not try to write .pyc.
STAGE_ENVIRONMENT = {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}

log = logging.getLogger(__name__)

__all__ = ["DockerRunner", "StageContainer", "engine_reason", "clean", "bench_container_overhead", "device_reason"]


# --------------------------------------------------------------------------- devices


def ascend_options(container: dict[str, Any], device_ids: list[int], dev: Path = Path("/dev")) -> dict[str, Any]:
    """An Ascend stage's devices, from the validated container options (targets/ascend/target.yaml,
    overridable per stanza) and the configured device ids: /dev/davinci<N> for each id, the listed
    management devices (davinci_manager, devmm_svm, hisi_hdc), the read-only binds (the driver folder)
    and the numeric groups that own those devices (mode 0660 HwHiAiUser; the container runs as the
    caller's uid). A device id the host lacks is a one-line ConfigError."""
    from .base import ascend_device_reason

    wrong = ascend_device_reason(device_ids, dev)
    if wrong:
        raise ConfigError(f"targets.ascend: {wrong}")
    paths = [str(dev / f"davinci{i}") for i in device_ids]
    for spec in container.get("devices") or []:
        host = spec.split(":")[0]
        if host not in paths:
            paths.append(host)
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ConfigError(
            f"targets.ascend.container.devices: {missing[0]} does not exist on this host; is the "
            "Ascend driver installed (npu-smi info)?"
        )
    groups = sorted({str(os.stat(p).st_gid) for p in paths})
    return {
        "devices": [f"{p}:{p}:rwm" for p in paths],
        "binds": [f"{b}:{b}:ro" for b in container.get("binds_ro") or [] if Path(b).exists()],
        "group_add": groups,
    }


#: requires.devices kind -> the container options that give a stage that device
DEVICE_OPTIONS = {
    "nvidia-gpu": lambda: {"gpus": True},
    "ascend-npu": lambda: {},  # from the container options: ascend_options
}


def _device_options(
    target: TargetDef,
    container: dict[str, Any] | None = None,
    stage: str | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the engine is asked for: the devices of requires.devices, and from the target's validated
    container options (targets/<t>/target.yaml ``container:``, overridden per matrix.yaml stanza) the
    GPU request (count or device_ids; all GPUs when a GPU target names none), shm size and ulimits."""
    container = container or {}
    out: dict[str, Any] = {}
    kinds = stage_requires(target, stage).get("devices", [])
    for kind in kinds:
        for key, value in DEVICE_OPTIONS[kind]().items():
            out[key] = out.get(key, []) + value if isinstance(value, list) else value
    if "ascend-npu" in kinds:
        ids = [int((params or {}).get("device_id", 0))]
        out.update(ascend_options(container, ids))
    if container.get("gpus") or out.get("gpus"):
        out["gpus"] = container.get("gpus") or {"count": -1}
    for key in ("shm_size", "ulimits"):
        if container.get(key):
            out[key] = container[key]
    return out


def device_options(
    matrix: Matrix, target: TargetDef, stage: str | None = None, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The device options :meth:`DockerRunner.container_for` gives a stage of ``target`` (the
    stage's own requires.devices; the target's when ``stage`` is None)."""
    return _device_options(target, matrix.target_cfg(target.name).get("container"), stage, params)


# --------------------------------------------------------------------------- one container


class StageContainer:
    """create -> start -> stream logs -> wait (real timeout; kill) -> remove, as a context manager."""

    def __init__(
        self,
        engine: Engine,
        image_id: str,
        command: list[str],
        *,
        label: str,
        user: str,
        mounts: list[tuple[str, str, bool]],
        labels: dict[str, str],
        environment: dict[str, str],
        mem_limit: str | None,
        device_options: dict[str, Any] | None = None,
        volumes: list[str] | None = None,
    ):
        self.engine, self.image_id, self.command, self.label = engine, image_id, command, label
        self.kwargs: dict[str, Any] = dict(
            user=user,
            mounts=mounts,
            labels=labels,
            environment={**STAGE_ENVIRONMENT, **environment},
            mem_limit=mem_limit,
            network_mode="none",
            device_options=device_options,
            **HARDENING,
        )
        if volumes:
            self.kwargs["volumes"] = list(volumes)
        self.cid: str | None = None
        self.log_error: str | None = None
        self.oom_killed = False

    def __enter__(self) -> StageContainer:
        self.cid = self.engine.create_container(self.image_id, self.command, **self.kwargs)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.cid:
            cid, self.cid = self.cid, None
            try:
                self.engine.remove_container(cid)
            except Exception as exc:  # noqa: BLE001 - must not hide the stage's own error; `invoke clean` finds it
                log.debug("%s: could not remove container %s: %s", self.label, cid[:12], exc)

    def run(self, tail: LogTail, timeout_s: float) -> int:
        """Start, stream the log into ``tail``, wait. Returns the exit code; raises on timeout."""
        assert self.cid, "use StageContainer as a context manager"
        self.engine.start(self.cid)
        pump = threading.Thread(target=self._pump, args=(tail,), name=f"logs {self.label}", daemon=True)
        pump.start()
        code = self.engine.wait(self.cid, timeout_s)
        if code is None:
            self.engine.kill(self.cid)
            self.engine.wait(self.cid, KILL_GRACE_S)
            pump.join(LOG_DRAIN_S)
            raise StageFailed(
                f"{self.label}: timed out after {timeout_s:g}s; the container was killed "
                "(raise stage_timeout_s if the stage needs longer)",
                tail.text(),
            )
        pump.join(LOG_DRAIN_S)
        if self.log_error:
            tail.feed(f"[modelmatrix: the log stream broke: {self.log_error}]")
        self.oom_killed = bool(self.engine.container_state(self.cid).get("OOMKilled"))
        return code

    def _pump(self, tail: LogTail) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        partial = ""
        assert self.cid is not None, "the container is created before its logs are read"
        try:
            for chunk in self.engine.logs(self.cid):
                text = partial + decoder.decode(chunk).replace("\r\n", "\n").replace("\r", "\n")
                *lines, partial = text.split("\n")
                for line in lines:
                    tail.feed(line)
            partial += decoder.decode(b"", final=True)
        except DockerError as exc:
            self.log_error = str(exc)
        if partial:
            tail.feed(partial)


# --------------------------------------------------------------------------- the runner


def _memory_limit(matrix: Matrix) -> str:
    value = str(matrix.raw["images"]["memory_limit"]).strip()
    if not re.fullmatch(r"\d+(\.\d+)?[bkmgBKMG]?", value):
        raise ConfigError(f"{matrix.path.name}: images.memory_limit: {value!r} is not a size like 8g or 512m")
    return value


def _signal_note(code: int) -> str:
    """For an exit code 128+N: the signal, which modelmatrix did not send (its own kill is a timeout)."""
    try:
        name = signal.Signals(code - 128).name if 128 < code < 160 else ""
    except ValueError:
        name = ""
    return f" (killed by {name} from outside modelmatrix: `docker kill`, `docker rm -f`?)" if name else ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


class DockerRunner(Runner):
    name = "docker"

    def __init__(self, matrix: Matrix, engine: Engine | None = None, user: str | None = None):
        self.matrix = matrix
        self.session = uuid.uuid4().hex[:16]
        self.user = user or f"{os.getuid()}:{os.getgid()}"
        self._engine = engine
        self._images: dict[str, tuple[str, str]] = {}
        self._remote: dict[str, Engine] = {}  # docker_host -> its engine
        self._provenance: dict[str, dict[str, Any]] = {}  # target -> its image's identity (sidecars)

    def remote_host(self, target: TargetDef) -> str | None:
        """The target stanza's ``docker_host``: its stages run on that engine, with their inputs copied
        in and outputs copied back (its bind mounts would name that host's filesystem, not ours)."""
        return self.matrix.target_cfg(target.name).get("docker_host") or None

    def engine_for(self, target: TargetDef) -> Engine:
        host = self.remote_host(target)
        if not host:
            return self.engine
        if host not in self._remote:
            self._remote[host] = Engine(host=host)
        return self._remote[host]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine()
        return self._engine

    def unavailable_reason(self, target: TargetDef) -> str | None:
        """Engine down, or a device the target needs is absent. A missing image is not a reason
        here: :meth:`prepare` builds it (and says why when it cannot)."""
        try:
            engine = self.engine_for(target)
            engine.ping()
        except DockerError as exc:
            return str(exc)
        if self.remote_host(target):
            return remote_device_reason(target, engine)
        reason = device_reason(target)
        if reason is None and "nvidia-gpu" in target.requires.get("devices", []):
            missing = engine_gpu_reason(engine.info())
            reason = f"{target.name} needs nvidia-gpu (requires.devices): {missing}" if missing else None
        return reason

    def prepare(self, target: TargetDef) -> None:
        """Build the target's image unless its recipe's tag exists (never pulling a base: that is
        `invoke build`'s job). A failure raises a one-line error: the target FAILED, not skipped
        (base not available -> `invoke bases`; a failing Dockerfile -> its failing step)."""
        if "nvidia-gpu" in target.requires.get("devices", []) and not self.remote_host(target):
            # (a remote engine's GPUs are that host's: this host's nvidia-smi says nothing of them)
            gpus = self.matrix.target_cfg(target.name).get("container", {}).get("gpus")
            wrong = gpu_request_reason(gpus, nvidia_gpus()[0], f"targets.{target.name}.container.gpus")
            if wrong:
                raise ConfigError(f"{self.matrix.path.name}: {wrong}")
        try:
            row = images.build(self.matrix, target.name, engine=self.engine_for(target), allow_pull=False)
        except ImageMissing as exc:
            # its base is not here, or a file the user must supply was not given: the target cannot
            # run here (skipped with how to fix it), unlike a Dockerfile step that fails
            raise TargetUnavailable(f"{target.name} image: {exc}") from None
        except ModelMatrixError as exc:
            raise StageFailed(f"{target.name} image: {exc}", getattr(exc, "log_tail", "")) from None
        self._images[target.name] = (row["image_id"], row["tag"])

    def fingerprint(self, target: TargetDef) -> str:
        """The image id: a rebuild of the same recipe (`invoke build --force`, no layer cache,
        apt may bring other packages) is another environment, so stage results are not reused."""
        image_id, tag = self.image_for(target)
        return f"docker:{image_id}"

    def provenance(self, target: TargetDef) -> dict[str, Any]:
        """The image the target's stages run in: id, tag, layer diff ids, labels and toolchain
        versions (its io.modelmatrix.versions label), from the engine's inspect of that id."""
        if target.name not in self._provenance:
            image_id, tag = self.image_for(target)
            engine = self.engine_for(target)
            inspect = engine.image(image_id)
            if inspect is None:
                self._images.pop(target.name, None)
                raise ImageMissing(
                    f"{target.name}: image {tag} ({image_id[7:19]}) is gone from the engine; "
                    f"run `invoke build --target {target.name}` (the docker runner never pulls)"
                )
            self._provenance[target.name] = docker_environment(
                image_id, tag, inspect, self.fingerprint(target), engine.address if self.remote_host(target) else None
            )
        return self._provenance[target.name]

    def stage_unavailable_reason(self, target: TargetDef, stage: str) -> str | None:
        """One stage's own device needs: on a remote engine asked of that engine, else of this host."""
        if self.remote_host(target):
            own = dataclasses.replace(target, requires=stage_requires(target, stage))
            return remote_device_reason(own, self.engine_for(target))
        return super().stage_unavailable_reason(target, stage)

    def device_fingerprint(self, target: TargetDef) -> str:
        """The GPUs a stage container gets (container.gpus.device_ids, or the first ``count``). On a
        remote engine this host cannot see them: the engine's address and its server id stand in,
        so a workspace shared between hosts still never reuses another host's engine."""
        gpus = self.matrix.target_cfg(target.name).get("container", {}).get("gpus") or {}
        host = self.remote_host(target)
        if host and "nvidia-gpu" in target.requires.get("devices", []):
            info = self.engine_for(target).info()
            return f"nvidia-gpu@{host}={info.get('ID', '?')};gpus={json.dumps(gpus, sort_keys=True)}"
        if gpus.get("device_ids"):
            return device_fingerprint(target, list(gpus["device_ids"]))
        count = gpus.get("count")
        return device_fingerprint(
            target, [str(i) for i in range(count)] if isinstance(count, int) and count >= 0 else None
        )

    def image_for(self, target: TargetDef) -> tuple[str, str]:
        """(image ID, tag) of the target's current recipe; ImageMissing when it is not built."""
        if target.name not in self._images:
            row = images.image_status(self.matrix, target.name, self.engine_for(target))
            if not row["up_to_date"]:
                raise ImageMissing(f"{target.name}: {row['problem']} (the docker runner never pulls)")
            self._images[target.name] = (row["image_id"], row["tag"])
        return self._images[target.name]

    def run(self, req: StageRequest) -> str:
        image_id, tag = self.image_for(req.target)
        remote = self.remote_host(req.target)
        reason = (
            remote_device_reason(req.target, self.engine_for(req.target))
            if remote
            else device_reason(req.target, req.stage)
        )
        if reason:
            raise StageFailed(f"{req.label}: {reason}")
        workspace = req.workspace.resolve()
        out = (workspace / req.out_dir).resolve()
        if out == workspace or not out.is_relative_to(workspace):
            raise StageFailed(f"{req.label}: out_dir {req.out_dir!r} must be a folder inside the workspace")
        if not out.is_dir():
            raise StageFailed(f"{req.label}: output folder {out} does not exist (the caller creates it)")
        req.write_spec(CONTAINER_WORKSPACE)
        tail = LogTail(req.label)
        container = self.container_for(req)
        try:
            with container:
                if remote:
                    copy_in(container, req, self.user)
                code = container.run(tail, req.timeout_s)
                if remote and code == 0:
                    copy_out(container, req)
        except ImageMissing:
            self._images.pop(req.target.name, None)
            raise ImageMissing(
                f"{req.label}: image {tag} ({image_id[7:19]}) is gone from the engine; "
                f"run `invoke build --target {req.target.name}` (the docker runner never pulls)"
            ) from None
        except DockerError as exc:  # the engine failed or the container vanished: this stage failed
            if "no such container" in str(exc).lower():
                raise StageFailed(
                    f"{req.label}: its container was removed while the stage ran (by `docker rm`, "
                    f"or `invoke clean --force` on a host sharing this engine?); run it again",
                    tail.text(),
                ) from None
            raise StageFailed(f"{req.label}: Docker engine error: {exc}", tail.text()) from None
        if code != 0:
            why = (
                f" (killed: out of memory, images.memory_limit {_memory_limit(self.matrix)})"
                if container.oom_killed
                else _signal_note(code)
            )
            raise stage_exit_failure(req.label, code, tail, f" in {tag}{why}")
        req.check_result(tail.text())
        return tail.text()

    def container_for(self, req: StageRequest) -> StageContainer:
        """The (not yet created) container that runs ``req``: what :meth:`run` uses."""
        image_id, tag = self.image_for(req.target)
        workspace = req.workspace.resolve()
        out = (workspace / req.out_dir).resolve()
        rel = out.relative_to(workspace).as_posix()
        # stderr joined to stdout inside the container: Docker copies the two streams separately,
        # so their lines would otherwise interleave out of order (a traceback before the print
        # that preceded it) and the last line would not be the error.
        command = [
            "sh",
            "-c",
            'exec "$@" 2>&1',
            "stage",
            "python3",
            "-m",
            req.module,
            f"{CONTAINER_WORKSPACE}/{rel}/{SPEC_NAME}",
        ]
        remote = self.remote_host(req.target)
        return StageContainer(
            self.engine_for(req.target),
            image_id,
            command,
            label=req.label,
            user=self.user,
            # a remote engine's bind mounts would name its own filesystem: a volume, filled by copy_in
            mounts=[]
            if remote
            else [(str(workspace), CONTAINER_WORKSPACE, True), (str(out), f"{CONTAINER_WORKSPACE}/{rel}", False)],
            volumes=[CONTAINER_WORKSPACE] if remote else None,
            labels={**owner_labels(self.session), STAGE_LABEL: req.label, IMAGE_LABEL: tag},
            environment={
                **STAGE_ENVIRONMENT,
                **(self.matrix.target_cfg(req.target.name).get("container") or {}).get("env", {}),
            },
            mem_limit=_memory_limit(self.matrix),
            device_options=device_options(self.matrix, req.target, req.stage, req.params),
        )

    def close(self) -> None:
        """Remove whatever this runner's session left behind (normally nothing)."""
        for engine in ([self._engine] if self._engine is not None else []) + list(self._remote.values()):
            try:
                for c in engine.containers(f"{SESSION_LABEL}={self.session}"):
                    engine.remove_container(c["Id"])
            except DockerError as exc:
                log.warning(
                    "could not remove the containers of run %s on %s (`invoke clean` will): %s",
                    self.session,
                    engine.address,
                    exc,
                )


# --------------------------------------------------------------------------- remote engines

#: requires.devices kind -> the runtime a remote engine's `docker info` lists when it can give that device
ENGINE_RUNTIMES = {"ascend-npu": "ascend"}


def remote_device_reason(target: TargetDef, engine: Engine) -> str | None:
    """A remote engine's devices are that host's: ask the engine (`docker info`), not this host's /dev."""
    kinds = target.requires.get("devices", [])
    if not kinds:
        return None
    info = engine.info()
    for kind in kinds:
        if kind == "nvidia-gpu":
            missing = engine_gpu_reason(info)
        elif kind in ENGINE_RUNTIMES:
            runtime = ENGINE_RUNTIMES[kind]
            missing = (
                None
                if runtime in (info.get("Runtimes") or {})
                else f"the Docker engine lists no {runtime} runtime (docker info)"
            )
        else:
            return (
                f"targets/{target.name}/target.yaml: requires.devices: unknown kind {kind!r} "
                f"(known: nvidia-gpu, {', '.join(ENGINE_RUNTIMES)})"
            )
        if missing:
            return f"{target.name} needs {kind} (requires.devices) on {engine.address}: {missing}"
    return None


def _uid_gid(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def copy_in(container: StageContainer, req: StageRequest, user: str) -> None:
    """Copy the stage's inputs and its (so far: spec.json only) output folder into the container's
    /workspace volume, at the same relative paths. Inputs and their folders are read-only to the
    stage, its output folder is the stage user's (the stage has no capability to override that)."""
    assert container.cid
    uid, gid = _uid_gid(user)
    ws = req.workspace.resolve()
    seen: set[str] = set()
    with tempfile.TemporaryFile() as fh:
        with tarfile.open(fileobj=fh, mode="w") as tar:

            def folder(rel: str, mode: int, owner: tuple[int, int]) -> None:
                parts = Path(rel).parts
                for i in range(1, len(parts) + 1):
                    sub = "/".join(parts[:i])
                    if sub in seen:
                        continue
                    seen.add(sub)
                    info = tarfile.TarInfo(sub)
                    info.type, info.mtime = tarfile.DIRTYPE, int(time.time())
                    info.mode, (info.uid, info.gid) = (mode, owner) if i == len(parts) else (0o555, (0, 0))
                    tar.addfile(info)

            def add(path: Path, rel: str, file_mode: int, owner: tuple[int, int]) -> None:
                if path.is_dir():
                    folder(rel, 0o555 if file_mode == 0o444 else 0o755, owner)
                    for child in sorted(path.iterdir()):
                        add(child, f"{rel}/{child.name}", file_mode, owner)
                elif path.is_file():
                    folder(str(Path(rel).parent), 0o555, (0, 0))
                    info = tar.gettarinfo(str(path), arcname=rel)
                    info.mode, info.uid, info.gid, info.uname, info.gname = file_mode, owner[0], owner[1], "", ""
                    with open(path, "rb") as src:
                        tar.addfile(info, src)

            out_rel = Path(req.out_dir).as_posix()
            top = tarfile.TarInfo(".")  # /workspace itself: not the stage's to write
            top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o555, int(time.time())
            tar.addfile(top)
            folder(str(Path(out_rel).parent), 0o555, (0, 0))
            for rel in req.inputs.values():
                add(ws / rel, Path(rel).as_posix(), 0o444, (0, 0))
            add(ws / out_rel, out_rel, 0o644, (uid, gid))
        fh.seek(0)
        container.engine.put_archive(container.cid, CONTAINER_WORKSPACE, fh)


def copy_out(container: StageContainer, req: StageRequest) -> None:
    """Copy the stage's output folder back from the container into the local one: regular files and
    folders only, nothing outside it."""
    assert container.cid
    out = (req.workspace / req.out_dir).resolve()
    remote = f"{CONTAINER_WORKSPACE}/{Path(req.out_dir).as_posix()}"
    with tempfile.TemporaryFile() as fh:
        for chunk in container.engine.get_archive(container.cid, remote):
            fh.write(chunk)
        fh.seek(0)
        with tarfile.open(fileobj=fh, mode="r:") as tar:
            for member in tar:
                parts = Path(member.name).parts[1:]  # the archive's top is the folder itself
                if not parts:
                    continue
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise StageFailed(
                        f"{req.label}: the container's output holds {member.name!r}, which is not "
                        "a plain file or folder inside the output folder; refused"
                    )
                dest = out.joinpath(*parts)
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


# --------------------------------------------------------------------------- housekeeping


def clean(all_images: bool = False, force: bool = False, engine: Engine | None = None) -> dict[str, Any]:
    """Remove leftover modelmatrix containers: those whose creating run is known to be gone
    (:func:`~modelmatrix.docker_client.owner_state`: created on this host by a process that no
    longer runs). Containers of a live run, of another host sharing the engine, or with labels
    that cannot be read are kept and listed with the reason, unless ``force``. With ``all_images``
    also every image modelmatrix built (not the bootstrapped bases).

    Returns ``containers`` (really removed by this call), ``kept`` ("name (stage): kept (why)"),
    ``failed`` (removals the engine refused) and ``images``."""
    engine = engine or Engine()
    removed: list[str] = []
    kept: list[str] = []
    failed: list[str] = []
    removed_images: list[str] = []
    for c in engine.containers(SESSION_LABEL):
        labels = c.get("Labels") or {}
        name = (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
        what = f"{name} ({labels.get(STAGE_LABEL, labels.get(SESSION_LABEL))})"
        gone, why = owner_state(labels)
        if not (gone or force):
            kept.append(f"{what}: kept ({why})")
            continue
        try:
            if engine.remove_container(c["Id"]):
                removed.append(what)
                log.info("removed %s: %s", what, why if gone else "forced")
        except DockerError as exc:
            failed.append(f"{what}: {exc}")
    if all_images:
        # the images, then their builder stages (untagged layer caches holding the CA and wheels)
        for label in (f"{images.LABEL_PREFIX}target", f"{images.LABEL_PREFIX}builder-stage"):
            for img in engine.images(label):
                engine.remove_image(img["Id"], force=True)
                removed_images.append(", ".join(img.get("RepoTags") or []) or img["Id"][7:19])
    return {"containers": removed, "kept": kept, "failed": failed, "images": removed_images}


def bench_container_overhead(
    matrix: Matrix, runs: int = 5, target: str | None = None, engine: Engine | None = None
) -> dict[str, Any]:
    """Seconds from create to removal of a container running a no-op stage (``python3 -m
    targets.common.contract``: interpreter start + the contract import), against the same command run
    locally. The issue's goal is under 1 s per container."""
    engine = engine or Engine()
    rows = {r["target"]: r for r in images.list_images(matrix, engine)}
    order = [target] if target else sorted(rows, key=lambda t: (t != "onnxruntime", t))
    chosen = next((rows[t] for t in order if t in rows and rows[t]["up_to_date"]), None)
    if chosen is None:
        raise ImageMissing(f"bench: no built image among {', '.join(order)}; run `invoke build` first")
    command = ["python3", "-m", "targets.common.contract"]
    seconds = []
    for i in range(runs):
        t0 = time.perf_counter()
        with StageContainer(
            engine,
            chosen["image_id"],
            command,
            label=f"bench.{i}",
            user=f"{os.getuid()}:{os.getgid()}",
            mounts=[],
            labels={**owner_labels(f"bench-{uuid.uuid4().hex[:8]}"), STAGE_LABEL: "bench"},
            environment=dict(STAGE_ENVIRONMENT),
            mem_limit=_memory_limit(matrix),
        ) as c:
            tail = LogTail("bench")
            code = c.run(tail, 60)
        seconds.append(time.perf_counter() - t0)
        if code != 0:
            raise StageFailed(f"bench: the no-op stage exited {code} in {chosen['tag']}", tail.text())
    local = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "targets.common.contract"], cwd=REPO_ROOT, check=True)
        local.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {
        "target": chosen["target"],
        "image": chosen["tag"],
        "runs": runs,
        "seconds": [round(s, 3) for s in seconds],
        "median_s": round(median, 3),
        "min_s": round(min(seconds), 3),
        "max_s": round(max(seconds), 3),
        "local_median_s": round(statistics.median(local), 3),
        "overhead_s": round(median - statistics.median(local), 3),
        "goal_s": 1.0,
        "meets_goal": median < 1.0,
    }
