"""Conversions are deterministic: the same inputs converted twice in the same images give the same bytes.

torch.export's model.onnx and caffe.convert's model.prototxt + model.caffemodel are produced twice,
in two workspaces (nothing of the first run can be reused by the second), by the real torch and caffe
images through the Docker runner, on the small synthetic set (64x32, as the other docker matrix
tests). Every byte must be equal, and so must the stage keys and the provenance sidecars (which name
the image by id and layer diff ids, checked against the engine). The vendor tools that are not
deterministic (TensorRT's engine, atc's OM) are declared so in their target.yaml and reported, not
run here (no GPU, no CANN): tests/test_provenance.py checks the report says so.

The first workspace runs the whole matrix (its report, the sidecars of the inference stages too);
the second runs only the stages that convert (prepare, torch.export, caffe.convert) to stay lean.
"""

from __future__ import annotations

import hashlib
import json

import yaml

from modelmatrix import REPO_ROOT, data
from modelmatrix.config import load_matrix
from modelmatrix.docker_client import Engine
from modelmatrix.pipeline import DONE, MatrixRun, run_matrix
from modelmatrix.plan import build_plan
from modelmatrix.provenance import sidecar_name
from modelmatrix.runners.docker import DockerRunner

from mm_testing import write_matrix

CONVERTED = {"torch.export": ["model.onnx"], "caffe.convert": ["model.prototxt", "model.caffemodel"]}


def _config(root, dataset):
    shipped = yaml.safe_load((REPO_ROOT / "matrix.yaml").read_text())
    return write_matrix(
        root,
        runner="docker",
        images=shipped["images"],
        data__dataset=str(dataset),
        targets={"torch": {"params": {"batch_size": 8}}, "caffe": {"params": {"batch_size": 8}}},
    )


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_onnx_and_caffe_conversions_are_byte_identical_across_two_runs(tmp_path, ci_base, bullseye_base):
    tmp_path.chmod(0o755)
    dataset = tmp_path / "data"
    first_cfg = _config(tmp_path / "one", dataset)
    m1 = load_matrix(first_cfg)
    data.make_synthetic(dataset, **m1.raw["data"]["synthetic"])

    first = run_matrix(m1)
    assert first.runner == "docker" and first.passed, first.report
    assert first.report["targets"]["caffe"]["status"] == "passed"

    m2 = load_matrix(_config(tmp_path / "two", dataset))
    assert m2.workspace != m1.workspace
    wanted = {"prepare", *CONVERTED}
    plan = [n for n in build_plan(m2) if n.id in wanted]
    runner = DockerRunner(m2)
    try:
        second = MatrixRun(m2, runner).run(plan)
    finally:
        runner.close()

    engine = Engine()
    for node, files in CONVERTED.items():
        a, b = first.outcomes[node], second[node]
        assert a.status == DONE and b.status == DONE, (node, a.reason, b.reason)
        assert a.dir != b.dir and a.dir is not None and b.dir is not None
        assert a.key == b.key  # same image, same inputs, same parameters
        for name in files:
            one, two = (a.dir / name).read_bytes(), (b.dir / name).read_bytes()
            assert len(one) > 0
            assert one == two, f"{node} {name}: {_digest(a.dir / name)} != {_digest(b.dir / name)}"
            # the provenance is reproducible as well, and names the image the engine holds
            side_a, side_b = (a.dir / sidecar_name(name)).read_bytes(), (b.dir / sidecar_name(name)).read_bytes()
            assert side_a == side_b
            side = json.loads(side_a)
            assert side["sha256"] == hashlib.sha256(one).hexdigest() and side["nondeterministic"] is None
            env = side["environment"]
            img = engine.image(env["image"]["id"])
            assert img is not None and env["runner"] == "docker"
            assert env["fingerprint"] == f"docker:{img['Id']}"
            assert env["image"]["diff_ids"] == img["RootFS"]["Layers"] and env["image"]["diff_ids"]
            labels = img["Config"]["Labels"]
            assert env["versions"] == json.loads(labels["io.modelmatrix.versions"]) and env["versions"]
            assert env["image"]["labels"]["io.modelmatrix.recipe-hash"] == labels["io.modelmatrix.recipe-hash"]
            assert env["image"]["tag"].startswith(f"modelmatrix/{a.node.target}:")
    # the prepared inputs the conversions calibrated on were the same bytes too
    assert first.outcomes["prepare"].stamp["outputs"] == second["prepare"].stamp["outputs"]
