"""Stage ``quantize.int8_u8``: the CPU's int8 file. As ``quantize.int8`` (same calibration images,
method, per-channel symmetric int8 weights, bias correction), but with uint8 asymmetric activations:
ONNX Runtime's x86 kernels take uint8 x int8 (U8S8, VPMADDUBSW/VPDPBUSD) directly and convert an
int8 activation first. Measured at 256x128, batch 16, on an AVX-512 VNNI EPYC (benchmarks/
reduced-precision.md): the symmetric file runs at 1.0x fp32, this one at 3.6x with ``cpu_keep_fp32:
neck`` (an fp32 stem alone costs 0.8x of that), and with a cosine to fp32 no lower. TensorRT's
explicit quantisation takes symmetric int8 only, so it compiles quantize.int8, never this file.
"""

from __future__ import annotations

from typing import Any, Dict

from targets.common.contract import Spec, main

from .int8 import quantize


def run(spec: Spec) -> Dict[str, Any]:
    return quantize(spec, "uint8", "cpu_keep_fp32", "neck")


if __name__ == "__main__":
    main(run)
