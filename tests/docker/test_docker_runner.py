"""The Docker runner: stages in real containers, and every way a stage can go wrong."""

from __future__ import annotations

import errno
import grp
import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import docker.api.client
import numpy as np
import pytest

from modelmatrix import REPO_ROOT, images
from modelmatrix.docker_client import (
    OWNER_PID_LABEL,
    OWNER_START_LABEL,
    SESSION_LABEL,
    Engine,
    owner_labels,
    process_start,
)
from modelmatrix.errors import ImageMissing, StageFailed
from modelmatrix.runners.base import StageRequest
from modelmatrix.runners.docker import DockerRunner, bench_container_overhead, clean

from mm_docker_support import ON_TOP, make_project


def request(m, target: str, stage: str, ws: Path, out: str, timeout_s: float = 120, **kw) -> StageRequest:
    (ws / out).mkdir(parents=True, exist_ok=True)
    return StageRequest(m.targets[target], stage, ws, kw.pop("inputs", {}), out, timeout_s=timeout_s, **kw)


def leftovers(runner: DockerRunner) -> list:
    return runner.engine.containers(f"{SESSION_LABEL}={runner.session}")


def test_stage_that_crashes(mm_matrix, mm_image, tmp_path):
    runner = DockerRunner(mm_matrix)
    with pytest.raises(StageFailed) as err:
        runner.run(request(mm_matrix, "mmtest", "crash", tmp_path, "out/crash"))
    msg = str(err.value)
    assert msg.startswith(f"exited with code 1 in {mm_image['tag']}: RuntimeError: boom from mmtest.crash")
    assert "about to crash" in err.value.log_tail and "Traceback" in err.value.log_tail
    assert leftovers(runner) == []
    assert not (tmp_path / "out/crash/result.json").exists()


def test_stage_that_hangs_is_killed_and_removed(mm_matrix, mm_image, tmp_path):
    runner = DockerRunner(mm_matrix)
    with pytest.raises(StageFailed) as err:
        runner.run(request(mm_matrix, "mmtest", "hang", tmp_path, "out/hang", timeout_s=3))
    assert str(err.value).startswith("mmtest.hang: timed out after 3s; the container was killed")
    assert "hanging now" in err.value.log_tail
    assert leftovers(runner) == []  # killed, then removed in finally


def test_stage_that_writes_nothing(mm_matrix, mm_image, tmp_path):
    runner = DockerRunner(mm_matrix)
    # (with or without the "mmtest.nothing: " prefix: the pipeline names the node itself)
    with pytest.raises(StageFailed, match=r"^(mmtest\.nothing: )?exited 0 but wrote no result\.json in out/nothing"):
        runner.run(request(mm_matrix, "mmtest", "nothing", tmp_path, "out/nothing"))
    assert leftovers(runner) == []


def test_container_is_isolated(mm_matrix, mm_image, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.txt").write_text("input for the probe")
    runner = DockerRunner(mm_matrix)
    tail = runner.run(request(mm_matrix, "mmtest", "probe", tmp_path, "out/probe", inputs={"data": "in/data.txt"}))
    facts = json.loads((tmp_path / "out/probe/result.json").read_text())
    assert facts["input"] == "input for the probe"  # inputs readable
    assert facts["workspace_writable"] is False and facts["workspace_errno"] == errno.EROFS
    assert not (tmp_path / "intruder.txt").exists()
    assert facts["network"] is False and facts["interfaces"] == ["lo"]  # network_mode=none
    assert facts["memory_limit"] == str(1 << 30)  # images.memory_limit: 1g
    assert (facts["uid"], facts["gid"]) == (os.getuid(), os.getgid())
    assert facts["home"] == "/tmp"
    assert (tmp_path / "out/probe/owned.txt").stat().st_uid == os.getuid()
    assert isinstance(tail, str) and leftovers(runner) == []


def python_for(uid: int) -> str:
    """An interpreter of this Python version that ``uid`` may execute (this venv's may live under
    an unreadable /root); the venv's site-packages go on PYTHONPATH."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    folders = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/bin", "/usr/bin"]
    for exe in dict.fromkeys([sys.executable] + [os.path.join(d, f"python{want}") for d in folders]):
        if not os.path.isfile(exe):
            continue
        try:
            out = subprocess.run(
                [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                user=uid,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except PermissionError:
            continue
        if out.returncode == 0 and out.stdout.strip() == want:
            return exe
    pytest.skip(f"no Python {want} interpreter that uid {uid} may run")


def test_outputs_belong_to_the_invoking_user(mm_matrix, mm_image, shared_root):
    """Run the runner as a non-root user (uid 4242, in the docker group): the files the stage
    writes are that user's, not root's."""
    if os.getuid() != 0:  # CI runs as a normal user already: the check above covers it
        pytest.skip("needs root to start the runner as another user; the isolation test checks the uid")
    uid = 4242
    ws = shared_root / "ws-4242"
    (ws / "in").mkdir(parents=True)
    (ws / "in" / "data.txt").write_text("x")
    (ws / "out" / "probe").mkdir(parents=True)
    for p in [ws, *ws.rglob("*")]:
        os.chown(p, uid, uid)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from modelmatrix.config import load_matrix
        from modelmatrix.runners.base import StageRequest
        from modelmatrix.runners.docker import DockerRunner
        m = load_matrix({str(mm_matrix.path)!r}, targets_dir=Path({str(mm_matrix.targets["mmtest"].folder.parent)!r}))
        req = StageRequest(m.targets["mmtest"], "probe", Path({str(ws)!r}), {{"data": "in/data.txt"}}, "out/probe",
                           timeout_s=120)
        DockerRunner(m).run(req)
        """)
    python = python_for(uid)
    path = os.pathsep.join([str(REPO_ROOT), *site.getsitepackages()])
    env = {
        "HOME": str(ws),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": path,
        **{k: v for k, v in os.environ.items() if k.startswith(("DOCKER_", "PIP_", "SSL_", "REQUESTS_"))},
    }
    done = subprocess.run(
        [python, "-c", script],
        user=uid,
        group=uid,
        cwd=REPO_ROOT,
        env=env,
        extra_groups=[grp.getgrnam("docker").gr_gid],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads((ws / "out/probe/result.json").read_text())
    assert (facts["uid"], facts["gid"]) == (uid, uid)
    for name in ("owned.txt", "result.json"):
        assert (ws / "out/probe" / name).stat().st_uid == uid


def test_image_deleted_between_build_and_run_is_not_pulled(shared_root, ort_image, tmp_path, monkeypatch):
    m = make_project(
        shared_root / "gone",
        "gone",
        ON_TOP + "USER root\nRUN echo gone > /opt/modelmatrix/gone.txt\n",
        ort_image["tag"],
    )
    row = images.build(m, "gone")

    def no_pull(*args, **kwargs):
        raise AssertionError("the runner tried to pull")

    monkeypatch.setattr(docker.api.client.APIClient, "pull", no_pull)
    runner = DockerRunner(m)
    assert runner.image_for(m.targets["gone"]) == (row["image_id"], row["tag"])  # looked up ...
    Engine().remove_image(row["tag"], force=True)  # ... then deleted
    with pytest.raises(ImageMissing) as err:
        runner.run(request(m, "gone", "noop", tmp_path, "out/noop"))
    assert "is gone from the engine; run `invoke build --target gone`" in str(err.value)
    assert "\n" not in str(err.value)
    assert leftovers(runner) == []
    with pytest.raises(ImageMissing, match=r"is not built; run `invoke build --target gone`.*never pulls"):
        DockerRunner(m).run(request(m, "gone", "noop", tmp_path, "out/noop"))


def tiny_onnx_model(path: Path) -> None:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: (N, 3, 16, 8) -> (N, 32)."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(7)
    weights = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in (("w", (16, 3, 3, 3)), ("b", (16,)), ("fc", (16, 32)), ("fcb", (32,)))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "fc", "fcb"], ["class"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 8])],
        [helper.make_tensor_value_info("class", TensorProto.FLOAT, ["batch", 32])],
        initializer=weights,
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8), str(path))


def test_outputs_from_both_runners_agree(real_matrix, ort_image, tmp_path):
    if not (REPO_ROOT / "targets" / "onnxruntime" / "infer.py").is_file():
        pytest.fail("targets/onnxruntime/infer.py is missing")
    (tmp_path / "models").mkdir()
    tiny_onnx_model(tmp_path / "models" / "model.onnx")
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "inputs.npy", np.random.default_rng(0).random((10, 3, 16, 8), dtype=np.float32))
    inputs = {"onnx": "models/model.onnx", "inputs": "data/inputs.npy"}
    params = {
        "batch_size": 4,
        "intra_op_threads": 1,
        "graph_optimization": "all",
        "providers": ["CPUExecutionProvider"],
    }
    runner = DockerRunner(real_matrix)
    runner.run(request(real_matrix, "onnxruntime", "infer", tmp_path, "docker", inputs=inputs, params=params))
    local = request(real_matrix, "onnxruntime", "infer", tmp_path, "local", inputs=inputs, params=params)
    spec = local.write_spec(str(tmp_path))
    subprocess.run(
        [sys.executable, "-m", "targets.onnxruntime.infer", str(spec)],
        cwd=REPO_ROOT,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        timeout=300,
    )
    in_docker = np.load(tmp_path / "docker" / "features.npy")
    on_host = np.load(tmp_path / "local" / "features.npy")
    assert in_docker.shape == (10, 32) and in_docker.dtype == np.float32
    np.testing.assert_array_equal(in_docker, on_host)
    result = json.loads((tmp_path / "docker" / "result.json").read_text())
    assert result["versions"]["onnxruntime"] == "1.31.1" and result["images"] == 10


def test_clean_removes_leftovers_only(mm_image, docker_engine):
    """A leftover of a process of this host that has exited goes; this live process's stays
    (the other cases: test_container_hardening.py)."""
    common = dict(user="0:0", mounts=[], environment={}, mem_limit="64m")
    gone = subprocess.Popen(["true"])
    start = process_start(gone.pid)
    gone.wait()
    dead = docker_engine.create_container(
        mm_image["image_id"],
        ["true"],
        labels={**owner_labels("test-leftover"), OWNER_PID_LABEL: str(gone.pid), OWNER_START_LABEL: start},
        **common,
    )
    alive = docker_engine.create_container(mm_image["image_id"], ["true"], labels=owner_labels("test-alive"), **common)
    try:
        result = clean(engine=docker_engine)
        ids = {c["Id"] for c in docker_engine.containers(SESSION_LABEL)}
        assert dead not in ids and alive in ids  # this process is alive: its container stays
        assert any("test-leftover" in r for r in result["containers"])
        assert any("(test-alive): kept (owner pid" in k for k in result["kept"])
    finally:
        docker_engine.remove_container(dead)
        docker_engine.remove_container(alive)


def test_container_overhead_bench(real_matrix, ort_image):
    result = bench_container_overhead(real_matrix, runs=3, target="onnxruntime")
    print("container overhead:", result)
    assert result["image"] == ort_image["tag"] and len(result["seconds"]) == 3
    assert set(result) >= {"median_s", "local_median_s", "overhead_s", "meets_goal"}
