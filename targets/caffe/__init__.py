"""Caffe target: ONNX -> prototxt/caffemodel conversion (onnx2caffe, convert) and pycaffe inference.

Importing this package inside the caffe image (``MM_TARGET=caffe``) picks OpenBLAS's kernel from
the CPU flags before numpy or pycaffe load OpenBLAS: Debian bullseye's OpenBLAS 0.3.13 does not
know CPUs released after 2020 (AMD Zen 4, Intel Sapphire Rapids) and falls back to its generic
"Prescott" kernel, measured 5x slower for sgemm than "SkylakeX" on an AVX-512 CPU. A
user-set ``OPENBLAS_CORETYPE`` is left alone; the choice is reported in every result.json.
"""

import os

AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return set()
    return set()


def openblas_coretype(flags: set) -> str:
    """The fastest OpenBLAS 0.3.13 kernel family these CPU flags can run ('' = let OpenBLAS pick)."""
    if AVX512 <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return ""


def _select_openblas_core() -> None:
    if os.environ.get("MM_TARGET") != "caffe" or "OPENBLAS_CORETYPE" in os.environ:
        return
    core = openblas_coretype(_cpu_flags())
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
        os.environ["MM_OPENBLAS_CORETYPE_SOURCE"] = "cpu flags (targets/caffe/__init__.py)"


_select_openblas_core()
