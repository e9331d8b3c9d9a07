"""Stage ``caffe.infer``: features from model.prototxt + model.caffemodel with pycaffe (CPU).

Before Caffe's C++ sees the files (a bad file there is a glog CHECK: an abort, not an error),
both are checked here and refused with one line:

- the prototxt is parsed with ``caffe_pb2`` (syntax), its layer types must be registered in this
  Caffe and every bottom produced by an earlier layer;
- the caffemodel is read at the protobuf wire level (layer names and blob shapes, weights skipped
  rather than decoded: pure-Python protobuf would take minutes for 94 MB of floats) and must
  hold exactly the blobs the prototxt's layers need, shape for shape.

Then the input blob is reshaped per batch (the last one partial), ``net.forward()`` runs, and the
blob named by ``output_name`` is flattened to (B, D) into ``features.npy``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

os.environ.setdefault("GLOG_minloglevel", "2")  # before pycaffe loads glog: no INFO spam

import numpy as np  # noqa: E402

from targets.common.arrays import load_inputs as common_load_inputs
from targets.common.contract import Spec, StageError, batched_timings, main, save_npy  # noqa: E402

DPKG_STATUS = Path("/var/lib/dpkg/status")
BLAS_ALTERNATIVE = Path("/etc/alternatives/libblas.so.3-x86_64-linux-gnu")


# --------------------------------------------------------------------------- the Caffe runtime


def import_caffe():
    """pycaffe, CPU mode; one line if this Python has no Caffe."""
    try:
        import caffe
    except ImportError as exc:
        raise StageError(
            f"pycaffe is not importable here ({exc}); run the caffe stages in the caffe image (images/caffe/Dockerfile)"
        ) from None
    caffe.set_mode_cpu()
    return caffe


def caffe_pb2():
    from caffe.proto import caffe_pb2 as pb2

    return pb2


def round_mode_supported() -> bool:
    """BVLC master >= 2018-03-07 has PoolingParameter.round_mode (tag 1.0 does not)."""
    return "round_mode" in caffe_pb2().PoolingParameter.DESCRIPTOR.fields_by_name


def deb_version(package: str) -> str:
    """The installed Debian package version, read from dpkg's status file ('' if not installed)."""
    if not DPKG_STATUS.is_file():
        return ""
    for stanza in DPKG_STATUS.read_text(errors="replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Package") == package and "installed" in fields.get("Status", ""):
            return fields.get("Version", "")
    return ""


def versions(caffe) -> Dict[str, Any]:
    import google.protobuf
    import onnx
    from google.protobuf.internal import api_implementation

    return {
        "caffe": getattr(caffe, "__version__", "unknown"),
        "caffe_deb": deb_version("python3-caffe"),
        "round_mode_supported": round_mode_supported(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "protobuf": google.protobuf.__version__,
        "protobuf_implementation": api_implementation.Type(),
        "blas": os.path.realpath(BLAS_ALTERNATIVE) if BLAS_ALTERNATIVE.exists() else "unknown",
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "auto"),
        "openblas_coretype_source": os.environ.get("MM_OPENBLAS_CORETYPE_SOURCE", "environment")
        if "OPENBLAS_CORETYPE" in os.environ
        else "OpenBLAS detection",
    }


def write_image_versions(path: str) -> None:
    """/opt/modelmatrix/versions.json at image build time (images/README.md rule 8), failing the
    build when pycaffe lacks round_mode or protobuf is not the pure-Python implementation."""
    import json
    import platform

    caffe = import_caffe()
    found = versions(caffe)
    if not found["round_mode_supported"]:
        raise SystemExit("this Caffe has no PoolingParameter.round_mode (needs BVLC master >= 2018-03-07)")
    if found["protobuf_implementation"] != "python":
        raise SystemExit(
            f"protobuf implementation is {found['protobuf_implementation']!r}; set "
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python"
        )
    keep = ("caffe", "caffe_deb", "onnx", "numpy", "protobuf", "protobuf_implementation", "blas")
    out = {key: str(found[key]) for key in keep}
    out.update(round_mode="supported", python=platform.python_version())
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1, sort_keys=True)


# --------------------------------------------------------------------------- prototxt checks


def read_prototxt(path: Path):
    """The NetParameter of a prototxt, or one line saying why it is not a usable one."""
    from google.protobuf import text_format

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run caffe.convert first")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise StageError(f"{path}: not a text file, not a Caffe prototxt; run caffe.convert again") from None
    net = caffe_pb2().NetParameter()
    try:
        text_format.Merge(text, net)
    except text_format.ParseError as exc:
        raise StageError(f"{path}: not a valid Caffe prototxt ({exc}); run caffe.convert again") from None
    if net.layers:
        raise StageError(f"{path}: uses the V1 'layers' format; run caffe.convert again")
    if not net.layer:
        raise StageError(f"{path}: defines no layers; run caffe.convert again")
    return net


def check_prototxt(path: Path, net, registered: List[str]) -> Dict[str, str]:
    """Layer types known to this Caffe, every bottom produced earlier; returns blob -> producer."""
    produced = {name: "input" for name in net.input}
    for layer in net.layer:
        if layer.type not in registered:
            raise StageError(
                f"{path}: layer {layer.name!r} has type {layer.type!r}, unknown to this Caffe; run caffe.convert again"
            )
        for bottom in layer.bottom:
            if bottom not in produced:
                raise StageError(
                    f"{path}: layer {layer.name!r} reads blob {bottom!r} that no earlier "
                    "layer produces; run caffe.convert again"
                )
        for top in layer.top:
            produced[top] = layer.name
    return produced


# --------------------------------------------------------------------------- caffemodel scan


class _Corrupt(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Corrupt("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value) with value an int (varint) or a (start, stop) span."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Corrupt("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
            continue
        if wire == 2:
            length, pos = _varint(buf, pos, end)
            span = (pos, pos + length)
        elif wire in (1, 5):
            span = (pos, pos + (8 if wire == 1 else 4))
        else:
            raise _Corrupt(f"unsupported wire type {wire}")
        if span[1] > end:
            raise _Corrupt("a field runs past the end of its message")
        pos = span[1]
        yield number, wire, span


def _packed_varints(buf: memoryview, span: Tuple[int, int]) -> List[int]:
    out, pos = [], span[0]
    while pos < span[1]:
        value, pos = _varint(buf, pos, span[1])
        out.append(value)
    return out


def _blob_shape(buf: memoryview, start: int, end: int) -> Tuple[Tuple[int, ...], int]:
    """BlobProto: (shape, number of float values stored)."""
    shape: List[int] = []
    legacy: Dict[int, int] = {}
    count = 0
    for number, wire, value in _fields(buf, start, end):
        if number == 7 and wire == 2:  # BlobShape shape
            for sub, sub_wire, sub_value in _fields(buf, *value):
                if sub == 1:
                    shape.extend(_packed_varints(buf, sub_value) if sub_wire == 2 else [sub_value])
        elif number == 5:  # float data (packed or not)
            count += (value[1] - value[0]) // 4 if wire == 2 else 1
        elif number == 8:  # double data
            count += (value[1] - value[0]) // 8 if wire == 2 else 1
        elif number in (1, 2, 3, 4) and wire == 0:  # legacy num/channels/height/width
            legacy[number] = value
    if not shape and legacy:
        shape = [legacy.get(k, 1) for k in (1, 2, 3, 4)]
    return tuple(shape), count


def scan_caffemodel(path: Path) -> Dict[str, List[Tuple[int, ...]]]:
    """Layer name -> blob shapes of a binary caffemodel (NetParameter), weights not decoded."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run caffe.convert first")
    data = memoryview(path.read_bytes())
    layers: Dict[str, List[Tuple[int, ...]]] = {}
    try:
        for number, wire, value in _fields(data, 0, len(data)):
            if number == 2 and wire == 2:
                raise StageError(f"{path}: uses the V1 'layers' format; run caffe.convert again")
            if number != 100 or wire != 2:
                continue
            name, blobs = None, []  # type: Tuple[Any, List[Any]]
            for sub, sub_wire, sub_value in _fields(data, *value):
                if sub == 1 and sub_wire == 2:
                    name = bytes(data[sub_value[0] : sub_value[1]]).decode("utf-8", "replace")
                elif sub == 7 and sub_wire == 2:
                    shape, count = _blob_shape(data, *sub_value)
                    expect = int(np.prod(shape)) if shape else 0
                    if count != expect:
                        raise _Corrupt(
                            f"layer {name!r} blob {len(blobs)} holds {count} values for shape "
                            f"{'x'.join(map(str, shape)) or '()'}"
                        )
                    blobs.append(shape)
            if name is None:
                raise _Corrupt("a layer without a name")
            if blobs:
                layers[name] = blobs
    except _Corrupt as exc:
        raise StageError(f"{path}: not a valid caffemodel ({exc}); run caffe.convert again") from None
    if not layers:
        raise StageError(f"{path}: holds no layer weights, not a caffemodel; run caffe.convert again")
    return layers


def check_weights(net, stored: Dict[str, List[Tuple[int, ...]]], proto: Path, model: Path) -> None:
    """Every parameter blob of the net in the caffemodel, shape for shape, and nothing else."""
    fix = "use the prototxt and the caffemodel of the same caffe.convert run"
    for name, params in net.params.items():
        want = [tuple(int(v) for v in p.data.shape) for p in params]
        if name not in stored:
            raise StageError(f"{model}: does not match {proto}: no weights for layer {name!r}; {fix}")
        got = stored[name]
        if got != want:
            show = lambda shapes: ", ".join("x".join(map(str, s)) for s in shapes)  # noqa: E731
            raise StageError(
                f"{model}: does not match {proto}: layer {name!r} has blobs [{show(got)}] in "
                f"the caffemodel, [{show(want)}] in the prototxt; {fix}"
            )
    extra = sorted(set(stored) - set(net.params))
    if extra:
        raise StageError(
            f"{model}: does not match {proto}: weights for layer(s) {', '.join(map(repr, extra[:3]))} "
            f"that the prototxt lacks; {fix}"
        )


def open_net(caffe, proto: Path, model: Path):
    """A caffe.Net in TEST phase with its weights, after the checks above."""
    netparam = read_prototxt(proto)
    check_prototxt(proto, netparam, list(caffe.layer_type_list()))
    stored = scan_caffemodel(model)
    net = caffe.Net(str(proto), caffe.TEST)
    check_weights(net, stored, proto, model)
    net.copy_from(str(model))
    if len(net.inputs) != 1:
        raise StageError(f"{proto}: has {len(net.inputs)} input blobs, expected one image input")
    return net


# --------------------------------------------------------------------------- inference


def load_inputs(path: Path, chw: Tuple[int, ...], proto: Path) -> np.ndarray:
    """inputs.npy matching the net's input blob (memory-mapped float32 (N, C, H, W))."""
    return common_load_inputs(path, chw, str(proto))


def output_blob(net, name: str, proto: Path) -> str:
    if name not in net.blobs:
        last = list(net.blobs)[-1]
        raise StageError(
            f"output_name: {name!r} is not a blob of {proto} (its last blob is {last!r}); "
            "set the same output_name for caffe.convert and caffe.infer"
        )
    return name


def forward(net, input_name: str, output: str, batch: np.ndarray) -> np.ndarray:
    blob = net.blobs[input_name]
    if blob.data.shape[0] != batch.shape[0]:
        blob.reshape(*batch.shape)
        net.reshape()
    blob.data[...] = batch
    net.forward()
    return net.blobs[output].data.reshape(batch.shape[0], -1)


def infer(net, input_name: str, output: str, arr: np.ndarray, batch_size: int):
    """Features (N, D) and the seconds of each batch (input copy + forward + output view)."""
    features = None
    seconds = []
    for start, stop in batched_timings(arr.shape[0], batch_size):
        batch = arr[start:stop]
        t0 = time.perf_counter()
        out = forward(net, input_name, output, batch)
        seconds.append(time.perf_counter() - t0)
        if features is None:
            features = np.empty((arr.shape[0], out.shape[1]), dtype=np.float32)
        features[start:stop] = out
    return features, seconds


def prepare(spec: Spec):
    """Net, input name, output name, memory-mapped inputs, batch size."""
    batch_size = int(spec.param("batch_size", 16))
    if batch_size < 1:
        raise StageError(f"batch_size must be >= 1, got {batch_size}")
    caffe = import_caffe()
    proto, model = spec.input("prototxt"), spec.input("caffemodel")
    net = open_net(caffe, proto, model)
    input_name = net.inputs[0]
    output = output_blob(net, spec.param("output_name", "output"), proto)
    arr = load_inputs(spec.input("inputs"), tuple(net.blobs[input_name].data.shape[1:]), proto)
    return caffe, net, input_name, output, arr, batch_size


def run(spec: Spec) -> Dict[str, Any]:
    caffe, net, input_name, output, arr, batch_size = prepare(spec)
    features, seconds = infer(net, input_name, output, arr, batch_size)
    save_npy(spec.output("features.npy"), features)
    return {
        "batch_size": batch_size,
        "images": int(arr.shape[0]),
        "batch_seconds": seconds,
        "images_per_second": arr.shape[0] / sum(seconds),
        "input_name": input_name,
        "output_name": output,
        "feature_dim": int(features.shape[1]),
        "versions": versions(caffe),
    }


if __name__ == "__main__":
    main(run)
