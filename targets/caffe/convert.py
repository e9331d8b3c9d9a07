"""Stage ``caffe.convert``: model.onnx -> model.prototxt + model.caffemodel, no manual edits.

1. ``onnx2caffe`` reads and folds the ONNX graph, maps every node exactly (or refuses the whole
   list of nodes it cannot map) and computes Caffe's shapes with Caffe's own formulas: a first
   shape guard, before anything is written.
2. pycaffe builds the net from the prototxt (written under a temporary name), the input blob is
   reshaped to the probe batch and every blob shape is compared with ONNX's: the real shape
   guard. The first layer whose shape differs is named (this is what catches a max-pool rounded
   the wrong way: 65x33 instead of 64x32).
3. The weights are assigned blob by blob (shapes checked), the caffemodel is saved under a
   temporary name, and only then are both files renamed into place.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("GLOG_minloglevel", "2")  # before pycaffe loads glog


from targets.common.contract import Spec, StageError, main, temp_path  # noqa: E402

from . import onnx2caffe as oc  # noqa: E402
from .infer import import_caffe, round_mode_supported, versions  # noqa: E402


def _temp_path(final: Path) -> Path:
    return temp_path(final)


def check_round_mode(net: oc.CaffeNet, proto: Path) -> None:
    if round_mode_supported():
        return
    floor = [
        layer.name
        for layer in net.layers
        if str(layer.params.get("pooling_param", {}).get("round_mode", "")) == "FLOOR"
    ]
    if floor:
        raise StageError(
            f"{proto}: pooling layer {floor[0]!r} needs round_mode: FLOOR, which this Caffe "
            "lacks (BVLC master >= 2018-03-07 has it); use the caffe image"
        )


def assign_weights(cnet, net: oc.CaffeNet, proto: Path) -> int:
    """Copy every weight array into the net; returns the number of values copied."""
    blobs = oc.param_blobs(net)
    missing = sorted(set(cnet.params) - set(blobs))
    if missing:
        raise StageError(
            f"{proto}: Caffe created weights for layer(s) {', '.join(missing[:3])} that the "
            "conversion has no values for; this is a converter bug, nothing was written"
        )
    copied = 0
    for name, arrays in blobs.items():
        params = cnet.params[name]
        if len(params) != len(arrays):
            raise StageError(
                f"{proto}: layer {name!r} has {len(params)} blobs in Caffe, the conversion "
                f"made {len(arrays)}; nothing was written"
            )
        for i, (param, array) in enumerate(zip(params, arrays)):
            if tuple(param.data.shape) != tuple(array.shape):
                raise StageError(
                    f"{proto}: layer {name!r} blob {i} is {param.data.shape} in Caffe, "
                    f"{array.shape} from the ONNX graph; nothing was written"
                )
            param.data[...] = array
            copied += array.size
    return copied


def build(caffe, net: oc.CaffeNet, text: str, proto_final: Path, model_final: Path) -> Dict[str, Any]:
    """Write both files under temporary names, check them with pycaffe, then rename into place."""
    tmp_proto, tmp_model = _temp_path(proto_final), _temp_path(model_final)
    try:
        tmp_proto.write_text(text)
        t0 = time.perf_counter()
        cnet = caffe.Net(str(tmp_proto), caffe.TEST)
        cnet.blobs[net.input_name].reshape(*net.probe_input_shape())
        cnet.reshape()
        actual = {name: tuple(blob.data.shape) for name, blob in cnet.blobs.items()}
        oc.check_shapes(net, actual, str(proto_final))
        copied = assign_weights(cnet, net, proto_final)
        cnet.save(str(tmp_model))
        build_s = time.perf_counter() - t0
        os.replace(tmp_model, model_final)
        os.replace(tmp_proto, proto_final)
    finally:
        for tmp in (tmp_proto, tmp_model):
            if tmp.exists():
                tmp.unlink()
    return {"caffe_blobs_checked": len(actual), "weights": copied, "build_seconds": build_s}


def summary(net: oc.CaffeNet) -> Dict[str, Any]:
    pools: List[Dict[str, Any]] = []
    for layer in net.layers:
        p = layer.params.get("pooling_param")
        if p is not None:
            pools.append(
                {
                    "layer": layer.name,
                    "pool": str(p["pool"]),
                    "round_mode": str(p["round_mode"]) if "round_mode" in p else None,
                    "global": bool(p.get("global_pooling", False)),
                    "top_shape": list(net.expected[layer.tops[0]]),
                }
            )
    return {
        "layers": len(net.layers),
        "layer_types": dict(sorted(Counter(l.type for l in net.layers).items())),
        "pooling": pools,
        "input_name": net.input_name,
        "input_shape": list(net.input_shape),
        "output_name": net.output_name,
        "output_shape_at_probe": list(net.expected[net.output_name]),
        "probe_batch": net.probe_batch,
    }


def run(spec: Spec) -> Dict[str, Any]:
    onnx_path = spec.input("onnx")
    output_name = spec.param("output_name", "output")
    proto_final, model_final = spec.output("model.prototxt"), spec.output("model.caffemodel")
    t0 = time.perf_counter()
    model = oc.load_onnx(onnx_path)
    net = oc.convert_model(model, output_name=output_name, source=str(onnx_path))
    oc.check_shapes(net, oc.simulate_shapes(net), str(onnx_path))  # Caffe's formulas, no Caffe yet
    text = oc.render_prototxt(net)
    map_s = time.perf_counter() - t0
    caffe = import_caffe()
    check_round_mode(net, proto_final)
    built = build(caffe, net, text, proto_final, model_final)
    result = {
        "map_seconds": map_s,
        "shape_guard": "passed",
        "versions": versions(caffe),
        "onnx_nodes": len(model.graph.node),
        "onnx_opset": oc.opset_of(model),
    }
    result.update(summary(net))
    result.update(built)
    return result


if __name__ == "__main__":
    main(run)
