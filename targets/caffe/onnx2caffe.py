"""ONNX graph -> Caffe net description (pure onnx + numpy; no caffe import).

Runs on the host (tests, Python 3.11, onnx 1.23) and in the caffe image (Python 3.9, onnx 1.15),
so it keeps to APIs both have. The result, :class:`CaffeNet`, holds everything ``convert.py``
needs and nothing that needs pycaffe:

- ``layers``: Caffe layer specs in graph order, each with its weight arrays and the ONNX node
  it came from;
- ``expected``: for every Caffe top, the shape ONNX shape inference gives the tensor it stands
  for at ``probe_batch`` (the shape guard compares Caffe's blob shapes with these);
- :func:`render_prototxt` writes the deterministic prototxt text;
- :func:`simulate_shapes` computes Caffe's blob shapes with Caffe's own formulas (pooling
  CEIL/FLOOR included), so the shape guard also runs where there is no Caffe.

Everything that cannot be mapped exactly is refused, as a whole list, before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from targets.common.contract import StageError

#: The batch size the graph is analysed (and the shape guard run) at. Not 1, so that a layer that
#: drops or fixes the batch axis shows up as a shape difference.
PROBE_BATCH = 2

Shape = Tuple[int, ...]


class Ident(str):
    """A prototxt enum value, written without quotes (``pool: MAX``)."""


@dataclass
class Layer:
    name: str
    type: str
    bottoms: List[str]
    tops: List[str]
    params: Dict[str, Any] = field(default_factory=dict)  # e.g. {"pooling_param": {...}}
    blobs: List[np.ndarray] = field(default_factory=list)
    onnx_node: str = ""
    onnx_op: str = ""


@dataclass
class CaffeNet:
    name: str
    input_name: str
    input_shape: Shape  # as written in the prototxt (batch 1 when the ONNX batch is dynamic)
    layers: List[Layer]
    output_name: str
    probe_batch: int
    expected: Dict[str, Shape]  # top -> shape at probe_batch (from ONNX shape inference)
    onnx_tensor: Dict[str, str]  # top -> the ONNX tensor it stands for ("" when internal)
    dynamic_batch: bool = True

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def probe_input_shape(self) -> Shape:
        return (self.probe_batch,) + tuple(self.input_shape[1:])


class _Unsupported(Exception):
    """One node that cannot be mapped; collected, then reported together."""


# --------------------------------------------------------------------------- loading


def load_onnx(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run torch.export first")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError/RuntimeError/ValueError by version
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise StageError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {first}); run torch.export again"
        ) from None
    if not model.graph.node:
        raise StageError(f"{path}: the ONNX graph has no nodes; run torch.export again")
    return model


# --------------------------------------------------------------------------- small helpers


def _attrs(node: onnx.NodeProto) -> Dict[str, Any]:
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _dims(value_info: onnx.ValueInfoProto) -> Optional[List[Any]]:
    """Dims as ints, or the dim_param string / None where unknown; None if no shape at all."""
    ttype = value_info.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    out: List[Any] = []
    for dim in ttype.shape.dim:
        if dim.HasField("dim_value"):
            out.append(int(dim.dim_value))
        else:
            out.append(dim.dim_param or None)
    return out


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


# --------------------------------------------------------------------------- constant folding


def _fold_node(
    node: onnx.NodeProto, values: List[Optional[np.ndarray]], in_shapes: List[Optional[Shape]]
) -> Optional[List[np.ndarray]]:
    """numpy evaluation of the shape/constant ops torch exports; None when not foldable."""
    op, at = node.op_type, _attrs(node)
    if op == "Constant":
        if "value" in at:
            return [numpy_helper.to_array(at["value"])]
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
            if key in at:
                return [np.array(at[key], dtype=dtype)]
        for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
            if key in at:
                return [np.array(list(at[key]), dtype=dtype)]
        return None
    if op == "Shape":
        shape = in_shapes[0]
        if shape is None:
            return None
        end = at.get("end")  # opset >= 15: a slice of the shape
        return [np.array(shape[at.get("start", 0) : end], dtype=np.int64)]
    if not values or any(v is None for v, name in zip(values, node.input) if name):
        return None
    x = values[0]
    if op == "Identity":
        return [x]
    if op == "Cast":
        return [x.astype(helper.tensor_dtype_to_np_dtype(at["to"]))]
    if op == "Gather":
        return [np.take(x, values[1].astype(np.int64), axis=int(at.get("axis", 0)))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = at.get("axes")
        if axes is None and len(values) > 1 and values[1] is not None:
            axes = values[1].tolist()
        if op == "Unsqueeze":
            if axes is None:
                return None
            out = x
            rank = x.ndim + len(axes)
            for axis in sorted(a % rank for a in axes):
                out = np.expand_dims(out, axis)
            return [out]
        if axes is None:
            return [np.squeeze(x)]
        return [np.squeeze(x, axis=tuple(a % x.ndim for a in axes))]
    if op == "Concat":
        return [np.concatenate([np.atleast_1d(v) for v in values], axis=int(at["axis"]))]
    if op == "Reshape":
        shape = [int(s) for s in values[1].tolist()]
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Slice":
        if "starts" in at:  # opset < 10
            starts, ends = at["starts"], at["ends"]
            axes = at.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends = values[1].tolist(), values[2].tolist()
            axes = values[3].tolist() if len(values) > 3 and values[3] is not None else list(range(len(starts)))
            steps = values[4].tolist() if len(values) > 4 and values[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            index[a] = slice(int(s), int(e), int(st))
        return [x[tuple(index)]]
    if op in ("Add", "Sub", "Mul", "Div") and len(values) == 2:
        a, b = values
        if op == "Div" and np.issubdtype(a.dtype, np.integer):  # ONNX truncates toward zero
            return [np.trunc(np.true_divide(a, b)).astype(a.dtype)]
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        return [fn(a, b).astype(a.dtype)]
    return None


FOLDABLE = {
    "Constant",
    "Shape",
    "Identity",
    "Cast",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Reshape",
    "Slice",
    "Add",
    "Sub",
    "Mul",
    "Div",
}
#: Initializers larger than this are left out of the copy that shape inference sees (their shape
#: is declared as a graph input instead): inference needs values only for small shape tensors.
SKELETON_MIN_ELEMENTS = 4096


class Constants:
    """The graph's initializers as numpy arrays, converted on first use."""

    def __init__(self, graph: onnx.GraphProto):
        self.protos = {init.name: init for init in graph.initializer}
        self.arrays: Dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.protos or name in self.arrays

    def get(self, name: str) -> Optional[np.ndarray]:
        if name in self.arrays:
            return self.arrays[name]
        proto = self.protos.get(name)
        if proto is None:
            return None
        self.arrays[name] = numpy_helper.to_array(proto)
        return self.arrays[name]

    def set(self, name: str, value: np.ndarray) -> None:
        self.arrays[name] = value


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the large weights (declared as typed graph inputs instead)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    graph_inputs = {vi.name for vi in light.graph.input}
    keep = []
    for init in light.graph.initializer:
        if int(np.prod(init.dims)) < SKELETON_MIN_ELEMENTS:
            keep.append(init)
        elif init.name not in graph_inputs:
            light.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del light.graph.initializer[:]
    light.graph.initializer.extend(keep)
    return light


def _infer_shapes(model: onnx.ModelProto, source: str) -> Dict[str, Optional[Shape]]:
    """Static shape of every tensor (None where inference gives none), ONNX's own inference."""
    try:
        inferred = shape_inference.infer_shapes(_skeleton(model), strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - InferenceError's class moved between onnx versions
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StageError(
            f"{source}: ONNX shape inference failed ({first}); "
            "check the export (onnx.checker) and run torch.export again"
        ) from None
    table: Dict[str, Optional[Shape]] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _dims(vi)
        table[vi.name] = tuple(dims) if dims is not None and all(isinstance(d, int) for d in dims) else None
    for init in model.graph.initializer:
        table[init.name] = tuple(int(d) for d in init.dims)
    return table


def fold_constants(model: onnx.ModelProto, source: str) -> Tuple[Dict[str, Optional[Shape]], set]:
    """Replace (in place) every node whose outputs are computable - constants, Shape of a static
    tensor - with initializers. Returns the shapes of the folded graph and the names of folded
    tensors that came from a Shape (their values hold the probe batch)."""
    batch_dependent: set = set()
    for _ in range(8):
        shapes = _infer_shapes(model, source)
        consts = Constants(model.graph)
        kept, changed = [], False
        for node in model.graph.node:
            outs = None
            if node.op_type in FOLDABLE and (
                node.op_type in ("Constant", "Shape") or all(name in consts for name in node.input if name)
            ):
                values = [consts.get(name) if name else None for name in node.input]
                outs = _fold_node(node, values, [shapes.get(name) for name in node.input])
            if outs is None or len(outs) < len([o for o in node.output if o]):
                kept.append(node)
                continue
            changed = True
            derived = node.op_type == "Shape" or any(n in batch_dependent for n in node.input)
            for name, value in zip(node.output, outs):
                value = np.asarray(value)
                consts.set(name, value)
                consts.protos[name] = numpy_helper.from_array(value, name)
                model.graph.initializer.append(consts.protos[name])
                if derived:
                    batch_dependent.add(name)
        if not changed:
            return shapes, batch_dependent
        del model.graph.node[:]
        model.graph.node.extend(kept)
        _drop_unused_initializers(model)
    raise StageError(f"{source}: constant folding did not settle after 8 passes")


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    dropped = {init.name for init in model.graph.initializer if init.name not in used}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [vi for vi in model.graph.input if vi.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


# --------------------------------------------------------------------------- the graph input


def _graph_input(model: onnx.ModelProto, source: str) -> Tuple[onnx.ValueInfoProto, List[Any]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(vi.name for vi in inputs) or "none"
        raise StageError(
            f"{source}: the graph has {len(inputs)} inputs ({names}); Caffe conversion needs exactly one image input"
        )
    vi = inputs[0]
    if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise StageError(f"{source}: input {vi.name!r} is not float32; export the model in fp32")
    dims = _dims(vi)
    if dims is None or len(dims) != 4:
        raise StageError(f"{source}: input {vi.name!r} has shape {dims}, expected (batch, channels, height, width)")
    if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        shown = "x".join(str(d) if d is not None else "?" for d in dims)
        raise StageError(
            f"{source}: input {vi.name!r} has a dynamic channel/spatial size ({shown}); "
            "Caffe needs fixed C, H and W: export with only the batch axis dynamic"
        )
    return vi, dims


def _fix_batch(model: onnx.ModelProto, input_name: str, batch: int) -> None:
    """Set the (dynamic) batch dim of the input to ``batch`` and forget stale inferred shapes."""
    for vi in model.graph.input:
        if vi.name == input_name:
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_value = batch
    del model.graph.value_info[:]
    for vi in model.graph.output:
        vi.type.tensor_type.ClearField("shape")


# --------------------------------------------------------------------------- mapping


class _Mapper:
    """ONNX nodes -> Caffe layers; each ``op_<Type>`` maps one node or raises _Unsupported."""

    def __init__(
        self,
        model: onnx.ModelProto,
        shapes: Dict[str, Optional[Shape]],
        batch_dependent: set,
        input_name: str,
        dynamic_batch: bool,
    ):
        self.shapes = shapes
        self.batch_dependent = batch_dependent
        self.dynamic_batch = dynamic_batch
        self.consts = Constants(model.graph)
        self.alias: Dict[str, str] = {input_name: input_name}
        self.layers: List[Layer] = []
        self.expected: Dict[str, Shape] = {}
        self.onnx_tensor: Dict[str, str] = {}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.skip: set = set()  # nodes already consumed by a fusion
        self.layer_names: set = set()

    # -- bookkeeping
    def blob(self, tensor: str) -> str:
        if tensor not in self.alias:
            raise _Unsupported(f"input {tensor!r} is not produced by a mapped layer")
        return self.alias[tensor]

    def shape(self, tensor: str) -> Shape:
        shape = self.shapes.get(tensor)
        if shape is None:
            raise _Unsupported(f"ONNX shape inference gives no static shape for {tensor!r}")
        return shape

    def const(self, tensor: str) -> Optional[np.ndarray]:
        return self.consts.get(tensor)

    def unique_name(self, name: str) -> str:
        base, k = name, 1
        while name in self.layer_names:
            k += 1
            name = f"{base}_{k}"
        self.layer_names.add(name)
        return name

    def add(self, layer: Layer, node: onnx.NodeProto, top_shapes: Dict[str, Tuple[Shape, str]]) -> None:
        layer.name = self.unique_name(layer.name)
        layer.onnx_node, layer.onnx_op = node.name, node.op_type
        self.layers.append(layer)
        for top in layer.tops:
            shape, tensor = top_shapes[top]
            self.expected[top] = tuple(int(v) for v in shape)
            self.onnx_tensor[top] = tensor

    def single(
        self,
        node: onnx.NodeProto,
        label: str,
        ltype: str,
        params: Dict[str, Any],
        blobs: Sequence[np.ndarray] = (),
        bottom: Optional[str] = None,
    ) -> None:
        out = node.output[0]
        bottom = bottom if bottom is not None else self.blob(node.input[0])
        self.add(
            Layer(label, ltype, [bottom], [out], params, [np.asarray(b, np.float32) for b in blobs]),
            node,
            {out: (self.shape(out), out)},
        )
        self.alias[out] = out

    # -- dispatch
    def run(self, nodes: List[Tuple[int, onnx.NodeProto]]) -> List[str]:
        problems = []
        for index, node in nodes:
            if id(node) in self.skip:
                continue
            label = _node_label(node, index)
            handler = getattr(self, "op_" + node.op_type, None)
            try:
                if handler is None:
                    raise _Unsupported("")
                handler(node, label)
            except _Unsupported as exc:
                reason = str(exc)
                problems.append(f"{node.op_type} (node {label}{': ' + reason if reason else ''})")
                for out in node.output:  # keep going to report every problem at once
                    self.alias.setdefault(out, out)
        return problems

    def used_outputs(self, node: onnx.NodeProto) -> List[str]:
        return [o for o in node.output if o and (o in self.consumers or o in self.graph_outputs)]

    # -- operators
    def op_Conv(self, node, label):
        at = _attrs(node)
        weight = self.const(node.input[1])
        bias = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if weight is None or (len(node.input) > 2 and node.input[2] and bias is None):
            raise _Unsupported("weights are not constant")
        if weight.ndim != 4:
            raise _Unsupported(f"only 2-D convolution maps to Caffe, weight rank {weight.ndim}")
        kh, kw = at.get("kernel_shape", weight.shape[2:])
        pads = _symmetric_pads(at, self.shape(node.input[0]), (kh, kw))
        sh, sw = at.get("strides", [1, 1])
        dh, dw = at.get("dilations", [1, 1])
        conv = {
            "num_output": int(weight.shape[0]),
            "bias_term": bias is not None,
            "pad_h": pads[0],
            "pad_w": pads[1],
            "kernel_h": int(kh),
            "kernel_w": int(kw),
            "stride_h": int(sh),
            "stride_w": int(sw),
        }
        if (dh, dw) != (1, 1):
            conv["dilation"] = [int(dh)] if dh == dw else [int(dh), int(dw)]
        if int(at.get("group", 1)) != 1:
            conv["group"] = int(at["group"])
        blobs = [weight] + ([bias] if bias is not None else [])
        self.single(node, label, "Convolution", {"convolution_param": conv}, blobs)

    def op_Relu(self, node, label):
        self.single(node, label, "ReLU", {})

    def op_LeakyRelu(self, node, label):
        alpha = float(_attrs(node).get("alpha", 0.01))
        self.single(node, label, "ReLU", {"relu_param": {"negative_slope": alpha}})

    def op_MaxPool(self, node, label):
        at = _attrs(node)
        if len(self.used_outputs(node)) > 1:
            raise _Unsupported("the Indices output is used")
        if any(d != 1 for d in at.get("dilations", [1, 1])):
            raise _Unsupported("dilated pooling has no Caffe equivalent")
        if int(at.get("storage_order", 0)) != 0:
            raise _Unsupported("storage_order 1")
        self.pool(node, label, "MAX", at)

    def op_AveragePool(self, node, label):
        at = _attrs(node)
        pads = at.get("pads", [0, 0, 0, 0])
        if any(pads) and not int(at.get("count_include_pad", 0)):
            raise _Unsupported("padded average pooling with count_include_pad=0 (Caffe counts the padding)")
        self.pool(node, label, "AVE", at)

    def pool(self, node, label, kind, at):
        in_shape = self.shape(node.input[0])
        if len(in_shape) != 4:
            raise _Unsupported(f"only 2-D pooling maps to Caffe, input rank {len(in_shape)}")
        kh, kw = at["kernel_shape"]
        pad_h, pad_w = _symmetric_pads(at, in_shape, (kh, kw))
        if pad_h >= kh or pad_w >= kw:
            raise _Unsupported(f"padding {pad_h},{pad_w} not smaller than the kernel {kh}x{kw}")
        sh, sw = at.get("strides", [1, 1])
        ceil = bool(int(at.get("ceil_mode", 0)))
        params = {
            "pool": Ident(kind),
            "kernel_h": int(kh),
            "kernel_w": int(kw),
            "stride_h": int(sh),
            "stride_w": int(sw),
            "pad_h": pad_h,
            "pad_w": pad_w,
            "round_mode": Ident("CEIL" if ceil else "FLOOR"),
        }
        self.single(node, label, "Pooling", {"pooling_param": params})

    def op_GlobalAveragePool(self, node, label):
        if len(self.shape(node.input[0])) != 4:
            raise _Unsupported("only 4-D input maps to Caffe global pooling")
        self.single(node, label, "Pooling", {"pooling_param": {"pool": Ident("AVE"), "global_pooling": True}})

    def op_GlobalMaxPool(self, node, label):
        if len(self.shape(node.input[0])) != 4:
            raise _Unsupported("only 4-D input maps to Caffe global pooling")
        self.single(node, label, "Pooling", {"pooling_param": {"pool": Ident("MAX"), "global_pooling": True}})

    def op_ReduceMean(self, node, label):
        at = _attrs(node)
        in_shape = self.shape(node.input[0])
        axes = at.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.const(node.input[1])
            axes = None if value is None else value.tolist()
        if len(in_shape) != 4 or axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            raise _Unsupported(f"only the mean over H and W of a 4-D tensor maps to Caffe (axes {axes})")
        out = node.output[0]
        pool = {"pooling_param": {"pool": Ident("AVE"), "global_pooling": True}}
        if int(at.get("keepdims", 1)):
            self.single(node, label, "Pooling", pool)
            return
        pooled = out + "/pooled"
        n, c = in_shape[:2]
        self.add(
            Layer(label, "Pooling", [self.blob(node.input[0])], [pooled], pool), node, {pooled: ((n, c, 1, 1), "")}
        )
        self.add(Layer(label + "/flatten", "Flatten", [pooled], [out], {}), node, {out: (self.shape(out), out)})
        self.alias[out] = out

    def op_BatchNormalization(self, node, label):
        at = _attrs(node)
        if len(self.used_outputs(node)) > 1 or int(at.get("training_mode", 0)):
            raise _Unsupported("training-mode BatchNormalization (running statistics outputs)")
        arrays = [self.const(name) for name in node.input[1:5]]
        if any(a is None for a in arrays):
            raise _Unsupported("scale/bias/mean/var are not constant")
        gamma, beta, mean, var = (np.asarray(a, np.float32).reshape(-1) for a in arrays)
        in_shape = self.shape(node.input[0])
        if len(in_shape) < 2 or in_shape[1] != mean.size:
            raise _Unsupported(f"{mean.size} statistics for input shape {_fmt(in_shape)}")
        eps = float(at.get("epsilon", 1e-5))
        out = node.output[0]
        normed = out + "/bn"
        self.add(
            Layer(
                label,
                "BatchNorm",
                [self.blob(node.input[0])],
                [normed],
                {"batch_norm_param": {"use_global_stats": True, "eps": eps}},
                [mean, var, np.ones(1, np.float32)],
            ),
            node,
            {normed: (self.shape(out), "")},
        )
        self.add(
            Layer(label + "/scale", "Scale", [normed], [out], {"scale_param": {"bias_term": True}}, [gamma, beta]),
            node,
            {out: (self.shape(out), out)},
        )
        self.alias[out] = out

    def op_Add(self, node, label):
        a, b = node.input[0], node.input[1]
        ca, cb = self.const(a), self.const(b)
        if ca is None and cb is None:
            sa, sb = self.shape(a), self.shape(b)
            if sa != sb:
                raise _Unsupported(f"broadcasting add {_fmt(sa)} + {_fmt(sb)}")
            out = node.output[0]
            self.add(
                Layer(
                    label,
                    "Eltwise",
                    [self.blob(a), self.blob(b)],
                    [out],
                    {"eltwise_param": {"operation": Ident("SUM")}},
                ),
                node,
                {out: (self.shape(out), out)},
            )
            self.alias[out] = out
            return
        x, c = (a, cb) if cb is not None else (b, ca)
        self.channel_op(node, label, x, c, "Bias")

    def op_Sub(self, node, label):
        c = self.const(node.input[1])
        if c is None or self.const(node.input[0]) is not None:
            raise _Unsupported("only tensor minus constant maps to Caffe")
        self.channel_op(node, label, node.input[0], -np.asarray(c, np.float32), "Bias")

    def op_Mul(self, node, label):
        a, b = node.input[0], node.input[1]
        ca, cb = self.const(a), self.const(b)
        if (ca is None) == (cb is None):
            raise _Unsupported("only tensor times constant maps to Caffe")
        x, c = (a, cb) if cb is not None else (b, ca)
        self.channel_op(node, label, x, c, "Scale")

    def op_Div(self, node, label):
        c = self.const(node.input[1])
        if c is None or self.const(node.input[0]) is not None:
            raise _Unsupported("only tensor divided by constant maps to Caffe")
        c = np.asarray(c, np.float32)
        if np.any(c == 0):
            raise _Unsupported("division by zero in the constant")
        self.channel_op(node, label, node.input[0], np.float32(1.0) / c, "Scale")

    def channel_op(self, node, label, x: str, c: np.ndarray, ltype: str):
        """x (+|*) per-channel constant -> Caffe Bias / Scale on axis 1."""
        x_shape, out = self.shape(x), node.output[0]
        if self.shape(out) != x_shape:
            raise _Unsupported(f"the constant {_fmt(np.shape(c))} broadcasts the input {_fmt(x_shape)}")
        vec = _per_channel(np.asarray(c, np.float32), x_shape)
        if vec is None:
            raise _Unsupported(f"constant of shape {_fmt(np.shape(c))} is not per-channel for input {_fmt(x_shape)}")
        params = (
            {"bias_param": {"axis": 1, "num_axes": 1}}
            if ltype == "Bias"
            else {"scale_param": {"axis": 1, "num_axes": 1, "bias_term": False}}
        )
        self.single(node, label, ltype, params, [vec], bottom=self.blob(x))

    def op_Gemm(self, node, label):
        at = _attrs(node)
        weight = self.const(node.input[1])
        if weight is None or self.const(node.input[0]) is not None:
            raise _Unsupported("only input x constant weight maps to InnerProduct")
        if int(at.get("transA", 0)):
            raise _Unsupported("transA=1")
        in_shape = self.shape(node.input[0])
        weight = np.asarray(weight, np.float32)
        weight = weight if int(at.get("transB", 0)) else weight.T  # Caffe: (num_output, K)
        weight = weight * np.float32(at.get("alpha", 1.0))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2])
            if c is None:
                raise _Unsupported("bias C is not constant")
            bias = _vector(np.asarray(c, np.float32) * np.float32(at.get("beta", 1.0)), weight.shape[0])
            if bias is None:
                raise _Unsupported(f"bias of shape {_fmt(np.shape(c))} is not per-output")
        self.inner_product(node, label, node.input[0], in_shape, weight, bias, node.output[0])

    def op_MatMul(self, node, label):
        weight = self.const(node.input[1])
        if weight is None or self.const(node.input[0]) is not None or weight.ndim != 2:
            raise _Unsupported("only input x constant 2-D weight maps to InnerProduct")
        weight = np.asarray(weight, np.float32).T
        out, bias = node.output[0], None
        users = self.consumers.get(out, [])
        if out not in self.graph_outputs and len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            c = self.const(other)
            vec = None if c is None else _vector(np.asarray(c, np.float32), weight.shape[0])
            if vec is not None and self.shape(add.output[0]) == self.shape(out):
                bias, out = vec, add.output[0]
                self.skip.add(id(add))
        self.inner_product(node, label, node.input[0], self.shape(node.input[0]), weight, bias, out)

    def inner_product(self, node, label, x, in_shape, weight, bias, out):
        if len(in_shape) != 2 or in_shape[1] != weight.shape[1]:
            raise _Unsupported(f"input {_fmt(in_shape)} for weight {_fmt(weight.shape)} (need N x K)")
        params = {"inner_product_param": {"num_output": int(weight.shape[0]), "bias_term": bias is not None}}
        blobs = [weight] + ([bias] if bias is not None else [])
        self.add(
            Layer(
                label,
                "InnerProduct",
                [self.blob(x)],
                [out],
                params,
                [np.ascontiguousarray(b, np.float32) for b in blobs],
            ),
            node,
            {out: (self.shape(out), out)},
        )
        self.alias[out] = out

    # -- shape-only operators: data order is kept, only the dims change
    def op_Flatten(self, node, label):
        in_shape = self.shape(node.input[0])
        axis = int(_attrs(node).get("axis", 1))
        if axis % len(in_shape) != 1 or axis == 0:
            raise _Unsupported(f"Flatten axis {axis} (only axis 1 keeps the batch axis)")
        self.reshape_like(node, label)

    def op_Reshape(self, node, label):
        target = self.const(node.input[1])
        if target is None:
            raise _Unsupported("the target shape is not constant after folding")
        in_shape = self.shape(node.input[0])
        if (
            node.input[1] not in self.batch_dependent
            and len(in_shape) > 0
            and int(target.reshape(-1)[0]) not in (0, -1)
            and self.dynamic_batch
        ):
            raise _Unsupported(f"target shape {target.tolist()} fixes the batch size (use x.size(0) or -1)")
        self.reshape_like(node, label)

    def op_Squeeze(self, node, label):
        self.reshape_like(node, label)

    def op_Unsqueeze(self, node, label):
        self.reshape_like(node, label)

    def op_Gather(self, node, label):
        index = self.const(node.input[1])
        axis = int(_attrs(node).get("axis", 0))
        in_shape = self.shape(node.input[0])
        axis %= max(1, len(in_shape))
        if index is None or index.ndim != 0 or axis == 0 or in_shape[axis] != 1 or int(index) not in (0, -1):
            raise _Unsupported("only taking index 0 of a size-1 non-batch axis maps to Caffe")
        self.reshape_like(node, label)

    def reshape_like(self, node, label):
        in_shape, out = self.shape(node.input[0]), node.output[0]
        out_shape = self.shape(out)
        if not out_shape or out_shape[0] != in_shape[0] or int(np.prod(out_shape)) != int(np.prod(in_shape)):
            raise _Unsupported(f"{_fmt(in_shape)} -> {_fmt(out_shape)} does not keep the batch axis")
        bottom = self.blob(node.input[0])
        if len(out_shape) == 2:
            self.add(
                Layer(label, "Flatten", [bottom], [out], {"flatten_param": {"axis": 1}}), node, {out: (out_shape, out)}
            )
        else:
            dims = [0] + [int(d) for d in out_shape[1:]]
            self.add(
                Layer(label, "Reshape", [bottom], [out], {"reshape_param": {"shape": {"dim": dims}}}),
                node,
                {out: (out_shape, out)},
            )
        self.alias[out] = out

    def op_Identity(self, node, label):
        self.alias[node.output[0]] = self.blob(node.input[0])

    def op_Dropout(self, node, label):
        if len(self.used_outputs(node)) > 1:
            raise _Unsupported("the mask output is used")
        self.alias[node.output[0]] = self.blob(node.input[0])


def _symmetric_pads(at: Dict[str, Any], in_shape: Shape, kernel: Tuple[int, int]) -> Tuple[int, int]:
    auto = at.get("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        raise _Unsupported(f"auto_pad {auto} (export with explicit pads)")
    pads = [0, 0, 0, 0] if auto == "VALID" else list(at.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        raise _Unsupported(f"pads {pads} (2-D only)")
    top, left, bottom, right = (int(p) for p in pads)
    if (top, left) != (bottom, right):
        raise _Unsupported(f"asymmetric pads {pads} (Caffe pads both sides equally)")
    return top, left


def _per_channel(c: np.ndarray, x_shape: Shape) -> Optional[np.ndarray]:
    """The (C,) vector for a constant that varies at most along axis 1 of x, else None."""
    channels = x_shape[1] if len(x_shape) > 1 else 1
    if c.ndim > len(x_shape):
        return None
    full = c.reshape((1,) * (len(x_shape) - c.ndim) + c.shape)
    for axis, size in enumerate(full.shape):
        if size != 1 and axis != 1:
            return None
    vec = full.reshape(-1)
    if vec.size == 1:
        return np.full(channels, vec[0], np.float32)
    return vec.astype(np.float32) if vec.size == channels else None


def _vector(c: np.ndarray, n: int) -> Optional[np.ndarray]:
    flat = c.reshape(-1)
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
        return None
    if flat.size == 1:
        return np.full(n, flat[0], np.float32)
    return flat.astype(np.float32) if flat.size == n else None


def _live_nodes(model: onnx.ModelProto) -> List[Tuple[int, onnx.NodeProto]]:
    """Nodes the graph output depends on, in graph order."""
    producer = {out: node for node in model.graph.node for out in node.output}
    needed, stack, live = set(), [o.name for o in model.graph.output], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(i for i in node.input if i)
    return [(i, n) for i, n in enumerate(model.graph.node) if id(n) in live]


# --------------------------------------------------------------------------- entry point


def convert_model(
    model: onnx.ModelProto, output_name: str = "output", probe_batch: int = PROBE_BATCH, source: str = "model.onnx"
) -> CaffeNet:
    """The Caffe net for ``model``; raises StageError (one line) for anything not mapped exactly."""
    if not isinstance(output_name, str) or not output_name or any(ch.isspace() or ch in '"\\' for ch in output_name):
        raise StageError(f"output_name: {output_name!r} is not a usable blob name; use e.g. 'output'")
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    vi, dims = _graph_input(model_copy, source)
    if output_name == vi.name:
        raise StageError(f"output_name: {output_name!r} is the name of the input blob; choose another name")
    if len(model_copy.graph.output) != 1:
        raise StageError(
            f"{source}: the graph has {len(model_copy.graph.output)} outputs; "
            "Caffe conversion needs exactly one (the feature)"
        )
    dynamic_batch = not (isinstance(dims[0], int) and dims[0] > 0)
    batch = probe_batch if dynamic_batch else int(dims[0])
    _fix_batch(model_copy, vi.name, batch)
    shapes, batch_dependent = fold_constants(model_copy, source)
    folded = model_copy

    mapper = _Mapper(folded, shapes, batch_dependent, vi.name, dynamic_batch)
    nodes = _live_nodes(folded)
    problems = mapper.run(nodes)
    if problems:
        raise StageError(
            f"{source}: {len(problems)} ONNX node(s) have no exact Caffe mapping: "
            f"{'; '.join(problems)}; nothing was written"
        )

    graph_out = folded.graph.output[0].name
    final = mapper.alias.get(graph_out)
    if final is None or final == vi.name or not mapper.layers:
        raise StageError(f"{source}: the output {graph_out!r} is not computed by any layer")
    _rename_top(mapper, final, output_name)
    input_shape = ((1 if dynamic_batch else batch),) + tuple(int(d) for d in dims[1:])
    mapper.expected[vi.name] = (batch,) + tuple(int(d) for d in dims[1:])
    mapper.onnx_tensor[vi.name] = vi.name
    name = model.graph.name or "onnx_model"
    return CaffeNet(
        name=name,
        input_name=vi.name,
        input_shape=input_shape,
        layers=mapper.layers,
        output_name=output_name,
        probe_batch=batch,
        expected=mapper.expected,
        onnx_tensor=mapper.onnx_tensor,
        dynamic_batch=dynamic_batch,
    )


def _rename_top(mapper: _Mapper, old: str, new: str) -> None:
    if old == new:
        return
    taken = {t for layer in mapper.layers for t in layer.tops + layer.bottoms}
    if new in taken:  # another blob already has the wanted name: move it aside
        _rename_top(mapper, new, new + "_orig")
    for layer in mapper.layers:
        layer.tops = [new if t == old else t for t in layer.tops]
        layer.bottoms = [new if b == old else b for b in layer.bottoms]
    mapper.expected[new] = mapper.expected.pop(old)
    mapper.onnx_tensor[new] = mapper.onnx_tensor.pop(old)


# --------------------------------------------------------------------------- prototxt text


def _value(value: Any) -> str:
    if isinstance(value, Ident):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(float(np.float32(value)))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(value).__name__} to a prototxt")


def _fields(params: Dict[str, Any], indent: int) -> List[str]:
    pad, lines = "  " * indent, []
    for key, value in params.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                lines.append(f"{pad}{key} {{")
                lines.extend(_fields(item, indent + 1))
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_value(item)}")
    return lines


def render_prototxt(net: CaffeNet) -> str:
    """Deterministic prototxt text: an Input layer, then one block per layer."""
    lines = [
        "# generated by modelmatrix targets/caffe/onnx2caffe.py from the ONNX graph; do not edit",
        f"name: {_value(net.name)}",
    ]
    blocks = [
        Layer(
            net.input_name,
            "Input",
            [],
            [net.input_name],
            {"input_param": {"shape": {"dim": [int(d) for d in net.input_shape]}}},
        )
    ] + net.layers
    for layer in blocks:
        body: Dict[str, Any] = {"name": layer.name, "type": layer.type}
        if layer.bottoms:
            body["bottom"] = list(layer.bottoms)
        body["top"] = list(layer.tops)
        body.update(layer.params)
        lines.append("layer {")
        lines.extend(_fields(body, 1))
        lines.append("}")
    return "\n".join(lines) + "\n"


def param_blobs(net: CaffeNet) -> Dict[str, List[np.ndarray]]:
    return {layer.name: layer.blobs for layer in net.layers if layer.blobs}


# --------------------------------------------------------------------------- Caffe's shape rules


def _pooled(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """pooling_layer.cpp Reshape(): rounding, then drop a last window that starts in the padding."""
    span = size + 2 * pad - kernel
    pooled = (int(math.ceil(span / stride)) if ceil else span // stride) + 1
    if pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def caffe_top_shape(layer: Layer, bottoms: List[Shape]) -> Shape:
    """The top shape Caffe computes for ``layer`` (the layer types this module writes)."""
    x = bottoms[0]
    kind = layer.type
    if kind == "Convolution":
        p = layer.params["convolution_param"]
        dil = p.get("dilation", [1])
        dh, dw = (dil[0], dil[-1])
        oh = (x[2] + 2 * p["pad_h"] - (dh * (p["kernel_h"] - 1) + 1)) // p["stride_h"] + 1
        ow = (x[3] + 2 * p["pad_w"] - (dw * (p["kernel_w"] - 1) + 1)) // p["stride_w"] + 1
        return (x[0], p["num_output"], oh, ow)
    if kind == "Pooling":
        p = layer.params["pooling_param"]
        if p.get("global_pooling"):
            return (x[0], x[1], 1, 1)
        ceil = str(p.get("round_mode", "CEIL")) == "CEIL"
        return (
            x[0],
            x[1],
            _pooled(x[2], p["kernel_h"], p["stride_h"], p["pad_h"], ceil),
            _pooled(x[3], p["kernel_w"], p["stride_w"], p["pad_w"], ceil),
        )
    if kind in ("ReLU", "BatchNorm", "Scale", "Bias"):
        return x
    if kind == "Eltwise":
        if any(b != x for b in bottoms[1:]):
            raise ValueError(f"Eltwise bottoms differ: {', '.join(_fmt(b) for b in bottoms)}")
        return x
    if kind == "InnerProduct":
        return (x[0], layer.params["inner_product_param"]["num_output"])
    if kind == "Flatten":
        return (x[0], int(np.prod(x[1:])))
    if kind == "Reshape":
        dims = layer.params["reshape_param"]["shape"]["dim"]
        out = [x[i] if d == 0 else d for i, d in enumerate(dims)]
        if -1 in out:
            known = int(np.prod([d for d in out if d != -1]))
            out[out.index(-1)] = int(np.prod(x)) // known
        return tuple(out)
    raise ValueError(f"no shape rule for layer type {kind}")


def simulate_shapes(net: CaffeNet, batch: Optional[int] = None) -> Dict[str, Shape]:
    """Every blob's shape as Caffe would compute it, without Caffe."""
    batch = net.probe_batch if batch is None else batch
    shapes: Dict[str, Shape] = {net.input_name: (batch,) + tuple(net.input_shape[1:])}
    for layer in net.layers:
        top = caffe_top_shape(layer, [shapes[b] for b in layer.bottoms])
        for name in layer.tops:
            shapes[name] = tuple(int(v) for v in top)
    return shapes


def check_shapes(net: CaffeNet, actual: Mapping[str, Sequence[int]], where: str) -> None:
    """The shape guard: the first layer whose top shape differs from the ONNX graph's, named."""
    for layer in net.layers:
        for top in layer.tops:
            want = net.expected[top]
            got = tuple(int(v) for v in actual[top]) if top in actual else None
            if got != want:
                tensor = net.onnx_tensor.get(top) or f"output of ONNX node {layer.onnx_node}"
                shown = _fmt(got) if got is not None else "missing"
                raise StageError(
                    f"{where}: shape guard: layer {layer.name!r} ({layer.type}, from ONNX {layer.onnx_op} "
                    f"{layer.onnx_node!r}) gives {top!r} {shown} in Caffe but {_fmt(want)} in the ONNX graph "
                    f"({tensor}); the conversion is wrong for this layer, nothing was written"
                )
