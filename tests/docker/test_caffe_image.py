"""The caffe target for real: the image built FROM a bullseye minbase, real pycaffe in containers.

Both architectures x both neck features are exported to ONNX on the host (torch, seeded random
weights with calibrated BatchNorm), converted by ``caffe.convert`` and run by ``caffe.infer`` in
the image through the DockerRunner, on a small synthetic Market1501-layout set, and compared
with PyTorch (and with ONNX Runtime on the same ONNX file: the fp32 noise floor).

About the tolerance: every variant must pass the shipped matrix.yaml caffe tolerance (rtol 1e-3,
atol 1e-3 on the raw features, cosine >= 0.99999), equal Rank-1/mAP, and Caffe's error must stay
within 2x of ONNX Runtime's on the same ONNX file (the fp32 noise floor). neck_feat=before must
also pass atol 1e-4 (max abs error ~6e-5 to 9e-5); the BNNeck output (after) cannot: PyTorch fp32
itself is ~2e-4 from a float64 run there (see matrix.yaml).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from modelmatrix import REPO_ROOT, images
from modelmatrix.config import ARCH_CONTRACTS, load_matrix
from modelmatrix.data import make_synthetic, prepare
from modelmatrix.docker_client import owner_labels
from modelmatrix.errors import StageFailed
from modelmatrix.reid_metrics import evaluate_index
from modelmatrix.runners.base import LogTail, StageRequest
from modelmatrix.runners.docker import CONTAINER_WORKSPACE, DockerRunner, StageContainer
from targets.torch.export import calibration_sample, export_onnx
from targets.torch.models import init_random_model

from mm_docker_support import BULLSEYE_BASE, write_yaml

SIZE = [256, 128]
VARIANTS = [(arch, neck) for arch in ("reid-strong-baseline", "fastreid-bagtricks-r50") for neck in ("after", "before")]


def vname(arch: str, neck: str) -> str:
    return f"{arch}-{neck}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """World-readable (a stage may run as another uid than the test)."""
    root = tmp_path_factory.mktemp("caffe-docker")
    root.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def caffe_matrix(shared_root, bullseye_base):
    root = shared_root / "caffe"
    root.mkdir(exist_ok=True)
    path = write_yaml(
        root / "matrix.yaml",
        {
            "workspace": str(root / "ws"),
            "images": {"memory_limit": "4g"},
            "targets": {"caffe": {"image": {"base": BULLSEYE_BASE}}},
            "verify": {"reference": "caffe"},
        },
    )
    return load_matrix(path)


@pytest.fixture(scope="module")
def caffe_image(caffe_matrix):
    return images.build(caffe_matrix, "caffe")


@pytest.fixture(scope="module")
def runner(caffe_matrix, caffe_image):
    r = DockerRunner(caffe_matrix)
    yield r
    r.close()


@pytest.fixture(scope="module")
def ws(shared_root):
    path = shared_root / "caffe-ws"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def dataset(shared_root):
    return make_synthetic(
        shared_root / "caffe-data",
        identities=6,
        cameras=3,
        gallery_per_camera=1,
        junk=1,
        distractors=2,
        seed=3,
        train_identities=0,
    )["path"]


@pytest.fixture(scope="module")
def exported(ws, dataset):
    """Per variant: model.onnx in the workspace, inputs.npy + index.json per arch, torch features."""
    out = {}
    for arch, neck in VARIANTS:
        data_dir = ws / "data" / arch
        if not (data_dir / "inputs.npy").is_file():
            prepare(Path(dataset), data_dir, ARCH_CONTRACTS[arch], SIZE, ascend_bins=False)
        cfg = {
            "arch": arch,
            "num_classes": 751,
            "last_stride": 1,
            "neck_feat": neck,
            "input_size": SIZE,
            "seed": 0,
            "calibration_batches": 4,
            "export": {"opset": 11, "input_name": "image", "output_name": "class", "dynamic_batch": True},
        }
        # As torch.export does for random weights: BatchNorm statistics from the prepared inputs.
        model = init_random_model(cfg, calibration_sample(data_dir / "inputs.npy", cfg)[0])
        folder = ws / "models" / vname(arch, neck)
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(export_onnx(model, cfg, {}), str(folder / "model.onnx"))
        inputs = np.load(data_dir / "inputs.npy")
        with torch.no_grad():
            ref = model(torch.from_numpy(inputs)).numpy()
        sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        ort_feats = sess.run(None, {"image": inputs})[0]
        out[(arch, neck)] = {
            "ref": ref,
            "ort": ort_feats,
            "items": json.loads((data_dir / "index.json").read_text())["items"],
        }
    return out


def run_stage(runner, matrix, ws: Path, stage: str, inputs: dict, out_dir: str, params: dict) -> dict:
    out = ws / out_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    runner.run(
        StageRequest(
            target=matrix.targets["caffe"],
            stage=stage,
            workspace=ws,
            inputs=inputs,
            out_dir=out_dir,
            params=params,
            timeout_s=600,
        )
    )
    return json.loads((out / "result.json").read_text())


def stage_error(runner, matrix, ws, stage, inputs, out_dir, params) -> str:
    """Run a stage that must fail with exit 2; returns its one error line."""
    with pytest.raises(StageFailed) as exc:
        run_stage(runner, matrix, ws, stage, inputs, out_dir, params)
    # the stage contract's user error (exit 2): its message IS the reason, said once
    assert exc.value.user_error and exc.value.exit_code == 2, (str(exc.value), exc.value.log_tail)
    errors = [line for line in exc.value.log_tail.splitlines() if "error: " in line]
    assert len(errors) == 1, exc.value.log_tail
    assert errors[0].split("error: ", 1)[1] == str(exc.value)
    assert "Traceback" not in exc.value.log_tail
    return errors[0]


@pytest.fixture(scope="module")
def converted(runner, caffe_matrix, ws, exported):
    results = {}
    for arch, neck in VARIANTS:
        name = vname(arch, neck)
        results[(arch, neck)] = run_stage(
            runner,
            caffe_matrix,
            ws,
            "convert",
            {"onnx": f"models/{name}/model.onnx"},
            f"caffe/{name}/convert",
            {"output_name": "output"},
        )
    return results


def files(arch, neck):
    name = vname(arch, neck)
    return {
        "prototxt": f"caffe/{name}/convert/model.prototxt",
        "caffemodel": f"caffe/{name}/convert/model.caffemodel",
        "inputs": f"data/{arch}/inputs.npy",
    }


# --------------------------------------------------------------------------- the image


def test_image_records_caffe_and_round_mode(caffe_image):
    versions = caffe_image["versions"]
    assert versions["caffe_deb"] == "1.0.0+git20180821.99bd997-8+b2"
    assert versions["round_mode"] == "supported"
    assert versions["protobuf_implementation"] == "python"
    assert versions["onnx"] == "1.15.0" and versions["numpy"].startswith("1.19.")
    assert versions["python"].startswith("3.9.")
    assert "openblas" in versions["blas"]


# --------------------------------------------------------------------------- conversion + parity


@pytest.mark.parametrize("arch,neck", VARIANTS, ids=[vname(*v) for v in VARIANTS])
def test_convert_and_infer_match_torch(runner, caffe_matrix, ws, exported, converted, arch, neck):
    conv = converted[(arch, neck)]
    assert conv["shape_guard"] == "passed"
    maxpool = conv["pooling"][0]
    assert maxpool["round_mode"] == ("FLOOR" if arch == "reid-strong-baseline" else "CEIL")
    assert maxpool["top_shape"] == [2, 64, 64, 32]
    assert conv["output_name"] == "output" and conv["input_shape"] == [1, 3, 256, 128]

    result = run_stage(
        runner,
        caffe_matrix,
        ws,
        "infer",
        files(arch, neck),
        f"caffe/{vname(arch, neck)}/infer",
        {"batch_size": 16, "output_name": "output"},
    )
    got = np.load(ws / "caffe" / vname(arch, neck) / "infer" / "features.npy")
    ref, ort_feats, items = (
        exported[(arch, neck)]["ref"],
        exported[(arch, neck)]["ort"],
        exported[(arch, neck)]["items"],
    )
    assert got.shape == ref.shape == (len(items), 2048) and got.dtype == np.float32
    assert result["images"] == len(items) and len(result["batch_seconds"]) == -(-len(items) // 16)
    assert result["versions"]["round_mode_supported"] is True

    err = float(np.abs(got - ref).max())
    ort_err = float(np.abs(ort_feats - ref).max())
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    tol = load_matrix(REPO_ROOT / "matrix.yaml").target_cfg("caffe")["tolerance"]
    print(
        f"\n{vname(arch, neck)}: max abs {err:.3g} (onnxruntime {ort_err:.3g}), max |feature| "
        f"{float(np.abs(ref).max()):.3g}, min cosine {cos.min():.9f}, {result['images_per_second']:.2f} img/s"
    )
    assert cos.min() >= tol["cosine_min"] == 0.99999
    np.testing.assert_allclose(got, ref, rtol=tol["rtol"], atol=tol["atol"])
    assert err <= 2 * ort_err + 1e-5
    if neck == "before":
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    # the features are not collapsed: each image is nearest to its own reference feature
    sim = (got / np.linalg.norm(got, axis=1, keepdims=True)) @ (ref / np.linalg.norm(ref, axis=1, keepdims=True)).T
    assert (sim.argmax(axis=1) == np.arange(len(items))).all()
    caffe_metrics, torch_metrics = evaluate_index(got, items), evaluate_index(ref, items)
    assert caffe_metrics["rank1"] == torch_metrics["rank1"]
    assert caffe_metrics["mAP"] == pytest.approx(torch_metrics["mAP"], abs=1e-9)


def test_ceil_rounding_is_caught_by_the_guard_in_real_caffe(caffe_image, caffe_matrix, ws, exported, docker_engine):
    """Build the strong-baseline net in pycaffe with the max-pool flipped to CEIL: the guard,
    reading Caffe's own blob shapes, names the pool layer (65x33 against ONNX's 64x32)."""
    out = ws / "guard"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    code = textwrap.dedent(f"""
        from pathlib import Path
        from targets.caffe import onnx2caffe as oc
        from targets.caffe.convert import build
        from targets.caffe.infer import import_caffe
        net = oc.convert_model(oc.load_onnx(Path("{CONTAINER_WORKSPACE}/models/reid-strong-baseline-after/model.onnx")))
        pool = next(l for l in net.layers if l.onnx_op == "MaxPool")
        pool.params["pooling_param"]["round_mode"] = oc.Ident("CEIL")
        out = Path("{CONTAINER_WORKSPACE}/guard")
        build(import_caffe(), net, oc.render_prototxt(net), out / "model.prototxt", out / "model.caffemodel")
        """)
    tail = LogTail("caffe.guard")
    container = StageContainer(
        docker_engine,
        caffe_image["image_id"],
        ["python3", "-c", code],
        label="caffe.guard",
        user=DockerRunner(caffe_matrix).user,
        mounts=[(str(ws), CONTAINER_WORKSPACE, True), (str(out), f"{CONTAINER_WORKSPACE}/guard", False)],
        labels=owner_labels("caffe-guard-test"),
        environment={"HOME": "/tmp"},
        mem_limit="4g",
    )
    with container:
        assert container.run(tail, 300) == 1
    log = tail.text()
    assert "StageError" in log
    assert "layer '/base/maxpool/MaxPool' (Pooling, from ONNX MaxPool" in log
    assert "2x64x65x33 in Caffe but 2x64x64x32 in the ONNX graph" in log
    assert list(out.iterdir()) == []  # nothing written: not even the temporary prototxt


def test_bench_reports_images_per_second(runner, caffe_matrix, ws, converted):
    result = run_stage(
        runner,
        caffe_matrix,
        ws,
        "bench",
        files("reid-strong-baseline", "after"),
        "caffe/bench",
        {"batch_sizes": [1, 8, 16], "warmup": 1, "iterations": 2},
    )
    rows = {r["batch_size"]: r for r in result["results"]}
    assert sorted(rows) == [1, 8, 16]
    for row in rows.values():
        assert row["images_per_second"] > 0 and row["latency_ms_p95"] >= row["latency_ms_p50"] > 0
    print(
        "\ncaffe bench: "
        + ", ".join(
            f"bs{b} {r['images_per_second']:.2f} img/s (p50 {r['latency_ms_p50']:.0f} ms)"
            for b, r in sorted(rows.items())
        )
    )
    assert (ws / "caffe" / "bench" / "bench.json").is_file()


# --------------------------------------------------------------------------- bad input


def test_corrupt_prototxt(runner, caffe_matrix, ws, converted):
    good = (ws / files("reid-strong-baseline", "after")["prototxt"]).read_text()
    bad_dir = ws / "bad"
    bad_dir.mkdir(exist_ok=True)
    (bad_dir / "truncated.prototxt").write_text(good[: len(good) // 2])
    (bad_dir / "unknown-bottom.prototxt").write_text(
        good.replace('bottom: "/base/maxpool/MaxPool_output_0"', 'bottom: "nowhere"', 1)
    )
    for name, expect in [
        ("truncated", "not a valid Caffe prototxt"),
        ("unknown-bottom", "reads blob 'nowhere' that no earlier layer produces"),
    ]:
        inputs = dict(files("reid-strong-baseline", "after"), prototxt=f"bad/{name}.prototxt")
        line = stage_error(runner, caffe_matrix, ws, "infer", inputs, f"caffe/bad-{name}", {})
        assert f"bad/{name}.prototxt: " in line and expect in line
        assert not (ws / "caffe" / f"bad-{name}" / "features.npy").exists()


@pytest.mark.parametrize(
    "other,expect",
    [
        (("reid-strong-baseline", "before"), "no weights for layer '/bottleneck/BatchNormalization'"),
        (("fastreid-bagtricks-r50", "after"), "no weights for layer '/base/conv1/Conv'"),
    ],
)
def test_caffemodel_that_does_not_match_its_prototxt(runner, caffe_matrix, ws, converted, other, expect):
    inputs = dict(files("reid-strong-baseline", "after"), caffemodel=files(*other)["caffemodel"])
    line = stage_error(runner, caffe_matrix, ws, "infer", inputs, "caffe/bad-mismatch", {})
    assert "model.caffemodel: does not match " in line and expect in line
    assert not (ws / "caffe" / "bad-mismatch" / "features.npy").exists()


def test_truncated_caffemodel(runner, caffe_matrix, ws, converted):
    data = (ws / files("reid-strong-baseline", "after")["caffemodel"]).read_bytes()
    (ws / "bad").mkdir(exist_ok=True)
    (ws / "bad" / "truncated.caffemodel").write_bytes(data[: len(data) - 1000])
    inputs = dict(files("reid-strong-baseline", "after"), caffemodel="bad/truncated.caffemodel")
    line = stage_error(runner, caffe_matrix, ws, "infer", inputs, "caffe/bad-truncated", {})
    assert "truncated.caffemodel: not a valid caffemodel" in line


def test_wrong_output_name(runner, caffe_matrix, ws, converted):
    line = stage_error(
        runner,
        caffe_matrix,
        ws,
        "infer",
        files("reid-strong-baseline", "after"),
        "caffe/bad-output",
        {"output_name": "feat"},
    )
    assert "output_name: 'feat' is not a blob of" in line


def _odd_onnx(path: Path, dynamic_hw: bool) -> None:
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.sin(torch.nn.functional.relu(x)).flatten(1)

    axes = {"x": {0: "b", 2: "h", 3: "w"} if dynamic_hw else {0: "b"}, "y": {0: "b"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Odd(),
        (torch.zeros(1, 3, 8, 4),),
        str(path),
        dynamo=False,
        opset_version=11,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes=axes,
    )


@pytest.mark.parametrize(
    "dynamic_hw,expect",
    [
        (False, "1 ONNX node(s) have no exact Caffe mapping: Sin (node /Sin)"),
        (True, "has a dynamic channel/spatial size"),
    ],
)
def test_convert_refuses_before_writing(runner, caffe_matrix, ws, caffe_image, dynamic_hw, expect):
    name = "dynamic" if dynamic_hw else "unsupported"
    _odd_onnx(ws / "bad" / f"{name}.onnx", dynamic_hw)
    line = stage_error(runner, caffe_matrix, ws, "convert", {"onnx": f"bad/{name}.onnx"}, f"caffe/bad-{name}", {})
    assert expect in line
    assert sorted(p.name for p in (ws / "caffe" / f"bad-{name}").iterdir()) == ["spec.json"]
