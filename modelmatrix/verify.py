"""Parity checks of each backend's features against the reference backend's (numpy only).

Three checks, each enabled per target by ``tolerance.checks``:

- ``allclose``: element-wise, numpy semantics ``|a - b| <= atol + rtol * |b|`` with ``b`` the
  REFERENCE (asymmetric, as ``numpy.isclose``); NaN anywhere is a violation.
- ``cosine``: cosine similarity of each image's feature with the reference's; the check is
  ``min over images >= cosine_min``.
- ``retrieval``: Rank-1 and mAP (Market1501 protocol, ``reid_metrics``) of the target's features
  and of the reference's; the check is ``|delta Rank-1| <= rank1_delta`` and
  ``|delta mAP| <= map_delta`` (plus 1e-9 for float rounding of the averages).

Reported besides: ``max_abs_error``, ``max_rel_error`` = ``max |a - b| / (|b| + 1e-12)`` (the
epsilon only avoids a division by zero: near-zero reference values give large relative errors,
which is why the pass/fail rule is the allclose one), the mean absolute error, the worst element
and the worst image. A target whose features have another shape than the reference's fails its
enabled checks with a message; it does not crash the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .config import TOLERANCE
from .errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, EXIT_UNAVAILABLE, DataError, worst_exit
from .reid_metrics import evaluate_index

CHECKS = ("allclose", "cosine", "retrieval")
REL_EPS = 1e-12
DELTA_SLACK = 1e-9
TOLERANCE_SEMANTICS = "numpy: |a-b| <= atol + rtol*|b|, b = reference"
#: report["targets"][t]["status"]; the tables show them as REFERENCE, PASS, FAIL, ...
STATUSES = ("reference", "passed", "failed", "unchecked", "skipped", "error")


def _num(x: Any) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _check(name: str, enabled: bool, passed: bool, threshold: Any, value: Any, message: str) -> dict:
    return {
        "name": name,
        "enabled": bool(enabled),
        "passed": bool(passed),
        "threshold": threshold,
        "value": value,
        "message": message,
    }


def _file(index: Mapping, row: int) -> str | None:
    items = index.get("items") or []
    return items[row]["file"] if 0 <= row < len(items) else None


# --------------------------------------------------------------------------- element-wise


def elementwise(a: np.ndarray, b: np.ndarray, rtol: float, atol: float, index: Mapping) -> dict[str, Any]:
    """Errors of ``a`` (target) against ``b`` (reference), same shape, float64."""
    diff = np.abs(a - b)
    allowed = atol + rtol * np.abs(b)
    bad = ~(diff <= allowed)  # NaN compares False: a violation
    nonfinite = int((~np.isfinite(a)).sum())
    out: dict[str, Any] = {
        "max_abs_error": _num(np.max(diff)) if diff.size else 0.0,
        "mean_abs_error": _num(np.mean(diff)) if diff.size else 0.0,
        "max_rel_error": _num(np.max(diff / (np.abs(b) + REL_EPS))) if diff.size else 0.0,
        "violations": int(bad.sum()),
        "elements": int(diff.size),
        "violation_fraction": float(bad.sum() / diff.size) if diff.size else 0.0,
        "nonfinite": nonfinite,
        "worst": None,
        "reference_abs_max": _num(np.max(np.abs(b))) if b.size else 0.0,  # the scale atol meets
        "reference_rms": _num(np.sqrt(np.mean(b * b))) if b.size else 0.0,
    }
    if bad.any():
        excess = np.where(np.isnan(diff), np.inf, diff - allowed)
        r, c = np.unravel_index(int(np.argmax(excess)), diff.shape)
        out["worst"] = {
            "row": int(r),
            "col": int(c),
            "file": _file(index, int(r)),
            "value": _num(a[r, c]),
            "reference": _num(b[r, c]),
            "abs_error": _num(diff[r, c]),
            "allowed": _num(allowed[r, c]),
        }
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (float64); a zero vector gives 0."""
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(1) / (na * nb)


# --------------------------------------------------------------------------- one target


def compare(
    target: str,
    feats: np.ndarray,
    ref: np.ndarray,
    tol: Mapping[str, Any],
    index: Mapping,
    max_rank: int = 50,
    ref_retrieval: dict | None = None,
    ref_retrieval_error: str | None = None,
) -> dict[str, Any]:
    """Compare one target's features with the reference's; returns the target's result dict.

    ``ref_retrieval`` / ``ref_retrieval_error``: the reference's retrieval metrics (or why there
    are none) when the caller has already computed them; computed here otherwise.
    """
    tol = TOLERANCE.check(dict(tol), f"targets.{target}.tolerance")
    enabled = set(tol["checks"])
    a, b = np.asarray(feats), np.asarray(ref)
    result: dict[str, Any] = {
        "target": target,
        "shape": list(a.shape),
        "reference_shape": list(b.shape),
        "tolerance": tol,
        "metrics": {},
        "checks": [],
    }
    if a.ndim != 2 or a.shape != b.shape:
        msg = (
            f"features shape {tuple(a.shape)} differs from the reference's {tuple(b.shape)}; "
            f"the target computed something else (check its output name and batch handling)"
        )
        result["checks"] = [_check(n, n in enabled, False, None, None, msg) for n in CHECKS]
        result["reason"] = msg
        return _finish(result)
    bad = nonfinite(a, index, "the target's") or nonfinite(b, index, "the reference's")
    if bad:
        result["checks"] = [_check(n, n in enabled, False, None, None, bad) for n in CHECKS]
        result["reason"] = bad
        result["metrics"]["nonfinite"] = {
            "target": int((~np.isfinite(a)).sum()),
            "reference": int((~np.isfinite(b)).sum()),
        }
        return _finish(result)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    el = elementwise(a64, b64, tol["rtol"], tol["atol"], index)
    cos = cosines(a64, b64)
    result["metrics"].update(el)
    result["metrics"]["cosine"] = _cosine_summary(cos, index)
    result["checks"].append(_allclose_check(el, tol, "allclose" in enabled))
    result["checks"].append(_cosine_check(result["metrics"]["cosine"], tol, "cosine" in enabled))
    if ref_retrieval is None and ref_retrieval_error is None:
        ref_retrieval, ref_retrieval_error = retrieval_or_error(b, index, max_rank)
    ret, ret_err = (
        retrieval_or_error(a, index, max_rank)
        if ref_retrieval_error is None
        else (None, f"reference: {ref_retrieval_error}")
    )
    result["metrics"]["retrieval"] = ret
    result["metrics"]["reference_retrieval"] = ref_retrieval
    result["checks"].append(_retrieval_check(ret, ref_retrieval, ret_err, tol, "retrieval" in enabled))
    if ret is not None and ref_retrieval is not None:
        result["metrics"]["deltas"] = {k: ret[k] - ref_retrieval[k] for k in ("rank1", "rank5", "rank10", "mAP")}
    return _finish(result)


def nonfinite(features: np.ndarray, index: Mapping, whose: str) -> str | None:
    """None when every value is finite; else one line with the count and the first file named."""
    finite = np.isfinite(features)
    if finite.all():
        return None
    rows = np.flatnonzero(~finite.all(axis=1)) if features.ndim == 2 else np.array([0])
    first = int(rows[0])
    return (
        f"{whose} features are not finite: {int((~finite).sum())} NaN or infinite values in "
        f"{len(rows)} images (first: row {first}, {_file(index, first)})"
    )


def retrieval_or_error(features: np.ndarray, index: Mapping, max_rank: int) -> tuple[dict | None, str | None]:
    try:
        r = evaluate_index(np.asarray(features, dtype=np.float64), index.get("items") or [], max_rank)
    except DataError as exc:
        return None, str(exc)
    return r, None


def _cosine_summary(cos: np.ndarray, index: Mapping) -> dict[str, Any]:
    if cos.size == 0:
        return {"min": None, "mean": None, "worst_row": None, "worst_file": None, "nan": 0}
    nan = np.isnan(cos)
    worst = int(np.argmax(nan)) if nan.any() else int(np.argmin(cos))
    return {
        "min": _num(np.min(cos)) if not nan.any() else None,
        "mean": _num(np.mean(cos)),
        "worst_row": worst,
        "worst_file": _file(index, worst),
        "nan": int(nan.sum()),
    }


def _allclose_check(el: dict, tol: dict, enabled: bool) -> dict:
    thr = {"rtol": tol["rtol"], "atol": tol["atol"]}
    n, total = el["violations"], el["elements"]
    if n == 0:
        msg = (
            f"all {total} elements within atol {tol['atol']:g} + rtol {tol['rtol']:g}*|ref| "
            f"(max abs error {_fmt(el['max_abs_error'])})"
        )
        return _check("allclose", enabled, True, thr, 0, msg)
    w = el["worst"]
    msg = (
        f"{n} of {total} elements ({100.0 * n / total:.3g}%) exceed atol {tol['atol']:g} + "
        f"rtol {tol['rtol']:g}*|ref|; worst: row {w['row']} ({w['file']}) col {w['col']}: "
        f"{_fmt(w['value'])} vs reference {_fmt(w['reference'])} "
        f"(|diff| {_fmt(w['abs_error'])} > allowed {_fmt(w['allowed'])})"
    )
    if el["nonfinite"]:
        msg += f"; {el['nonfinite']} values are NaN or infinite"
    return _check("allclose", enabled, False, thr, n, msg)


def _cosine_check(c: dict, tol: dict, enabled: bool) -> dict:
    thr = tol["cosine_min"]
    if c["min"] is None:
        msg = (
            f"cosine is NaN for {c['nan']} images (first: row {c['worst_row']}, {c['worst_file']}): "
            f"the features contain NaN or infinity"
            if c["worst_row"] is not None
            else "no images"
        )
        return _check("cosine", enabled, False, thr, None, msg)
    ok = c["min"] >= thr
    rel = ">=" if ok else "<"
    msg = (
        f"min cosine {c['min']:.6f} {rel} {thr:g} (worst row {c['worst_row']}, {c['worst_file']}); mean {c['mean']:.6f}"
    )
    return _check("cosine", enabled, ok, thr, c["min"], msg)


def _retrieval_check(ret: dict | None, ref: dict | None, err: str | None, tol: dict, enabled: bool) -> dict:
    thr = {"rank1_delta": tol["rank1_delta"], "map_delta": tol["map_delta"]}
    if ret is None or ref is None:
        return _check("retrieval", enabled, False, thr, None, f"retrieval metrics unavailable: {err}")
    d1, dm = ret["rank1"] - ref["rank1"], ret["mAP"] - ref["mAP"]
    ok1 = abs(d1) <= tol["rank1_delta"] + DELTA_SLACK
    okm = abs(dm) <= tol["map_delta"] + DELTA_SLACK
    msg = (
        f"Rank-1 {ret['rank1']:.4f} vs reference {ref['rank1']:.4f} ({_bound(d1, tol['rank1_delta'], ok1)}); "
        f"mAP {ret['mAP']:.4f} vs {ref['mAP']:.4f} ({_bound(dm, tol['map_delta'], okm)})"
    )
    return _check("retrieval", enabled, ok1 and okm, thr, {"rank1_delta": abs(d1), "map_delta": abs(dm)}, msg)


def _bound(delta: float, allowed: float, ok: bool) -> str:
    """``delta -1.9e-07, |delta| <= 0.001`` or ``delta -1.9e-07: |delta| 1.9e-07 > 0.0001 EXCEEDED``: as
    many digits as it takes to see why, never two equal-looking numbers called exceeded."""
    shown = "0" if delta == 0 else f"{delta:+.3g}"
    if ok:
        return f"delta {shown}, |delta| <= {allowed:g}"
    return f"delta {shown}: |delta| {abs(delta):.3g} > {allowed:g} EXCEEDED"


def _fmt(x: float | None) -> str:
    return "nan" if x is None else f"{x:.4g}"


def _finish(result: dict) -> dict:
    enabled = [c for c in result["checks"] if c["enabled"]]
    if not enabled:
        result["status"] = "unchecked"
        result.setdefault("reason", "no check enabled in tolerance.checks")
    else:
        result["status"] = "passed" if all(c["passed"] for c in enabled) else "failed"
    result["failed_checks"] = [c["name"] for c in enabled if not c["passed"]]
    return result


# --------------------------------------------------------------------------- the whole matrix


def verify_all(
    features: Mapping[str, np.ndarray],
    reference_name: str,
    tolerances: Mapping[str, Mapping],
    index: Mapping,
    skipped: Mapping[str, str] | None = None,
    failed: Mapping[str, Any] | None = None,
    max_rank: int = 50,
    required: Mapping[str, str] | None = None,
    allow_skip: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Compare every target with features against the reference; the report dict.

    ``features``: target -> (N, D) array (the reference's included); ``skipped``: target -> reason;
    ``failed``: target -> message, or {"stage", "reason", "kind"} with kind "bad input" (the user's
    input: exit 2), "timed out" or "failed" (exit 3). ``required``: target -> why it must run: a
    required target that was skipped is an error (exit 3), never a pass; ``allow_skip``: target ->
    the stanza's reason for allowing a skip (shown). ``passed`` is True only if at least one target
    was compared with an enabled check, every enabled check of every compared target passed, no
    target failed and no required target was skipped. ``exit_code`` says which of those it was
    (errors.py, README "Exit codes"); ``cause`` names it in a few words.
    """
    skipped, required, allow_skip = dict(skipped or {}), dict(required or {}), dict(allow_skip or {})
    failed = {
        t: (f if isinstance(f, dict) else {"stage": t, "reason": str(f), "kind": "failed"})
        for t, f in (failed or {}).items()
    }
    items = index.get("items") or []
    names = _ordered(reference_name, [*features, *failed, *skipped])
    results: dict[str, dict] = {}
    ref = features.get(reference_name) if reference_name not in failed else None
    ref_bad = nonfinite(np.asarray(ref), index, "the reference's") if ref is not None else None
    ref_ret, ref_err = retrieval_or_error(ref, index, max_rank) if ref is not None and not ref_bad else (None, ref_bad)
    why_no_ref = _why_no_reference(reference_name, ref, failed, skipped)
    for name in names:
        if name in failed:
            f = failed[name]
            results[name] = {
                "target": name,
                "status": "error",
                "reason": f["reason"],
                "kind": f["kind"],
                "stage": f["stage"],
            }
        elif name in skipped and name in required:
            results[name] = {
                "target": name,
                "status": "error",
                "kind": "required but skipped",
                "reason": f"{skipped[name]} (required: {required[name]})",
            }
        elif name in skipped:
            results[name] = {"target": name, "status": "skipped", "reason": skipped[name]}
            if name in allow_skip:
                results[name]["allowed"] = allow_skip[name]
        elif name == reference_name and ref is not None:
            results[name] = {
                "target": name,
                "status": "reference",
                "shape": list(np.shape(ref)),
                "reason": ref_bad or f"the reference ({np.shape(ref)[0]} images)",
                "metrics": {"retrieval": ref_ret},
            }
            if ref_bad:
                results[name]["nonfinite"] = True
        elif ref is None:
            results[name] = {"target": name, "status": "skipped", "reason": f"not compared: {why_no_ref}"}
        else:
            results[name] = compare(
                name,
                features[name],
                ref,
                tolerances.get(name, {}),
                index,
                max_rank,
                ref_retrieval=ref_ret,
                ref_retrieval_error=ref_err,
            )
    for name, r in results.items():
        if r["status"] in ("error", "skipped") and name in tolerances and name != reference_name:
            r["tolerance"] = TOLERANCE.check(dict(tolerances[name]), f"targets.{name}.tolerance")
    passed, reason, code, cause = _overall(results, why_no_ref, ref_bad)
    counts = {s: sum(1 for r in results.values() if r["status"] == s) for s in STATUSES}
    return {
        "schema": 2,
        "reference": reference_name,
        "passed": passed,
        "reason": reason,
        "exit_code": code,
        "cause": cause,
        "tolerance_semantics": TOLERANCE_SEMANTICS,
        "max_rank": max_rank,
        "num_images": len(items),
        "num_query": sum(1 for it in items if it.get("split") == "query"),
        "num_gallery": sum(1 for it in items if it.get("split") == "gallery"),
        "reference_retrieval": ref_ret,
        "reference_retrieval_error": ref_err,
        "counts": counts,
        "targets": results,
        "model": {},
    }


def _ordered(reference: str, names: Sequence[str]) -> list[str]:
    out = [reference] if reference in names else []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def _why_no_reference(name: str, ref: np.ndarray | None, failed: Mapping, skipped: Mapping) -> str | None:
    if name in failed:
        return f"reference target {name!r} did not run ({failed[name]['kind']})"
    if ref is not None:
        return None
    if name in skipped:
        return f"reference target {name!r} was skipped"
    return f"reference target {name!r} produced no features"


def _overall(results: Mapping[str, dict], why_no_ref: str | None, ref_bad: str | None) -> tuple[bool, str, int, str]:
    """(passed, reason, exit code, cause). The reason counts each kind of outcome and names the
    targets, never repeating a stage's message (that is said once, on the target's own line)."""
    by = lambda s: [n for n, r in results.items() if r["status"] == s]  # noqa: E731
    errors, fails, passes, skips = by("error"), by("failed"), by("passed"), by("skipped")
    bad_input = [n for n in errors if results[n].get("kind") == "bad input"]
    not_run = [n for n in errors if n not in bad_input]
    reasons, causes, codes = [], [], []
    if bad_input:
        stages = ", ".join(results[n].get("stage") or n for n in bad_input)
        reasons.append(f"bad input in {stages}")
        causes.append(f"bad input ({stages})")
        codes.append(EXIT_BAD_INPUT)
    if not_run:
        detail = ", ".join(f"{n} ({results[n].get('kind') or 'failed'})" for n in not_run)
        reasons.append(f"{len(not_run)} target(s) could not run: {detail}")
        for kind, what in (
            ("timed out", "timed out"),
            ("failed", "failed"),
            ("required but skipped", "was skipped, but is required"),
        ):
            hit = [results[n].get("stage") or n for n in not_run if (results[n].get("kind") or "failed") == kind]
            if hit:
                causes.append(f"{', '.join(hit)} {what}")
        codes.append(EXIT_UNAVAILABLE)
    if ref_bad:
        reasons.append(ref_bad)
        causes.append("the reference is not finite")
        codes.append(EXIT_CHECK_FAILED)
    if fails:
        detail = ", ".join(f"{n} ({', '.join(results[n]['failed_checks'])})" for n in fails)
        reasons.append(f"{len(fails)} target(s) failed checks: {detail}")
        causes.append("a check failed")
        codes.append(EXIT_CHECK_FAILED)
    if not fails and not passes and not ref_bad and not errors:
        reasons.append(
            f"nothing was compared: {why_no_ref}"
            if why_no_ref
            else "nothing was compared: no target other than the reference ran an enabled check"
        )
        causes.append("nothing was compared")
        codes.append(EXIT_UNAVAILABLE)
    tally = f"{len(passes)} passed, {len(fails)} failed, {len(errors)} could not run, {len(skips)} skipped"
    if reasons:
        return False, "; ".join(reasons) + f" ({tally})", worst_exit(codes), "; ".join(causes)
    tail = f"; {len(skips)} skipped ({', '.join(skips)})" if skips else ""
    return True, f"all {len(passes)} compared target(s) passed{tail}", EXIT_OK, "every enabled check passed"
