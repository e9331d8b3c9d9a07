"""The image's version probe: ``python3 -m targets.tensorrt.probe /opt/modelmatrix/versions.json``.

Run at build time, on hosts that usually have no GPU: it only imports tensorrt (no Builder, no CUDA
call) and reads what the NVIDIA base declares about itself (``CUDA_VERSION``, and the driver it
needs from ``NVIDIA_REQUIRE_CUDA``). images.py copies the JSON into the io.modelmatrix.versions
label, so `invoke images` shows TensorRT, CUDA and the minimum driver.

``MM_TENSORRT=absent`` (a build arg) is for proving the rest of the recipe on a base without
TensorRT (tests/docker/test_tensorrt_recipe.py); the default, ``required``, fails the build when
``import tensorrt`` does.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional

from targets.common.contract import StageError, atomic_write_json

from . import require_tensorrt


def driver_floor(require_cuda: str) -> Optional[str]:
    """The general driver floor in an NVIDIA ``NVIDIA_REQUIRE_CUDA`` value ("cuda>=12.8 brand=tesla,
    driver>=470,driver<471 ..."): the brand-specific ranges are compatibility exceptions, so the
    floor is what CUDA itself needs, which the base states only as the cuda>= part."""
    m = re.search(r"cuda>=(\d+\.\d+)", require_cuda or "")
    return f"cuda>={m.group(1)}" if m else None


def image_versions(env: Mapping[str, str], mode: str) -> Dict[str, str]:
    """name -> version for versions.json; raises SystemExit with one line when TensorRT is required
    and cannot be imported."""
    out: Dict[str, str] = {"python": platform.python_version()}
    for dist in ("numpy", "cuda-python", "cuda-bindings"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    if mode == "absent":
        out["tensorrt"] = "absent (built with MM_TENSORRT=absent)"
    else:
        try:
            out["tensorrt"] = require_tensorrt()
        except StageError as exc:
            raise SystemExit(
                f"error: {exc} (the base must be NVIDIA's nvcr.io/nvidia/tensorrt image; "
                "MM_TENSORRT=absent builds the rest of the recipe without it)"
            ) from None
    out["cuda"] = env.get("CUDA_VERSION", "absent")
    floor = driver_floor(env.get("NVIDIA_REQUIRE_CUDA", ""))
    out["cuda_driver_min"] = env.get("MM_CUDA_DRIVER_MIN") or "?"
    if floor:
        out["cuda_requires"] = floor
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python3 -m targets.tensorrt.probe OUT.json")
    versions = image_versions(os.environ, os.environ.get("MM_TENSORRT", "required"))
    atomic_write_json(Path(sys.argv[1]), versions)
    print(json.dumps(versions, sort_keys=True))
