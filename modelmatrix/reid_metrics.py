"""Rank-k and mAP under the Market1501 protocol (numpy only).

Follows reid-strong-baseline (``utils/reid_metric.py::R1_mAP`` with ``feat_norm='yes'`` and
``data/datasets/eval_reid.py::eval_func``):

- features are L2-normalised (``x / max(||x||, 1e-12)``, as ``torch.nn.functional.normalize``);
- distances are squared Euclidean, ``|q|^2 + |g|^2 - 2 q.g`` (computed here in float64);
- for each query the gallery is sorted by distance (a STABLE sort, so ties keep gallery order and
  two runs on equal features rank identically; upstream's default argsort leaves ties unspecified)
  and gallery items with the same pid AND the same camera are dropped;
- a query with no match left is skipped (not counted);
- CMC = cumulative hits clipped at 1, cut at ``max_rank``; ``max_rank`` is first lowered to the
  gallery size as upstream does, and a query whose kept list is shorter than that (its same-camera
  images removed) is padded with its last CMC value (1: a valid query has a hit), where upstream
  would fail on a ragged array;
- AP = sum over hits of precision at that hit / number of hits; mAP and CMC are averaged over the
  valid queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DataError

QUERY_BLOCK = 256  # queries per distance block: bounds memory on the full set (3368 x 15913)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def squared_distances(qf: np.ndarray, gf: np.ndarray) -> np.ndarray:
    """(m, n) squared Euclidean distances, float64."""
    qf = np.asarray(qf, dtype=np.float64)
    gf = np.asarray(gf, dtype=np.float64)
    return (qf**2).sum(1)[:, None] + (gf**2).sum(1)[None, :] - 2.0 * qf @ gf.T


def eval_func(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float, int, list[float]]:
    """(cmc, mAP, num_valid_queries, per-query AP) from a distance matrix, as upstream eval_func."""
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    all_cmc, all_ap = [], []
    for q in range(num_q):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        hits = (g_pids[order][keep] == q_pids[q]).astype(np.int64)
        if not hits.any():
            continue
        cum = hits.cumsum()
        cmc = np.minimum(cum, 1)[:max_rank].astype(np.float64)
        if len(cmc) < max_rank:
            cmc = np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1])])
        all_cmc.append(cmc)
        precision = cum / np.arange(1, len(cum) + 1, dtype=np.float64)
        all_ap.append(float((precision * hits).sum() / hits.sum()))
    if not all_cmc:
        return np.zeros(max_rank), 0.0, 0, []
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), len(all_cmc), all_ap


def evaluate(
    qf: np.ndarray, gf: np.ndarray, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, max_rank: int = 50
) -> dict[str, Any]:
    """Rank-1/5/10, mAP and the CMC curve of query features against gallery features.

    Raises DataError when no query has a match in the gallery under another camera.
    """
    qf, gf = np.asarray(qf), np.asarray(gf)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise DataError(
            f"retrieval: query features {qf.shape} and gallery features {gf.shape} must be "
            f"2-D with the same feature dimension; check the features file"
        )
    if len(q_pids) != len(qf) or len(q_camids) != len(qf) or len(g_pids) != len(gf) or len(g_camids) != len(gf):
        raise DataError(
            f"retrieval: {len(qf)} query / {len(gf)} gallery features but "
            f"{len(q_pids)} / {len(g_pids)} labels; features and index.json disagree"
        )
    if len(gf) == 0 or len(qf) == 0:
        raise DataError("retrieval: empty query or gallery; the dataset needs both")
    qn, gn = l2_normalize(qf), l2_normalize(gf)
    q_pids, q_camids = np.asarray(q_pids), np.asarray(q_camids)
    cmcs, aps, valid = [], [], 0
    for s in range(0, len(qn), QUERY_BLOCK):
        e = s + QUERY_BLOCK
        cmc, _, n, ap = eval_func(
            squared_distances(qn[s:e], gn), q_pids[s:e], g_pids, q_camids[s:e], g_camids, max_rank
        )
        if n:
            cmcs.append(cmc * n)
            aps.extend(ap)
            valid += n
    if not valid:
        raise DataError(
            "retrieval: no query has a gallery image of the same identity under another "
            "camera (Market1501 protocol), so Rank-k/mAP are undefined; use a dataset "
            "with such pairs or drop 'retrieval' from the tolerance checks"
        )
    cmc = np.sum(cmcs, axis=0) / valid
    at = lambda k: float(cmc[min(k, len(cmc)) - 1])  # noqa: E731
    return {
        "rank1": at(1),
        "rank5": at(5),
        "rank10": at(10),
        "mAP": float(np.mean(aps)),
        "cmc": [float(v) for v in cmc],
        "num_valid_queries": int(valid),
        "num_query": int(len(qf)),
        "num_gallery": int(len(gf)),
    }


def split_index(index_items: Sequence[dict]) -> dict[str, np.ndarray]:
    """Row positions and labels of the query and gallery items of index.json's ``items``."""
    q = [i for i, it in enumerate(index_items) if it["split"] == "query"]
    g = [i for i, it in enumerate(index_items) if it["split"] == "gallery"]
    other = [it for it in index_items if it["split"] not in ("query", "gallery")]
    if other:
        raise DataError(
            f"index.json: item {other[0].get('file')!r} has split {other[0]['split']!r} "
            f"(expected query or gallery); re-run prepare"
        )
    col = lambda rows, key: np.asarray([index_items[i][key] for i in rows], dtype=np.int64)  # noqa: E731
    return {
        "q_idx": np.asarray(q, dtype=np.int64),
        "g_idx": np.asarray(g, dtype=np.int64),
        "q_pids": col(q, "pid"),
        "g_pids": col(g, "pid"),
        "q_camids": col(q, "camid"),
        "g_camids": col(g, "camid"),
    }


def evaluate_index(features: np.ndarray, index_items: Sequence[dict], max_rank: int = 50) -> dict[str, Any]:
    """``evaluate`` on features whose row i is index item i."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(index_items):
        raise DataError(
            f"retrieval: features of shape {features.shape} but index.json has "
            f"{len(index_items)} images; re-run the stage that wrote the features"
        )
    s = split_index(index_items)
    return evaluate(
        features[s["q_idx"]], features[s["g_idx"]], s["q_pids"], s["g_pids"], s["q_camids"], s["g_camids"], max_rank
    )
