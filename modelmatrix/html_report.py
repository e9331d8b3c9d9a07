"""report.html: the verify report people look at. One self-contained file: plots are inline PNGs
(matplotlib, Agg, base64), thumbnails inline JPEGs; no script, no stylesheet or font from the network.

Sections: the verdict and the per-target table; skipped and failed targets with their reasons; the
CMC curves (Rank-1..max_rank) of every backend on one plot; throughput bars from the last `invoke
bench`; per compared target the histogram of absolute errors against its tolerance, the per-image
cosine distribution against ``cosine_min``, and its worst images (lowest cosine) shown beside their
nearest neighbour under the reference's features and under the target's.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WORST_IMAGES = 3
THUMB_HEIGHT = 96
DPI = 80
STATUS_COLOURS = {
    "reference": "#4a6fa5",
    "passed": "#2e7d32",
    "failed": "#c62828",
    "error": "#c62828",
    "skipped": "#757575",
    "unchecked": "#ef6c00",
}


@dataclass
class HtmlInputs:
    """What the plots need besides the report dict: the features verify compared (target -> (N, D)),
    prepare's index (file names, splits), the dataset folder (thumbnails; None: names only) and the
    last bench's throughput (target -> {batch size: img/s})."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    dataset: Path | None = None
    bench: dict[str, dict[str, float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- pieces


def _figure(w: float = 6.0, h: float = 3.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _png(fig: Any, alt: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _thumb(dataset: Path | None, rel: str | None) -> str:
    """A small inline JPEG of a dataset image, or its name when it cannot be read here."""
    name = html.escape(rel or "?")
    if dataset is None or not rel:
        return f'<span class="noimg">{name}</span>'
    try:
        from PIL import Image

        with Image.open(dataset / rel) as src:
            im = src.convert("RGB")
            im.thumbnail((THUMB_HEIGHT, THUMB_HEIGHT))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=75)
    except (OSError, ValueError) as exc:
        log.debug("report.html: no thumbnail for %s: %s", rel, exc)
        return f'<span class="noimg">{name}</span>'
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="thumb" alt="{name}" title="{name}" src="data:image/jpeg;base64,{data}">'


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(1) / (na * nb)


def _nearest(feats: np.ndarray, row: int, candidates: np.ndarray) -> int | None:
    """The candidate row nearest to ``row`` (Euclidean on L2-normalised features, as retrieval does)."""
    cand = candidates[candidates != row]
    if cand.size == 0:
        return None
    f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    d = ((f[cand] - f[row]) ** 2).sum(1)
    return int(cand[int(np.argmin(d))])


# --------------------------------------------------------------------------- plots


def cmc_plot(report: dict[str, Any]) -> str | None:
    curves = []
    for name, r in report.get("targets", {}).items():
        ret = (r.get("metrics") or {}).get("retrieval")
        if ret and ret.get("cmc"):
            curves.append((name, ret["cmc"]))
    if not curves:
        return None
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot()
    max_rank = int(report.get("max_rank") or 50)
    for i, (name, cmc) in enumerate(curves):
        ranks = np.arange(1, min(len(cmc), max_rank) + 1)
        ax.plot(
            ranks,
            np.asarray(cmc[: len(ranks)]) * 100,
            label=name,
            linewidth=2.4 - 0.5 * min(i, 3),
            linestyle=["-", "--", ":", "-."][i % 4],
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(f"CMC, Rank-1..{max_rank}")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig, "CMC curves of every backend")


def bench_plot(bench: dict[str, dict[str, float]]) -> str | None:
    rows = [
        (t, bs, ips) for t, by in sorted(bench.items()) for bs, ips in sorted(by.items(), key=lambda kv: int(kv[0]))
    ]
    if not rows:
        return None
    fig = _figure(6.0, 0.4 * len(rows) + 1.2)
    ax = fig.add_subplot()
    labels = [f"{t} (batch {bs})" for t, bs, _ in rows]
    ax.barh(range(len(rows)), [ips for *_, ips in rows], color="#4a6fa5")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    ax.set_title("throughput (last invoke bench)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig, "throughput per backend and batch size")


def error_plot(target: str, diff: np.ndarray, tol: dict[str, Any], ref_abs: np.ndarray) -> str:
    fig = _figure(4.6, 2.8)
    ax = fig.add_subplot()
    d = diff.ravel()
    positive = d[d > 0]
    lo = float(positive.min()) if positive.size else 1e-12
    hi = max(float(d.max()), tol["atol"] * 2, lo * 10)
    bins = np.logspace(np.log10(lo), np.log10(hi), 40)
    ax.hist(np.clip(d, lo, None), bins=bins, color="#4a6fa5")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(tol["atol"], color="#c62828", linestyle="--", label=f"atol {tol['atol']:g}")
    typical = tol["atol"] + tol["rtol"] * float(np.median(ref_abs))
    ax.axvline(typical, color="#ef6c00", linestyle=":", label=f"atol + rtol*median|ref| {typical:.2g}")
    ax.set_xlabel("|target - reference| per element")
    ax.set_ylabel("elements")
    ax.set_title(f"{target}: absolute errors")
    ax.legend(fontsize=8)
    return _png(fig, f"{target}: histogram of absolute errors")


def cosine_plot(target: str, cos: np.ndarray, cosine_min: float) -> str:
    fig = _figure(4.6, 2.8)
    ax = fig.add_subplot()
    gap = np.clip(1.0 - cos, 1e-12, None)  # 1 - cosine on a log axis: 0.9999999 is readable
    lo, hi = float(gap.min()), max(float(gap.max()), (1.0 - cosine_min) * 2)
    bins = np.logspace(np.log10(lo), np.log10(max(hi, lo * 10)), 30)
    ax.hist(gap, bins=bins, color="#2e7d32")
    ax.set_xscale("log")
    ax.axvline(max(1.0 - cosine_min, 1e-12), color="#c62828", linestyle="--", label=f"cosine_min {cosine_min:g}")
    ax.set_xlabel("1 - cosine(target, reference) per image")
    ax.set_ylabel("images")
    ax.set_title(f"{target}: per-image cosine")
    ax.legend(fontsize=8)
    return _png(fig, f"{target}: per-image cosine distribution")


# --------------------------------------------------------------------------- the page

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{margin-bottom:.2em} .verdict{font-size:1.3em;padding:.5em .8em;border-radius:6px;color:#fff}
.pass{background:#2e7d32} .fail{background:#c62828}
table{border-collapse:collapse;margin:.8em 0} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child,td.reason{text-align:left} .status{font-weight:bold;color:#fff;text-align:center}
.plots{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start} .plot{border:1px solid #eee}
.worst td{text-align:center;vertical-align:top} .thumb{height:96px;display:block;margin:auto}
.noimg{font-size:.8em;color:#777} .banner{background:#fff3e0;border-left:4px solid #ef6c00;padding:.4em .8em}
"""


def _status_cell(status: str) -> str:
    from .report import label

    return (
        f'<td class="status" style="background:{STATUS_COLOURS.get(status, "#555")}">{html.escape(label(status))}</td>'
    )


def _table(report: dict[str, Any]) -> str:
    from .report import targets_in_order

    head = [
        "target",
        "status",
        "max abs err",
        "min cosine",
        "mean cosine",
        "Rank-1",
        "mAP",
        "Δ Rank-1",
        "Δ mAP",
        "reason",
    ]
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for name, r in targets_in_order(report):
        m = r.get("metrics") or {}
        cos, ret, d = m.get("cosine") or {}, m.get("retrieval") or {}, m.get("deltas") or {}
        cells = [
            _f(m.get("max_abs_error"), ".3g"),
            _f(cos.get("min"), ".6f"),
            _f(cos.get("mean"), ".6f"),
            _f(ret.get("rank1"), ".4f"),
            _f(ret.get("mAP"), ".4f"),
            _f(d.get("rank1"), "+.4f"),
            _f(d.get("mAP"), "+.4f"),
        ]
        rows.append(
            f"<tr><td>{html.escape(name)}</td>{_status_cell(r['status'])}"
            + "".join(f"<td>{c}</td>" for c in cells)
            + f'<td class="reason">{html.escape(str(r.get("reason") or ""))}</td></tr>'
        )
    return "<table>" + "".join(rows) + "</table>"


def _target_section(name: str, r: dict[str, Any], data: HtmlInputs, ref_name: str) -> str:
    out = [f"<h3>{html.escape(name)}</h3>"]
    feats, ref = data.features.get(name), data.features.get(ref_name)
    tol = r.get("tolerance")
    if feats is None or ref is None or tol is None or np.shape(feats) != np.shape(ref) or np.ndim(feats) != 2:
        out.append(f"<p>{html.escape(str(r.get('reason') or 'no features to plot'))}</p>")
        return "".join(out)
    a, b = np.asarray(feats, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        out.append(f"<p>{html.escape(str(r.get('reason') or 'non-finite features'))}</p>")
        return "".join(out)
    cos = _cosines(a, b)
    out.append(
        '<div class="plots">'
        + error_plot(name, np.abs(a - b), tol, np.abs(b))
        + cosine_plot(name, cos, tol["cosine_min"])
        + "</div>"
    )
    items = data.index.get("items") or []
    gallery = np.array([i for i, it in enumerate(items) if it.get("split") == "gallery"], dtype=np.int64)
    if gallery.size == 0:
        gallery = np.arange(len(items), dtype=np.int64)
    rows = [
        "<tr><th>image</th><th>cosine</th><th>nearest under the reference</th><th>nearest under this target</th></tr>"
    ]
    for row in np.argsort(cos)[:WORST_IMAGES]:
        row = int(row)
        nn_ref, nn_t = _nearest(b, row, gallery), _nearest(a, row, gallery)
        same = "" if nn_ref == nn_t else ' style="outline:3px solid #c62828"'

        def cell(i: int | None) -> str:
            f = items[i]["file"] if i is not None and i < len(items) else None
            return f"{_thumb(data.dataset, f)}<div class='noimg'>{html.escape(f or '-')}</div>"

        rows.append(
            f"<tr><td>{cell(row)}</td><td>{cos[row]:.9f}<br>1 - cos {1.0 - cos[row]:.2e}</td>"
            f"<td>{cell(nn_ref)}</td><td{same}>{cell(nn_t)}</td></tr>"
        )
    out.append(
        "<p>Worst images (lowest cosine), each beside its nearest gallery image under the reference's "
        "features and under this target's (outlined when they differ):</p>"
    )
    out.append('<table class="worst">' + "".join(rows) + "</table>")
    return "".join(out)


def to_html(report: dict[str, Any], data: HtmlInputs | None = None) -> str:
    """The whole page as a string (UTF-8, self-contained)."""
    from .report import RANDOM_BANNER, targets_in_order

    data = data or HtmlInputs()
    passed = bool(report.get("passed"))
    verdict = "PASSED" if passed else f"FAILED (exit {report.get('exit_code', 1)})"
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        "<title>modelmatrix report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>modelmatrix report</h1>",
        f'<p class="verdict {"pass" if passed else "fail"}">{verdict}: '
        f"{html.escape(str(report.get('reason', '')))}</p>",
    ]
    model = report.get("model") or {}
    if model.get("random_weights"):
        parts.append(f'<p class="banner">{html.escape(RANDOM_BANNER.lstrip("> ").replace("**", ""))}</p>')
    facts = [
        f"reference: {report.get('reference')}",
        f"images: {report.get('num_images')} ({report.get('num_query')} query, {report.get('num_gallery')} gallery)",
    ]
    if model:
        facts.append("model: " + ", ".join(f"{k}={v}" for k, v in model.items() if k != "random_weights"))
    if report.get("runner"):
        facts.append(f"runner: {report['runner']}")
    if report.get("gathered"):
        g = report["gathered"]
        facts.append(
            f"gathered from {len(g.get('exports', []))} exports: "
            + ", ".join(f"{e['target']} ({e.get('host')})" for e in g.get("exports", []))
        )
    parts.append("<ul>" + "".join(f"<li>{html.escape(str(f))}</li>" for f in facts) + "</ul>")
    parts += ["<h2>Targets</h2>", _table(report)]
    not_run = [(n, r) for n, r in targets_in_order(report) if r["status"] in ("skipped", "error")]
    if not_run:
        parts.append("<h2>Skipped and not run</h2><ul>")
        for n, r in not_run:
            allowed = f" (skip allowed: {r['allowed']})" if r.get("allowed") else ""
            parts.append(
                f"<li><b>{html.escape(n)}</b> {html.escape(r['status'])}: "
                f"{html.escape(str(r.get('reason') or ''))}{html.escape(allowed)}</li>"
            )
        parts.append("</ul>")
    plots = [p for p in (cmc_plot(report), bench_plot(data.bench)) if p]
    if plots:
        parts.append("<h2>Retrieval and throughput</h2><div class='plots'>" + "".join(plots) + "</div>")
    compared = [(n, r) for n, r in targets_in_order(report) if r["status"] in ("passed", "failed", "unchecked")]
    if compared:
        parts.append("<h2>Per target</h2>")
        for n, r in compared:
            parts.append(_target_section(n, r, data, str(report.get("reference"))))
    parts.append("</body></html>\n")
    return "\n".join(parts)
