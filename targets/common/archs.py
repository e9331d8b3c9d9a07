"""Input contract of each architecture: how the host preprocesses images for it (prepare) and
what the export records in the ONNX metadata. Shared by both sides (stdlib only)."""

from typing import Any, Dict

#: ../shared/REFERENCE.md: reid-strong-baseline normalises outside the model (RGB, bilinear,
#: ToTensor, ImageNet mean/std); fast-reid takes RGB 0..255 and normalises inside (bicubic).
ARCH_CONTRACTS: Dict[str, Dict[str, Any]] = {
    "reid-strong-baseline": {
        "color": "RGB",
        "interpolation": "bilinear",
        "scale": 1.0 / 255.0,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "normalize_in_model": False,
    },
    "fastreid-bagtricks-r50": {
        "color": "RGB",
        "interpolation": "bicubic",
        "scale": 1.0,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],  # 0..255 in; mean/std inside the model
        "normalize_in_model": True,
    },
}
