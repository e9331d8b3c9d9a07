"""modelmatrix: host-side orchestration. Imports no toolchain (torch, onnxruntime, caffe, tensorrt, acl)."""

from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS_DIR = REPO_ROOT / "targets"
IMAGES_DIR = REPO_ROOT / "images"
