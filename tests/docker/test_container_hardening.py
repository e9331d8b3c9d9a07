"""Stage containers: hardened host config, `clean` that only removes what is known to be dead, and
engine faults that become one-line errors. Real containers on the local engine throughout."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from modelmatrix import images
from modelmatrix.docker_client import (
    OWNER_HOST_LABEL,
    OWNER_LABEL,
    OWNER_PID_LABEL,
    OWNER_START_LABEL,
    SESSION_LABEL,
    Engine,
    host_identity,
    owner_labels,
    process_start,
)
from modelmatrix.errors import ImageMissing, ModelMatrixError, StageFailed
from modelmatrix.runners.docker import HARDENING, DockerRunner, clean

from mm_docker_support import ON_TOP, make_project, stage_request


def leftovers(engine: Engine, runner: DockerRunner) -> list:
    return engine.containers(f"{SESSION_LABEL}={runner.session}")


def wait_running(engine: Engine, runner: DockerRunner, limit_s: float = 60) -> str:
    """The id of the runner's container once the engine reports it running."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for c in leftovers(engine, runner):
            if c.get("State") == "running":
                return c["Id"]
        time.sleep(0.1)
    raise AssertionError(f"no running container of run {runner.session} within {limit_s}s")


# --------------------------------------------------------------------------- hardening


def test_stage_container_is_hardened(mm_matrix, mm_image, tmp_path, docker_engine):
    """The container run() would start, created and inspected before it starts."""
    runner = DockerRunner(mm_matrix)
    req = stage_request(mm_matrix, "mmtest", "harden", tmp_path, "out/harden")
    with runner.container_for(req) as c:
        info = docker_engine.api.inspect_container(c.cid)
        assert info["State"]["Status"] == "created"
    assert leftovers(docker_engine, runner) == []
    hc = info["HostConfig"]
    assert "ALL" in hc["CapDrop"] and not hc["CapAdd"]
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["PidsLimit"] == HARDENING["pids_limit"] == 4096
    assert hc["ReadonlyRootfs"] is True
    assert "/tmp" in hc["Tmpfs"]
    assert hc["NetworkMode"] == "none"
    assert hc["Memory"] == 1 << 30  # images.memory_limit: 1g
    assert not hc.get("Privileged")
    mounts = {m["Target"]: m for m in hc["Mounts"]}
    assert set(mounts) == {"/workspace", "/workspace/out/harden"}
    assert mounts["/workspace"]["Source"] == str(tmp_path) and mounts["/workspace"]["ReadOnly"] is True
    assert mounts["/workspace/out/harden"]["Source"] == str(tmp_path / "out/harden")
    assert not mounts["/workspace/out/harden"].get("ReadOnly")
    cfg = info["Config"]
    assert cfg["User"] == f"{os.getuid()}:{os.getgid()}"
    assert {"HOME=/tmp", "PYTHONDONTWRITEBYTECODE=1"} <= set(cfg["Env"])
    labels = cfg["Labels"]
    assert labels[SESSION_LABEL] == runner.session and labels[OWNER_HOST_LABEL] == host_identity()
    assert labels[OWNER_PID_LABEL] == str(os.getpid()) and labels[OWNER_START_LABEL] == process_start(os.getpid())


def test_hardened_stage_runs_and_sees_the_limits(mm_matrix, mm_image, tmp_path):
    """What the stage itself sees: no capabilities, no privilege gain, the pid limit, a read-only
    root and a writable tmpfs /tmp; its output folder still takes its files."""
    runner = DockerRunner(mm_matrix)
    runner.run(stage_request(mm_matrix, "mmtest", "harden", tmp_path, "out/harden"))
    facts = json.loads((tmp_path / "out/harden/result.json").read_text())
    assert int(facts["cap_eff"], 16) == 0 and int(facts["cap_bnd"], 16) == 0
    assert facts["no_new_privs"] == "1"
    assert facts["pids_max"] == "4096"
    assert facts["/opt/modelmatrix/intruder.txt"] == errno.EROFS and facts["/intruder.txt"] == errno.EROFS
    assert facts["mounts"]["/"][1][0] == "ro"
    assert facts["mounts"]["/tmp"][0] == "tmpfs" and "rw" in facts["mounts"]["/tmp"][1]
    assert facts["tmp"] == "tmp is writable" and facts["home"] == "/tmp"
    assert facts["dont_write_bytecode"] is True
    assert (tmp_path / "out/harden/owned.txt").read_bytes() == b"mine"


# --------------------------------------------------------------------------- clean


def _container(engine: Engine, image_id: str, labels: dict, start: bool) -> str:
    cid = engine.create_container(
        image_id, ["sleep", "600"], user="0:0", mounts=[], labels=labels, environment={}, mem_limit="64m"
    )
    if start:
        engine.start(cid)
    return cid


def _labels(session: str, **override: str) -> dict:
    return {**owner_labels(session), **override}


def test_clean_removes_only_containers_whose_owner_is_known_gone(mm_image, docker_engine):
    tag = uuid.uuid4().hex[:8]
    live = subprocess.Popen(["sleep", "600"])
    dead = subprocess.Popen(["sleep", "0"])
    dead_start = process_start(dead.pid)
    dead.wait()
    live_start = process_start(live.pid)
    assert live_start and dead_start and process_start(dead.pid) is None
    other_host = f"other-host/{uuid.uuid4()}/4026531836"
    cases = {  # session -> (labels, started, removed?)
        f"other-host-{tag}": (
            _labels(
                f"other-host-{tag}",
                **{OWNER_HOST_LABEL: other_host, OWNER_PID_LABEL: str(live.pid), OWNER_START_LABEL: live_start},
            ),
            True,
            False,
        ),
        f"other-host-exited-pid-{tag}": (
            _labels(
                f"other-host-exited-pid-{tag}",
                **{OWNER_HOST_LABEL: other_host, OWNER_PID_LABEL: str(dead.pid), OWNER_START_LABEL: dead_start},
            ),
            False,
            False,
        ),
        f"dead-pid-{tag}": (
            _labels(f"dead-pid-{tag}", **{OWNER_PID_LABEL: str(dead.pid), OWNER_START_LABEL: dead_start}),
            False,
            True,
        ),
        f"dead-pid-running-{tag}": (
            _labels(f"dead-pid-running-{tag}", **{OWNER_PID_LABEL: str(dead.pid), OWNER_START_LABEL: dead_start}),
            True,
            True,
        ),
        f"live-pid-{tag}": (
            _labels(f"live-pid-{tag}", **{OWNER_PID_LABEL: str(live.pid), OWNER_START_LABEL: live_start}),
            True,
            False,
        ),
        f"pid-reused-{tag}": (
            _labels(
                f"pid-reused-{tag}", **{OWNER_PID_LABEL: str(live.pid), OWNER_START_LABEL: str(int(live_start) - 1)}
            ),
            True,
            True,
        ),
        f"old-labels-{tag}": ({SESSION_LABEL: f"old-labels-{tag}", OWNER_LABEL: "gone-host:1"}, False, False),
        f"this-process-{tag}": (owner_labels(f"this-process-{tag}"), True, False),
    }
    ids = {}
    try:
        for session, (labels, started, _) in cases.items():
            ids[session] = _container(docker_engine, mm_image["image_id"], labels, started)
        result = clean(engine=docker_engine)
        present = {c["Labels"][SESSION_LABEL] for c in docker_engine.containers(SESSION_LABEL)}
        for session, (_, _, removed) in cases.items():
            assert (session not in present) is removed, session
            assert any(f"({session})" in r for r in result["containers"]) is removed, (session, result)
            assert any(f"({session}): kept (" in k for k in result["kept"]) is (not removed), (session, result)
        kept = {k.split(": kept ")[0].rpartition("(")[2].rstrip(")"): k for k in result["kept"]}
        assert f"owner on another host: other-host (boot {other_host.split('/')[1][:8]})" in kept[f"other-host-{tag}"]
        assert "owner labels not understood: gone-host:1" in kept[f"old-labels-{tag}"]
        assert f"owner pid {live.pid} still running" in kept[f"live-pid-{tag}"]
        assert result["failed"] == []
        # what is gone is not reported again
        again = clean(engine=docker_engine)
        assert not any(tag in r for r in again["containers"])
    finally:
        live.kill()
        live.wait()
        for cid in ids.values():
            docker_engine.remove_container(cid)


# --------------------------------------------------------------------------- engine faults


def test_image_removed_after_prepare_is_a_one_line_image_missing(shared_root, ort_image, tmp_path, docker_engine):
    m = make_project(
        shared_root / "vanish",
        "vanish",
        ON_TOP + "USER root\nRUN echo vanish > /opt/modelmatrix/vanish.txt\n",
        ort_image["tag"],
    )
    runner = DockerRunner(m)
    runner.prepare(m.targets["vanish"])  # built (or found) ...
    tag = images.image_status(m, "vanish", docker_engine)["tag"]
    docker_engine.remove_image(tag, force=True)  # ... and gone before the stage runs
    with pytest.raises(ImageMissing) as err:
        runner.run(stage_request(m, "vanish", "noop", tmp_path, "out/noop"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"vanish.noop: image {tag} (")
    assert "is gone from the engine; run `invoke build --target vanish`" in msg
    assert leftovers(docker_engine, runner) == []


def test_container_removed_mid_run_by_another_client(mm_matrix, mm_image, tmp_path, docker_engine):
    runner = DockerRunner(mm_matrix)
    box: dict = {}

    def intruder() -> None:
        try:
            cid = wait_running(docker_engine, runner)
            time.sleep(1.0)  # the runner is in wait() by now
            box["removed"] = Engine().remove_container(cid)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            box["error"] = exc

    thread = threading.Thread(target=intruder)
    thread.start()
    t0 = time.monotonic()
    with pytest.raises(ModelMatrixError) as err:
        runner.run(stage_request(mm_matrix, "mmtest", "hang", tmp_path, "out/hang", timeout_s=120))
    thread.join()
    assert box == {"removed": True}
    assert time.monotonic() - t0 < 60  # not the stage timeout
    assert isinstance(err.value, StageFailed)
    msg = str(err.value)
    assert "\n" not in msg, msg  # (the pipeline names the node on the stage line)
    # the engine kills it first: the runner sees SIGKILL's exit 137, or the container already gone
    assert (
        "exited with code 137 in" in msg
        and "(killed by SIGKILL from outside modelmatrix" in msg
        or "its container was removed while the stage ran" in msg
    ), msg
    assert leftovers(docker_engine, runner) == []


class EngineRelay:
    """A unix socket relaying to the real engine, which the test can cut: the engine 'dies' for
    the runner (connections dropped, socket gone) while the real engine keeps the container."""

    def __init__(self, upstream: str):
        self.dir = Path(tempfile.mkdtemp(prefix="mm-relay-"))
        self.path = self.dir / "docker.sock"
        self.upstream = upstream
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(self.path))
        self.listener.listen(32)
        self.listener.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                continue
            up = socket.socket(socket.AF_UNIX)
            up.connect(self.upstream)
            self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.stop.set()
        self.listener.close()
        self.path.unlink()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_engine_lost_during_wait_is_a_one_line_stage_failure(
    mm_matrix, mm_image, tmp_path, docker_engine, monkeypatch, caplog
):
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip(f"the relay needs a unix-socket engine, not {host}")
    relay = EngineRelay(host.removeprefix("unix://"))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{relay.path}")
    runner = DockerRunner(mm_matrix, engine=Engine())

    def cut_when_waiting() -> None:
        wait_running(docker_engine, runner)
        time.sleep(1.0)  # the runner is in wait() by now
        relay.cut()

    thread = threading.Thread(target=cut_when_waiting)
    thread.start()
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="modelmatrix.runners.docker"),
            pytest.raises(ModelMatrixError) as err,
        ):
            runner.run(stage_request(mm_matrix, "mmtest", "hang", tmp_path, "out/hang", timeout_s=120))
        thread.join()
        assert isinstance(err.value, StageFailed)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("mmtest.hang: Docker engine error: "), msg
        assert f"not reachable at unix://{relay.path}" in msg, msg
        # the removal in `finally` failed too (no engine): logged, not raised over the real error
        assert any("could not remove container" in r.getMessage() for r in caplog.records)
        left = leftovers(docker_engine, runner)
        assert len(left) == 1 and left[0]["State"] == "running"  # the real engine still has it
    finally:
        thread.join()
        for c in leftovers(docker_engine, runner):
            docker_engine.remove_container(c["Id"])
