"""Write the verify report: report.json, report.md (a table) and junit.xml; terminal lines.

The report dict comes from ``verify.verify_all``; the orchestrator fills ``report["model"]``
(``random_weights``, ``arch``, ...) before writing. Every file is written to a temporary name
and renamed, so a reader never sees half a report.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from targets.common.contract import atomic_write_bytes

from .verify import CHECKS, TOLERANCE_SEMANTICS

LABELS = {"reference": "REFERENCE", "passed": "PASS", "failed": "FAIL", "unchecked": "UNCHECKED",
          "skipped": "SKIPPED", "error": "ERROR"}

RANDOM_BANNER = ("> **Random weights** - no checkpoint was given, the model has seeded random "
                 "weights: parity between backends is meaningful, absolute Rank-1/mAP are not.")


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.json, report.md and junit.xml into ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [(out_dir / "report.json", to_json(report)), (out_dir / "report.md", to_markdown(report)),
             (out_dir / "junit.xml", to_junit(report))]
    for path, text in files:
        atomic_write_bytes(path, text.encode("utf-8"))
    return [p for p, _ in files]


def label(status: str) -> str:
    """The table label of a status: PASS, FAIL, SKIPPED, ERROR, UNCHECKED, REFERENCE."""
    return LABELS.get(status, status.upper())


# --------------------------------------------------------------------------- json

def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars and arrays -> Python values, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):            # numpy scalar or array
        return _clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_clean(report), indent=2, sort_keys=True, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- markdown

def _f(x: Any, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _delta(x: Any) -> str:
    return "-" if x is None else f"{x:+.4f}"


def _row(name: str, r: dict[str, Any]) -> list[str]:
    m = r.get("metrics") or {}
    ret = m.get("retrieval") or {}
    cos = m.get("cosine") or {}
    d = m.get("deltas") or {}
    return [name, label(r["status"]), _f(m.get("max_abs_error"), ".3g"), _f(cos.get("min"), ".6f"),
            _f(cos.get("mean"), ".6f"), _f(ret.get("rank1")), _f(ret.get("mAP")),
            _delta(d.get("rank1")), _delta(d.get("mAP"))]


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict[str, Any]) -> str:
    model = report.get("model") or {}
    lines = ["# modelmatrix report", ""]
    if model.get("random_weights"):
        lines += [RANDOM_BANNER, ""]
    verdict = "PASSED" if report.get("passed") else "FAILED"
    lines += [f"**{verdict}**: {_md_escape(report.get('reason', ''))}", ""]
    facts = [f"reference: `{report.get('reference')}`",
             f"images: {report.get('num_images')} ({report.get('num_query')} query, "
             f"{report.get('num_gallery')} gallery)"]
    if model:
        facts.insert(0, "model: " + ", ".join(f"{k}={v}" for k, v in sorted(model.items())))
    lines += [f"- {f}" for f in facts]
    rr = report.get("reference_retrieval")
    if rr:
        lines.append(f"- reference retrieval: Rank-1 {rr['rank1']:.4f}, Rank-5 {rr['rank5']:.4f}, "
                     f"mAP {rr['mAP']:.4f} ({rr['num_valid_queries']} valid queries)")
    elif report.get("reference_retrieval_error"):
        lines.append(f"- reference retrieval: unavailable ({_md_escape(report['reference_retrieval_error'])})")
    lines += [f"- tolerance semantics: {TOLERANCE_SEMANTICS}", ""]
    head = ["target", "status", "max abs err", "min cosine", "mean cosine", "Rank-1", "mAP",
            "Δ Rank-1", "Δ mAP"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report.get("targets", {}).items():
        lines.append("| " + " | ".join(_md_escape(c) for c in _row(name, r)) + " |")
    lines += ["", "## Details", ""]
    for name, r in report.get("targets", {}).items():
        lines.append(f"### {name}: {label(r['status'])}")
        if r.get("reason"):
            lines.append(f"- {_md_escape(r['reason'])}")
        for c in r.get("checks", []):
            state = ("pass" if c["passed"] else "FAIL") if c["enabled"] else \
                f"not enforced ({'would pass' if c['passed'] else 'would fail'})"
            text = "see above" if c["message"] == r.get("reason") else c["message"]
            lines.append(f"- `{c['name']}` {state}: {_md_escape(text)}")
        tol = r.get("tolerance")
        if tol:
            lines.append(f"- tolerance: rtol {tol['rtol']:g}, atol {tol['atol']:g}, cosine_min "
                         f"{tol['cosine_min']:g}, rank1_delta {tol['rank1_delta']:g}, map_delta "
                         f"{tol['map_delta']:g}, checks {', '.join(tol['checks']) or 'none'}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- junit

def _case_names(r: dict[str, Any]) -> list[str]:
    tol = r.get("tolerance") or {}
    return list(tol.get("checks") or CHECKS)


def to_junit(report: dict[str, Any]) -> str:
    """One testsuite "modelmatrix"; one testcase per (target, check), classname = target."""
    suite = ET.Element("testsuite", name="modelmatrix")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for name, r in report.get("targets", {}).items():
        status = r["status"]
        if status == "reference":
            continue
        if status in ("error", "skipped"):
            for check in _case_names(r):
                case = ET.SubElement(suite, "testcase", classname=name, name=check)
                counts["tests"] += 1
                reason = r.get("reason") or ""
                if status == "error":
                    ET.SubElement(case, "error", message=reason).text = reason
                    counts["errors"] += 1
                else:
                    ET.SubElement(case, "skipped", message=reason)
                    counts["skipped"] += 1
            continue
        for c in r.get("checks", []):
            case = ET.SubElement(suite, "testcase", classname=name, name=c["name"])
            counts["tests"] += 1
            if not c["enabled"]:
                ET.SubElement(case, "skipped", message=f"check not enabled in targets.{name}.tolerance.checks")
                counts["skipped"] += 1
            elif not c["passed"]:
                ET.SubElement(case, "failure", message=c["message"], type=c["name"]).text = c["message"]
                counts["failures"] += 1
            else:
                ET.SubElement(case, "system-out").text = c["message"]
    for k, v in counts.items():
        suite.set(k, str(v))
    root = ET.Element("testsuites", name="modelmatrix")
    root.append(suite)
    for k, v in counts.items():
        if k != "skipped":
            root.set(k, str(v))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------- terminal

def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: one per target, then the verdict."""
    out = []
    if (report.get("model") or {}).get("random_weights"):
        out.append("note: random weights (no checkpoint): parity is meaningful, absolute accuracy is not")
    rr = report.get("reference_retrieval")
    if rr:
        out.append(f"reference {report.get('reference')}: Rank-1 {rr['rank1']:.4f}  mAP {rr['mAP']:.4f}")
    width = max([len(n) for n in report.get("targets", {})] + [6])
    for name, r in report.get("targets", {}).items():
        status = r["status"]
        if status in ("passed", "failed", "unchecked"):
            m = r.get("metrics") or {}
            cos = (m.get("cosine") or {}).get("min")
            d = m.get("deltas") or {}
            detail = (f"max|d| {_f(m.get('max_abs_error'), '.2e')}  cos>= {_f(cos, '.6f')}  "
                      f"dR1 {_delta(d.get('rank1'))}  dmAP {_delta(d.get('mAP'))}")
            if r.get("failed_checks"):
                detail += f"  failed: {', '.join(r['failed_checks'])}"
            if not m:
                detail = r.get("reason") or ""
        else:
            detail = r.get("reason") or ""
        out.append(f"{name:<{width}}  {label(status):<9}  {detail}")
    out.append(("PASSED: " if report.get("passed") else "FAILED: ") + str(report.get("reason", "")))
    return out
