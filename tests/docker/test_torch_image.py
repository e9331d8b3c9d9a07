"""The torch image: PyTorch CPU from the wheelhouse ($PIP_FIND_LINKS), ONNX, on the CI base.

The slowest build of the suite (pip installs the ~190 MB torch wheel); a no-op once built.
"""

from __future__ import annotations

import json

from modelmatrix import images


def test_torch_image(real_matrix, docker_engine):
    row = images.build(real_matrix, "torch")
    print(f"torch image: built={row['built']} in {row['seconds']}s, {row['size'] / 1e6:.0f} MB")
    assert row["up_to_date"]
    assert row["versions"]["torch"].startswith("2.13.0") and row["versions"]["onnx"] == "1.23.2"
    labels = docker_engine.image(row["tag"])["Config"]["Labels"]
    assert json.loads(labels["io.modelmatrix.versions"]) == row["versions"]
    recipe_wheels = labels["io.modelmatrix.wheelhouse"].split(",")
    assert [w for w in recipe_wheels if w.startswith("torch-2.13.0")], recipe_wheels
