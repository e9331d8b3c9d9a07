"""modelmatrix.reid_metrics: the Market1501 protocol against hand-computed cases and a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelmatrix import reid_metrics
from modelmatrix.errors import DataError


def _unit(deg: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(math.radians(deg)), norm * math.sin(math.radians(deg))]


def test_hand_computed_example():
    # gallery on the unit circle at 5, 20, 40, 60 degrees; queries at 0, 25 and 90 degrees.
    gf = np.array([_unit(5, 2.0), _unit(20), _unit(40, 0.5), _unit(60)])  # norms differ: L2-normalised
    g_pids, g_cams = np.array([1, 2, 1, 3]), np.array([0, 1, 1, 1])
    qf = np.array([_unit(0, 3.0), _unit(25), _unit(90)])
    q_pids, q_cams = np.array([1, 2, 4]), np.array([0, 0, 0])
    r = reid_metrics.evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    # q0 (pid 1, cam 0): order g0 g1 g2 g3; g0 same pid+cam dropped -> miss, hit, miss:
    #     CMC 0,1,1   AP = (1/2) / 1 = 0.5
    # q1 (pid 2, cam 0): order g1 g2 g0 g3 -> hit first: CMC 1,1,1,1   AP = 1
    # q2 (pid 4): no match -> skipped
    assert r["num_valid_queries"] == 2
    assert r["cmc"] == pytest.approx([0.5, 1.0, 1.0, 1.0])  # max_rank lowered to the gallery size
    assert r["rank1"] == pytest.approx(0.5)
    assert r["rank5"] == r["rank10"] == pytest.approx(1.0)
    assert r["mAP"] == pytest.approx(0.75)


def test_ap_with_several_hits_and_distractors():
    # one query (pid 7, cam 0); gallery ranked: hit(cam1), distractor pid 0, hit(cam2), same-cam hit, miss
    qf = np.array([_unit(0)])
    gf = np.array([_unit(10), _unit(20), _unit(30), _unit(3), _unit(50)])
    r = reid_metrics.evaluate(qf, gf, [7], [7, 0, 7, 7, 5], [0], [1, 1, 2, 0, 1], max_rank=3)
    # the same-camera hit (closest, 3 deg) is dropped; kept list: hit, miss, hit, miss
    assert r["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert r["cmc"] == pytest.approx([1.0, 1.0, 1.0])


def _upstream_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """reid-strong-baseline's eval_func, written as a plain loop (ties do not occur in the data)."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    all_cmc, all_ap = [], []
    for q in range(num_q):
        order = sorted(range(num_g), key=lambda j: distmat[q, j])
        kept = [j for j in order if not (g_pids[j] == q_pids[q] and g_camids[j] == q_camids[q])]
        matches = [1 if g_pids[j] == q_pids[q] else 0 for j in kept]
        if sum(matches) == 0:
            continue
        cmc, hits, precisions = [], 0, []
        for k, m in enumerate(matches):
            hits += m
            cmc.append(min(hits, 1))
            if m:
                precisions.append(hits / (k + 1))
        cmc = cmc[:max_rank] + [cmc[-1]] * max(0, max_rank - len(cmc))
        all_cmc.append(cmc)
        all_ap.append(sum(precisions) / sum(matches))
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), len(all_cmc)


@pytest.mark.parametrize("max_rank,block", [(50, 256), (10, 256), (500, 7)])
def test_random_data_matches_the_plain_loop(monkeypatch, max_rank, block):
    monkeypatch.setattr(reid_metrics, "QUERY_BLOCK", block)
    rng = np.random.default_rng(3)
    qf, gf = rng.normal(size=(25, 16)), rng.normal(size=(90, 16))
    q_pids, g_pids = rng.integers(0, 13, 25), rng.integers(0, 10, 90)  # pids 10..12: no match
    q_cams, g_cams = rng.integers(0, 3, 25), rng.integers(0, 3, 90)
    r = reid_metrics.evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    dist = np.array([[float(((a - b) ** 2).sum()) for b in gn] for a in qn])
    cmc, mAP, valid = _upstream_eval(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
    assert 0 < valid < 25  # some queries are skipped
    assert r["num_valid_queries"] == valid
    assert r["cmc"] == pytest.approx(list(cmc), abs=1e-12)
    assert r["mAP"] == pytest.approx(mAP, abs=1e-12)
    assert r["rank1"] == pytest.approx(cmc[0]) and r["rank5"] == pytest.approx(cmc[min(5, len(cmc)) - 1])


def test_perfect_features_score_one():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 32))
    g_pids = np.repeat(np.arange(6), 3)
    g_cams = np.tile([0, 1, 2], 6)
    gf = centers[g_pids] + 1e-3 * rng.normal(size=(18, 32))
    r = reid_metrics.evaluate(centers, gf, np.arange(6), g_pids, np.zeros(6, int), g_cams)
    assert r["rank1"] == 1.0 and r["mAP"] == pytest.approx(1.0)


def test_no_valid_query_is_a_data_error():
    with pytest.raises(DataError) as exc:
        reid_metrics.evaluate(np.eye(2), np.eye(2), [1, 2], [1, 2], [0, 0], [0, 0])
    assert "no query has a gallery image" in str(exc.value) and "\n" not in str(exc.value)


def test_split_index_and_evaluate_index():
    items = [
        {"file": "query/a", "pid": 1, "camid": 0, "split": "query"},
        {"file": "bounding_box_test/b", "pid": 1, "camid": 1, "split": "gallery"},
        {"file": "query/c", "pid": 2, "camid": 2, "split": "query"},
        {"file": "bounding_box_test/d", "pid": 0, "camid": 3, "split": "gallery"},
    ]
    s = reid_metrics.split_index(items)
    assert s["q_idx"].tolist() == [0, 2] and s["g_idx"].tolist() == [1, 3]
    assert s["q_pids"].tolist() == [1, 2] and s["g_camids"].tolist() == [1, 3]
    feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    r = reid_metrics.evaluate_index(feats, items)
    assert r["num_valid_queries"] == 1 and r["rank1"] == 1.0
    with pytest.raises(DataError) as exc:
        reid_metrics.evaluate_index(feats[:3], items)
    assert "index.json has 4 images" in str(exc.value)
    with pytest.raises(DataError):
        reid_metrics.split_index([dict(items[0], split="train")])
