"""Stage ``quantize.roofline`` (run by ``invoke bench`` before the backends): this machine's own
limits and the model's arithmetic, so each backend's img/s can be read as a fraction of what the CPU
can do at its precision.

- fp32 GEMM: the faster of numpy ``matmul`` (the BLAS numpy links) and ONNX Runtime ``MatMul`` of
  float32 ``n x n``, best of a few runs;
- int8 GEMM: ONNX Runtime ``MatMulInteger`` (uint8 x int8 -> int32, the kernel the QDQ model's
  convolutions fall to on the CPU provider), a model made with ``onnx.helper``;
- bf16 GEMM: torch ``matmul`` in bfloat16 when torch is importable here, else not measured;
- the CPU's flags that decide int8/bf16 speed (avx2, avx512*, vnni, amx), from /proc/cpuinfo;
- the model's GFLOP per image from the ONNX graph: 2 x the multiply-accumulates of every Conv,
  Gemm and MatMul, with the shapes inferred at batch 1.

Params: ``gemm_n`` (default 1024), ``seconds`` per kernel (default 1.0), ``threads`` (0 = the
libraries' default, as the backends' benches use). Writes roofline.json.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from targets.common.contract import Spec, StageError, atomic_write_json, main

from .common import load_model, versions

FLAG_NAMES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> List[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in FLAG_NAMES if f in have]
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_rate(fn: Callable[[], Any], flop: float, seconds: float) -> Dict[str, Any]:
    """GFLOP/s (or GOP/s) of ``fn``: two warm-up calls, then the best of as many as fit in ``seconds``."""
    fn()
    fn()
    times: List[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "gflops": round(flop / best / 1e9, 1),
        "runs": len(times),
        "best_ms": round(best * 1e3, 3),
        "median_ms": round(float(np.median(times)) * 1e3, 3),
    }


def gemm_fp32(n: int, seconds: float, threads: int) -> Dict[str, Any]:
    """The faster of numpy's BLAS and ONNX Runtime's own MatMul (MLAS, what the fp32 backend runs):
    numpy alone under-reads the limit (measured on an AVX-512 EPYC: OpenBLAS 230 GFLOP/s while ONNX
    Runtime ran the whole model at 415), so a backend would read as > 100% of its roofline."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    blas = {**best_rate(lambda: a @ b, 2.0 * n**3, seconds), "kernel": f"numpy.matmul float32 {n}x{n}x{n}"}
    sess = _ort_gemm("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, n, threads)
    mlas = best_rate(lambda: sess.run(None, {"a": a, "b": b}), 2.0 * n**3, seconds)
    mlas["kernel"] = f"onnxruntime MatMul float32 {n}x{n}x{n}"
    best = max((blas, mlas), key=lambda r: float(r["gflops"]))
    return {**best, "numpy_blas": _blas(), "candidates": {"numpy": blas, "onnxruntime": mlas}}


def _ort_gemm(op: str, ta: int, tb: int, ty: int, n: int, threads: int) -> Any:
    """An ONNX Runtime session of one ``n x n x n`` ``op`` (made with onnx.helper)."""
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"], name="gemm")],
        f"{op}_gemm",
        [helper.make_tensor_value_info("a", ta, [n, n]), helper.make_tensor_value_info("b", tb, [n, n])],
        [helper.make_tensor_value_info("y", ty, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _blas() -> str:
    try:
        cfg = np.show_config(mode="dicts")
        return str(cfg["Build Dependencies"]["blas"]["name"])
    except Exception:
        return "?"


def gemm_int8(n: int, seconds: float, threads: int) -> Dict[str, Any]:
    sess = _ort_gemm("MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, n, threads)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    b = rng.integers(-128, 128, (n, n), dtype=np.int8)
    out = best_rate(lambda: sess.run(None, {"a": a, "b": b}), 2.0 * n**3, seconds)
    return {
        **out,
        "kernel": f"onnxruntime MatMulInteger uint8 x int8 -> int32 {n}x{n}x{n}",
        "unit": "GOP/s (int8 multiply-accumulates x 2)",
    }


def gemm_bf16(n: int, seconds: float, flags: List[str]) -> Dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"status": "not measured", "reason": "torch is not in this environment (bf16 GEMM needs it)"}
    n = min(n, 512)  # emulated bf16 runs at well under 1 GFLOP/s: keep it to a second
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    out = best_rate(lambda: a @ b, 2.0 * n**3, seconds)
    native = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    return {
        **out,
        "kernel": f"torch.matmul bfloat16 {n}x{n}x{n} (torch {torch.__version__})",
        "native": native,
        "note": "" if native else "no avx512_bf16/amx_bf16: bf16 is emulated here",
    }


def _dims(vi: onnx.ValueInfoProto) -> Optional[List[int]]:
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
    return dims if dims and all(d > 0 for d in dims) else None


def model_gflop(model: onnx.ModelProto) -> Dict[str, Any]:
    """GFLOP per image: 2 x MACs of Conv / Gemm / MatMul, shapes inferred at batch 1."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    m = shape_inference.infer_shapes(m)
    shapes: Dict[str, List[int]] = dict(inits)
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        d = _dims(vi)
        if d:
            shapes[vi.name] = d
    macs: Dict[str, int] = {}
    unknown: List[str] = []
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x, w, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if not (x and w and y):
            unknown.append(node.name or node.op_type)
            continue
        if node.op_type == "Conv":
            # y: N x Cout x H' x W'; w: Cout x Cin/group x kh x kw
            n_mac = int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            k = x[0] if trans_a else x[-1]
            n_mac = int(np.prod(y)) * k
        else:
            n_mac = int(np.prod(y)) * x[-1]
        macs[node.op_type] = macs.get(node.op_type, 0) + n_mac
    total = sum(macs.values())
    return {"gflop_per_image": round(2.0 * total / 1e9, 4), "macs_by_op": macs, "unknown_shapes": unknown}


def run(spec: Spec) -> Dict[str, Any]:
    n = int(spec.param("gemm_n", 1024))
    seconds = float(spec.param("seconds", 1.0))
    threads = int(spec.param("threads", 0))
    if n < 64 or n > 8192 or seconds <= 0:
        raise StageError(f"gemm_n must be in 64..8192 and seconds > 0, got {n} and {seconds}")
    path = spec.input("onnx")
    flops = model_gflop(load_model(path))
    if flops["gflop_per_image"] <= 0:
        raise StageError(f"{path}: no Conv/Gemm/MatMul with known shapes: cannot count the model's GFLOP")
    flags = cpu_flags()
    fp32 = gemm_fp32(n, seconds, threads)
    int8 = gemm_int8(n, seconds, threads)
    bf16 = gemm_bf16(n, seconds, flags)
    report = {
        "cpu": cpu_model(),
        "flags": flags,
        "gemm": {"fp32": fp32, "int8": int8, "bf16": bf16},
        "int8_over_fp32": round(int8["gflops"] / fp32["gflops"], 2),
        "model": flops,
        "versions": versions(),
    }
    atomic_write_json(spec.output("roofline.json"), report)
    return report


if __name__ == "__main__":
    main(run)
