"""The one module that imports the Docker SDK (docker-py).

Everything else talks to the engine through :class:`Engine`, which hides the SDK's pitfalls
(../shared/REFERENCE.md "Docker SDK pitfalls"):

* builds go through ``APIClient.build(decode=True)`` so the log streams live; ``rm``/``forcerm``
  are on and ``use_config_proxy`` is off (no proxy settings copied into build args);
* containers are created by image ID (``create`` never pulls), started, waited on with a real
  limit (``wait(timeout=)`` is only an HTTP timeout: on expiry it raises ReadTimeout or, over the
  unix socket, ConnectionError, and the container keeps running) and removed by the caller;
* long calls (build, import, load, save, push, pull, logs) use a client without a read timeout.

SDK, requests and socket exceptions become :class:`~modelmatrix.errors.DockerError` (one line)
or :class:`~modelmatrix.errors.ImageMissing` (404 on an image).

Every container carries labels naming its run and its owner (:func:`owner_labels`), so that
`invoke clean` can tell a crash's leftover from another run's live stage (:func:`owner_state`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import docker.types
import requests

from .errors import DockerError, ImageMissing

DEFAULT_TIMEOUT_S = 60
SESSION_LABEL = "io.modelmatrix.session"
OWNER_LABEL = "io.modelmatrix.owner"  # "hostname:pid", for people reading `docker ps`
OWNER_HOST_LABEL = "io.modelmatrix.owner.host"  # host_identity() of the creating process
OWNER_PID_LABEL = "io.modelmatrix.owner.pid"
OWNER_START_LABEL = "io.modelmatrix.owner.start"  # its start time (/proc/<pid>/stat field 22)
RUNNER_HINT = "start the engine, or run with `--runner local`"

log = logging.getLogger(__name__)


def engine_address() -> str:
    return os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"


def _short(exc: BaseException, limit: int = 200) -> str:
    """The innermost useful line of an exception chain."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for marker, meaning in (
        ("FileNotFoundError", "no socket there"),
        ("PermissionError", "permission denied on the socket"),
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
    ):
        if marker in text:
            return meaning
    return text[:limit]


def _unreachable(exc: BaseException) -> DockerError:
    return DockerError(f"Docker engine not reachable at {engine_address()} ({_short(exc)}); {RUNNER_HINT}")


def _api_error(what: str, exc: docker.errors.APIError) -> DockerError:
    detail = (exc.explanation or str(exc)).strip().splitlines()[0] if (exc.explanation or str(exc)) else ""
    return DockerError(f"{what}: {detail[:300]}")


@contextlib.contextmanager
def _translated(what: str, image: str | None = None) -> Iterator[None]:
    """Turn SDK/requests exceptions into one-line ModelMatrixErrors."""
    try:
        yield
    except docker.errors.ImageNotFound:
        raise ImageMissing(f"{what}: image {image or '?'} not found in the local engine") from None
    except docker.errors.APIError as exc:
        raise _api_error(what, exc) from None
    except requests.exceptions.ConnectionError as exc:
        raise _unreachable(exc) from None
    except requests.exceptions.RequestException as exc:  # read timeouts, broken chunked streams
        raise DockerError(f"{what}: {_short(exc)}") from None
    except docker.errors.DockerException as exc:
        if "Error while fetching server API version" in str(exc):
            raise _unreachable(exc) from None
        raise DockerError(f"{what}: {_short(exc)}") from None
    except OSError as exc:  # raw socket errors: docker-py reads log streams from the socket itself
        raise DockerError(f"{what}: {_short(exc)}") from None


class Engine:
    """A connection to one Docker engine (from DOCKER_HOST / the active context)."""

    def __init__(self, timeout: int = DEFAULT_TIMEOUT_S, host: str | None = None):
        """``host``: an engine address (unix://, tcp://, ssh://: a target's ``docker_host``); None:
        DOCKER_HOST / the default socket."""
        self.host = host
        try:
            if host:
                ssh = host.startswith("ssh://")
                self.client = docker.DockerClient(base_url=host, timeout=timeout, use_ssh_client=ssh)
                version = self.client.api.api_version
                self.long = docker.APIClient(base_url=host, timeout=None, version=version, use_ssh_client=ssh)
            else:
                self.client = docker.from_env(timeout=timeout)
                version = self.client.api.api_version
                self.long = docker.from_env(timeout=None, version=version).api  # no read timeout
        except docker.errors.DockerException as exc:
            if host:
                raise DockerError(
                    f"Docker engine not reachable at {host} ({_short(exc)}); start it, or fix "
                    "the target's docker_host in matrix.yaml"
                ) from None
            raise _unreachable(exc) from None
        self.api = self.client.api

    @property
    def address(self) -> str:
        return self.host or engine_address()

    # ------------------------------------------------------------------ engine
    def ping(self) -> None:
        with _translated("docker ping"):
            self.api.ping()

    def info(self) -> dict[str, Any]:
        with _translated("docker info"):
            return self.api.info()

    # ------------------------------------------------------------------ images
    def image(self, ref: str) -> dict[str, Any] | None:
        """``inspect`` of a local image, or None when it does not exist (never pulls)."""
        try:
            with _translated(f"inspect image {ref}"):
                return self.api.inspect_image(ref)
        except ImageMissing:
            return None
        except DockerError as exc:
            # A malformed reference is "not here", not an engine failure.
            if "invalid reference format" in str(exc) or "no such image" in str(exc).lower():
                return None
            raise

    def images(self, label: str) -> list[dict[str, Any]]:
        with _translated("list images"):
            return self.api.images(filters={"label": label})

    def build(
        self, context: io.BufferedIOBase, *, buildargs: dict[str, str], labels: dict[str, str], nocache: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Stream the decoded build messages of a custom (already tarred) context."""
        with _translated("docker build"):
            yield from self.long.build(
                fileobj=context,
                custom_context=True,
                decode=True,
                rm=True,
                forcerm=True,
                pull=False,
                nocache=nocache,
                use_config_proxy=False,
                buildargs=dict(buildargs),
                labels=dict(labels),
            )

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        with _translated(f"tag {image_id[:19]} as {repository}:{tag}", image_id):
            if not self.api.tag(image_id, repository, tag, force=True):
                raise DockerError(f"tag {image_id[:19]} as {repository}:{tag}: the engine refused")

    def remove_image(self, ref: str, force: bool = False) -> None:
        with _translated(f"remove image {ref}", ref):
            self.api.remove_image(ref, force=force)

    def read_file(self, image_id: str, path: str) -> bytes | None:
        """Contents of one file of an image (a created, never started, container); None if absent."""
        with _translated(f"read {path} from {image_id[:19]}", image_id):
            cid = self.api.create_container(
                image_id, command=["true"], network_disabled=True, labels=owner_labels("read-file")
            )["Id"]
        try:
            with _translated(f"read {path} from {image_id[:19]}", image_id):
                try:
                    stream, _stat = self.api.get_archive(cid, path)
                except docker.errors.NotFound:
                    return None
                data = b"".join(stream)
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                member = tf.next()
                fh = tf.extractfile(member) if member is not None else None
                return fh.read() if fh is not None else None
        finally:
            with _translated("remove helper container"):
                self.api.remove_container(cid, force=True)

    def pull(self, ref: str, answer_timeout_s: float = 20.0) -> str | None:
        """Try to pull ``ref``. None on success, else a one-line reason.

        The registry must answer within ``answer_timeout_s``; once it does, a pull that makes
        progress is waited for. The SDK's pull has no timeout, so it runs in a thread.
        """
        repo, tag = _split_ref(ref)
        first = threading.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                for chunk in self.long.pull(repo, tag=tag, stream=True, decode=True):
                    first.set()
                    if "error" in chunk:
                        box["error"] = str(chunk["error"]).strip().splitlines()[0]
                        return
            except docker.errors.APIError as exc:
                box["error"] = _api_error("pull", exc).args[0].removeprefix("pull: ")
            except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
                box["error"] = _short(exc)
            finally:
                box["done"] = True
                first.set()

        thread = threading.Thread(target=work, name=f"pull {ref}", daemon=True)
        thread.start()
        if not first.wait(answer_timeout_s):
            return f"no answer from the registry within {answer_timeout_s:.0f}s"
        thread.join()
        if "error" in box:
            return box["error"]
        return None if self.image(ref) else "pull finished but the image is not there"

    def save(self, ref: str) -> Iterator[bytes]:
        with _translated(f"docker save {ref}", ref):
            yield from self.long.get_image(ref, chunk_size=1 << 20)

    def load(self, fileobj: io.BufferedIOBase) -> list[str]:
        """``docker load`` (plain or gzip tar); returns the lines the engine reported."""
        lines = []
        with _translated("docker load"):
            for chunk in self.long.load_image(iter(lambda: fileobj.read(1 << 20), b"")):
                if "error" in chunk:
                    raise DockerError(f"docker load: {str(chunk['error']).strip()[:300]}")
                if chunk.get("stream"):
                    lines.append(chunk["stream"].strip())
        return lines

    def push(self, repository: str, tag: str) -> Iterator[dict[str, Any]]:
        with _translated(f"docker push {repository}:{tag}"):
            yield from self.long.push(repository, tag=tag, stream=True, decode=True)

    # ------------------------------------------------------------------ containers
    def create_container(
        self,
        image_id: str,
        command: list[str],
        *,
        user: str,
        mounts: list[tuple[str, str, bool]],
        labels: dict[str, str],
        environment: dict[str, str],
        mem_limit: str | None,
        network_mode: str = "none",
        working_dir: str | None = None,
        device_options: dict[str, Any] | None = None,
        read_only: bool = False,
        tmpfs: dict[str, str] | None = None,
        cap_drop: list[str] | None = None,
        security_opt: list[str] | None = None,
        pids_limit: int | None = None,
        volumes: list[str] | None = None,
    ) -> str:
        """Create (not start) a container from an image ID. ``mounts``: (host, container, read_only);
        ``volumes``: container paths that get an anonymous volume (removed with the container: where
        files are copied in on an engine that does not share this host's filesystem); ``read_only``:
        the root filesystem; ``tmpfs``: path -> mount options."""
        with _translated("create container", image_id):
            host_config = self.api.create_host_config(
                mounts=[
                    docker.types.Mount(target=dst, source=src, type="bind", read_only=ro) for src, dst, ro in mounts
                ]
                + [docker.types.Mount(target=dst, source=None, type="volume") for dst in volumes or []],
                network_mode=network_mode,
                mem_limit=mem_limit,
                read_only=read_only or None,
                tmpfs=dict(tmpfs) if tmpfs else None,
                cap_drop=list(cap_drop) if cap_drop else None,
                security_opt=list(security_opt) if security_opt else None,
                pids_limit=pids_limit,
                **_device_kwargs(device_options or {}),
            )
            return self.api.create_container(
                image_id,
                command=command,
                user=user,
                labels=labels,
                environment=environment,
                host_config=host_config,
                working_dir=working_dir,
                detach=True,
            )["Id"]

    def start(self, cid: str) -> None:
        with _translated("start container"):
            self.api.start(cid)

    def put_archive(self, cid: str, path: str, data: Any) -> None:
        """Extract a tar (bytes or a file object) into a created container at ``path``."""
        with _translated(f"copy files into the container at {path}"):
            if not self.long.put_archive(cid, path, data):
                raise DockerError(f"copy files into the container at {path}: the engine refused")

    def get_archive(self, cid: str, path: str) -> Iterator[bytes]:
        """A tar stream of ``path`` in a (stopped) container."""
        with _translated(f"copy {path} out of the container"):
            stream, _stat = self.long.get_archive(cid, path, chunk_size=1 << 20)
            yield from stream

    def logs(self, cid: str) -> Iterator[bytes]:
        """stdout+stderr from the beginning, following until the container stops."""
        with _translated("container logs"):
            yield from self.long.logs(cid, stream=True, follow=True, stdout=True, stderr=True)

    def wait(self, cid: str, timeout_s: float) -> int | None:
        """Exit code, or None when the container still runs after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with (
                _translated("wait for container"),
                contextlib.suppress(
                    requests.exceptions.ReadTimeout,
                    requests.exceptions.ConnectionError,
                    requests.exceptions.ChunkedEncodingError,
                ),
            ):
                result = self.api.wait(cid, timeout=max(deadline - time.monotonic(), 1.0))
                return int(result.get("StatusCode", -1))
            # The limit, or a dropped connection: ask the engine which (raises when it is gone too).
            state = self.container_state(cid)
            if not state.get("Running"):
                return int(state.get("ExitCode", -1))
            if deadline - time.monotonic() < 1.0:
                return None
            time.sleep(0.1)  # dropped early: wait again for the rest of the limit

    def container_state(self, cid: str) -> dict[str, Any]:
        with _translated("inspect container"):
            return self.api.inspect_container(cid)["State"]

    def kill(self, cid: str) -> None:
        try:
            with _translated("kill container"):
                self.api.kill(cid)
        except DockerError as exc:
            if "is not running" not in str(exc):
                raise

    def remove_container(self, cid: str) -> bool:
        """Force-remove a container (and its anonymous volumes). False when it was already gone,
        or another client is removing it right now."""
        try:
            with _translated("remove container"):
                self.api.remove_container(cid, force=True, v=True)
        except DockerError as exc:
            if "no such container" not in str(exc).lower() and "already in progress" not in str(exc):
                raise
            return False
        return True

    def containers(self, label: str) -> list[dict[str, Any]]:
        with _translated("list containers"):
            return self.api.containers(all=True, filters={"label": label})


# --------------------------------------------------------------------------- container owners


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def host_identity() -> str:
    """Who "this host" is, for telling whether a container's creating process can still be running.

    ``hostname/boot_id/pid-namespace``: the kernel's boot_id (/proc/sys/kernel/random/boot_id) is a
    random UUID made at every boot, so it differs between two hosts sharing an engine and between
    two boots of one host (a cloned VM's /etc/machine-id does not; a hostname may not). The pid
    namespace (the inode of /proc/self/ns/pid) tells apart two containers on one kernel, whose pids
    mean different processes; the hostname is there for people. Only a process with the same
    identity can look the owner's pid up. Without /proc (not Linux) it is ``hostname/-/-``.
    """
    boot = _read("/proc/sys/kernel/random/boot_id") or "-"
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = "-"
    return f"{socket.gethostname()}/{boot}/{pidns}"


def process_start(pid: int) -> str | None:
    """Start time of a process on this host (field 22 of /proc/<pid>/stat, clock ticks since boot),
    "" where /proc cannot say (then only whether the pid exists is known), None when no such process."""
    text = _read(f"/proc/{pid}/stat")
    if text:
        # the command name (field 2) is in parentheses and may hold spaces and parentheses itself
        fields = text.rpartition(")")[2].split()
        return fields[19] if len(fields) > 19 else ""
    try:
        os.kill(pid, 0)  # /proc hidden (hidepid) or absent: at least whether the pid exists
    except ProcessLookupError:
        return None
    except OSError:  # EPERM: it exists, another user's
        pass
    return ""


def owner_labels(session: str) -> dict[str, str]:
    """Labels on every container modelmatrix creates: the run (``session``, one per runner) and the
    process that created it, on which host, since when - so `invoke clean` finds leftovers and
    never mistakes another run's live stage, nor a later process that got the same pid, for one."""
    pid = os.getpid()
    return {
        SESSION_LABEL: session,
        OWNER_LABEL: f"{socket.gethostname()}:{pid}",
        OWNER_HOST_LABEL: host_identity(),
        OWNER_PID_LABEL: str(pid),
        OWNER_START_LABEL: process_start(pid) or "",
    }


def owner_state(labels: dict[str, str]) -> tuple[bool, str]:
    """(True, why) when the run that created a container is known to be gone, else (False, why).

    Known gone means: created on this host (same :func:`host_identity`) by a pid that no longer
    runs, or that now belongs to a process started at another time (the pid was reused). A
    container of another host, or with labels this cannot read (an older modelmatrix), is not
    known to be gone.
    """
    host, pid, start = (labels.get(k) for k in (OWNER_HOST_LABEL, OWNER_PID_LABEL, OWNER_START_LABEL))
    if host is None or pid is None or start is None or not pid.isdigit() or not 0 < int(pid) < 1 << 32:
        return False, f"owner labels not understood: {labels.get(OWNER_LABEL, '?')}"
    if host != host_identity():
        name, _, rest = host.partition("/")
        boot = rest.partition("/")[0]
        return False, f"owner on another host: {name} (boot {boot[:8]}), pid {pid}"
    now = process_start(int(pid))
    if now is None:
        return True, f"owner pid {pid} has exited"
    if start and now and now != start:
        return True, f"owner pid {pid} has exited (the pid now belongs to a later process)"
    return False, f"owner pid {pid} still running"


def _split_ref(ref: str) -> tuple[str, str | None]:
    """'repo/name:tag' -> ('repo/name', 'tag'); a registry port is not a tag; digests kept whole."""
    if "@" in ref:
        return ref, None
    head, sep, tail = ref.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return ref, "latest"


def _device_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """Device options from the runner: {"gpus": True | {count: N} | {device_ids: [...]}, "shm_size": "1g",
    "ulimits": {name: {soft, hard}}} or {"devices": [...], "binds": [...]}."""
    out: dict[str, Any] = {}
    gpus = options.get("gpus")
    if gpus:
        ids = list(gpus.get("device_ids") or []) if isinstance(gpus, dict) else []
        count = gpus.get("count") if isinstance(gpus, dict) else None
        out["device_requests"] = [
            docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])
            if ids
            else docker.types.DeviceRequest(count=-1 if count is None else int(count), capabilities=[["gpu"]])
        ]
    if options.get("shm_size"):
        out["shm_size"] = options["shm_size"]
    if options.get("ulimits"):
        out["ulimits"] = [
            docker.types.Ulimit(name=name, soft=int(v["soft"]), hard=int(v["hard"]))
            for name, v in sorted(options["ulimits"].items())
        ]
    if options.get("devices"):
        out["devices"] = list(options["devices"])
    if options.get("binds"):
        out["binds"] = list(options["binds"])
    if options.get("group_add"):
        out["group_add"] = [str(g) for g in options["group_add"]]  # e.g. the group owning /dev/davinci*
    return out


def engine_reason() -> str | None:
    """None when an engine answers, else one line saying why not (suggesting --runner local)."""
    try:
        Engine(timeout=10).ping()
    except DockerError as exc:
        return str(exc)
    return None
