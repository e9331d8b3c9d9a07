"""ONNX -> Caffe conversion on the host (onnx + numpy + torch; no Caffe here).

The layer specs are executed with Caffe's own semantics written out in numpy (pooling with
Caffe's CEIL/FLOOR window rules, BatchNorm/Scale/Bias blobs, InnerProduct's (out, in) weights)
and compared with PyTorch; the shape guard runs on shapes computed with Caffe's formulas. The
real pycaffe run is tests/docker/test_caffe_image.py.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.nn import functional as F

from targets.caffe import convert as caffe_convert
from targets.caffe import onnx2caffe as oc
from targets.caffe import openblas_coretype
from targets.caffe.infer import scan_caffemodel
from targets.common.contract import StageError, main
from targets.torch.export import export_onnx
from targets.torch.models import ARCH_CONTRACTS, apply_contract, init_random_model, smooth_images

SIZE = [256, 128]


# --------------------------------------------------------------------------- Caffe semantics in numpy


def _caffe_pool(x: np.ndarray, p: dict) -> np.ndarray:
    """pooling_layer.cpp Forward_cpu, MAX and AVE, with the top size from Caffe's Reshape()."""
    n, c, h, w = x.shape
    if p.get("global_pooling"):
        return (x.max if str(p["pool"]) == "MAX" else x.mean)(axis=(2, 3), keepdims=True)
    kh, kw, sh, sw, ph, pw = (p[k] for k in ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"))
    ceil = str(p["round_mode"]) == "CEIL"
    oh, ow = oc._pooled(h, kh, sh, ph, ceil), oc._pooled(w, kw, sw, pw, ceil)
    out = np.empty((n, c, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            if str(p["pool"]) == "MAX":
                he, we = min(hs + kh, h), min(ws + kw, w)
                hs, ws = max(hs, 0), max(ws, 0)
                out[:, :, i, j] = x[:, :, hs:he, ws:we].max(axis=(2, 3))
            else:
                he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                out[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / size
    return out


def caffe_forward(net: oc.CaffeNet, x: np.ndarray) -> np.ndarray:
    """Run the layer specs the way Caffe defines each layer type."""
    blobs = {net.input_name: x.astype(np.float32)}
    for layer in net.layers:
        bottom = [blobs[b] for b in layer.bottoms]
        a, kind = bottom[0], layer.type
        if kind == "Convolution":
            p = layer.params["convolution_param"]
            dil = p.get("dilation", [1])
            out = F.conv2d(
                torch.tensor(a),
                torch.tensor(layer.blobs[0]),
                torch.tensor(layer.blobs[1]) if p["bias_term"] else None,
                stride=(p["stride_h"], p["stride_w"]),
                padding=(p["pad_h"], p["pad_w"]),
                dilation=(dil[0], dil[-1]),
                groups=p.get("group", 1),
            ).numpy()
        elif kind == "Pooling":
            out = _caffe_pool(a, layer.params["pooling_param"])
        elif kind == "ReLU":
            slope = layer.params.get("relu_param", {}).get("negative_slope", 0.0)
            out = np.where(a > 0, a, a * np.float32(slope))
        elif kind == "BatchNorm":
            mean, var, factor = layer.blobs
            scale = 0.0 if factor[0] == 0 else 1.0 / factor[0]
            shape = (1, -1) + (1,) * (a.ndim - 2)
            eps = layer.params["batch_norm_param"]["eps"]
            out = (a - (mean * scale).reshape(shape)) / np.sqrt((var * scale).reshape(shape) + np.float32(eps))
        elif kind in ("Scale", "Bias"):
            shape = (1, -1) + (1,) * (a.ndim - 2)
            if kind == "Bias":
                out = a + layer.blobs[0].reshape(shape)
            else:
                out = a * layer.blobs[0].reshape(shape)
                if len(layer.blobs) > 1:
                    out = out + layer.blobs[1].reshape(shape)
        elif kind == "Eltwise":
            out = sum(bottom[1:], a)
        elif kind == "InnerProduct":
            out = a.reshape(a.shape[0], -1) @ layer.blobs[0].T
            if len(layer.blobs) > 1:
                out = out + layer.blobs[1]
        elif kind == "Flatten":
            out = a.reshape(a.shape[0], -1)
        elif kind == "Reshape":
            dims = layer.params["reshape_param"]["shape"]["dim"]
            out = a.reshape([a.shape[i] if d == 0 else d for i, d in enumerate(dims)])
        else:
            raise AssertionError(f"no numpy rule for {kind}")
        blobs[layer.tops[0]] = out.astype(np.float32)
    return blobs[net.output_name]


# --------------------------------------------------------------------------- exports


def export_module(module: nn.Module, shape=(1, 3, 20, 12), dynamic=None) -> onnx.ModelProto:
    buf = io.BytesIO()
    axes = dynamic if dynamic is not None else {"x": {0: "batch"}, "y": {0: "batch"}}
    torch.onnx.export(
        module.eval(),
        (torch.randn(*shape),),
        buf,
        dynamo=False,
        opset_version=11,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes=axes,
    )
    return onnx.load_from_string(buf.getvalue())


def arch_cfg(arch: str, neck_feat: str) -> dict:
    return {
        "arch": arch,
        "num_classes": 751,
        "last_stride": 1,
        "neck_feat": neck_feat,
        "input_size": SIZE,
        "seed": 0,
        "calibration_batches": 1,
        "export": {"opset": 11, "input_name": "image", "output_name": "class", "dynamic_batch": True},
    }


@pytest.fixture(scope="module")
def archs():
    """(torch model, ONNX model) for both architectures x both neck features."""
    out = {}
    for arch in ("reid-strong-baseline", "fastreid-bagtricks-r50"):
        for neck in ("after", "before"):
            cfg = arch_cfg(arch, neck)
            model = init_random_model(cfg)
            out[(arch, neck)] = (model, export_onnx(model, cfg, {}))
    return out


def arch_inputs(arch: str, n: int = 2) -> torch.Tensor:
    pixels = smooth_images(n, SIZE, torch.Generator().manual_seed(7))
    return apply_contract(pixels, ARCH_CONTRACTS[arch]).float()


def pool_layer(net: oc.CaffeNet) -> oc.Layer:
    return next(l for l in net.layers if l.type == "Pooling" and l.onnx_op == "MaxPool")


# --------------------------------------------------------------------------- the two architectures


@pytest.mark.parametrize("arch", ["reid-strong-baseline", "fastreid-bagtricks-r50"])
@pytest.mark.parametrize("neck", ["after", "before"])
def test_real_architectures_match_torch_with_caffe_semantics(archs, arch, neck):
    model, proto = archs[(arch, neck)]
    net = oc.convert_model(proto, output_name="output")
    x = arch_inputs(arch)
    with torch.no_grad():
        ref = model(x).numpy()
    got = caffe_forward(net, x.numpy())
    assert got.shape == ref.shape == (2, 2048)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999
    oc.check_shapes(net, oc.simulate_shapes(net), "model.onnx")  # the guard passes


def test_strong_baseline_prototxt(archs):
    net = oc.convert_model(archs[("reid-strong-baseline", "after")][1], output_name="output")
    text = oc.render_prototxt(net)
    pool = pool_layer(net)
    p = pool.params["pooling_param"]
    assert (p["kernel_h"], p["stride_h"], p["pad_h"], str(p["round_mode"])) == (3, 2, 1, "FLOOR")
    assert net.expected[pool.tops[0]] == (2, 64, 64, 32)
    assert "round_mode: FLOOR" in text and "round_mode: CEIL" not in text
    assert "global_pooling: true" in text
    assert [l.type for l in net.layers[:2]] == ["Convolution", "Pooling"]  # no stem ReLU
    assert [l.type for l in net.layers[-4:]] == ["Pooling", "Flatten", "BatchNorm", "Scale"]
    bn, scale = net.layers[-2:]
    assert bn.params["batch_norm_param"] == {"use_global_stats": True, "eps": pytest.approx(1e-5)}
    assert bn.blobs[2].tolist() == [1.0]  # scale factor
    assert scale.params["scale_param"]["bias_term"] is True and scale.tops == ["output"]
    assert net.input_name == "image" and net.input_shape == (1, 3, 256, 128)
    assert 'top: "output"' in text and text.count('top: "output"') == 1
    assert text == oc.render_prototxt(oc.convert_model(archs[("reid-strong-baseline", "after")][1]))


def test_fastreid_prototxt(archs):
    net = oc.convert_model(archs[("fastreid-bagtricks-r50", "after")][1], output_name="feat")
    text = oc.render_prototxt(net)
    p = pool_layer(net).params["pooling_param"]
    assert (p["kernel_h"], p["stride_h"], p["pad_h"], str(p["round_mode"])) == (3, 2, 0, "CEIL")
    assert net.expected[pool_layer(net).tops[0]] == (2, 64, 64, 32)
    assert "round_mode: CEIL" in text and "round_mode: FLOOR" not in text
    # the in-model normalisation (x - mean) / std: Bias(-mean) then Scale(1/std), per channel
    bias, scale = net.layers[0], net.layers[1]
    assert (bias.type, scale.type) == ("Bias", "Scale")
    np.testing.assert_allclose(bias.blobs[0], [-123.675, -116.28, -103.53], rtol=1e-6)
    np.testing.assert_allclose(scale.blobs[0], 1 / np.array([58.395, 57.12, 57.375]), rtol=1e-6)
    assert [l.type for l in net.layers[2:5]] == ["Convolution", "ReLU", "Pooling"]  # stem ReLU
    # BatchNorm2d neck on (B, 2048, 1, 1), then fast-reid's feat[..., 0, 0] (two Gathers of index 0
    # on size-1 axes: a Reshape, then the Flatten); the final top is renamed
    assert [l.type for l in net.layers[-5:]] == ["Pooling", "BatchNorm", "Scale", "Reshape", "Flatten"]
    assert net.expected[net.layers[-3].tops[0]] == (2, 2048, 1, 1)
    assert net.layers[-1].tops == ["feat"] and net.output_name == "feat"


@pytest.mark.parametrize("neck", ["after", "before"])
def test_before_has_no_neck(archs, neck):
    net = oc.convert_model(archs[("reid-strong-baseline", neck)][1])
    assert any(l.type == "BatchNorm" for l in net.layers) == (neck == "after")


# --------------------------------------------------------------------------- the shape guard


def test_ceil_rounding_would_give_65x33_and_the_guard_names_the_pool(archs):
    """Caffe's default CEIL on reid-strong-baseline's k3 s2 p1 floor max-pool: 65x33 maps."""
    net = oc.convert_model(archs[("reid-strong-baseline", "after")][1])
    pool = pool_layer(net)
    pool.params["pooling_param"]["round_mode"] = oc.Ident("CEIL")
    shapes = oc.simulate_shapes(net)
    assert shapes[pool.tops[0]] == (2, 64, 65, 33)
    with pytest.raises(StageError) as err:
        oc.check_shapes(net, shapes, "model.prototxt")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'/base/maxpool/MaxPool'" in msg and "2x64x65x33 in Caffe" in msg and "2x64x64x32 in the ONNX" in msg


def test_floor_on_fastreid_would_give_63x31(archs):
    net = oc.convert_model(archs[("fastreid-bagtricks-r50", "after")][1])
    pool = pool_layer(net)
    pool.params["pooling_param"]["round_mode"] = oc.Ident("FLOOR")
    with pytest.raises(StageError, match=r"MaxPool.*2x64x63x31 in Caffe but 2x64x64x32"):
        oc.check_shapes(net, oc.simulate_shapes(net), "model.prototxt")


def test_guard_reports_missing_blob(archs):
    net = oc.convert_model(archs[("reid-strong-baseline", "before")][1])
    shapes = oc.simulate_shapes(net)
    del shapes["output"]
    with pytest.raises(StageError, match=r"'output' missing in Caffe"):
        oc.check_shapes(net, shapes, "model.prototxt")


@pytest.mark.parametrize(
    "size,kernel,stride,pad,ceil,want",
    [
        (128, 3, 2, 1, False, 64),
        (128, 3, 2, 1, True, 65),  # reid-strong-baseline
        (128, 3, 2, 0, True, 64),
        (128, 3, 2, 0, False, 63),  # fast-reid
        (64, 3, 2, 1, False, 32),
        (64, 3, 2, 1, True, 33),
        (5, 2, 2, 1, True, 3),  # last window dropped (starts in the pad)
    ],
)
def test_caffe_pooling_formula(size, kernel, stride, pad, ceil, want):
    assert oc._pooled(size, kernel, stride, pad, ceil) == want
    torch_out = F.max_pool2d(torch.zeros(1, 1, size, size), kernel, stride, pad, ceil_mode=ceil).shape[-1]
    assert torch_out == want  # ONNX/PyTorch ceil_mode follow the same rule as Caffe CEIL


# --------------------------------------------------------------------------- operator coverage


class Ops(nn.Module):
    """Input normalisation, dilated and grouped conv, ceil pooling, mean over H,W, view(B, -1)
    (Shape/Gather/Unsqueeze/Concat/Reshape), BatchNorm1d, MatMul + Add."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=2, dilation=2)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.bn = nn.BatchNorm1d(8)
        self.w = nn.Parameter(torch.randn(8, 5))
        self.b = nn.Parameter(torch.randn(5))
        self.register_buffer("mean", torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([2.0, 3.0, 4.0]).view(1, 3, 1, 1))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = self.pool(F.leaky_relu(self.c2(F.relu(self.c1(x))), 0.1))
        y = x.mean((2, 3), keepdim=True)
        y = self.bn(y.view(y.size(0), -1))
        return y @ self.w + self.b


class Head(nn.Module):
    """Linear (Gemm), a mean without keepdim, fast-reid's [..., 0, 0] indexing, average pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.avg = nn.AvgPool2d(2, 2)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.avg(self.conv(x)) * 0.5 + 1.0
        a = self.bn(F.adaptive_avg_pool2d(x, 1))[..., 0, 0]
        return self.fc(a) + x.mean((2, 3))[:, :4]


def test_ops_module_matches_torch():
    torch.manual_seed(0)
    module = Ops().eval()
    proto = export_module(module)
    types = {n.op_type for n in proto.graph.node}
    assert {"Shape", "Gather", "Concat", "Reshape", "MatMul", "ReduceMean", "Sub", "Div"} <= types
    net = oc.convert_model(proto)
    kinds = [l.type for l in net.layers]
    assert kinds == [
        "Bias",
        "Scale",
        "Convolution",
        "ReLU",
        "Convolution",
        "ReLU",
        "Pooling",
        "Pooling",
        "Flatten",
        "BatchNorm",
        "Scale",
        "InnerProduct",
    ]
    assert net.layers[4].params["convolution_param"]["group"] == 4
    assert net.layers[2].params["convolution_param"]["dilation"] == [2]
    assert net.layers[5].params["relu_param"]["negative_slope"] == pytest.approx(0.1)
    assert str(net.layers[6].params["pooling_param"]["round_mode"]) == "CEIL"
    x = torch.randn(3, 3, 20, 12)
    with torch.no_grad():
        ref = module(x).numpy()
    np.testing.assert_allclose(caffe_forward(net, x.numpy()), ref, rtol=1e-5, atol=1e-5)
    oc.check_shapes(net, oc.simulate_shapes(net, 2), "m")


def test_slice_of_a_feature_is_refused_with_its_node():
    torch.manual_seed(0)
    with pytest.raises(StageError) as err:
        oc.convert_model(export_module(Head()))
    msg = str(err.value)
    assert "Slice (node" in msg and "nothing was written" in msg and "\n" not in msg


def test_gemm_gather_avgpool_mul_add_match_torch():
    torch.manual_seed(1)

    class M(Head):
        def forward(self, x):
            x = self.avg(self.conv(x)) * 0.5 + 1.0
            a = self.bn(F.adaptive_avg_pool2d(x, 1))[..., 0, 0]
            return self.fc(a) - 0.25 + self.fc(x.mean((2, 3)))

    module = M().eval()
    with torch.no_grad():
        module.bn.running_var.uniform_(0.5, 2)
        module.bn.running_mean.uniform_(-1, 1)
    proto = export_module(module)
    assert {"Gemm", "Gather", "AveragePool", "Mul", "Add", "ReduceMean"} <= {n.op_type for n in proto.graph.node}
    net = oc.convert_model(proto)
    x = torch.randn(3, 3, 20, 12)
    with torch.no_grad():
        ref = module(x).numpy()
    np.testing.assert_allclose(caffe_forward(net, x.numpy()), ref, rtol=1e-5, atol=1e-5)
    kinds = [l.type for l in net.layers]
    assert kinds.count("InnerProduct") == 2 and "Eltwise" in kinds and "Reshape" in kinds


# --------------------------------------------------------------------------- refusals


def _graph(nodes, inputs, outputs, inits=(), opset=11) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_unsupported_ops_are_listed_with_node_names():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.erf(torch.sin(F.relu(x))).flatten(1)

    with pytest.raises(StageError) as err:
        oc.convert_model(export_module(Odd()), source="model.onnx")
    msg = str(err.value)
    assert msg.startswith("model.onnx: 2 ONNX node(s) have no exact Caffe mapping: ")
    assert "Sin (node /Sin)" in msg and "Erf (node /Erf)" in msg and "Relu" not in msg
    assert "\n" not in msg


def test_dynamic_spatial_size_is_refused():
    proto = export_module(nn.Conv2d(3, 4, 3), dynamic={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b"}})
    with pytest.raises(StageError, match=r"input .x. has a dynamic channel/spatial size \(bx3xhxw\).*fixed C, H and W"):
        oc.convert_model(proto, source="x.onnx")


def test_asymmetric_pool_pads_are_refused():
    node = helper.make_node(
        "MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]
    )
    with pytest.raises(StageError, match=r"MaxPool \(node pool: asymmetric pads \[0, 0, 1, 1\]"):
        oc.convert_model(_graph([node], [_vi("x", ["b", 3, 5, 5])], [_vi("y", None)]))


def test_fixed_batch_reshape_is_refused():
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, -1])
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="view")
    with pytest.raises(StageError, match=r"Reshape \(node view: target shape \[2, -1\] fixes the batch"):
        oc.convert_model(_graph([node], [_vi("x", ["b", 3, 4, 4])], [_vi("y", None)], [shape]))


def test_graph_shape_problems():
    relu = helper.make_node("Relu", ["x"], ["y"], name="r")
    with pytest.raises(StageError, match="2 inputs"):
        oc.convert_model(_graph([relu], [_vi("x", ["b", 3, 4, 4]), _vi("z", ["b", 3, 4, 4])], [_vi("y", None)]))
    with pytest.raises(StageError, match=r"input 'x' has shape \['b', 3\]"):
        oc.convert_model(_graph([relu], [_vi("x", ["b", 3])], [_vi("y", None)]))
    with pytest.raises(StageError, match="output_name: 'x' is the name of the input blob"):
        oc.convert_model(_graph([relu], [_vi("x", ["b", 3, 4, 4])], [_vi("y", None)]), output_name="x")
    with pytest.raises(StageError, match="not a usable blob name"):
        oc.convert_model(_graph([relu], [_vi("x", ["b", 3, 4, 4])], [_vi("y", None)]), output_name="a b")


def test_output_name_collision_renames_the_other_blob():
    nodes = [
        helper.make_node("Relu", ["x"], ["output"], name="r1"),
        helper.make_node("Relu", ["output"], ["y"], name="r2"),
    ]
    net = oc.convert_model(_graph(nodes, [_vi("x", ["b", 3, 4, 4])], [_vi("y", None)]), output_name="output")
    assert [l.tops for l in net.layers] == [["output_orig"], ["output"]]
    assert net.layers[1].bottoms == ["output_orig"]


def test_unreadable_onnx_files(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xff\xff\xff not an onnx file")
    with pytest.raises(StageError, match=r"garbage.onnx: not a readable ONNX model"):
        oc.load_onnx(garbage)
    with pytest.raises(StageError, match=r"missing.onnx: not found"):
        oc.load_onnx(tmp_path / "missing.onnx")


def _spec(tmp_path, onnx_bytes: bytes) -> str:
    (tmp_path / "model.onnx").write_bytes(onnx_bytes)
    spec = {
        "schema": 1,
        "target": "caffe",
        "stage": "convert",
        "workspace": str(tmp_path),
        "inputs": {"onnx": "model.onnx"},
        "out_dir": "out",
        "params": {"output_name": "output"},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_convert_stage_refuses_before_writing_anything(tmp_path, capsys):
    class Odd(nn.Module):
        def forward(self, x):
            return torch.sin(x).flatten(1)

    spec = _spec(tmp_path, export_module(Odd()).SerializeToString())
    with pytest.raises(SystemExit) as exc:
        main(caffe_convert.run, [spec])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Sin (node /Sin)" in err and "\n" not in err
    assert list((tmp_path / "out").iterdir()) == []


def test_convert_stage_without_caffe_writes_nothing(tmp_path, capsys):
    """On the host the mapping succeeds, then pycaffe is missing: one line, still no files."""
    try:
        import caffe  # noqa: F401

        pytest.skip("pycaffe is importable here")
    except ImportError:
        pass
    spec = _spec(tmp_path, export_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())).SerializeToString())
    with pytest.raises(SystemExit) as exc:
        main(caffe_convert.run, [spec])
    assert exc.value.code == 2
    assert "pycaffe is not importable" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- caffemodel wire scan


def _varint(v: int) -> bytes:
    out = b""
    while True:
        byte = v & 0x7F
        v >>= 7
        out += bytes([byte | (0x80 if v else 0)])
        if not v:
            return out


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _blob(shape, values: int) -> bytes:
    dims = b"".join(_varint(d) for d in shape)
    return _field(7, _field(1, dims)) + _field(5, np.zeros(values, np.float32).tobytes())


def _caffemodel(layers) -> bytes:
    body = _field(1, b"net")
    for name, blobs in layers:
        body += _field(
            100, _field(1, name.encode()) + _field(2, b"Convolution") + b"".join(_field(7, b) for b in blobs)
        )
    return body


def test_scan_caffemodel_reads_names_and_shapes(tmp_path):
    path = tmp_path / "m.caffemodel"
    path.write_bytes(_caffemodel([("conv", [_blob((4, 3, 3, 3), 108), _blob((4,), 4)]), ("relu", [])]))
    assert scan_caffemodel(path) == {"conv": [(4, 3, 3, 3), (4,)]}


def test_scan_caffemodel_refuses_truncated_and_inconsistent(tmp_path):
    good = _caffemodel([("conv", [_blob((4, 3, 3, 3), 108)])])
    path = tmp_path / "m.caffemodel"
    path.write_bytes(good[:-10])
    with pytest.raises(StageError, match=r"m.caffemodel: not a valid caffemodel \(a field runs past"):
        scan_caffemodel(path)
    path.write_bytes(_caffemodel([("conv", [_blob((4, 3, 3, 3), 100)])]))
    with pytest.raises(StageError, match=r"layer 'conv' blob 0 holds 100 values for shape 4x3x3x3"):
        scan_caffemodel(path)
    path.write_bytes(b"")
    with pytest.raises(StageError, match="holds no layer weights"):
        scan_caffemodel(path)


def test_openblas_coretype_from_flags():
    assert openblas_coretype({"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}) == "SkylakeX"
    assert openblas_coretype({"avx2", "fma", "avx512f"}) == "Haswell"
    assert openblas_coretype({"sse2"}) == ""


def test_prototxt_floats_round_trip():
    assert oc._value(9.999999747378752e-06) == "9.999999747378752e-06"
    assert np.float32(float(oc._value(1e-5))) == np.float32(1e-5)
    assert oc._value('a"b') == '"a\\"b"' and oc._value(True) == "true" and oc._value(oc.Ident("MAX")) == "MAX"
    assert math.isclose(float(oc._value(0.1)), 0.1, rel_tol=1e-7)
