"""Helpers shared by test files (a plain module: `conftest` is ambiguous between tests/ and
tests/docker/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def write_matrix(tmp_path: Path, **overrides) -> Path:
    """A small matrix.yaml in tmp_path: the shipped defaults, made quick (small images, few targets)."""
    base = {
        "workspace": str(tmp_path / "ws"),
        "runner": "local",
        "model": {"arch": "reid-strong-baseline", "input_size": [64, 32], "calibration_batches": 2},
        "data": {
            "dataset": str(tmp_path / "data"),
            "ascend_bins": True,
            "synthetic": {
                "identities": 8,
                "cameras": 3,
                "gallery_per_camera": 1,
                "junk": 1,
                "distractors": 2,
                "seed": 0,
            },
        },
        "targets": {"torch": {"params": {"batch_size": 8}}, "onnxruntime": {"params": {"batch_size": 8}}},
    }
    for dotted, value in overrides.items():
        d = base
        keys = dotted.split("__")
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def run_invoke(args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 900):
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=cwd,
        env=full_env,
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
