"""The SHIPPED matrix.yaml, unchanged but for where it writes, through `invoke matrix --runner docker`.

This is what a fresh clone does (`invoke bases`, `invoke build`, `invoke data --synthetic`,
`invoke matrix --runner docker`): the shipped model (reid-strong-baseline, 256x128, seeded random
weights), the default synthetic set and the shipped tolerances, on torch + onnxruntime + caffe in
their images. It fails when a shipped threshold does not hold for this machine's fp32 noise (the
retrieval deltas, measured in benchmarks/fp32-retrieval-noise.md), which is the point: a threshold
the shipped run cannot meet is a bug in matrix.yaml, not in the run.

Only `workspace` and `data.dataset` are moved (into tmp_path): relative paths in matrix.yaml resolve
from its folder, and the test must not write into the checkout.
"""
from __future__ import annotations

import json

import yaml

from modelmatrix import REPO_ROOT

from mm_docker_support import write_yaml
from mm_testing import run_invoke

COMPARED = ("onnxruntime", "caffe")      # checked against the reference, torch
MOVED = ("workspace", "data.dataset")


def _without(d: dict, dotted: str) -> dict:
    """A deep copy of ``d`` without the key at ``dotted``."""
    out = json.loads(json.dumps(d))
    node = out
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[k]
    del node[keys[-1]]
    return out


def _shipped_copy(tmp_path) -> tuple[dict, str]:
    """The shipped matrix.yaml with workspace and dataset in tmp_path; nothing else changed."""
    shipped = yaml.safe_load((REPO_ROOT / "matrix.yaml").read_text())
    copy = json.loads(json.dumps(shipped))
    copy["workspace"] = str(tmp_path / "ws")
    copy["data"]["dataset"] = str(tmp_path / "data" / "market1501-synthetic")
    a, b = shipped, copy
    for key in MOVED:
        a, b = _without(a, key), _without(b, key)
    assert a == b
    return shipped, str(write_yaml(tmp_path / "matrix.yaml", copy))


def test_shipped_matrix_passes_with_the_docker_runner(tmp_path, ci_base, bullseye_base):
    tmp_path.chmod(0o755)                 # stages run as this uid, but keep the tree readable
    shipped, cfg = _shipped_copy(tmp_path)

    r = run_invoke(["data", "--synthetic", "--config", cfg], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = run_invoke(["matrix", "--config", cfg, "--runner", "docker"], timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    report = json.loads((tmp_path / "ws" / "report.json").read_text())
    assert report["passed"] is True, report["reason"]
    assert report["runner"] == "docker"
    assert report["reference"] == "torch" and report["targets"]["torch"]["status"] == "reference"
    compared = sorted(t for t, res in report["targets"].items() if res["status"] == "passed")
    assert compared == sorted(COMPARED), {t: res["status"] for t, res in report["targets"].items()}
    assert report["num_query"] > 0 and report["num_gallery"] > 0
    for t in COMPARED:
        res = report["targets"][t]
        # The thresholds that held are the shipped ones, and every check ran on all three targets.
        for key, value in shipped["targets"][t]["tolerance"].items():
            assert res["tolerance"][key] == value, (t, key)
        assert {c["name"] for c in res["checks"] if c["enabled"] and c["passed"]} == \
            {"allclose", "cosine", "retrieval"}, (t, res["checks"])
        assert res["metrics"]["retrieval"]["num_query"] == report["num_query"]
