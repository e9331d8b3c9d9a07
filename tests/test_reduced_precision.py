"""The shared quantize stage on real small ONNX files: bad inputs give one line, and the keys hold.

Small graphs (a conv net made with onnx.helper) keep these fast; the full matrix run with the
fine-tuned checkpoint is measured in the engineers' report (it takes minutes on 2 cores)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets.common.contract import spec_to_json

from mm_testing import REPO


def conv_net(path: Path, custom_op: bool = False) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["class"], name="flat")]
    if custom_op:
        nodes[1] = helper.make_node("FancyAct", ["c"], ["r"], name="fancy", domain="com.example")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 8])],
                              [helper.make_tensor_value_info("class", TensorProto.FLOAT, ["N", 4])], [w, b])
    opsets = [helper.make_opsetid("", 11)] + ([helper.make_opsetid("com.example", 1)] if custom_op else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def run_stage(tmp: Path, stage: str, params: dict, n_images: int = 6, custom_op: bool = False):
    conv_net(tmp / "model.onnx", custom_op)
    np.save(tmp / "inputs.npy", np.random.default_rng(1).normal(size=(n_images, 3, 16, 8)).astype(np.float32))
    (tmp / "out").mkdir(exist_ok=True)
    inputs = {"onnx": "model.onnx", "calibration": "inputs.npy"} if stage == "int8" else {"onnx": "model.onnx"}
    spec = tmp / "out" / "spec.json"
    spec.write_text(json.dumps(spec_to_json("quantize", stage, str(tmp), inputs, "out", params)))
    return subprocess.run([sys.executable, "-m", f"targets.quantize.{stage}", str(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_int8_writes_symmetric_per_channel_qdq_at_opset_13(tmp_path):
    proc = run_stage(tmp_path, "int8", {"calibration_images": 4, "method": "minmax"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    side = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert side["opset"] == 13 and side["calibration_images"] == 4 and side["method"] == "minmax"
    model = onnx.load(str(tmp_path / "out" / "model.qdq.onnx"))
    zps = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zps and not any(z.any() for z in zps)                           # symmetric: zero points 0
    assert all(z.dtype == np.int8 for z in zps if z.dtype != np.int32)     # int8 (biases are int32)
    w_scale = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("w_scale")]
    assert w_scale and w_scale[0].shape == (4,)                              # per output channel


def test_more_calibration_images_than_prepared_uses_all_and_says_so(tmp_path):
    proc = run_stage(tmp_path, "int8", {"calibration_images": 64}, n_images=6)
    assert proc.returncode == 0, proc.stderr
    assert "calibrated on all 6" in proc.stdout
    side = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert (side["calibration_images"], side["calibration_images_requested"]) == (6, 64)


def test_one_calibration_image_works_and_is_flagged(tmp_path):
    proc = run_stage(tmp_path, "int8", {"calibration_images": 1}, n_images=1)
    assert proc.returncode == 0, proc.stderr
    side = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert side["calibration_images"] == 1 and any("ONE image" in n for n in side["notes"])


@pytest.mark.parametrize("stage", ["int8", "fp16"])
def test_an_op_the_quantiser_cannot_handle_is_named_in_one_line(tmp_path, stage):
    proc = run_stage(tmp_path, stage, {}, custom_op=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FancyAct" in lines[0] and "node fancy" in lines[0]
    assert not (tmp_path / "out" / "model.qdq.onnx").exists()


def test_fp16_keeps_fp32_inputs_and_outputs(tmp_path):
    proc = run_stage(tmp_path, "fp16", {"opset": 13})
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(tmp_path / "out" / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
