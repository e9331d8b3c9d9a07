"""The Ascend target without Huawei's toolkit: its checks, command lines and file formats, and both
stages run for real against the FAKE toolkit (tests/fake_cann), on files the tests make.

The real CANN 5.0.1 was not executed anywhere here: these tests prove the orchestration, parsing and
file layouts, not atc's or the NPU's numerics.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelmatrix import data
from modelmatrix.reid_metrics import eval_func, evaluate_index
from targets.ascend import cann
from targets.ascend.commands import commands
from targets.ascend.onnxinfo import image_input, output_dim, read_onnx
from targets.common.contract import StageError, spec_to_json

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "fake_cann"))
from build_run import build_run  # noqa: E402

H, W = 32, 16
GUIDE_PERF_BS1 = """[e2e] throughputRate: 141.4, latency: 139547
[data read] throughputRate: 142.595, moduleLatency: 7.01285
[preprocess] throughputRate: 142.32, moduleLatency: 7.0264
[infer] throughputRate: 142.234, Interface throughputRate: 361.547, moduleLatency: 3.2183
[post] throughputRate: 142.233, moduleLatency: 7.03069

"""


def tiny_onnx(path: Path, opset: int = 11, extra_op: str | None = None, dim: int = 8) -> Path:
    """image (N,3,H,W) -> Conv -> Relu -> GlobalAveragePool -> Flatten -> class (N, dim)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((dim, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(dim).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["class" if extra_op is None else "f"]),
    ]
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["f"], ["class"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, H, W])],
        [helper.make_tensor_value_info("class", TensorProto.FLOAT, ["batch", dim])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- Python 3.7

PY38_NAMES = {
    "removeprefix",
    "removesuffix",
    "is_relative_to",
    "cache",
    "prod",
    "isqrt",
    "shlex_join",
    "get_origin",
    "get_args",
    "TypedDict",
    "Literal",
    "Protocol",
    "Final",
    "cached_property",
    "topological_sort",
    "with_stem",
    "readlink",
    "bit_count",
    "pairwise",
    "zip_longest_strict",
}
PY38_MODULES = {"importlib.metadata", "zoneinfo", "graphlib", "tomllib"}


def _py37_problems(path: Path) -> list[str]:
    src = path.read_text()
    try:
        tree = ast.parse(src, filename=str(path), feature_version=(3, 7))
    except SyntaxError as exc:
        return [f"{path}:{exc.lineno}: not Python 3.7 syntax ({exc.msg})"]
    future = any(
        isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    annotations: set[int] = set()
    for node in ast.walk(tree):
        for ann in [getattr(node, "annotation", None), getattr(node, "returns", None)]:
            if ann is not None:
                annotations.update(id(n) for n in ast.walk(ann))
    out = []
    for node in ast.walk(tree):
        line = f"{path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr in PY38_NAMES:
            out.append(f"{line}: .{node.attr} is newer than Python 3.7")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module == "typing":
                names += [f"typing.{a.name}" for a in node.names if a.name in PY38_NAMES]
            out += [
                f"{line}: imports {n} (newer than 3.7)" for n in names if n in PY38_MODULES or n.startswith("typing.")
            ]
        if (
            isinstance(node, ast.Subscript)
            and id(node) not in annotations
            and isinstance(node.value, ast.Name)
            and node.value.id in ("list", "dict", "tuple", "set", "type")
        ):
            out.append(f"{line}: {node.value.id}[...] at run time needs Python 3.9")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) in annotations and not future:
            out.append(f"{line}: X | Y in an annotation without `from __future__ import annotations`")
        if (
            isinstance(node, ast.FormattedValue)
            and isinstance(node.format_spec, ast.JoinedStr) is False
            and re.search(r"\{[^{}]*=\}", ast.get_source_segment(src, node) or "")
        ):
            out.append(f"{line}: f-string '=' needs Python 3.8")
        if isinstance(node, ast.keyword) and node.arg in ("missing_ok", "strict", "slots", "kw_only"):
            out.append(f"{line}: keyword {node.arg}= is newer than Python 3.7")
    return out


def test_targets_common_and_ascend_are_python_37_code():
    files = sorted((REPO / "targets" / "common").glob("*.py")) + sorted((REPO / "targets" / "ascend").glob("*.py"))
    assert len(files) >= 8
    problems = [p for f in files for p in _py37_problems(f)]
    assert problems == []


def test_the_py37_check_finds_what_37_lacks(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import importlib.metadata\nx = 'ab'.removeprefix('a')\ny = list[int]\nif (n := 3): pass\n")
    found = _py37_problems(bad)
    assert len(found) == 1 and "not Python 3.7 syntax" in found[0]  # the walrus stops the parse
    bad.write_text(
        "import importlib.metadata\nx = 'ab'.removeprefix('a')\ny = list[int]\n"
        "def f(p: 'str | None') -> dict[str, int]:\n    return {}\n"
    )
    found = _py37_problems(bad)
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        ".removeprefix is newer than Python 3.7",
        "imports importlib.metadata (newer than 3.7)",
        "list[...] at run time needs Python 3.9",
    ]


# --------------------------------------------------------------------------- ONNX facts and atc's limits


def test_onnx_facts_read_without_the_onnx_package(tmp_path):
    path = tiny_onnx(tmp_path / "m.onnx")
    info = read_onnx(path)
    assert info["opsets"] == {"": 11}
    assert [op for _, op, _ in info["ops"]] == ["Conv", "Relu", "GlobalAveragePool", "Flatten"]
    assert info["inputs"] == [("image", ["batch", 3, H, W])]  # the initializers are not inputs
    assert image_input(info, path) == ("image", 3, H, W) and output_dim(info, path) == 8
    cann.check_onnx_for_atc(info, path)


def test_opset_13_and_an_op_atc_lacks_are_refused_by_name(tmp_path):
    path = tiny_onnx(tmp_path / "m13.onnx", opset=13)
    with pytest.raises(
        StageError,
        match=r"m13.onnx: ONNX opset 13; ATC \(CANN 5.0.1\) takes opset 11: "
        r"export with model.export.opset: 11",
    ):
        cann.check_onnx_for_atc(read_onnx(path), path)
    det = tiny_onnx(tmp_path / "det.onnx", extra_op="Det")
    with pytest.raises(StageError, match=r"det.onnx: operators ATC \(CANN 5.0.1\) does not convert: Det \(1 node\)"):
        cann.check_onnx_for_atc(read_onnx(det), det)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(StageError, match="junk.onnx: not a valid ONNX file"):
        read_onnx(junk)


def test_the_guides_command_lines():
    params = {"batch_sizes": [16, 1], "soc_version": "Ascend310", "precision_mode": "force_fp16", "atc_log": "debug"}
    lines = [
        " ".join(c)
        for c in commands(
            "convert",
            params,
            {"input_size": [256, 128], "input_name": "image", "inputs": {"onnx": "ReID.onnx"}, "out_dir": "."},
        )
    ]
    assert lines == [
        "atc --framework=5 --model=ReID.onnx --output=om/model_bs1 --input_format=NCHW --input_shape=image:1,3,256,128 "
        "--log=debug --soc_version=Ascend310 --precision_mode=force_fp16",
        "atc --framework=5 --model=ReID.onnx --output=om/model_bs16 --input_format=NCHW --input_shape=image:16,3,256,128 "
        "--log=debug --soc_version=Ascend310 --precision_mode=force_fp16",
    ]
    (bench,) = commands("infer", {"batch_size": 1, "device_id": 0}, {"input_size": [256, 128], "inputs": {"om": "."}})
    assert " ".join(bench) == (
        "benchmark.x86_64 -model_type=vision -device_id=0 -batch_size=1 -om_path=model_bs1.om "
        "-input_text_path=./prep_bin.info -input_width=128 -input_height=256 "
        "-output_binary=True -useDvpp=False"
    )
    assert (
        cann.atc_command("m.onnx", "o", "image", 16, 256, 128, auto_tune_mode="RL,GA")[-1] == "--auto_tune_mode=RL,GA"
    )
    with pytest.raises(StageError, match="auto_tune_mode 'XX'"):
        cann.atc_command("m.onnx", "o", "image", 16, 256, 128, auto_tune_mode="XX")


# --------------------------------------------------------------------------- benchmark files


def test_perf_file_gives_the_guides_card_throughput(tmp_path):
    perf = tmp_path / "perf_vision_batchsize_1_device_0.txt"
    perf.write_text(GUIDE_PERF_BS1)
    out = cann.parse_perf(perf)
    assert out["chip_fps"] == 361.547 and out["card_fps"] == 1446.188
    assert out["stages"]["e2e"] == {"throughputRate": 141.4, "latency": 139547.0}
    perf.write_text(GUIDE_PERF_BS1.replace("361.547", "647.14"))
    assert cann.parse_perf(perf)["card_fps"] == 2588.56
    perf.write_text("throughput 361.547 img/s\n")
    with pytest.raises(StageError, match=r"perf_vision_batchsize_1_device_0.txt: line 1 is not '\[stage\] key: value"):
        cann.parse_perf(perf)
    perf.write_text("[e2e] throughputRate: 141.4, latency: 139547\n")
    with pytest.raises(StageError, match="no '\\[infer\\] ... Interface throughputRate: N' line"):
        cann.parse_perf(perf)


def test_dump_output_is_read_in_info_order_and_a_gap_is_named(tmp_path):
    dump = cann.dump_dir(tmp_path, 0)
    dump.mkdir(parents=True)
    stems = ["0002_c2s1_000001_00", "0001_c1s1_000001_00", "0003_c1s1_000001_00"]  # not directory order
    for i, s in enumerate(stems):
        np.full(4, i, dtype="<f4").tofile(dump / f"{s}_1.bin")
    feats = cann.read_dump(tmp_path, 0, stems, 4)
    assert feats.dtype == np.float32 and feats[:, 0].tolist() == [0.0, 1.0, 2.0]
    (dump / f"{stems[1]}_1.bin").unlink()
    (dump / f"{stems[2]}_1.bin").unlink()
    with pytest.raises(StageError, match=rf"dumpOutput_device0: no output for {stems[1]}_1.bin \(and 1 more\) of 3"):
        cann.read_dump(tmp_path, 0, stems, 4)
    np.zeros(3, dtype="<f4").tofile(dump / f"{stems[1]}_1.bin")
    np.zeros(4, dtype="<f4").tofile(dump / f"{stems[2]}_1.bin")
    with pytest.raises(StageError, match=rf"{stems[1]}_1.bin: 12 bytes, expected 16 bytes \(float32 x 4\)"):
        cann.read_dump(tmp_path, 0, stems, 4)


def test_a_bin_of_the_wrong_size_is_named(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0" * (3 * H * W * 4))
    (tmp_path / "b.bin").write_bytes(b"\0" * 100)
    rows = [(0, "ascend/a.bin", W, H), (1, "ascend/b.bin", W, H)]
    with pytest.raises(
        StageError, match=rf"b.bin: 100 bytes, expected {3 * H * W * 4} \(float32 3x{H}x{W}, no header\)"
    ):
        cann.check_bins(rows, tmp_path, (3, H, W))
    info = tmp_path / "prep_bin.info"
    info.write_text("0 ascend/a.bin 16\n")
    with pytest.raises(StageError, match="prep_bin.info: line 1 is not '<index> <path> <width> <height>'"):
        cann.read_info(info)


# --------------------------------------------------------------------------- both stages, fake toolkit


@pytest.fixture(scope="module")
def fake_toolkit(tmp_path_factory):
    """The fake installer run as a user would (--install --quiet), into a temporary install path."""
    root = tmp_path_factory.mktemp("fake_cann")
    made = build_run(root / "downloads")
    rc = subprocess.run(
        [str(made["toolkit"]["path"]), "--install", "--quiet", f"--install-path={root / 'Ascend'}"],
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 0, rc.stderr
    refused = subprocess.run(
        [str(made["toolkit"]["path"]), "--install", "--quiet", "--full"], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "unsupported parameter: --full" in refused.stderr
    install = root / "Ascend" / "ascend-toolkit" / "latest"
    bench_dir = root / "bench"
    bench_dir.mkdir()
    os.symlink(made["benchmark"]["path"], bench_dir / "benchmark.x86_64")
    env = {
        **os.environ,
        "install_path": str(install),
        "PATH": os.pathsep.join(
            [str(Path(sys.executable).parent), str(install / "atc" / "bin"), str(bench_dir), os.environ["PATH"]]
        ),
    }
    return {"env": env, "made": made, "install": install}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A real prepare (synthetic Market1501 set, 32x16) and a tiny opset-11 ONNX beside it."""
    root = tmp_path_factory.mktemp("ascend_ws")
    data.make_synthetic(root / "ds", identities=6, cameras=2, gallery_per_camera=2, junk=1, distractors=2)
    from targets.common.archs import ARCH_CONTRACTS

    contract = {**ARCH_CONTRACTS["reid-strong-baseline"], "input_size": [H, W]}
    data.prepare(root / "ds", root / "prepare", contract, (H, W))
    (root / "export").mkdir()
    tiny_onnx(root / "export" / "model.onnx")
    return root


def _stage(ws: Path, stage: str, inputs: dict, params: dict, env: dict) -> subprocess.CompletedProcess:
    out = ws / f"ascend.{stage}"
    out.mkdir(exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps(spec_to_json("ascend", stage, str(ws), inputs, out.name, params)))
    return subprocess.run(
        [sys.executable, "-m", f"targets.ascend.{stage}", str(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_convert_and_infer_with_the_fake_toolkit(workspace, fake_toolkit):
    env = fake_toolkit["env"]
    params = {
        "batch_sizes": [1, 4],
        "soc_version": "Ascend310",
        "precision_mode": "force_fp16",
        "atc_log": "error",
        "auto_tune_mode": "",
    }
    conv = _stage(workspace, "convert", {"onnx": "export/model.onnx"}, params, env)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    om_dir = workspace / "ascend.convert" / "om"
    for b in (1, 4):
        om = om_dir / f"model_bs{b}.om"
        assert om.read_bytes()[:4] == b"IMOD"
        side = json.loads((om_dir / f"model_bs{b}.om.json").read_text())
        assert side["batch"] == b and side["input"]["shape"] == [b, 3, H, W] and side["output"]["shape"] == [b, 8]
        assert side["precision_mode"] == "force_fp16" and side["atc_version"] == "5.0.1"
        assert side["toolkit_test_double"] is True and side["command"][0].endswith("/atc")
        log = (workspace / "ascend.convert" / "logs" / f"atc_bs{b}.log").read_text()
        assert "ATC run success" in log and f"--input_shape=image:{b},3,{H},{W}" in log
    assert list((workspace / "ascend.convert" / "logs" / "plog" / "plog").glob("plog-*.log"))  # atc's own log kept
    result = json.loads((workspace / "ascend.convert" / "result.json").read_text())
    assert "FAKE CANN toolkit" in result["note"]

    inputs = {"om": "ascend.convert/om", "bins": "prepare/ascend", "index": "prepare/index.json"}
    inf = _stage(workspace, "infer", inputs, {"batch_size": 4, "device_id": 0, "chips_per_card": 4}, env)
    assert inf.returncode == 0, inf.stdout + inf.stderr
    out = workspace / "ascend.infer"
    feats = np.load(out / "features.npy")
    x = np.load(workspace / "prepare" / "inputs.npy")
    ref = ort.InferenceSession(str(workspace / "export" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )[0]
    cos = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
    assert feats.shape == ref.shape and cos.min() >= 0.999 and 0 < np.abs(feats - ref).max() < 5e-2  # fp16-rounded
    res = json.loads((out / "result.json").read_text())
    perf = cann.parse_perf(out / "result" / "perf_vision_batchsize_4_device_0.txt")
    assert res["images_per_second"] == perf["card_fps"] == round(perf["chip_fps"] * 4, 3)
    assert res["test_double"] is True and "FAKE" in res["note"]
    info_lines = (out / "prep_bin.info").read_text().splitlines()
    assert info_lines[0].split()[1] == str(
        workspace / "prepare" / "ascend" / info_lines[0].split()[1].rsplit("/", 1)[1]
    )

    # a batch size that was not converted, and a dumpOutput gap, are one line each
    bad = _stage(workspace, "infer", inputs, {"batch_size": 16, "device_id": 0}, env)
    assert (
        bad.returncode == 2
        and bad.stderr.strip().splitlines()[-1].startswith("error: ")
        and "no OM for batch_size 16 (converted: model_bs1.om, model_bs4.om)" in bad.stderr
    ), bad.stderr


def test_modelzoo_postprocess_reads_our_dump_output(workspace, fake_toolkit):
    """A re-implementation of the guide's ReID_postprocess.py (query/gallery folders + dumpOutput ->
    Rank-1/mAP) on our files gives what verify computes from features.npy."""
    out = workspace / "ascend.infer"
    if not (out / "features.npy").is_file():
        pytest.skip("needs test_convert_and_infer_with_the_fake_toolkit")
    pred = out / "result" / "dumpOutput_device0"
    pattern = re.compile(r"([-\d]+)_c(\d)")

    def load(folder: Path):
        feats, pids, cams = [], [], []
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".jpg"):
                continue
            pid, cam = map(int, pattern.search(name).groups())
            if pid == -1:
                continue  # junk images, as reid-strong-baseline's Market1501 loader
            feats.append(np.fromfile(pred / (Path(name).stem + "_1.bin"), dtype=np.float32))
            pids.append(pid)
            cams.append(cam - 1)
        return np.stack(feats), np.array(pids), np.array(cams)

    qf, qp, qc = load(workspace / "ds" / "query")
    gf, gp, gc = load(workspace / "ds" / "bounding_box_test")
    qf, gf = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in (qf, gf)]  # TEST.FEAT_NORM yes
    distmat = (qf**2).sum(1)[:, None] + (gf**2).sum(1)[None, :] - 2 * qf @ gf.T
    cmc, m_ap, _, _ = eval_func(distmat, qp, gp, qc, gc, 50)
    index = json.loads((workspace / "prepare" / "index.json").read_text())
    ours = evaluate_index(np.load(out / "features.npy"), index["items"])
    assert abs(ours["rank1"] - cmc[0]) < 1e-9 and abs(ours["mAP"] - m_ap) < 1e-9
    # the .bin layout the guide's preprocess writes: raw float32 CHW, no header, named <stem>.bin
    first = index["items"][0]
    raw = np.fromfile(workspace / "prepare" / "ascend" / (Path(first["file"]).stem + ".bin"), dtype=np.float32)
    assert np.array_equal(raw.reshape(3, H, W), np.load(workspace / "prepare" / "inputs.npy")[0])
    assert (workspace / "prepare" / "ascend" / "prep_bin.info").read_text().splitlines()[
        0
    ] == f"0 ascend/{Path(first['file']).stem}.bin {W} {H}"


def test_fake_tools_refuse_unknown_flags(fake_toolkit, tmp_path):
    env = fake_toolkit["env"]
    atc = subprocess.run(
        ["atc", "--framework=5", "--model=x.onnx", "--output=o", "--soc_version=Ascend310", "--bogus=1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert atc.returncode == 1 and "unknown parameter --bogus" in atc.stdout
    bench = subprocess.run(
        ["benchmark.x86_64", "-model_type=vision", "-turbo=True"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert bench.returncode == 1 and "unknown parameter -turbo" in bench.stdout


def test_device_ids_that_do_not_exist_on_the_host(tmp_path):
    from modelmatrix.errors import ConfigError
    from modelmatrix.runners.base import ascend_device_reason
    from modelmatrix.runners.docker import ascend_options

    (tmp_path / "davinci0").write_text("")
    assert ascend_device_reason([0], tmp_path) is None
    assert ascend_device_reason([3], tmp_path) == (
        f"device id 3: {tmp_path / 'davinci3'} does not exist on this host "
        "(found: davinci0); set targets.ascend.params.device_id"
    )
    with pytest.raises(ConfigError, match="targets.ascend: device id 3: "):
        ascend_options({"devices": []}, [3], tmp_path)
    (tmp_path / "davinci_manager").write_text("")
    opts = ascend_options({"devices": [str(tmp_path / "davinci_manager")], "binds_ro": [str(tmp_path)]}, [0], tmp_path)
    assert opts["devices"] == [
        f"{tmp_path}/davinci0:{tmp_path}/davinci0:rwm",
        f"{tmp_path}/davinci_manager:{tmp_path}/davinci_manager:rwm",
    ]
    assert opts["binds"] == [f"{tmp_path}:{tmp_path}:ro"] and opts["group_add"] == [str(os.getgid())]
