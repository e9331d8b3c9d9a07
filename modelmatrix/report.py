"""Write the verify report: report.json, report.md (a table) and junit.xml; terminal lines.

The report dict comes from ``verify.verify_all``; the orchestrator fills ``report["model"]``
(``random_weights``, ``arch``, ...) before writing. Every file is written to a temporary name
and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from targets.common.contract import atomic_write_bytes

from .verify import TOLERANCE_SEMANTICS

LABELS = {
    "reference": "REFERENCE",
    "passed": "PASS",
    "failed": "FAIL",
    "unchecked": "UNCHECKED",
    "skipped": "SKIPPED",
    "error": "ERROR",
}

RANDOM_BANNER = (
    "> **Random weights** - no checkpoint was given, the model has seeded random "
    "weights: parity between backends is meaningful, absolute Rank-1/mAP are not."
)


def model_facts(model: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """What the report says about the model: only what applies, no ``None``s. Weights are either
    ``random weights, seed N`` or the checkpoint with its sha256 (from torch.export's meta.json)."""
    facts = {k: model[k] for k in ("arch", "neck_feat", "last_stride", "input_size") if model.get(k) is not None}
    if meta.get("random_weights") is True or (not meta and not model.get("checkpoint")):
        facts["weights"] = f"random weights, seed {meta.get('seed', model.get('seed', 0))}"
        facts["random_weights"] = True
    elif model.get("checkpoint"):
        facts["weights"] = str(model["checkpoint"])
        facts["random_weights"] = False
        if meta.get("checkpoint_sha256"):
            facts["checkpoint_sha256"] = meta["checkpoint_sha256"]
    return facts


def write_reports(report: dict[str, Any], out_dir: Path, html: Any = None) -> list[Path]:
    """Write report.json, report.md and junit.xml into ``out_dir``, and report.html when ``html``
    (an :class:`~modelmatrix.html_report.HtmlInputs`: the features and images its plots show) is
    given; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [
        (out_dir / "report.json", to_json(report)),
        (out_dir / "report.md", to_markdown(report)),
        (out_dir / "junit.xml", to_junit(report)),
    ]
    if html is not None:
        from .html_report import to_html

        files.append((out_dir / "report.html", to_html(report, html)))
    for path, text in files:
        atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))
    return [p for p, _ in files]


def targets_in_order(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The report's targets, the reference first, then by name (report.json sorts its keys)."""
    ref = report.get("reference")
    items = report.get("targets", {}).items()
    return sorted(items, key=lambda kv: (kv[0] != ref, kv[0]))


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
    if hasattr(obj, "tolist"):  # numpy scalar or array
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
    return [
        name,
        label(r["status"]),
        _f(m.get("max_abs_error"), ".3g"),
        _f(cos.get("min"), ".6f"),
        _f(cos.get("mean"), ".6f"),
        _f(ret.get("rank1")),
        _f(ret.get("mAP")),
        _delta(d.get("rank1")),
        _delta(d.get("mAP")),
    ]


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict[str, Any]) -> str:
    model = report.get("model") or {}
    lines = ["# modelmatrix report", ""]
    if model.get("random_weights"):
        lines += [RANDOM_BANNER, ""]
    verdict = "PASSED" if report.get("passed") else "FAILED"
    lines += [f"**{verdict}**: {_md_escape(report.get('reason', ''))}", ""]
    facts = [
        f"reference: `{report.get('reference')}`",
        f"images: {report.get('num_images')} ({report.get('num_query')} query, {report.get('num_gallery')} gallery)",
    ]
    if model:
        shown = {k: v for k, v in model.items() if k not in ("weights", "random_weights", "checkpoint_sha256")}
        facts.insert(0, "model: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        if model.get("weights"):
            sha = f" (sha256 {model['checkpoint_sha256']})" if model.get("checkpoint_sha256") else ""
            facts.insert(1, f"weights: {model['weights']}{sha}")
    lines += [f"- {f}" for f in facts]
    rr = report.get("reference_retrieval")
    if rr:
        lines.append(
            f"- reference retrieval: Rank-1 {rr['rank1']:.4f}, Rank-5 {rr['rank5']:.4f}, "
            f"mAP {rr['mAP']:.4f} ({rr['num_valid_queries']} valid queries)"
        )
    elif report.get("reference_retrieval_error"):
        lines.append(f"- reference retrieval: unavailable ({_md_escape(report['reference_retrieval_error'])})")
    lines += [f"- tolerance semantics: {TOLERANCE_SEMANTICS}", ""]
    head = ["target", "status", "max abs err", "min cosine", "mean cosine", "Rank-1", "mAP", "Δ Rank-1", "Δ mAP"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in targets_in_order(report):
        lines.append("| " + " | ".join(_md_escape(c) for c in _row(name, r)) + " |")
    lines += _nondeterministic_md(report)
    lines += ["", "## Details", ""]
    for name, r in targets_in_order(report):
        lines.append(f"### {name}: {label(r['status'])}")
        if r.get("reason"):
            lines.append(f"- {_md_escape(r['reason'])}")
        if r.get("allowed"):
            lines.append(f"- skip allowed by matrix.yaml: {_md_escape(r['allowed'])}")
        for c in r.get("checks", []):
            state = (
                ("pass" if c["passed"] else "FAIL")
                if c["enabled"]
                else f"not enforced ({'would pass' if c['passed'] else 'would fail'})"
            )
            text = "see above" if c["message"] == r.get("reason") else c["message"]
            lines.append(f"- `{c['name']}` {state}: {_md_escape(text)}")
        tol = r.get("tolerance")
        if tol:
            lines.append(
                f"- tolerance: rtol {tol['rtol']:g}, atol {tol['atol']:g}, cosine_min "
                f"{tol['cosine_min']:g}, rank1_delta {tol['rank1_delta']:g}, map_delta "
                f"{tol['map_delta']:g}, checks {', '.join(tol['checks']) or 'none'}"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _nondeterministic_md(report: dict[str, Any]) -> list[str]:
    """The artifacts that are not byte-identical from run to run (their targets' manifests say so,
    ``nondeterministic:``): named with the reason and what is compared instead of their bytes."""
    rows = report.get("nondeterministic") or []
    if not rows:
        return []
    lines = [
        "",
        "## Non-deterministic artifacts",
        "",
        "These outputs are not byte-identical between two runs on the same inputs (each target's "
        "target.yaml says why); their bytes are never compared, their outputs are:",
        "",
    ]
    for r in rows:
        lines.append(
            f"- `{_md_escape(r['node'])}` `{_md_escape(r['artifact'])}`: {_md_escape(r['reason'])}; "
            f"compared instead: {_md_escape(r['compared_by'])}"
        )
    return lines


# --------------------------------------------------------------------------- junit

_XML_BAD = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(text: Any) -> str:
    """Text XML 1.0 can carry: characters it forbids (control characters in a dataset's file names,
    lone surrogates from undecodable names) are written as ``\\xNN`` / ``\\uNNNN``."""
    return _XML_BAD.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", str(text)
    )


def to_junit(report: dict[str, Any]) -> str:
    """One testsuite "modelmatrix"; one testcase per (target, check), classname = target. A target
    that did not run (skipped, or an error) is one testcase "run" carrying its reason once."""
    suite = ET.Element("testsuite", name="modelmatrix")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}

    def case(target: str, name: str) -> ET.Element:
        counts["tests"] += 1
        return ET.SubElement(suite, "testcase", classname=xml_safe(target), name=xml_safe(name))

    for name, r in targets_in_order(report):
        status = r["status"]
        reason = xml_safe(r.get("reason") or "")
        if status == "reference":
            if r.get("nonfinite"):
                ET.SubElement(case(name, "reference"), "failure", message=reason, type="nonfinite").text = reason
                counts["failures"] += 1
            continue
        if status in ("error", "skipped"):
            c = case(name, "run")
            if status == "error":
                ET.SubElement(c, "error", message=reason, type=xml_safe(r.get("kind") or "error"))
                counts["errors"] += 1
            else:
                allowed = f" (allowed: {r['allowed']})" if r.get("allowed") else ""
                ET.SubElement(c, "skipped", message=xml_safe(reason + allowed))
                counts["skipped"] += 1
            continue
        for chk in r.get("checks", []):
            c = case(name, chk["name"])
            message = xml_safe(chk["message"])
            if not chk["enabled"]:
                ET.SubElement(c, "skipped", message=f"check not enabled in targets.{xml_safe(name)}.tolerance.checks")
                counts["skipped"] += 1
            elif not chk["passed"]:
                ET.SubElement(c, "failure", message=message, type=chk["name"])
                counts["failures"] += 1
            else:
                ET.SubElement(c, "system-out").text = message
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
    """A few lines for the terminal: one per target, the counts, then the verdict and its cause."""
    out = []
    if (report.get("model") or {}).get("random_weights"):
        out.append("note: random weights (no checkpoint): parity is meaningful, absolute accuracy is not")
    rr = report.get("reference_retrieval")
    if rr:
        out.append(f"reference {report.get('reference')}: Rank-1 {rr['rank1']:.4f}  mAP {rr['mAP']:.4f}")
    width = max([len(n) for n in report.get("targets", {})] + [6])
    for name, r in targets_in_order(report):
        status = r["status"]
        detail = r.get("reason") or ""
        if status in ("passed", "failed", "unchecked") and r.get("metrics") and "max_abs_error" in r["metrics"]:
            m = r["metrics"]
            cos = (m.get("cosine") or {}).get("min")
            d = m.get("deltas") or {}
            detail = (
                f"max|d| {_f(m.get('max_abs_error'), '.2e')}  cos>= {_f(cos, '.6f')}  "
                f"dR1 {_delta(d.get('rank1'))}  dmAP {_delta(d.get('mAP'))}"
            )
            if r.get("failed_checks"):
                detail += "  failed: " + "; ".join(
                    c["message"] for c in r.get("checks", []) if c["enabled"] and not c["passed"]
                )
        elif status == "failed" and r.get("failed_checks"):
            detail = r.get("reason") or ""
        if r.get("allowed"):
            detail += f"  (skip allowed: {r['allowed']})"
        out.append(f"{name:<{width}}  {label(status):<9}  {detail}")
    nondet = report.get("nondeterministic") or []
    if nondet:
        named = ", ".join(f"{r['node']} {r['artifact']}" for r in nondet)
        out.append(f"not byte-reproducible (compared by their outputs instead): {named}")
    c = report.get("counts") or {}
    out.append(
        f"summary: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
        f"{c.get('error', 0)} could not run, {c.get('skipped', 0)} skipped"
    )
    verdict = "PASSED" if report.get("passed") else f"FAILED (exit {report.get('exit_code', 1)})"
    cause = report.get("cause")
    out.append(f"{verdict}: " + (cause if cause and not report.get("passed") else str(report.get("reason", ""))))
    return out
