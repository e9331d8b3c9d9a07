"""A target on another Docker engine (``docker_host``): a SECOND dockerd started here on its own
socket, data-root and exec-root, on a bridge of its own and without iptables.

Not ``--bridge none``: a dockerd started with it DELETES the host's ``docker0`` interface (daemon
start-up removes "the default bridge" it was told not to use), which breaks the main engine's
networking on a shared kernel; a dedicated bridge interface, made and removed here, touches nothing. The image is moved into it the way
it would reach another host (save from the main engine, load into the second); the stage's inputs
are copied in and its outputs copied back, never bind-mounted; device probes ask that engine."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from modelmatrix.config import load_matrix
from modelmatrix.docker_client import SESSION_LABEL, Engine
from modelmatrix.errors import DockerError
from modelmatrix.runners.docker import DockerRunner, remote_device_reason

from mm_docker_support import stage_request, unavailable, write_yaml


@pytest.fixture(scope="module")
def second_engine(docker_engine):
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        unavailable("no dockerd binary to start a second engine with")
    root = Path(tempfile.mkdtemp(prefix="mm-dockerd2-"))  # short: a unix socket path is <= 107 bytes
    sock = root / "docker.sock"
    bridge = f"mmtest{os.getpid() % 10000}"
    made = subprocess.run(["ip", "link", "add", "name", bridge, "type", "bridge"], capture_output=True, text=True)
    if made.returncode != 0:
        unavailable(f"cannot make a bridge interface for the second dockerd: {made.stderr.strip()}")
    subprocess.run(["ip", "addr", "add", "10.213.7.1/24", "dev", bridge], check=True)
    log = open(root / "dockerd.log", "wb")
    proc = subprocess.Popen(
        [
            dockerd,
            "--host",
            f"unix://{sock}",
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "docker.pid"),
            "--bridge",
            bridge,
            "--iptables=false",
            "--ip-masq=false",
            "--shutdown-timeout",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        host = f"unix://{sock}"
        deadline = time.monotonic() + 40
        engine = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                engine = Engine(host=host)
                engine.ping()
                break
            except DockerError:
                engine = None
                time.sleep(0.5)
        if engine is None:
            pytest.fail(f"the second dockerd did not answer: {(root / 'dockerd.log').read_text()[-1500:]}")
        yield {"host": host, "engine": engine, "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True)  # leftover overlays, if any
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@pytest.fixture(scope="module")
def remote_matrix(second_engine, mm_matrix, mm_image, ort_image, docker_engine, shared_root):
    """The mmtest target with docker_host: the second engine, its image (and the base its tag is
    computed from) moved there by save + load."""
    t0 = time.perf_counter()
    for tag in (ort_image["tag"], mm_image["tag"]):  # the tag is computed from its base: move both
        for _ in second_engine["engine"].long.load_image(docker_engine.save(tag)):
            pass
    assert second_engine["engine"].image(mm_image["tag"]), "the image did not load into the second engine"
    moved = time.perf_counter() - t0
    path = write_yaml(
        shared_root / "mm" / "matrix-remote.yaml",
        {
            "workspace": str(shared_root / "mm" / "ws-remote"),
            "verify": {"reference": "mmtest"},
            "images": {"memory_limit": "1g"},
            "targets": {"mmtest": {"docker_host": second_engine["host"]}},
        },
    )
    m = load_matrix(path, targets_dir=shared_root / "mm" / "targets")
    return {"matrix": m, "moved_s": moved}


def test_stage_runs_on_the_remote_engine_inputs_in_outputs_back(remote_matrix, second_engine, docker_engine, tmp_path):
    m = remote_matrix["matrix"]
    runner = DockerRunner(m)
    tdef = m.targets["mmtest"]
    assert runner.unavailable_reason(tdef) is None
    runner.prepare(tdef)  # the tag is already in the second engine: nothing built
    assert runner.engine_for(tdef) is not runner.engine
    ws = tmp_path / "ws"
    (ws / "in").mkdir(parents=True)
    (ws / "in" / "data.txt").write_text("input for the remote probe")
    req = stage_request(m, "mmtest", "probe", ws, "stages/mmtest.probe/.tmp-1", inputs={"data": "in/data.txt"})
    planned = runner.container_for(req)
    assert planned.kwargs["mounts"] == [] and planned.kwargs["volumes"] == ["/workspace"]  # no host path
    before = {c["Id"] for c in docker_engine.containers(SESSION_LABEL)}
    runner.run(req)
    out = ws / "stages/mmtest.probe/.tmp-1"
    facts = json.loads((out / "result.json").read_text())  # copied back
    assert facts["input"] == "input for the remote probe"  # copied in
    assert (out / "owned.txt").read_bytes() == b"mine"
    # the container's /workspace is a volume of that engine, removed with the container: what a stage
    # writes outside its output folder never reaches this host (only the output folder is copied back)
    assert facts["workspace_writable"] is True and not (ws / "intruder.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["owned.txt", "result.json", "spec.json"]
    assert facts["network"] is False
    assert (out / "owned.txt").stat().st_uid == os.getuid()
    # it ran there, not on the main engine, and nothing is left on either
    assert {c["Id"] for c in docker_engine.containers(SESSION_LABEL)} == before
    assert second_engine["engine"].containers(f"{SESSION_LABEL}={runner.session}") == []
    runner.close()


def test_device_probe_asks_the_remote_engine(remote_matrix, second_engine):
    m = remote_matrix["matrix"]
    gpu = dataclasses.replace(m.targets["mmtest"], requires={**m.targets["mmtest"].requires, "devices": ["nvidia-gpu"]})
    reason = remote_device_reason(gpu, second_engine["engine"])
    assert reason is not None and second_engine["host"] in reason and "docker info" in reason
    info = second_engine["engine"].info()
    assert "nvidia" not in (info.get("Runtimes") or {})  # true of that engine, not of this host's /dev


def test_unreachable_remote_engine_is_one_line(remote_matrix, tmp_path):
    path = write_yaml(
        tmp_path / "m.yaml",
        {
            "workspace": str(tmp_path / "ws"),
            "verify": {"reference": "mmtest"},
            "targets": {"mmtest": {"docker_host": f"unix://{tmp_path}/none.sock"}},
        },
    )
    m = load_matrix(path, targets_dir=remote_matrix["matrix"].targets["mmtest"].folder.parent)
    reason = DockerRunner(m).unavailable_reason(m.targets["mmtest"])
    assert reason is not None and reason.startswith(f"Docker engine not reachable at unix://{tmp_path}/none.sock")
    assert "\n" not in reason


def test_a_remote_gpu_target_is_probed_and_keyed_by_its_engine_not_this_host(tmp_path, docker_engine):
    """tensorrt on a docker_host: this host has no nvidia-smi, and must not be asked. The stage probe
    goes to the engine's `docker info` (no nvidia runtime there: one line naming the engine), the key's
    device part names that engine, and prepare does not check this host's GPUs."""
    from modelmatrix import REPO_ROOT

    address = (
        docker_engine.api.base_url.replace("http+docker://localhost", "unix:///var/run/docker.sock")
        if os.environ.get("DOCKER_HOST") is None
        else os.environ["DOCKER_HOST"]
    )
    cfg = write_yaml(
        tmp_path / "matrix.yaml",
        {
            "workspace": str(tmp_path / "ws"),
            "targets": {
                "torch": {},
                "tensorrt": {"docker_host": address, "container": {"gpus": {"device_ids": ["7"]}}},
            },
        },
    )
    m = load_matrix(cfg)
    runner = DockerRunner(m)
    trt = m.targets["tensorrt"]
    why = runner.stage_unavailable_reason(trt, "infer")
    assert why is not None and "nvidia-gpu" in why and address in why and "\n" not in why
    fp = runner.device_fingerprint(trt)  # no nvidia-smi consulted (there is none here)
    assert fp.startswith(f"nvidia-gpu@{address}=") and '"device_ids": ["7"]' in fp
    assert (REPO_ROOT / "targets" / "tensorrt" / "target.yaml").is_file()
