"""What the Ascend stages need to know about an ONNX file, read with the standard library alone.

The Ascend image runs CANN 5.0.1's Python 3.7.5 and has no ``onnx`` package (the toolkit does not
need one), so this reads the protobuf wire format directly: the opset imports, the operators (type
and domain) of the main graph, and the graph's real inputs (initializers excluded) and outputs with
their shapes. Initializer payloads are skipped by length, never decoded. Operators inside
subgraphs (If/Loop bodies) are not listed: ReID exports have none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from targets.common.contract import StageError

# field numbers of onnx.proto (ModelProto, GraphProto, NodeProto, ValueInfoProto, TypeProto, ...)
_MODEL_GRAPH, _MODEL_OPSET = 7, 8
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 11, 12
_NODE_OP_TYPE, _NODE_DOMAIN, _NODE_NAME = 4, 7, 3
_TENSOR_NAME = 8
_DIM_VALUE, _DIM_PARAM = 1, 2


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, i: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise _Malformed("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 70:
            raise _Malformed("varint too long")


def _fields(buf: memoryview) -> Iterator[Tuple[int, Union[int, memoryview]]]:
    """(field number, value) of one protobuf message: an int for varints, bytes for the rest."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: Union[int, memoryview]
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > n:
                raise _Malformed("a field runs past the end of its message")
            value, i = buf[i : i + length], i + length
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise _Malformed("unknown wire type %d" % wire)
        if i > n:
            raise _Malformed("truncated field")
        yield number, value


def _text(value: Union[int, memoryview]) -> str:
    return bytes(value).decode("utf-8", "replace") if isinstance(value, memoryview) else str(value)


def _shape(type_proto: memoryview) -> List[Union[int, str]]:
    dims: List[Union[int, str]] = []
    for f, v in _fields(type_proto):
        if f == 1 and isinstance(v, memoryview):  # tensor_type
            for tf, tv in _fields(v):
                if tf == 2 and isinstance(tv, memoryview):  # shape
                    for df, dv in _fields(tv):
                        if df == 1 and isinstance(dv, memoryview):
                            dim: Union[int, str] = "?"
                            for kf, kv in _fields(dv):
                                if kf == _DIM_VALUE:
                                    dim = int(kv) if isinstance(kv, int) else "?"
                                elif kf == _DIM_PARAM:
                                    dim = _text(kv)
                            dims.append(dim)
    return dims


def _value_info(buf: memoryview) -> Tuple[str, List[Union[int, str]]]:
    name, shape = "", []  # type: Tuple[str, List[Union[int, str]]]
    for f, v in _fields(buf):
        if f == 1:
            name = _text(v)
        elif f == 2 and isinstance(v, memoryview):
            shape = _shape(v)
    return name, shape


def read_onnx(path: Path) -> Dict[str, Any]:
    """{"opsets": {domain: version}, "ops": [(domain, op_type)...] in node order, "inputs": [(name,
    shape)], "outputs": [(name, shape)], "sha256": ...}; StageError (one line) for an unreadable file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StageError("%s: not found; run torch.export first" % path) from None
    except OSError as exc:
        raise StageError("%s: cannot read (%s)" % (path, exc.strerror or exc)) from None
    opsets: Dict[str, int] = {}
    ops: List[Tuple[str, str, str]] = []
    inputs: List[Tuple[str, List[Union[int, str]]]] = []
    outputs: List[Tuple[str, List[Union[int, str]]]] = []
    initializers = set()
    graph_seen = False
    try:
        for f, v in _fields(memoryview(data)):
            if f == _MODEL_OPSET and isinstance(v, memoryview):
                domain, version = "", 0
                for of, ov in _fields(v):
                    if of == 1:
                        domain = _text(ov)
                    elif of == 2 and isinstance(ov, int):
                        version = ov
                opsets[domain if domain != "ai.onnx" else ""] = version
            elif f == _MODEL_GRAPH and isinstance(v, memoryview):
                graph_seen = True
                for gf, gv in _fields(v):
                    if not isinstance(gv, memoryview):
                        continue
                    if gf == _GRAPH_NODE:
                        op, domain, name = "", "", ""
                        for nf, nv in _fields(gv):
                            if nf == _NODE_OP_TYPE:
                                op = _text(nv)
                            elif nf == _NODE_DOMAIN:
                                domain = _text(nv)
                            elif nf == _NODE_NAME:
                                name = _text(nv)
                        ops.append((domain if domain != "ai.onnx" else "", op, name))
                    elif gf == _GRAPH_INITIALIZER:
                        for tf, tv in _fields(gv):
                            if tf == _TENSOR_NAME:
                                initializers.add(_text(tv))
                    elif gf == _GRAPH_INPUT:
                        inputs.append(_value_info(gv))
                    elif gf == _GRAPH_OUTPUT:
                        outputs.append(_value_info(gv))
    except (_Malformed, IndexError) as exc:
        raise StageError("%s: not a valid ONNX file (%s); export it again" % (path, exc)) from None
    if not graph_seen or not opsets:
        raise StageError("%s: not an ONNX model (no graph or no opset import); export it again" % path)
    return {
        "opsets": opsets,
        "ops": ops,
        "inputs": [i for i in inputs if i[0] not in initializers],
        "outputs": outputs,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }


def image_input(info: Dict[str, Any], path: Path) -> Tuple[str, int, int, int]:
    """(name, C, H, W) of the one image input (N, C, H, W) with fixed C, H and W."""
    if len(info["inputs"]) != 1:
        raise StageError(
            "%s: %d graph inputs (%s); the Ascend target takes a model with one image input"
            % (path, len(info["inputs"]), ", ".join(n for n, _ in info["inputs"]) or "none")
        )
    name, shape = info["inputs"][0]
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise StageError("%s: input %r has shape %s; expected (N, C, H, W) with fixed C, H and W" % (path, name, shape))
    return name, int(shape[1]), int(shape[2]), int(shape[3])


def output_dim(info: Dict[str, Any], path: Path) -> Optional[int]:
    """The feature length of the one output (N, D), when the file says it."""
    if len(info["outputs"]) != 1:
        raise StageError(
            "%s: %d graph outputs; the Ascend target takes a model with one feature output"
            % (path, len(info["outputs"]))
        )
    shape = info["outputs"][0][1]
    if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        return int(shape[1])
    return None
