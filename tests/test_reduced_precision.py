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
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(6, np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["class"], name="flat"),
    ]
    if custom_op:
        nodes[1] = helper.make_node("FancyAct", ["c"], ["r"], name="fancy", domain="com.example")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 8])],
        [helper.make_tensor_value_info("class", TensorProto.FLOAT, ["N", 6])],
        [w, b, w2, b2],
    )
    opsets = [helper.make_opsetid("", 11)] + ([helper.make_opsetid("com.example", 1)] if custom_op else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def run_stage(tmp: Path, stage: str, params: dict, n_images: int = 6, custom_op: bool = False):
    conv_net(tmp / "model.onnx", custom_op)
    np.save(tmp / "inputs.npy", np.random.default_rng(1).normal(size=(n_images, 3, 16, 8)).astype(np.float32))
    (tmp / "out").mkdir(exist_ok=True)
    calibrated = stage in ("int8", "int8_u8")
    inputs = {"onnx": "model.onnx", "calibration": "inputs.npy"} if calibrated else {"onnx": "model.onnx"}
    spec = tmp / "out" / "spec.json"
    spec.write_text(json.dumps(spec_to_json("quantize", stage, str(tmp), inputs, "out", params)))
    return subprocess.run(
        [sys.executable, "-m", f"targets.quantize.{stage}", str(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_int8_writes_symmetric_per_channel_qdq_at_opset_13(tmp_path):
    proc = run_stage(tmp_path, "int8", {"calibration_images": 4, "method": "minmax"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    side = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert side["opset"] == 13 and side["calibration_images"] == 4 and side["method"] == "minmax"
    model = onnx.load(str(tmp_path / "out" / "model.qdq.onnx"))
    zps = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zps and not any(z.any() for z in zps)  # symmetric: zero points 0
    assert all(z.dtype == np.int8 for z in zps if z.dtype != np.int32)  # int8 (biases are int32)
    w_scale = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("w2_scale")]
    assert w_scale and w_scale[0].shape == (6,)  # per output channel
    # keep_fp32 stem (the default): the first Conv reads the image in fp32, with fp32 weights
    conv = next(n for n in model.graph.node if n.name == "conv")
    assert conv.input[1] == "w" and side["fp32_nodes"] == ["conv"]
    assert not any(i.name.startswith("w_scale") for i in model.graph.initializer)


def test_int8_u8_writes_uint8_activations_and_quantises_the_stem_by_default(tmp_path):
    """quantize.int8_u8 (the CPU's file): weights as quantize.int8's (int8 symmetric per channel),
    activations uint8 with their own zero points; cpu_keep_fp32 neck leaves the stem quantised."""
    proc = run_stage(tmp_path, "int8_u8", {"calibration_images": 4, "method": "minmax"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    side = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert side["activations"] == "uint8 asymmetric per-tensor" and side["keep_fp32"] == "neck"
    model = onnx.load(str(tmp_path / "out" / "model.qdq.onnx"))
    zps = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("zero_point")}
    act = [z for n, z in zps.items() if not n.startswith(("w_", "w2_", "b_", "b2_"))]
    weights = [z for n, z in zps.items() if n.startswith(("w_", "w2_"))]
    assert act and all(z.dtype == np.uint8 for z in act)
    assert weights and all(z.dtype == np.int8 and not z.any() for z in weights)
    assert any(i.name.startswith("w_scale") for i in model.graph.initializer)  # the stem Conv is int8
    assert side["fp32_nodes"] == []  # conv_net has no BNNeck, so nothing stays fp32
    bad = run_stage(tmp_path, "int8_u8", {"cpu_keep_fp32": "trunk"})
    assert bad.returncode != 0 and "cpu_keep_fp32: expected one of none, stem, neck, stem+neck" in bad.stderr


def necked_net(path: Path) -> Path:
    """conv_net plus a BNNeck (BatchNormalization on the flattened pooled feature, running stats
    measured on the test images, as a trained model's): what bias_correction neck corrects."""
    conv_net(path)
    model = onnx.load(str(path))
    feats = _run_onnx(model.SerializeToString(), "class", _images(6))
    mean, var = feats.mean(0), feats.var(0) + 1e-3
    rng = np.random.default_rng(2)
    stats = {
        "bn_scale": rng.uniform(0.5, 1.5, 6),
        "bn_bias": rng.normal(0, 0.1, 6),
        "bn_mean": mean,
        "bn_var": var,
    }
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items())
    model.graph.node[-1].output[0] = "pooled"
    model.graph.node.append(helper.make_node("BatchNormalization", ["pooled", *stats], ["class"], name="neck_bn"))
    onnx.save(model, str(path))
    return path


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 3, 16, 8)).astype(np.float32)


def _run_onnx(model: bytes, output: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    if output != "class":
        m = onnx.load_from_string(model)
        m.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
        model = m.SerializeToString()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run([output], {"image": x})[0].astype(np.float64)


@pytest.mark.parametrize("correction", ["neck", "none"])
def test_bias_correction_gives_the_int8_neck_the_fp32_mean_feature(tmp_path, correction):
    """keep_fp32 stem+neck + bias_correction neck (the defaults): the BNNeck stays fp32 and its
    running mean absorbs the int8 trunk's mean shift, so over the calibration images the int8
    model's mean feature equals the fp32 model's (BatchNormalization is affine per channel);
    with bias_correction none the shift stays."""
    necked_net(tmp_path / "model.onnx")
    np.save(tmp_path / "inputs.npy", _images(6))
    (tmp_path / "out").mkdir()
    spec = tmp_path / "out" / "spec.json"
    inputs = {"onnx": "model.onnx", "calibration": "inputs.npy"}
    params = {"calibration_images": 6, "bias_correction": correction}
    spec.write_text(json.dumps(spec_to_json("quantize", "int8", str(tmp_path), inputs, "out", params)))
    proc = subprocess.run(
        [sys.executable, "-m", "targets.quantize.int8", str(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    side = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert side["keep_fp32"] == "stem+neck" and side["fp32_nodes"] == ["conv", "neck_bn"]
    assert side["bias_correction"]["applied"] == (correction == "neck"), side["bias_correction"]
    qmodel = (tmp_path / "out" / "model.qdq.onnx").read_bytes()
    neck = next(n for n in onnx.load_from_string(qmodel).graph.node if n.name == "neck_bn")
    assert neck.input[1] == "bn_scale"  # fp32 weights: no DequantizeLinear in front of the neck
    x = _images(6)
    ref = _run_onnx((tmp_path / "model.onnx").read_bytes(), "class", x).mean(0)
    got = _run_onnx(qmodel, "class", x).mean(0)
    gap = np.abs(got - ref).max()
    if correction == "neck":
        assert gap < 1e-4 * np.abs(ref).max(), (got, ref)
    else:
        assert gap > 1e-3 * np.abs(ref).max(), (got, ref)  # the uncorrected int8 shift is visible


def test_keep_fp32_none_quantises_the_first_conv_too(tmp_path):
    proc = run_stage(tmp_path, "int8", {"calibration_images": 4, "keep_fp32": "none"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model = onnx.load(str(tmp_path / "out" / "model.qdq.onnx"))
    scale = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("w_scale"))
    assert scale.shape == (4,)
    assert json.loads((tmp_path / "out" / "quantization.json").read_text())["fp32_nodes"] == []


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


@pytest.mark.parametrize("stage", ["int8", "int8_u8", "fp16"])
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


# --------------------------------------------------------------------------- on a fine-tuned model
#
# One briefly trained checkpoint per test session (invoke finetune's code, small: 32 identities x 4
# crops, 64x32, 6 epochs with layers up to layer3 frozen), then one matrix run with both
# reduced-precision targets on it. These are the slow tests of this file (measured in the report).

FT_IDENTITIES, FT_PER_IDENTITY, FT_EPOCHS = 32, 4, 6  # 16 x 4 x 4 epochs ended below random


def _small_matrix(root: Path, **overrides) -> Path:
    from modelmatrix import data
    from modelmatrix.config import load_matrix

    from mm_testing import write_matrix

    cfg = write_matrix(root, **overrides)
    m = load_matrix(cfg)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    return cfg


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory) -> dict:
    from modelmatrix.config import load_matrix
    from modelmatrix.finetune import run_finetune

    root = tmp_path_factory.mktemp("finetune")
    cfg = _small_matrix(
        root,
        targets={
            "torch": {"params": {"batch_size": 8, "finetune_epochs": FT_EPOCHS}},
            "onnxruntime": {"params": {"batch_size": 8}},
        },
    )
    summary = run_finetune(load_matrix(cfg), "local", identities=FT_IDENTITIES, images_per_identity=FT_PER_IDENTITY)
    return {"cfg": cfg, "summary": summary}


@pytest.fixture(scope="session")
def reduced_run(finetuned, tmp_path_factory) -> dict:
    """The matrix with torch, onnxruntime, quantize, onnxruntime_int8, onnxruntime_fp16 on the checkpoint."""
    from modelmatrix.config import load_matrix
    from modelmatrix.pipeline import run_matrix

    root = tmp_path_factory.mktemp("reduced")
    small = {"params": {"batch_size": 8}}
    cfg = _small_matrix(
        root,
        model__checkpoint=finetuned["summary"]["checkpoint"],
        targets={
            "torch": small,
            "onnxruntime": small,
            "quantize": {},
            "onnxruntime_int8": small,
            "onnxruntime_fp16": small,
        },
    )
    summary = run_matrix(load_matrix(cfg), "local")
    return {"cfg": cfg, "summary": summary, "report": summary.report, "ws": root / "ws"}


def test_finetune_is_far_above_random_weights_and_reruns_as_a_no_op(finetuned):
    import torch

    from modelmatrix.config import load_matrix
    from modelmatrix.finetune import run_finetune

    s = finetuned["summary"]
    trained, random = s["retrieval"]["trained"], s["retrieval"]["random"]
    assert trained["rank1"] >= random["rank1"] + 0.1 and trained["mAP"] > random["mAP"], s["retrieval"]
    state = torch.load(s["checkpoint"], map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and "bottleneck.running_mean" in state
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    again = run_finetune(
        load_matrix(finetuned["cfg"]), "local", identities=FT_IDENTITIES, images_per_identity=FT_PER_IDENTITY
    )
    assert again["key"] == s["key"] and again["checkpoint_sha256"] == s["checkpoint_sha256"]


def test_fp16_target_holds_its_cosine_floor_on_the_finetuned_model(reduced_run):
    """fp16 keeps the cosine floor (measured here: min 0.99946 at 64x32). Its retrieval deltas are
    not asserted at this size: on 16 queries one flipped top-1 is 6.25 points, and fp16 flips one at
    64x32 (Rank-1 +0.0625); at 256x128 the deltas are 0 (the report's measurement)."""
    t = reduced_run["report"]["targets"]["onnxruntime_fp16"]
    assert t["status"] in ("passed", "failed"), t
    by_name = {c["name"]: c for c in t["checks"]}
    assert not by_name["allclose"]["enabled"]  # fp16 is not fp32 rounding
    assert by_name["cosine"]["enabled"] and by_name["cosine"]["passed"], by_name["cosine"]
    assert by_name["retrieval"]["enabled"]
    assert (t["status"] == "passed") == all(c["passed"] for c in t["checks"] if c["enabled"])
    assert t["metrics"]["cosine"]["nan"] == 0


def test_int8_target_runs_the_shared_qdq_model_and_is_judged_at_task_level(reduced_run):
    ws = reduced_run["ws"]
    side = json.loads((ws / "targets" / "quantize" / "int8" / "quantization.json").read_text())
    assert side["opset"] == 13 and side["method"] == "minmax" and side["qdq_nodes"]["QuantizeLinear"] > 50
    # the CPU target runs the uint8-activation file by default (TensorRT's file is the one above)
    cpu = json.loads((ws / "targets" / "quantize" / "int8_u8" / "quantization.json").read_text())
    assert cpu["activations"].startswith("uint8") and cpu["calibration_sha256"] == side["calibration_sha256"]
    t = reduced_run["report"]["targets"]["onnxruntime_int8"]
    assert t["status"] in ("passed", "failed"), t  # compared, never skipped or an error
    by_name = {c["name"]: c for c in t["checks"]}
    assert not by_name["allclose"]["enabled"]
    assert by_name["cosine"]["enabled"] and by_name["retrieval"]["enabled"]
    # the verdict is the checks' (a failed one names what exceeded)
    assert (t["status"] == "passed") == all(c["passed"] for c in t["checks"] if c["enabled"])
    feats = np.load(ws / "targets" / "onnxruntime_int8" / "infer" / "features.npy")
    assert np.isfinite(feats).all()


def _run_int8(tmp_path: Path, model: onnx.ModelProto, name: str, inputs: Path):
    onnx.save(model, str(tmp_path / f"{name}.qdq.onnx"))
    (tmp_path / name).mkdir()
    spec = tmp_path / name / "spec.json"
    spec.write_text(
        json.dumps(
            spec_to_json(
                "onnxruntime_int8",
                "infer",
                str(tmp_path),
                {"onnx": f"{name}.qdq.onnx", "inputs": str(inputs)},
                name,
                {"batch_size": 8, "intra_op_threads": 0},
            )
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "targets.onnxruntime_int8.infer", str(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _nan_scale(model: onnx.ModelProto, which: int) -> onnx.ModelProto:
    """A copy of the QDQ model with the scale of its ``which``-th DequantizeLinear set to NaN."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"][which]
    scale = next(i for i in out.graph.initializer if i.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(scale), np.nan), scale.name))
    return out


def test_a_quantised_model_whose_features_are_nan_fails_never_passes(reduced_run, tmp_path):
    """The real QDQ file with a DequantizeLinear scale set to NaN, run by the int8 stage and judged by
    the matrix's verify with the int8 stanza: the last one (feeding the output) gives NaN features;
    the first one gives finite but constant features (the NaN is lost in the int8 arithmetic).
    Both fail every enabled check; neither passes."""
    from modelmatrix import verify
    from modelmatrix.config import load_matrix

    ws = reduced_run["ws"]
    model = onnx.load(str(ws / "targets" / "quantize" / "int8" / "model.qdq.onnx"))
    prep_dir = next(d for d in (ws / "stages" / "prepare").iterdir() if (d / "inputs.npy").is_file())
    m = load_matrix(reduced_run["cfg"])
    ref = np.load(ws / "targets" / "torch" / "infer" / "features.npy")
    index = json.loads((prep_dir / "index.json").read_text())
    tolerance = {"onnxruntime_int8": m.target_cfg("onnxruntime_int8")["tolerance"]}
    for name, which in (("nan", -1), ("constant", 0)):
        proc = _run_int8(tmp_path, _nan_scale(model, which), name, prep_dir / "inputs.npy")
        if proc.returncode != 0:  # the stage may refuse NaN itself: one line, no output
            assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / name / "features.npy").exists()
            continue
        feats = np.load(tmp_path / name / "features.npy")
        if name == "nan":
            assert not np.isfinite(feats).all()
        report = verify.verify_all({"torch": ref, "onnxruntime_int8": feats}, "torch", tolerance, index)
        t = report["targets"]["onnxruntime_int8"]
        assert t["status"] == "failed" and not report["passed"], (name, t)
        assert all(not c["passed"] for c in t["checks"] if c["enabled"]), (name, t["checks"])


# --------------------------------------------------------------------------- image: {use: ...}


def test_targets_that_use_the_onnxruntime_image_share_its_recipe_which_holds_their_code(tmp_path):
    """No engine needed: the recipe (context files, hash, tag) of quantize and onnxruntime_int8 is
    onnxruntime's, holds their code, and changes when their code does (so does the image ID in
    their stage keys under the docker runner)."""
    import shutil

    from modelmatrix import images
    from modelmatrix.bases import BaseInfo
    from modelmatrix.config import load_matrix

    from mm_testing import write_matrix

    targets = tmp_path / "targets"
    for name in ("common", "torch", "onnxruntime", "onnxruntime_int8", "quantize"):
        shutil.copytree(REPO / "targets" / name, targets / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO / "targets" / "__init__.py", targets / "__init__.py")
    (tmp_path / "images").symlink_to(REPO / "images")
    # onnxruntime itself is not in this matrix: its image is still the one used
    cfg = write_matrix(tmp_path, targets={"torch": {}, "quantize": {}, "onnxruntime_int8": {}})
    m = load_matrix(cfg, targets_dir=targets)
    base = BaseInfo("b", "b", "sha256:" + "0" * 64, "local", "")
    q, i8 = images.plan(m, "quantize", base), images.plan(m, "onnxruntime_int8", base)
    assert q.target == i8.target == "onnxruntime" and q.hash == i8.hash
    assert {"targets/onnxruntime/infer.py", "targets/onnxruntime_int8/infer.py", "targets/quantize/int8.py"} <= set(
        q.files
    )
    assert images.image_owner(m, "torch").name == "torch"
    (targets / "onnxruntime_int8" / "infer.py").write_text(
        (targets / "onnxruntime_int8" / "infer.py").read_text() + "\n"
    )
    assert images.plan(m, "quantize", base).hash != q.hash


def test_an_image_use_of_an_unknown_or_using_target_is_one_line(tmp_path):
    import shutil

    from modelmatrix import images
    from modelmatrix.config import load_matrix
    from modelmatrix.errors import ConfigError

    from mm_testing import write_matrix

    targets = tmp_path / "targets"
    for name in ("common", "torch"):
        shutil.copytree(REPO / "targets" / name, targets / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name, use in (("a", "nowhere"), ("b", "c"), ("c", "torch")):
        (targets / name).mkdir()
        (targets / name / "target.yaml").write_text(f"name: {name}\nimage: {{use: {use}}}\nstages: {{noop: {{}}}}\n")
    cfg = write_matrix(tmp_path, targets={"torch": {}, "a": {}, "b": {}})
    m = load_matrix(cfg, targets_dir=targets)
    with pytest.raises(ConfigError, match=r"targets/a/target.yaml: image.use: 'nowhere' is not another target"):
        images.image_owner(m, "a")
    with pytest.raises(ConfigError, match=r"image.use: 'c' itself uses 'torch'"):
        images.image_owner(m, "b")


def test_roofline_counts_the_models_macs_and_takes_the_faster_fp32_gemm(tmp_path):
    """quantize.roofline on conv_net: its MACs counted from the graph (conv 3->4 and 4->6, 3x3, on
    16x8: 16*8*4*27 + 16*8*6*36), and the fp32 limit is the faster of numpy's and ONNX Runtime's GEMM
    (numpy alone under-read it on an AVX-512 EPYC: a backend read as 181% of its roofline)."""
    proc = run_stage(tmp_path, "roofline", {"gemm_n": 128, "seconds": 0.05})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    roof = json.loads((tmp_path / "out" / "roofline.json").read_text())
    assert roof["model"]["macs_by_op"] == {"Conv": 16 * 8 * 4 * 27 + 16 * 8 * 6 * 36}
    fp32 = roof["gemm"]["fp32"]
    cands = fp32["candidates"]
    assert set(cands) == {"numpy", "onnxruntime"}
    assert fp32["gflops"] == max(c["gflops"] for c in cands.values()) > 0
    assert roof["gemm"]["int8"]["gflops"] > 0
    assert roof["int8_over_fp32"] == round(roof["gemm"]["int8"]["gflops"] / fp32["gflops"], 2)
