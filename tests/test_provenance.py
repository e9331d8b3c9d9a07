"""Provenance sidecars on a real run (local runner): every output's ``<output>.provenance.json`` has
the output's real sha256, the stage key and exactly what the key was built from (so the key can be
recomputed from the sidecar alone), the parameters and the environment; a stored result whose
sidecar is missing, changed or absent from its stamp is damaged and rebuilt; the report names the
artifacts the manifests declare non-deterministic (TensorRT's engine, atc's OM) and says they are
judged by their outputs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil

import pytest
import yaml

from modelmatrix import REPO_ROOT, data
from modelmatrix.config import load_matrix
from modelmatrix.errors import ConfigError, ModelMatrixError
from modelmatrix.hashing import sha256_json
from modelmatrix.pipeline import CACHED, DONE, SKIPPED, run_matrix
from modelmatrix.provenance import SCHEMA, sidecar_name
from modelmatrix.workspace import STAMP, Workspace

from mm_testing import write_matrix

HEX64 = set("0123456789abcdef")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sidecar(folder, output) -> dict:
    return json.loads((folder / sidecar_name(output)).read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small real run: prepare (with the ascend/ folder), torch.export/infer, onnxruntime.infer,
    verify; tensorrt and ascend enabled but skipped here (no GPU, no CANN)."""
    tmp = tmp_path_factory.mktemp("prov")
    cfg = write_matrix(
        tmp,
        targets={
            "torch": {"params": {"batch_size": 8}},
            "onnxruntime": {"params": {"batch_size": 8}},
            "tensorrt": {},
            "ascend": {},
        },
    )
    m = load_matrix(cfg)
    data.make_synthetic(m.resolve(m.raw["data"]["dataset"]), **m.raw["data"]["synthetic"])
    summary = run_matrix(m, "local", ci=False)
    assert summary.passed, summary.report
    return cfg, summary


def test_every_output_has_a_sidecar_with_its_real_digest_and_what_its_key_was_built_from(run):
    cfg, s = run
    done = {k: o for k, o in s.outcomes.items() if o.status == DONE}
    assert {"prepare", "torch.export", "torch.infer", "onnxruntime.infer", "verify"} <= set(done)
    for node_id, o in done.items():
        stamp = json.loads((o.dir / STAMP).read_text())
        for name in o.node.outputs:
            side = sidecar(o.dir, name)
            path = o.dir / name
            assert side["schema"] == SCHEMA and side["artifact"] == name
            assert side["node"] == node_id and side["key"] == o.key
            assert side["stage_outputs"] == stamp["outputs"]
            if path.is_dir():  # prepare/ascend: each file's own digest, and the tree digest of the stamp
                assert side["kind"] == "folder" and side["sha256"] == stamp["outputs"][name]
                files = sorted(p for p in path.rglob("*") if p.is_file())
                assert files and sorted(side["files"]) == [p.relative_to(path).as_posix() for p in files]
                for p in files:
                    rel = p.relative_to(path).as_posix()
                    assert side["files"][rel] == {"sha256": sha256(p), "size": p.stat().st_size}
            else:
                assert side["kind"] == "file"
                assert side["sha256"] == sha256(path) == stamp["outputs"][name]
                assert side["size"] == path.stat().st_size
            assert side["params"] == json.loads(json.dumps(o.node.params))
            # Everything the stage key is built from is in the sidecar: the key recomputes from it.
            assert set(side["code"]) <= HEX64 and len(side["code"]) == 64
            recomputed = sha256_json(
                {
                    "node": node_id,
                    "code": side["code"],
                    "env": side["environment"]["fingerprint"],
                    "params": side["params"],
                    "inputs": {k: v["sha256"] for k, v in side["inputs"].items()},
                }
            )
            assert recomputed == o.key, node_id
            # Each input digest is the real sha256 of the file the stage read (from its producer).
            for iname, inp in side["inputs"].items():
                ref = o.node.inputs.get(iname)
                if ref is None:
                    continue
                up = s.outcomes[ref.producer]
                assert inp["from"] == f"{ref.producer}/{ref.file}"
                assert inp["sha256"] == up.stamp["outputs"][ref.file]
                if (up.dir / ref.file).is_file():
                    assert inp["sha256"] == sha256(up.dir / ref.file)
            assert side["nondeterministic"] is None  # none of these is declared so


def test_sidecar_inputs_params_and_environment_of_real_stages(run):
    _, s = run
    export = s.outcomes["torch.export"]
    side = sidecar(export.dir, "model.onnx")
    prep = s.outcomes["prepare"]
    assert side["inputs"]["calibration"] == {
        "from": "prepare/inputs.npy",
        "sha256": sha256(prep.dir / "inputs.npy"),
    }
    assert side["params"]["model"]["input_size"] == [64, 32]
    assert side["target"] == "torch" and side["stage"] == "export"
    env = side["environment"]
    assert env["runner"] == "local" and env["fingerprint"].startswith("local:")
    assert env["python"]["version"] == platform.python_version()
    assert env["versions"]["torch"] == importlib.metadata.version("torch")
    assert env["versions"]["onnx"] == importlib.metadata.version("onnx")
    ort = sidecar(s.outcomes["onnxruntime.infer"].dir, "features.npy")
    assert ort["inputs"]["onnx"]["sha256"] == sha256(export.dir / "model.onnx")
    assert ort["params"]["batch_size"] == 8
    assert ort["environment"]["versions"]["onnxruntime"] == importlib.metadata.version("onnxruntime")
    # host stages: runner host; prepare names the dataset digest it was keyed on
    p = sidecar(prep.dir, "inputs.npy")
    assert p["environment"]["runner"] == "host" and p["target"] is None
    assert p["environment"]["versions"]["numpy"] == importlib.metadata.version("numpy")
    assert p["inputs"]["dataset"]["from"] == prep.node.params["dataset"]
    assert set(p["inputs"]["dataset"]["sha256"]) <= HEX64


def test_a_copied_out_artifact_is_found_with_its_provenance(run, tmp_path):
    """The user's view, targets/<t>/<stage>/, shows the sidecar beside the artifact."""
    _, s = run
    view = s.workspace / "targets" / "torch" / "export"
    assert (view / "model.onnx.provenance.json").is_file()
    shutil.copy(view / "model.onnx", tmp_path)
    shutil.copy(view / "model.onnx.provenance.json", tmp_path)
    assert sidecar(tmp_path, "model.onnx")["sha256"] == sha256(tmp_path / "model.onnx")


def test_a_missing_or_changed_sidecar_makes_the_stored_result_damaged_and_rebuilt(run):
    cfg, s = run
    folder = s.outcomes["torch.infer"].dir
    side = folder / sidecar_name("features.npy")
    side.unlink()
    again = run_matrix(load_matrix(cfg), "local", ci=False)
    o = again.outcomes["torch.infer"]
    assert o.status == DONE and "provenance sidecar features.npy.provenance.json was deleted" in o.rebuilt
    assert side.is_file() and sidecar(folder, "features.npy")["sha256"] == sha256(folder / "features.npy")
    # the same bytes again: the cascade stops there
    assert again.outcomes["onnxruntime.infer"].status == CACHED

    text = side.read_text()
    side.write_text(text.replace('"kind": "file"', '"kind": "forged"'))
    again = run_matrix(load_matrix(cfg), "local", ci=False)
    o = again.outcomes["torch.infer"]
    assert o.status == DONE and "no longer matches the digest it was stored with" in o.rebuilt
    assert sidecar(folder, "features.npy")["kind"] == "file"
    assert not run_matrix(load_matrix(cfg), "local", ci=False).did_work


def test_a_stamp_without_sidecar_digests_is_not_a_valid_result(tmp_path):
    """What an older modelmatrix stored (no sidecars, no ``provenance`` in the stamp) is rebuilt."""
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    key = "f" * 64
    tmp = ws.begin("t.s", key)
    (tmp / "out.bin").write_bytes(b"bytes")
    stamp = ws.commit("t.s", key, tmp, ["out.bin"])
    assert ws.find("t.s", key) == (stamp, None)
    folder = ws.stage_dir("t.s", key)
    old = {k: v for k, v in stamp.items() if k != "provenance"}
    (folder / STAMP).write_text(json.dumps(old))
    assert ws.find("t.s", key) == (None, "it has no provenance sidecars (stored by an older modelmatrix)")
    (folder / STAMP).write_text(json.dumps(stamp))
    (folder / "out.bin.provenance.json").write_text("{not json")
    found, why = ws.find("t.s", key)
    assert found is None and "out.bin.provenance.json no longer matches" in why
    with ws.stage("t.s", key, ["out.bin"]) as slot:  # the transaction rebuilds it
        assert not slot.cached and slot.damaged == why
        assert slot.tmp is not None
        (slot.tmp / "out.bin").write_bytes(b"bytes")
        slot.provenance = {"nondeterministic": {"out.bin": "made by a timed vendor tool"}}
    side = sidecar(folder, "out.bin")
    assert side["sha256"] == hashlib.sha256(b"bytes").hexdigest()
    assert side["nondeterministic"] == "made by a timed vendor tool"


def test_an_output_named_like_a_sidecar_is_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    tmp = ws.begin("t.s", "e" * 64)
    (tmp / "a").write_bytes(b"1")
    (tmp / "a.provenance.json").write_bytes(b"2")
    with pytest.raises(ModelMatrixError, match="a.provenance.json is a's provenance sidecar"):
        ws.commit("t.s", "e" * 64, tmp, ["a", "a.provenance.json"])
    assert ws.lookup("t.s", "e" * 64) is None


def test_report_names_the_non_deterministic_artifacts_and_what_is_compared_instead(run):
    _, s = run
    assert s.outcomes["tensorrt.convert"].status == SKIPPED
    rows = {(r["node"], r["artifact"]): r for r in s.report["nondeterministic"]}
    assert set(rows) == {
        ("tensorrt.convert", "model.engine"),
        ("tensorrt.convert", "model.engine.json"),
        ("tensorrt.convert", "timing.cache"),
        ("ascend.convert", "om"),
        ("ascend.convert", "logs"),
    }
    assert "timing" in rows[("tensorrt.convert", "model.engine")]["reason"]
    assert rows[("tensorrt.convert", "model.engine")]["compared_by"].startswith("tensorrt.infer's features")
    published = json.loads((s.workspace / "report.json").read_text())
    assert published["nondeterministic"] == s.report["nondeterministic"]
    md = (s.workspace / "report.md").read_text()
    assert "## Non-deterministic artifacts" in md
    assert "`tensorrt.convert` `model.engine`: TensorRT chooses tactics by timing them" in md
    assert "compared instead: ascend.infer's features against the reference" in md
    # ONNX and Caffe files are not in that list: they are byte-identical (tests/docker/test_conversion_determinism.py)
    assert not any(r["target"] in ("torch", "caffe", "onnxruntime") for r in s.report["nondeterministic"])


def test_a_non_deterministic_declaration_must_name_an_output(tmp_path):
    root = tmp_path / "targets"
    for src in sorted((REPO_ROOT / "targets").glob("*/target.yaml")):
        (root / src.parent.name).mkdir(parents=True)
        text = src.read_text()
        if src.parent.name == "tensorrt":
            text = text.replace("      timing.cache: ", "      timing.cach: ", 1)
        (root / src.parent.name / "target.yaml").write_text(text)
    cfg = tmp_path / "matrix.yaml"
    cfg.write_text(yaml.safe_dump({"targets": {"torch": {}}}))
    with pytest.raises(ConfigError) as exc:
        load_matrix(cfg, targets_dir=root)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{root / 'tensorrt' / 'target.yaml'}: stages.convert.nondeterministic.timing.cach: ")
    assert "'timing.cach' is not one of this stage's outputs (model.engine, model.engine.json, timing.cache)" in msg
