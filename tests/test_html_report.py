"""report.html: self-contained, rendered by a real headless Chromium (Debian's `chromium`), not
blank, no console errors; and the same detector does see a page that has one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelmatrix import data, report, verify
from modelmatrix.html_report import HtmlInputs, to_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CONSOLE_ERROR = re.compile(r"Uncaught|ERROR:CONSOLE|CONSOLE\(\d+\)\].*(Error|error)|Refused to")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """A report over real synthetic images and features (the reference, one close backend, one off
    by a perturbation, one skipped), as verify writes it."""
    root = tmp_path_factory.mktemp("html")
    ds = root / "data"
    data.make_synthetic(ds, identities=6, cameras=3, gallery_per_camera=1, junk=0, distractors=0, seed=0)
    items = data.scan_dataset(ds, None)
    index = {"items": items}
    rng = np.random.default_rng(0)
    pids = np.array([it["pid"] for it in items])
    centres = rng.normal(size=(pids.max() + 1, 64))
    ref = (centres[pids] + 0.3 * rng.normal(size=(len(items), 64))).astype(np.float32)
    close = ref + rng.normal(scale=1e-5, size=ref.shape).astype(np.float32)
    off = ref.copy()
    off[3] += rng.normal(scale=2.0, size=64).astype(np.float32)  # one image converted badly
    tol = {
        "rtol": 1e-3,
        "atol": 1e-3,
        "cosine_min": 0.99999,
        "rank1_delta": 0.0,
        "map_delta": 0.001,
        "checks": ["allclose", "cosine", "retrieval"],
    }
    feats = {"torch": ref, "onnxruntime": close, "caffe": off}
    rep = verify.verify_all(
        feats,
        "torch",
        {"onnxruntime": tol, "caffe": tol, "tensorrt": tol},
        index,
        skipped={"tensorrt": "tensorrt.convert: no GPU here"},
    )
    bench = {"torch": {"1": 40.0, "16": 90.0}, "onnxruntime": {"1": 55.0, "16": 120.0}}
    out = root / "verify"
    paths = report.write_reports(rep, out, html=HtmlInputs(features=feats, index=index, dataset=ds, bench=bench))
    assert out / "report.html" in paths
    return {"root": root, "html": out / "report.html", "report": rep, "items": items}


def _chromium(page: Path, shot: Path) -> str:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (Debian: apt-get install -y chromium)", pytrace=False)
    r = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,1800",
            f"--screenshot={shot}",
            "--enable-logging=stderr",
            "--v=0",
            "--user-data-dir=" + str(shot.parent / f"profile-{shot.stem}"),
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), r.stderr[-2000:]
    return r.stderr


def test_report_html_is_self_contained(rendered):
    text = rendered["html"].read_text()
    assert "FAILED" in text and "caffe" in text and "tensorrt.convert: no GPU here" in text
    # no network: nothing fetched from anywhere; images inline
    assert not re.search(r"""(src|href)=["'](https?:|//)""", text)
    assert "<script" not in text
    pngs = re.findall(r'src="data:image/png;base64,', text)
    assert len(pngs) >= 6  # CMC, throughput, and per compared target: errors + cosine
    thumbs = re.findall(r'class="thumb"[^>]*src="data:image/jpeg;base64,', text)
    assert len(thumbs) >= 9  # worst images with both nearest neighbours, per target
    # the worst image of the badly converted target is named (the perturbed row 3)
    assert rendered["items"][3]["file"] in text.split("<h3>caffe</h3>", 1)[1]


def test_report_html_renders_in_chromium(rendered, tmp_path):
    shot = tmp_path / "report.png"
    log = _chromium(rendered["html"], shot)
    assert not CONSOLE_ERROR.search(log), [ln for ln in log.splitlines() if CONSOLE_ERROR.search(ln)]
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert px.shape == (1800, 1200)
    assert px.std() > 20  # not blank: text, tables, plots, thumbnails
    assert (px < 100).mean() > 0.01  # dark pixels: the text and plot lines were drawn


def test_console_error_detector_is_real(tmp_path):
    """A page with a script error, rendered the same way, is caught by the same check."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    log = _chromium(page, tmp_path / "broken.png")
    assert CONSOLE_ERROR.search(log), log[-2000:]


def test_report_html_without_arrays_still_has_verdict_and_table(rendered, tmp_path):
    text = to_html(json.loads(report.to_json(rendered["report"])))
    assert "FAILED" in text and "<table>" in text and "CMC" in text  # the CMC comes from report.json
