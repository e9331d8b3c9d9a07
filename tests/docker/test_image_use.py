"""``image: {use: onnxruntime}``: quantize and onnxruntime_int8 run in the onnxruntime image.

Small real files (a conv net made with onnx.helper, 64x32 inputs) keep this short: the shared
int8 stage quantises in the image, the int8 target runs the result in the same image, and the
features agree with the host's run of the same code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelmatrix import REPO_ROOT, images
from modelmatrix.config import load_matrix
from modelmatrix.runners.docker import DockerRunner

from mm_docker_support import CI_BASE, stage_request, write_yaml


def conv_net(path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["class"], name="flat"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 32])],
        [helper.make_tensor_value_info("class", TensorProto.FLOAT, ["N", 8])],
        [w, b],
    )
    # IR 6, as torch.onnx writes for opset 11 (ONNX Runtime 1.31 in the image refuses the newest IR)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6), str(path))


def test_int8_target_and_quantize_run_in_the_onnxruntime_image(tmp_path, ci_base):
    tmp_path.chmod(0o755)
    cfg = write_yaml(
        tmp_path / "matrix.yaml",
        {
            "workspace": str(tmp_path / "ws"),
            "runner": "docker",
            "images": {"memory_limit": "2g", "bases": {"bookworm-minbase": {"suite": "bookworm", "tag": CI_BASE}}},
            "targets": {
                "torch": {"image": {"base": CI_BASE}},
                "onnxruntime": {"image": {"base": CI_BASE}},
                "quantize": {},
                "onnxruntime_int8": {},
            },
        },
    )
    m = load_matrix(cfg)
    own = images.image_status(m, "onnxruntime")
    for user in ("onnxruntime_int8", "quantize"):
        row = images.image_status(m, user)
        assert row["uses"] == "onnxruntime" and row["tag"] == own["tag"], row
    built = images.build(m, "onnxruntime_int8")  # builds (or finds) the onnxruntime image
    assert built["uses"] == "onnxruntime" and built["tag"] == own["tag"]
    assert {"onnx", "onnxconverter_common", "onnxruntime"} <= set(built["versions"])
    runner = DockerRunner(m)
    try:
        assert runner.fingerprint(m.targets["onnxruntime_int8"]) == runner.fingerprint(m.targets["onnxruntime"])
        (tmp_path / "in").mkdir()
        conv_net(tmp_path / "in" / "model.onnx")
        np.save(
            tmp_path / "in" / "inputs.npy", np.random.default_rng(1).normal(size=(12, 3, 64, 32)).astype(np.float32)
        )
        q = stage_request(
            m, "quantize", "int8", tmp_path, "q", inputs={"onnx": "in/model.onnx", "calibration": "in/inputs.npy"}
        )
        # one Conv only: keep_fp32 none, else there is nothing to quantise
        q.params = {"calibration_images": 8, "method": "minmax", "percentile": 99.999, "opset": 13, "keep_fp32": "none"}
        runner.run(q)
        side = json.loads((tmp_path / "q" / "quantization.json").read_text())
        assert side["opset"] == 13 and side["calibration_images"] == 8
        assert side["versions"]["onnxruntime"] == built["versions"]["onnxruntime"]
        inputs = {"onnx": "q/model.qdq.onnx", "inputs": "in/inputs.npy"}
        params = {"batch_size": 4, "intra_op_threads": 1}
        req = stage_request(m, "onnxruntime_int8", "infer", tmp_path, "docker", inputs=inputs)
        req.params = params
        runner.run(req)
    finally:
        runner.close()
    local = stage_request(m, "onnxruntime_int8", "infer", tmp_path, "local", inputs=inputs)
    local.params = params
    spec = local.write_spec(str(tmp_path))
    subprocess.run(
        [sys.executable, "-m", "targets.onnxruntime_int8.infer", str(spec)],
        cwd=REPO_ROOT,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        timeout=300,
    )
    in_docker = np.load(tmp_path / "docker" / "features.npy")
    on_host = np.load(tmp_path / "local" / "features.npy")
    assert in_docker.shape == (12, 8) and np.isfinite(in_docker).all()
    # the same QDQ file: equal up to the int8 kernels of two ONNX Runtime builds
    np.testing.assert_allclose(in_docker, on_host, rtol=0, atol=1e-3 * float(np.abs(on_host).max()))
    result = json.loads((tmp_path / "docker" / "result.json").read_text())
    assert result["target"] == "onnxruntime_int8" and result["images"] == 12
