"""The TensorRT target: strongly typed engine builds (convert.py) and inference (infer.py).

Written to NVIDIA's documented TensorRT 10.x/11.x Python API and type-checked against its stubs
(tests/test_tensorrt.py); NOT executed on the project's machines (no GPU, TensorRT not installable).
"""

from __future__ import annotations

from targets.common.contract import StageError


def require_tensorrt() -> str:
    """The installed TensorRT's version, or one line saying it is not here. The type stubs
    (tensorrt-stubs) install a bare ``tensorrt`` folder that imports as an empty namespace package:
    that is not TensorRT. Callers then ``import tensorrt as trt`` themselves, so that mypy checks
    every call against the stubs (a module returned from here would be untyped)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise StageError(
            f"TensorRT is not installed here ({exc}); the tensorrt image has it "
            "(its base is NVIDIA's nvcr.io/nvidia/tensorrt container)"
        ) from None
    if not hasattr(trt, "Builder"):
        raise StageError(
            "the `tensorrt` found here is only its type stubs (tensorrt-stubs), not TensorRT; "
            "run the target in its image"
        )
    return str(getattr(trt, "__version__", "?"))
