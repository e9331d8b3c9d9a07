"""ONNX export (torch.export), the infer stages of torch and onnxruntime, and the bench stages:
in process where that is quicker, and end to end as ``python -m targets.<t>.<stage> spec.json``.

A note on the element-wise tolerance. With seeded calibrated random weights the BN neck
('after') divides features that differ little between images by their small spread, which
amplifies ordinary fp32 rounding ~10x: PyTorch fp32 itself differs from PyTorch fp64 by up to
~2.5e-4 on O(1) features, and ONNX Runtime by as much (it is in fact closer to fp64). So parity
at rtol 1e-3 / atol 1e-4 is checked on the 'before' graph, and the 'after' graph at atol 1e-3
plus a per-row cosine; see the report to the lead.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from targets.common.contract import Spec, atomic_write_json, spec_to_json
from targets.onnxruntime import infer as ort_infer
from targets.torch import export
from targets.torch import models as M
from targets.torch.infer import load_model

REPO = Path(__file__).resolve().parents[1]
SMALL = [64, 32]


def model_params(arch="reid-strong-baseline", **kw):
    cfg = dict(
        arch=arch,
        checkpoint=None,
        seed=0,
        num_classes=751,
        last_stride=1,
        neck_feat="after",
        input_size=SMALL,
        calibration_batches=2,
        export=dict(opset=11, input_name="image", output_name="class", dynamic_batch=True),
    )
    cfg.update(kw)
    cfg["contract"] = dict(M.ARCH_CONTRACTS[cfg["arch"]], input_size=list(cfg["input_size"]))
    return cfg


def images(arch, n, size=SMALL, seed=11):
    x = M.apply_contract(M.smooth_images(n, size, torch.Generator().manual_seed(seed)), M.ARCH_CONTRACTS[arch])
    return x.numpy()


def export_in_process(out: Path, **kw) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    export.run(Spec("torch", "export", out, {}, out, {"model": model_params(**kw)}))
    return out


def run_stage(ws: Path, target: str, stage: str, inputs: dict, out_dir: str, params: dict):
    """Write spec.json as the host does and run the stage module in a fresh interpreter."""
    (ws / out_dir).mkdir(parents=True, exist_ok=True)
    spec = ws / out_dir / "spec.json"
    atomic_write_json(spec, spec_to_json(target, stage, str(ws), inputs, out_dir, params))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", f"targets.{target}.{stage}", str(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_one_line_failure(proc, names, out: Path, outputs=("features.npy",)):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert names in lines[0]
    for name in outputs + ("result.json",):
        assert not (out / name).exists()


def cosine_rows(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --------------------------------------------------------------------------- export, in process


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {
        "after": export_in_process(root / "after"),
        "before": export_in_process(root / "before", neck_feat="before"),
        "fastreid": export_in_process(root / "fastreid", arch="fastreid-bagtricks-r50"),
    }


def test_onnx_file_checker_opset_names_dynamic_batch(exported):
    proto = onnx.load(str(exported["after"] / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [("", 11)]
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["class"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 32]
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == 2048
    ops = {n.op_type for n in proto.graph.node}
    assert "GlobalAveragePool" in ops and "MaxPool" in ops


def test_onnx_metadata_and_meta_json(exported):
    proto = onnx.load(str(exported["after"] / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["producer"] == "modelmatrix" and props["arch"] == "reid-strong-baseline"
    assert json.loads(props["input_size"]) == SMALL and props["neck_feat"] == "after"
    assert props["last_stride"] == "1" and props["random_weights"] == "true" and props["seed"] == "0"
    assert json.loads(props["contract"])["mean"] == [0.485, 0.456, 0.406]
    meta = json.loads((exported["after"] / "meta.json").read_text())
    assert meta["random_weights"] is True and "checkpoint_sha256" not in meta
    assert meta["seed"] == 0 and meta["calibration"] == {"source": "synthetic", "images": 16}
    assert meta["feature_dim"] == 2048 and meta["contract"]["normalize_in_model"] is False
    assert meta["export"]["opset"] == 11 and meta["versions"]["torch"] == torch.__version__


def test_neck_before_leaves_the_bn_out_of_the_graph(exported):
    def last_ops(folder):
        return [n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node][-2:]

    # view(B, -1), as upstream writes it, exports to Shape/Gather/.../Reshape.
    assert last_ops(exported["after"]) == ["Reshape", "BatchNormalization"]
    assert last_ops(exported["before"])[-1] == "Reshape"
    ops = [n.op_type for n in onnx.load(str(exported["before"] / "model.onnx")).graph.node]
    assert "BatchNormalization" not in ops[-6:] and "GlobalAveragePool" in ops


def test_fastreid_graph_normalises_inside(exported):
    proto = onnx.load(str(exported["fastreid"] / "model.onnx"))
    first = [n.op_type for n in proto.graph.node if n.op_type != "Constant"][:2]
    assert first == ["Sub", "Div"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["contract"])["normalize_in_model"] is True


def ort_features(folder, x):
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


def torch_features(folder, x):
    model = load_model(folder / "weights.pt", json.loads((folder / "meta.json").read_text()))
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_weights_pt_reproduces_the_seeded_model(exported):
    x = images("reid-strong-baseline", 3)
    again = M.init_random_model(model_params())
    with torch.inference_mode():
        expected = again(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(torch_features(exported["after"], x), expected)


def test_ort_matches_torch_before_neck_at_rtol_1e3_atol_1e4(exported):
    x = images("reid-strong-baseline", 3)
    np.testing.assert_allclose(
        ort_features(exported["before"], x), torch_features(exported["before"], x), rtol=1e-3, atol=1e-4
    )


@pytest.mark.parametrize("which,arch", [("after", "reid-strong-baseline"), ("fastreid", "fastreid-bagtricks-r50")])
def test_ort_matches_torch_after_neck(exported, which, arch):
    x = images(arch, 3)
    got, ref = ort_features(exported[which], x), torch_features(exported[which], x)
    assert got.shape == ref.shape == (3, 2048)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    assert cosine_rows(got, ref).min() > 0.99999
    # and not trivially: another image's feature is far away
    assert cosine_rows(got, ref[[1, 2, 0]]).max() < 0.95


def test_export_param_errors_are_one_line(tmp_path):
    from targets.common.contract import StageError

    bad = model_params()
    bad["arch"] = "resnet18"
    with pytest.raises(StageError, match=r"^params.model.arch: unknown architecture 'resnet18'"):
        export.run(Spec("torch", "export", tmp_path, {}, tmp_path, {"model": bad}))
    bad = model_params()
    del bad["export"]["opset"]
    with pytest.raises(StageError, match=r"^params.model.export: missing opset"):
        export.run(Spec("torch", "export", tmp_path, {}, tmp_path, {"model": bad}))
    bad = model_params()
    bad["export"]["opset"] = 25
    with pytest.raises(StageError, match=r"^params.model.export.opset: .* writes opsets 7..20, got 25"):
        export.run(Spec("torch", "export", tmp_path, {}, tmp_path, {"model": bad}))
    assert not list(tmp_path.iterdir())


def test_random_weights_calibrated_on_the_prepared_inputs(tmp_path):
    from targets.common.contract import StageError

    x = images("reid-strong-baseline", 40, seed=3)
    np.save(tmp_path / "inputs.npy", x)
    out = tmp_path / "models"
    out.mkdir()
    spec = Spec("torch", "export", tmp_path, {"calibration": tmp_path / "inputs.npy"}, out, {"model": model_params()})
    export.run(spec)
    meta = json.loads((out / "meta.json").read_text())
    sample = torch.from_numpy(x[np.linspace(0, 39, 16).round().astype(int)])
    digest = hashlib.sha256(sample.numpy().tobytes()).hexdigest()
    assert meta["random_weights"] is True
    assert meta["calibration"] == {"source": "inputs.npy", "images": 16, "sample_sha256": digest}
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["calibration"])["images"] == 16
    again = M.init_random_model(model_params(), sample)  # the same, rebuilt by hand
    with torch.inference_mode():
        np.testing.assert_array_equal(torch_features(out, x[:3]), again(torch.from_numpy(x[:3])).numpy())

    np.save(tmp_path / "one.npy", x[:1])
    spec.inputs["calibration"] = tmp_path / "one.npy"
    with pytest.raises(StageError, match=r"one.npy: 1 image\(s\); calibrating random weights needs at least 2"):
        export.run(spec)
    np.save(tmp_path / "wide.npy", images("reid-strong-baseline", 2, size=[64, 64]))
    spec.inputs["calibration"] = tmp_path / "wide.npy"
    with pytest.raises(StageError, match=r"wide.npy: shape \(2, 3, 64, 64\), but this model takes \(N, 3, 64, 32\)"):
        export.run(spec)


def test_fixed_batch_export_and_a_batch_it_cannot_run(tmp_path):
    from targets.common.contract import StageError

    params = model_params()
    params["export"]["dynamic_batch"] = False
    out = tmp_path / "fixed"
    out.mkdir()
    export.run(Spec("torch", "export", out, {}, out, {"model": params}))
    dims = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1
    np.save(tmp_path / "inputs.npy", images("reid-strong-baseline", 3))
    spec = Spec(
        "onnxruntime",
        "infer",
        tmp_path,
        {"onnx": out / "model.onnx", "inputs": tmp_path / "inputs.npy"},
        tmp_path / "ort",
        {"batch_size": 2},
    )
    with pytest.raises(StageError, match="exported with a fixed batch of 1, cannot run 3 images in batches of 2"):
        ort_infer.run(spec)
    spec.params["batch_size"] = 1
    (tmp_path / "ort").mkdir()
    assert ort_infer.run(spec)["images"] == 3
    np.testing.assert_allclose(
        np.load(tmp_path / "ort/features.npy"),
        torch_features(out, images("reid-strong-baseline", 3)),
        rtol=1e-3,
        atol=1e-3,
    )


# --------------------------------------------------------------------------- stages, end to end


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace as the host lays it out: a fast-reid checkpoint, inputs.npy, then torch.export."""
    ws = tmp_path_factory.mktemp("ws")
    arch = "fastreid-bagtricks-r50"
    model = M.init_random_model(model_params(arch=arch, seed=5))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    (ws / "source").mkdir()
    torch.save({"model": sd, "iteration": 1}, ws / "source" / "model_final.pth")
    (ws / "data").mkdir()
    x = images(arch, 5)
    np.save(ws / "data" / "inputs.npy", x)
    proc = run_stage(
        ws,
        "torch",
        "export",
        {"checkpoint": "source/model_final.pth"},
        "models",
        {"model": model_params(arch=arch, checkpoint="/elsewhere/model_final.pth")},
    )
    assert proc.returncode == 0, proc.stderr
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    return {"ws": ws, "expected": expected, "arch": arch}


TORCH_INPUTS = {"weights": "models/weights.pt", "meta": "models/meta.json", "inputs": "data/inputs.npy"}
ORT_INPUTS = {"onnx": "models/model.onnx", "inputs": "data/inputs.npy"}


def test_export_stage_with_checkpoint(workspace):
    ws = workspace["ws"]
    for name in ("model.onnx", "weights.pt", "meta.json", "result.json"):
        assert (ws / "models" / name).is_file()
    assert not [p.name for p in (ws / "models").iterdir() if p.name.endswith(".tmp")]
    result = json.loads((ws / "models" / "result.json").read_text())
    assert result["opset"] == 11 and result["random_weights"] is False
    assert result["versions"]["torch"] == torch.__version__ and result["versions"]["onnx"] == onnx.__version__
    assert result["export_seconds"] > 0
    meta = json.loads((ws / "models" / "meta.json").read_text())
    digest = hashlib.sha256((ws / "source" / "model_final.pth").read_bytes()).hexdigest()
    assert meta["random_weights"] is False and meta["checkpoint_sha256"] == digest
    assert meta["checkpoint"] == "model_final.pth" and "calibration" not in meta and "seed" not in meta
    props = {p.key: p.value for p in onnx.load(str(ws / "models" / "model.onnx")).metadata_props}
    assert props["checkpoint_sha256"] == digest and props["random_weights"] == "false"


def test_torch_infer_stage(workspace):
    ws = workspace["ws"]
    proc = run_stage(ws, "torch", "infer", TORCH_INPUTS, "targets/torch", {"batch_size": 2, "threads": 1})
    assert proc.returncode == 0, proc.stderr
    feats = np.load(ws / "targets/torch/features.npy")
    assert feats.dtype == np.float32 and feats.shape == (5, 2048)
    # threads=1 here, the library default (all cores) in the fixture: the summation order
    # differs, and the BN neck amplifies that to ~1e-4 (see the module docstring)
    np.testing.assert_allclose(feats, workspace["expected"], rtol=1e-3, atol=1e-3)
    assert cosine_rows(feats, workspace["expected"]).min() > 0.99999
    result = json.loads((ws / "targets/torch/result.json").read_text())
    assert result["batch_size"] == 2 and result["images"] == 5 and len(result["batch_seconds"]) == 3
    assert result["images_per_second"] > 0 and result["threads"] == 1
    assert result["versions"]["torch"] == torch.__version__


def test_onnxruntime_infer_stage(workspace):
    ws = workspace["ws"]
    params = {
        "batch_size": 2,
        "providers": ["CPUExecutionProvider"],
        "intra_op_threads": 1,
        "graph_optimization": "all",
    }
    proc = run_stage(ws, "onnxruntime", "infer", ORT_INPUTS, "targets/onnxruntime", params)
    assert proc.returncode == 0, proc.stderr
    feats = np.load(ws / "targets/onnxruntime/features.npy")
    assert feats.dtype == np.float32 and feats.shape == (5, 2048)
    np.testing.assert_allclose(feats, workspace["expected"], rtol=1e-3, atol=1e-3)
    assert cosine_rows(feats, workspace["expected"]).min() > 0.99999
    result = json.loads((ws / "targets/onnxruntime/result.json").read_text())
    assert result["batch_size"] == 2 and result["images"] == 5 and len(result["batch_seconds"]) == 3
    assert result["versions"]["onnxruntime"] == ort.__version__


def test_bench_stages(workspace):
    ws = workspace["ws"]
    common = {"batch_sizes": [1, 4], "warmup": 1, "iterations": 2}
    proc = run_stage(ws, "torch", "bench", TORCH_INPUTS, "bench/torch", dict(common, threads=0))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((ws / "bench/torch/bench.json").read_text())
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    assert all(r["iterations"] == 2 and r["latency_ms_p95"] >= r["latency_ms_p50"] > 0 for r in report["results"])

    proc = run_stage(
        ws,
        "onnxruntime",
        "bench",
        ORT_INPUTS,
        "bench/onnxruntime",
        dict(common, iterations=None, seconds=0.2, matrix_batch_size=2, batch_size=2),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((ws / "bench/onnxruntime/bench.json").read_text())
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    assert all(r["images_per_second"] > 0 for r in report["results"])
    comp = report["comparison"]
    assert comp["batch_size"] == 2 and comp["images"] == 5
    assert comp["bare_images_per_second"] > 0 and comp["matrix_images_per_second"] > 0
    assert json.loads((ws / "bench/onnxruntime/result.json").read_text())["comparison"] == comp


# --------------------------------------------------------------------------- stages, failures


def test_corrupt_onnx_is_one_line_and_writes_nothing(workspace):
    ws = workspace["ws"]
    data = (ws / "models/model.onnx").read_bytes()
    (ws / "broken").mkdir(exist_ok=True)
    (ws / "broken/model.onnx").write_bytes(data[: len(data) // 2])
    proc = run_stage(
        ws,
        "onnxruntime",
        "infer",
        {"onnx": "broken/model.onnx", "inputs": "data/inputs.npy"},
        "targets/ort-broken",
        {"batch_size": 2},
    )
    assert_one_line_failure(proc, str(ws / "broken/model.onnx"), ws / "targets/ort-broken")


@pytest.mark.parametrize("target,inputs", [("torch", TORCH_INPUTS), ("onnxruntime", ORT_INPUTS)])
@pytest.mark.parametrize(
    "array",
    [np.zeros((2, 3, 32, 64), np.float32), np.zeros((2, 3, 64, 32), np.float64)],
    ids=["wrong-shape", "float64"],
)
def test_bad_inputs_npy_is_one_line_and_writes_nothing(workspace, target, inputs, array):
    ws = workspace["ws"]
    name = f"bad-{target}-{array.dtype}-{array.shape[2]}"
    np.save(ws / "data" / f"{name}.npy", array)
    proc = run_stage(ws, target, "infer", dict(inputs, inputs=f"data/{name}.npy"), f"targets/{name}", {"batch_size": 2})
    assert_one_line_failure(proc, str(ws / "data" / f"{name}.npy"), ws / f"targets/{name}")


def test_bad_checkpoint_export_is_one_line_and_writes_nothing(workspace):
    ws = workspace["ws"]
    torch.save([1, 2, 3], ws / "source" / "list.pth")
    proc = run_stage(
        ws,
        "torch",
        "export",
        {"checkpoint": "source/list.pth"},
        "models-bad",
        {"model": model_params(arch=workspace["arch"])},
    )
    assert_one_line_failure(
        proc, str(ws / "source/list.pth"), ws / "models-bad", outputs=("model.onnx", "weights.pt", "meta.json")
    )
