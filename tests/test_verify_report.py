"""modelmatrix.verify and modelmatrix.report: parity checks, the overall verdict, the files."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from modelmatrix import report, verify

TOL = {
    "rtol": 1e-3,
    "atol": 1e-4,
    "cosine_min": 0.9999,
    "rank1_delta": 0.0,
    "map_delta": 0.001,
    "checks": ["allclose", "cosine", "retrieval"],
}


def _index(ids: int = 10) -> dict:
    """Per identity: one query in camera 0, gallery in cameras 0, 1, 2; two distractors."""
    q = [
        {"file": f"query/{p:04d}_c1s1_000001_01.jpg", "pid": p, "camid": 0, "split": "query"} for p in range(1, ids + 1)
    ]
    g = [
        {"file": f"bounding_box_test/{p:04d}_c{c + 1}s1_000002_01.jpg", "pid": p, "camid": c, "split": "gallery"}
        for p in range(1, ids + 1)
        for c in range(3)
    ]
    g += [
        {"file": f"bounding_box_test/0000_c2s1_00000{k}_01.jpg", "pid": 0, "camid": 1, "split": "gallery"}
        for k in range(2)
    ]
    return {"items": q + g, "num_query": len(q)}


@pytest.fixture
def case():
    """Reference features clustered by identity (retrieval is meaningful, Rank-1 < 1)."""
    index = _index()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(11, 64))
    pids = np.array([it["pid"] for it in index["items"]])
    ref = (centers[pids] + 1.5 * rng.normal(size=(len(pids), 64))).astype(np.float32)
    return index, ref


def _checks(result: dict) -> dict:
    return {c["name"]: c for c in result["checks"]}


# ============================================================================ compare


def test_identical_features_pass_everything(case):
    index, ref = case
    r = verify.compare("onnxruntime", ref.copy(), ref, TOL, index, 50)
    assert r["status"] == "passed" and r["failed_checks"] == []
    assert all(c["passed"] and c["enabled"] for c in r["checks"])
    m = r["metrics"]
    assert m["max_abs_error"] == 0.0 and m["violations"] == 0
    assert m["cosine"]["min"] == pytest.approx(1.0)
    assert m["deltas"] == {"rank1": 0.0, "rank5": 0.0, "rank10": 0.0, "mAP": 0.0}
    assert 0.0 < m["retrieval"]["rank1"] < 1.0 and m["retrieval"] == m["reference_retrieval"]


def test_one_element_out_of_tolerance_is_found(case):
    index, ref = case
    feats = ref.copy()
    feats[13, 7] += 0.5
    r = verify.compare("caffe", feats, ref, TOL, index, 50)
    c = _checks(r)
    assert not c["allclose"]["passed"] and c["allclose"]["value"] == 1
    w = r["metrics"]["worst"]
    assert (w["row"], w["col"], w["file"]) == (13, 7, index["items"][13]["file"])
    assert w["abs_error"] == pytest.approx(0.5, rel=1e-6)
    assert w["allowed"] == pytest.approx(1e-4 + 1e-3 * abs(float(ref[13, 7])), rel=1e-6)
    assert r["metrics"]["max_abs_error"] == pytest.approx(0.5, rel=1e-6)
    assert index["items"][13]["file"] in c["allclose"]["message"]
    assert r["status"] == "failed" and "allclose" in r["failed_checks"]


def test_small_noise_within_tolerance_passes(case):
    index, ref = case
    feats = ref + np.float32(1e-5) * np.sign(ref)
    r = verify.compare("onnxruntime", feats, ref, TOL, index, 50)
    assert r["status"] == "passed", r["checks"]
    assert 0 < r["metrics"]["max_abs_error"] < 2e-5
    assert r["metrics"]["max_rel_error"] > 0


def test_allclose_uses_numpy_semantics_with_the_reference_as_b(case):
    index, _ = case
    b = np.full((len(index["items"]), 4), 2.0)
    a = np.full_like(b, 1.0)
    tol = dict(TOL, rtol=0.5, atol=0.0, checks=["allclose"])
    # |a-b| = 1 <= 0 + 0.5*|b| = 1: passes; with the roles swapped 1 > 0.5*|a| = 0.5: fails
    assert verify.compare("t", a, b, tol, index, 50)["status"] == "passed"
    assert np.allclose(a, b, rtol=0.5, atol=0.0)
    swapped = verify.compare("t", b, a, tol, index, 50)
    assert swapped["status"] == "failed" and swapped["metrics"]["violations"] == b.size


def test_permuted_rows_fail_cosine_and_allclose(case):
    """A backend returning another image's feature: every row is a valid feature, none is right."""
    index, ref = case
    perm = np.roll(np.arange(len(ref)), 1)
    feats = ref[perm]
    r = verify.compare("tensorrt", feats, ref, TOL, index, 50)
    c = _checks(r)
    assert not c["cosine"]["passed"] and not c["allclose"]["passed"]
    assert r["metrics"]["cosine"]["min"] < 0.9
    assert set(np.linalg.norm(feats, axis=1).round(4)) == set(np.linalg.norm(ref, axis=1).round(4))
    assert r["status"] == "failed"


def test_shape_mismatch_is_a_failed_check_not_a_crash(case):
    index, ref = case
    r = verify.compare("ascend", ref[:, :32], ref, TOL, index, 50)
    assert r["status"] == "failed" and set(r["failed_checks"]) == {"allclose", "cosine", "retrieval"}
    assert "(32, 32)" not in r["reason"] and f"({len(ref)}, 32)" in r["reason"]
    assert f"({len(ref)}, 64)" in r["reason"]
    r = verify.compare("ascend", ref[:-1], ref, TOL, index, 50)
    assert r["status"] == "failed"


def test_disabled_checks_do_not_decide(case):
    index, ref = case
    feats = ref.copy()
    feats[0, 0] += 1e-2  # breaks allclose, keeps cosine and retrieval
    only_cos = verify.compare("t", feats, ref, dict(TOL, checks=["cosine", "retrieval"]), index, 50)
    assert only_cos["status"] == "passed"
    assert _checks(only_cos)["allclose"] == {**_checks(only_cos)["allclose"], "enabled": False, "passed": False}
    none = verify.compare("t", feats, ref, dict(TOL, checks=[]), index, 50)
    assert none["status"] == "unchecked"


def test_retrieval_delta_threshold(case):
    index, ref = case
    feats = ref.copy()
    nq = index["num_query"]
    feats[:nq] = ref[np.roll(np.arange(nq), 1)]  # queries swapped: Rank-1 changes
    strict = verify.compare("t", feats, ref, dict(TOL, checks=["retrieval"]), index, 50)
    c = _checks(strict)["retrieval"]
    assert not c["passed"] and c["value"]["rank1_delta"] > 0 and "EXCEEDED" in c["message"]
    loose = verify.compare("t", feats, ref, dict(TOL, checks=["retrieval"], rank1_delta=1.0, map_delta=1.0), index, 50)
    assert loose["status"] == "passed"


def test_nan_features_fail_and_stay_json_safe(case, tmp_path):
    index, ref = case
    feats = ref.copy()
    feats[4, :] = np.nan
    r = verify.compare("t", feats, ref, TOL, index, 50)
    c = _checks(r)
    assert not c["allclose"]["passed"] and not c["cosine"]["passed"]
    assert "NaN" in c["cosine"]["message"] and "NaN" in c["allclose"]["message"]
    rep = verify.verify_all({"torch": ref, "t": feats}, "torch", {"t": TOL}, index)
    report.write_reports(rep, tmp_path)
    json.loads((tmp_path / "report.json").read_text())  # no NaN tokens


# ============================================================================ verify_all


def test_verify_all_passes_only_when_every_enabled_check_passes(case):
    index, ref = case
    tols = {"onnxruntime": TOL, "caffe": dict(TOL, checks=["cosine"])}
    bad = ref.copy()
    bad[2, 2] += 1e-2  # breaks allclose only; caffe checks cosine only
    rep = verify.verify_all(
        {"torch": ref, "onnxruntime": ref.copy(), "caffe": bad},
        "torch",
        tols,
        index,
        skipped={"ascend": "no atc on this host"},
        max_rank=50,
    )
    t = rep["targets"]
    assert list(t) == ["torch", "onnxruntime", "caffe", "ascend"]
    assert [t[n]["status"] for n in t] == ["reference", "passed", "passed", "skipped"]
    assert rep["passed"] is True and "2 compared" in rep["reason"] and "ascend" in rep["reason"]
    assert t["ascend"]["reason"] == "no atc on this host"
    assert rep["counts"]["passed"] == 2 and rep["counts"]["skipped"] == 1
    assert rep["reference_retrieval"]["rank1"] == t["onnxruntime"]["metrics"]["retrieval"]["rank1"]

    rep = verify.verify_all({"torch": ref, "onnxruntime": bad}, "torch", tols, index)
    assert rep["passed"] is False and "onnxruntime (allclose)" in rep["reason"]


def test_a_failed_target_fails_the_run(case):
    index, ref = case
    rep = verify.verify_all(
        {"torch": ref, "onnxruntime": ref.copy()},
        "torch",
        {"onnxruntime": TOL},
        index,
        failed={"caffe": "caffe.convert: exit 1"},
    )
    assert rep["passed"] is False and "caffe" in rep["reason"]
    caffe = rep["targets"]["caffe"]
    assert (caffe["status"], caffe["reason"], caffe["kind"]) == ("error", "caffe.convert: exit 1", "failed")
    assert rep["exit_code"] == 3 and "caffe failed" in rep["cause"]


def test_nothing_compared_is_not_a_pass(case):
    index, ref = case
    rep = verify.verify_all({"torch": ref}, "torch", {}, index, skipped={"caffe": "no caffe"})
    assert rep["passed"] is False and "nothing was compared" in rep["reason"]
    rep = verify.verify_all({"torch": ref, "ort": ref}, "torch", {"ort": dict(TOL, checks=[])}, index)
    assert rep["passed"] is False and rep["targets"]["ort"]["status"] == "unchecked"


def test_without_reference_features_nothing_is_compared(case):
    index, ref = case
    rep = verify.verify_all(
        {"onnxruntime": ref}, "torch", {"onnxruntime": TOL}, index, failed={"torch": "torch.infer: out of memory"}
    )
    assert rep["passed"] is False
    assert rep["targets"]["torch"]["status"] == "error"
    assert rep["targets"]["onnxruntime"]["status"] == "skipped"
    assert rep["targets"]["torch"]["reason"] == "torch.infer: out of memory"
    # said once, on the reference's own line: the others only say the reference did not run
    assert "out of memory" not in rep["targets"]["onnxruntime"]["reason"]
    assert "reference target 'torch' did not run" in rep["targets"]["onnxruntime"]["reason"]


def test_retrieval_impossible_fails_the_retrieval_check_only(case):
    index, ref = case
    items = [dict(it, pid=1000 + k) if it["split"] == "query" else it for k, it in enumerate(index["items"])]
    idx = {"items": items}
    rep = verify.verify_all({"torch": ref, "ort": ref.copy()}, "torch", {"ort": TOL}, idx)
    ort = rep["targets"]["ort"]
    assert ort["failed_checks"] == ["retrieval"] and rep["reference_retrieval"] is None
    assert "no query has a gallery image" in _checks(ort)["retrieval"]["message"]
    rep = verify.verify_all(
        {"torch": ref, "ort": ref.copy()}, "torch", {"ort": dict(TOL, checks=["allclose", "cosine"])}, idx
    )
    assert rep["passed"] is True


# ============================================================================ report files


@pytest.fixture
def full_report(case):
    index, ref = case
    bad = ref[np.roll(np.arange(len(ref)), 1)]
    rep = verify.verify_all(
        {"torch": ref, "onnxruntime": ref.copy(), "tensorrt": bad},
        "torch",
        {"onnxruntime": TOL, "tensorrt": dict(TOL, checks=["cosine", "allclose"]), "ascend": TOL},
        index,
        skipped={"ascend": "no Ascend device"},
        failed={"caffe": "caffe.convert: unsupported op"},
    )
    rep["model"] = {"arch": "reid-strong-baseline", "random_weights": True}
    return rep


def test_write_reports_files_and_json(full_report, tmp_path):
    paths = report.write_reports(full_report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "junit.xml"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["junit.xml", "report.json", "report.md"]
    back = json.loads(paths[0].read_text())
    assert back["passed"] is False and back["targets"]["tensorrt"]["status"] == "failed"
    assert back["model"]["random_weights"] is True


def test_markdown_table_and_banner(full_report):
    md = report.to_markdown(full_report)
    assert "Random weights" in md
    assert "numpy: |a-b| <= atol + rtol*|b|, b = reference" in md
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert "| PASS |" in rows["onnxruntime"] and "| FAIL |" in rows["tensorrt"]
    assert "| SKIPPED |" in rows["ascend"] and "| ERROR |" in rows["caffe"]
    assert "| REFERENCE |" in rows["torch"]
    assert "no Ascend device" in md and "caffe.convert: unsupported op" in md
    full_report["model"]["random_weights"] = False
    assert "Random weights" not in report.to_markdown(full_report)


def test_junit_structure(full_report, tmp_path):
    report.write_reports(full_report, tmp_path)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    suites = root.findall("testsuite")
    assert root.tag == "testsuites" and len(suites) == 1 and suites[0].get("name") == "modelmatrix"
    cases = {(c.get("classname"), c.get("name")): c for c in suites[0].findall("testcase")}
    assert ("torch", "allclose") not in cases  # the reference is not a test
    ort = [cases[("onnxruntime", n)] for n in ("allclose", "cosine", "retrieval")]
    assert all(len(c) == 0 or c[0].tag == "system-out" for c in ort)
    trt = cases[("tensorrt", "cosine")].find("failure")
    assert trt is not None and "min cosine" in trt.get("message")
    assert cases[("tensorrt", "retrieval")].find("skipped") is not None  # not enabled
    # a target that did not run is ONE case carrying its reason once, not one per check
    assert not any(k[0] in ("ascend", "caffe") and k[1] != "run" for k in cases)
    skipped = cases[("ascend", "run")].find("skipped")
    assert skipped is not None and skipped.get("message") == "no Ascend device"
    err = cases[("caffe", "run")].find("error")
    assert err is not None and err.get("message") == "caffe.convert: unsupported op"
    assert (tmp_path / "junit.xml").read_text().count("caffe.convert: unsupported op") == 1
    s = suites[0]
    n = len(cases)
    assert int(s.get("tests")) == n
    assert int(s.get("failures")) == sum(c.find("failure") is not None for c in cases.values())
    assert int(s.get("errors")) == sum(c.find("error") is not None for c in cases.values()) == 1
    assert int(s.get("skipped")) == sum(c.find("skipped") is not None for c in cases.values())


def test_summary_lines(full_report):
    lines = report.summary_lines(full_report)
    text = "\n".join(lines)
    for name, label in [("onnxruntime", "PASS"), ("tensorrt", "FAIL"), ("ascend", "SKIPPED"), ("caffe", "ERROR")]:
        assert any(ln.startswith(name) and label in ln for ln in lines), text
    assert lines[-1].startswith("FAILED (exit 3): ") and "caffe failed" in lines[-1]
    assert lines[-2].startswith("summary: 1 passed, 1 failed, 1 could not run, 1 skipped")
    assert "random weights" in lines[0]
