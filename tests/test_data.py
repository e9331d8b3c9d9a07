"""modelmatrix.data: the synthetic set, scanning, preprocessing, prepare, features files.

Real files throughout: JPEGs written by Pillow, the five real Market1501 crops in
shared/data/market1501-samples, real .npy files; real FIFOs, sockets, device files, links and
unreadable files (helpers in test_hashing.py), a real 2 MiB tmpfs for the full-disk cases.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelmatrix import data
from modelmatrix.config import ARCH_CONTRACTS
from modelmatrix.errors import DataError
from modelmatrix.hashing import HashCache

from test_hashing import KIND_WORDS, KINDS, make_special, one_line_error, readable_in_child_body, run_child

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "market1501-samples"
RSB = ARCH_CONTRACTS["reid-strong-baseline"]
FASTREID = ARCH_CONTRACTS["fastreid-bagtricks-r50"]
MARKET_NAME = re.compile(r"^(-1|\d{4})_c([1-6])s\d_\d{6}_\d{2}\.jpg$")
SMALL = dict(identities=6, cameras=3, gallery_per_camera=2, junk=2, distractors=3, seed=0)


def _samples() -> list[Path]:
    if not SAMPLES.is_dir():
        pytest.skip(f"{SAMPLES} is absent (CI checks out shared/ beside the repository)")
    return sorted(SAMPLES.glob("*.jpg"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn") / "market"
    return root, data.make_synthetic(root, **SMALL)


# ============================================================================ synthetic set


def test_synthetic_layout_and_names(synthetic):
    root, summary = synthetic
    for sub in ("query", "bounding_box_test", "bounding_box_train"):
        assert (root / sub / "Thumbs.db").is_file()
        names = [p.name for p in (root / sub).iterdir() if p.name != "Thumbs.db"]
        assert names, sub
        bad = [n for n in names if not MARKET_NAME.match(n)]
        assert not bad, bad
    gallery = [p.name for p in (root / "bounding_box_test").glob("*.jpg")]
    assert sum(n.startswith("-1_") for n in gallery) == SMALL["junk"]
    assert sum(n.startswith("0000_") for n in gallery) == SMALL["distractors"]
    assert len(list((root / "query").glob("*.jpg"))) == summary["query"] == 2 * SMALL["identities"]
    n_ids = SMALL["identities"] * SMALL["cameras"] * SMALL["gallery_per_camera"]
    assert summary["gallery"] == n_ids + SMALL["distractors"]
    assert len(gallery) == n_ids + SMALL["distractors"] + SMALL["junk"]
    assert len({p.name for p in root.rglob("*.jpg")}) == len(list(root.rglob("*.jpg")))  # unique names
    cams = {MARKET_NAME.match(n).group(2) for n in gallery}
    assert cams == {"1", "2", "3"}


def test_synthetic_images_are_64x128_rgb_jpeg(synthetic):
    root, _ = synthetic
    for p in sorted((root / "query").glob("*.jpg"))[:5]:
        with Image.open(p) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (64, 128), "RGB")


def test_every_query_has_gallery_matches_in_other_cameras(synthetic):
    root, _ = synthetic
    items = data.scan_dataset(root)
    gallery = [(g["pid"], g["camid"]) for g in items if g["split"] == "gallery"]
    for q in (i for i in items if i["split"] == "query"):
        assert any(pid == q["pid"] and cam != q["camid"] for pid, cam in gallery), q


def test_synthetic_is_deterministic_per_seed(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    small = dict(SMALL, identities=3, distractors=1, junk=1)
    data.make_synthetic(tmp_path / "a", **small)
    data.make_synthetic(tmp_path / "b", **small)
    data.make_synthetic(tmp_path / "c", **dict(small, seed=1))
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert any(a[k] != c[k] for k in a if k.endswith(".jpg"))


def test_synthetic_refuses_a_non_empty_folder_and_force_replaces_it(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    small = dict(SMALL, identities=2, distractors=0, junk=0)
    with pytest.raises(DataError) as exc:
        data.make_synthetic(out, **small)
    assert str(out) in _one_line(exc) and "--force" in str(exc.value)
    assert (out / "mine.txt").read_text() == "keep me"
    data.make_synthetic(out, force=True, **small)
    assert not (out / "mine.txt").exists() and (out / "query").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary siblings left


def test_synthetic_into_an_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    data.make_synthetic(out, **dict(SMALL, identities=2))
    assert (out / "bounding_box_test").is_dir()


def test_synthetic_bad_argument_is_one_line(tmp_path):
    with pytest.raises(DataError) as exc:
        data.make_synthetic(tmp_path / "x", cameras=7)
    assert "data.synthetic.cameras" in _one_line(exc)
    assert not (tmp_path / "x").exists()


# ============================================================================ scanning


def test_scan_order_labels_and_quiet_skips(synthetic, tmp_path):
    src, _ = synthetic
    root = tmp_path / "m"
    shutil.copytree(src, root)
    (root / "query" / "notes.txt").write_text("not an image")
    (root / "bounding_box_test" / "readme.md").write_text("not an image")
    items = data.scan_dataset(root)
    splits = [i["split"] for i in items]
    nq = splits.count("query")
    assert splits == ["query"] * nq + ["gallery"] * (len(items) - nq)
    for split in ("query", "gallery"):
        files = [i["file"] for i in items if i["split"] == split]
        assert files == sorted(files)
    assert all(i["pid"] != -1 for i in items)  # junk skipped
    assert any(i["pid"] == 0 and i["split"] == "gallery" for i in items)  # distractors kept
    assert {i["camid"] for i in items} == {0, 1, 2}
    assert not any(".db" in i["file"] or i["file"].endswith((".txt", ".md")) for i in items)
    first = next(i for i in items if i["split"] == "gallery" and i["pid"] > 0)
    m = MARKET_NAME.match(Path(first["file"]).name)
    assert first["file"].startswith("bounding_box_test/") and first["camid"] == int(m.group(2)) - 1
    assert first["pid"] == int(m.group(1))


def test_scan_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(DataError) as exc:
        data.scan_dataset(tmp_path / "nope")
    msg = _one_line(exc)
    assert str(tmp_path / "nope") in msg and "dataset folder not found" in msg
    assert "invoke data --synthetic" in msg and "data.dataset" in msg


def test_scan_missing_gallery_folder(tmp_path):
    (tmp_path / "query").mkdir()
    with pytest.raises(DataError) as exc:
        data.scan_dataset(tmp_path)
    assert str(tmp_path / "bounding_box_test") in _one_line(exc)


def test_scan_empty_query_folder(tmp_path):
    (tmp_path / "query").mkdir()
    (tmp_path / "query" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "bounding_box_test").mkdir()
    with pytest.raises(DataError) as exc:
        data.scan_dataset(tmp_path)
    msg = _one_line(exc)
    assert str(tmp_path / "query") in msg and "no images" in msg


@pytest.mark.parametrize(
    "name,words",
    [
        ("person_one.jpg", "does not match the Market1501 pattern"),
        ("0002_c7s1_000451_03.jpg", "camera 7 is outside 1..6"),
        ("0002_c0s1_000451_03.jpg", "camera 0 is outside 1..6"),
        ("-_c1s1_000451_03.jpg", "not a number"),
    ],
)
def test_scan_bad_names(tmp_path, name, words):
    for sub in ("query", "bounding_box_test"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (64, 128)).save(tmp_path / sub / "0002_c1s1_000451_01.jpg")
    Image.new("RGB", (64, 128)).save(tmp_path / "bounding_box_test" / name)
    with pytest.raises(DataError) as exc:
        data.scan_dataset(tmp_path)
    msg = _one_line(exc)
    assert str(tmp_path / "bounding_box_test" / name) in msg and words in msg


def test_scan_limit_is_deterministic_and_keeps_matches(synthetic):
    root, _ = synthetic
    full = data.scan_dataset(root)
    a = data.scan_dataset(root, limit=3)
    assert a == data.scan_dataset(root, limit=3)
    q = [i for i in a if i["split"] == "query"]
    assert q == [i for i in full if i["split"] == "query"][:3]
    pids = {i["pid"] for i in q}
    kept = [i for i in a if i["split"] == "gallery"]
    assert [i for i in full if i["split"] == "gallery" and i["pid"] in pids] == [i for i in kept if i["pid"] in pids]
    others = [i for i in kept if i["pid"] not in pids]
    assert len(others) == 3 and others == [i for i in full if i["split"] == "gallery" and i["pid"] not in pids][:3]
    with pytest.raises(DataError):
        data.scan_dataset(root, limit=0)


# ============================================================================ preprocessing


def _hand(path: Path, contract: dict, resample) -> np.ndarray:
    """The reference: PIL resize, then ToTensor (/255) and Normalize written out per channel."""
    u8 = np.asarray(Image.open(path).convert("RGB").resize((128, 256), resample))
    out = np.empty((3, 256, 128), np.float32)
    for ch in range(3):
        x = u8[:, :, ch].astype(np.float32)
        if contract["scale"] != 1.0:
            x = x / np.float32(255.0)
        out[ch] = (x - np.float32(contract["mean"][ch])) / np.float32(contract["std"][ch])
    return out


@pytest.mark.parametrize("contract,resample", [(RSB, Image.Resampling.BILINEAR), (FASTREID, Image.Resampling.BICUBIC)])
def test_preprocess_matches_a_hand_computation(synthetic, contract, resample):
    root, _ = synthetic
    items = data.scan_dataset(root)[:2]
    got = data.preprocess(items, root, contract, (256, 128), workers=1)
    assert got.shape == (2, 3, 256, 128) and got.dtype == np.float32
    for k, it in enumerate(items):
        np.testing.assert_array_equal(got[k], _hand(root / it["file"], contract, resample))


def test_preprocess_contracts_differ_as_documented(synthetic):
    root, _ = synthetic
    items = data.scan_dataset(root)[:1]
    rsb = data.preprocess(items, root, RSB, (256, 128), workers=1)[0]
    fr = data.preprocess(items, root, FASTREID, (256, 128), workers=1)[0]
    assert 0.0 <= fr.min() and fr.max() <= 255.0 and fr.max() > 1.5  # 0..255 in
    assert rsb.min() < 0.0 and rsb.max() < 3.0  # normalised
    bilinear_0_255 = (rsb * np.float32(0.229) + np.float32(0.485))[0] * 255
    assert np.abs(bilinear_0_255 - fr[0]).max() > 1.0  # bicubic != bilinear


def test_preprocess_threads_chunks_keep_item_order(synthetic):
    root, _ = synthetic
    items = data.scan_dataset(root)[:23]
    one = data.preprocess(items, root, RSB, (256, 128), workers=1)
    chunks = list(data.iter_preprocessed(items, root, RSB, (256, 128), workers=2, chunk=4))
    assert [s for s, _ in chunks] == list(range(0, 23, 4))
    np.testing.assert_array_equal(np.concatenate([a for _, a in chunks]), one)
    np.testing.assert_array_equal(data.preprocess(items, root, RSB, (256, 128), workers=0), one)


def test_real_market_samples_preprocess(tmp_path):
    files = _samples()
    assert len(files) == 5
    items = [{"file": p.name, "pid": 0, "camid": 0, "split": "gallery"} for p in files]
    x = data.preprocess(items, SAMPLES, RSB, (256, 128), workers=2)
    assert x.shape == (5, 3, 256, 128) and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_array_equal(x[3], _hand(files[3], RSB, Image.Resampling.BILINEAR))
    assert len({float(x[i].mean()) for i in range(5)}) == 5  # five different crops


def test_truncated_jpeg_is_a_one_line_error_naming_it(tmp_path):
    files = _samples()
    bad = tmp_path / "0022_c6s1_002976_01.jpg"
    raw = files[0].read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    good = [{"file": p.name, "pid": 1, "camid": 0, "split": "gallery"} for p in files[1:]]
    for p in files[1:]:
        shutil.copy(p, tmp_path / p.name)
    items = good[:2] + [{"file": bad.name, "pid": 1, "camid": 0, "split": "gallery"}] + good[2:]
    for workers in (1, 2):
        with pytest.raises(DataError) as exc:
            data.preprocess(items, tmp_path, RSB, (256, 128), workers=workers)
        msg = _one_line(exc)
        assert str(bad) in msg and "cannot decode" in msg


def test_not_an_image_with_jpg_suffix(tmp_path):
    (tmp_path / "0002_c1s1_000451_01.jpg").write_text("hello")
    with pytest.raises(DataError) as exc:
        data.preprocess([{"file": "0002_c1s1_000451_01.jpg"}], tmp_path, RSB, (256, 128), workers=1)
    assert "0002_c1s1_000451_01.jpg" in _one_line(exc)


def test_bad_contract_key_is_named(synthetic):
    root, _ = synthetic
    items = data.scan_dataset(root)[:1]
    with pytest.raises(DataError) as exc:
        data.preprocess(items, root, dict(RSB, interpolation="nearest"), (256, 128))
    assert "contract.interpolation" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        data.preprocess(items, root, dict(RSB, std=[1, 0, 1]), (256, 128))
    assert "contract.std" in _one_line(exc)


# ============================================================================ prepare


def test_prepare_writes_inputs_index_and_ascend_bins(synthetic, tmp_path):
    root, _ = synthetic
    out = tmp_path / "prep"
    contract = dict(RSB, input_size=[256, 128])
    summary = data.prepare(root, out, contract, (256, 128), limit=2, workers=2)
    x = np.load(out / "inputs.npy")
    index = json.loads((out / "index.json").read_text())
    items = index["items"]
    assert x.shape == (len(items), 3, 256, 128) and x.dtype == np.float32
    assert index["contract"] == contract and index["input_size"] == [256, 128]
    assert index["num_query"] == 2 == sum(i["split"] == "query" for i in items)
    assert items == data.scan_dataset(root, limit=2)
    assert summary["images"] == len(items) and summary["images_per_second"] > 0
    np.testing.assert_array_equal(x, data.preprocess(items, root, RSB, (256, 128), workers=1))
    bins = sorted((out / "ascend").glob("*.bin"))
    assert len(bins) == len(items)
    assert {b.stat().st_size for b in bins} == {393216}
    lines = (out / "ascend" / "prep_bin.info").read_text().splitlines()
    assert len(lines) == len(items)
    for i, (line, it) in enumerate(zip(lines, items, strict=True)):
        idx, path, w, h = line.split(" ")
        assert (int(idx), path, w, h) == (i, f"ascend/{Path(it['file']).stem}.bin", "128", "256")
        np.testing.assert_array_equal(np.fromfile(out / path, dtype=np.float32).reshape(3, 256, 128), x[i])
    assert not list(out.glob(".*"))  # no temporary files


def test_prepare_without_ascend_bins(synthetic, tmp_path):
    root, _ = synthetic
    data.prepare(root, tmp_path / "p", FASTREID, (64, 32), limit=1, ascend_bins=False, workers=1)
    assert not (tmp_path / "p" / "ascend").exists()
    assert np.load(tmp_path / "p" / "inputs.npy").shape[1:] == (3, 64, 32)


def test_prepare_stops_on_a_corrupt_image_without_inputs(synthetic, tmp_path):
    src, _ = synthetic
    root = tmp_path / "m"
    shutil.copytree(src, root)
    victim = sorted((root / "bounding_box_test").glob("0002_*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:300])
    out = tmp_path / "prep"
    with pytest.raises(DataError) as exc:
        data.prepare(root, out, RSB, (256, 128), workers=2)
    assert str(victim) in _one_line(exc)
    assert not (out / "inputs.npy").exists() and not (out / "index.json").exists()
    assert not list(out.glob(".inputs*"))


def test_prepare_duplicate_stems_refused_for_ascend(tmp_path):
    for sub in ("query", "bounding_box_test"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (64, 128)).save(tmp_path / sub / "0002_c1s1_000451_01.jpg")
    with pytest.raises(DataError) as exc:
        data.prepare(tmp_path, tmp_path / "out", RSB, (256, 128), workers=1)
    msg = _one_line(exc)
    assert "same file stem" in msg and "data.ascend_bins" in msg
    data.prepare(tmp_path, tmp_path / "out2", RSB, (256, 128), ascend_bins=False, workers=1)


# ============================================================================ features files


def test_load_features_accepts_the_right_shape(tmp_path):
    p = tmp_path / "features.npy"
    np.save(p, np.ones((4, 8), np.float32))
    assert data.load_features(p, 4).shape == (4, 8)


@pytest.mark.parametrize(
    "array,words",
    [
        (np.ones((3, 8), np.float32), "expected 4 rows"),
        (np.ones((4,), np.float32), "expected a 2-D float array"),
        (np.ones((4, 8), np.int32), "expected a 2-D float array"),
        (np.array([{"a": 1}] * 4, dtype=object), "not a readable .npy array"),
    ],
)
def test_load_features_wrong_file(tmp_path, array, words):
    p = tmp_path / "features.npy"
    np.save(p, array, allow_pickle=True)
    with pytest.raises(DataError) as exc:
        data.load_features(p, 4)
    msg = _one_line(exc)
    assert str(p) in msg and words in msg


def test_load_features_missing_or_garbage(tmp_path):
    with pytest.raises(DataError) as exc:
        data.load_features(tmp_path / "features.npy", 4)
    assert "not found" in _one_line(exc)
    (tmp_path / "features.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError) as exc:
        data.load_features(tmp_path / "features.npy", 4)
    assert str(tmp_path / "features.npy") in _one_line(exc)
    np.save(tmp_path / "f.npy", np.ones((4, 8), np.float32))
    with pytest.raises(DataError) as exc:
        data.load_features(tmp_path / "f.npy", 4, expected_cols=2048)
    assert "feature dimension 2048" in _one_line(exc)


def test_same_synthetic_request_is_a_no_op_and_a_different_one_is_refused(tmp_path):
    out = tmp_path / "set"
    first = data.make_synthetic(out, identities=3, cameras=2, gallery_per_camera=1, junk=0, distractors=0)
    assert first["status"] == "written"
    stamp = (out / "query").stat().st_mtime_ns
    again = data.make_synthetic(out, identities=3, cameras=2, gallery_per_camera=1, junk=0, distractors=0)
    assert again["status"] == "up to date" and (out / "query").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="not empty; delete it or pass --force"):
        data.make_synthetic(out, identities=4, cameras=2, gallery_per_camera=1, junk=0, distractors=0)


# ============================================================================ hostile dataset entries

OLD_NS = 1_500_000_000 * 10**9


def _copy_old(src: Path, dst: Path) -> Path:
    """A copy of a dataset whose files all have a past mtime (so the hash cache may keep them)."""
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        os.utime(p, ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    return dst


def _tiny(root: Path) -> Path:
    for sub in ("query", "bounding_box_test"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (64, 128), (200, 10, 10)).save(root / "query" / "0002_c1s1_000451_01.jpg")
    Image.new("RGB", (64, 128), (10, 200, 10)).save(root / "bounding_box_test" / "0002_c2s1_000551_01.jpg")
    return root


def _digest_and_prepare_in_child(
    root: Path, tmp: Path, drop_dac: bool = False, prefix: str = "", ascend_bins: bool = True
) -> dict:
    return run_child(
        prefix
        + f"from pathlib import Path\nfrom modelmatrix import data\nfrom modelmatrix.config import ARCH_CONTRACTS\n"
        f"from modelmatrix.hashing import HashCache\n"
        f"if result != 'readable':\n"
        f"    d = data.dataset_digest(Path({str(root)!r}), HashCache(Path({str(tmp / 'c.json')!r})), None)\n"
        f"    s = data.prepare(Path({str(root)!r}), Path({str(tmp / 'out')!r}), "
        f"ARCH_CONTRACTS['reid-strong-baseline'], (64, 32), ascend_bins={ascend_bins}, workers=2)\n"
        f"    result = [d, s['images']]",
        drop_dac=drop_dac,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_scan_refuses_special_files_named_like_images(tmp_path, kind):
    root = _tiny(tmp_path / "m")
    victim = root / "bounding_box_test" / "0005_c3s1_000601_02.jpg"
    make_special(victim, kind)
    with pytest.raises(DataError) as exc:
        data.scan_dataset(root)
    msg = _one_line(exc)
    assert str(victim) in msg and KIND_WORDS[kind] in msg and ("delete" in msg or "fix" in msg)
    # what `invoke matrix` runs (digest, then prepare): the same one line, never a hang
    out = _digest_and_prepare_in_child(root, tmp_path, prefix="result = None\n")
    one_line_error(out, str(victim), KIND_WORDS[kind])


def test_special_files_that_are_not_images_are_skipped_with_a_note(tmp_path, caplog):
    root = _tiny(tmp_path / "m")
    q = root / "query"
    make_special(q / "pipe", "fifo")
    make_special(q / "control.sock", "socket")
    make_special(q / "notes.txt", "dangling")
    with caplog.at_level(logging.INFO, logger="modelmatrix.data"):
        items = data.scan_dataset(root)
    assert [i["file"] for i in items] == ["query/0002_c1s1_000451_01.jpg", "bounding_box_test/0002_c2s1_000551_01.jpg"]
    notes = " | ".join(r.getMessage() for r in caplog.records)
    for name in ("pipe", "control.sock", "notes.txt"):
        assert str(q / name) in notes
    out = _digest_and_prepare_in_child(root, tmp_path, prefix="result = None\n")
    assert out["ok"] and out["result"][1] == 2


def test_unreadable_image_is_one_line_even_for_root(tmp_path):
    root = _tiny(tmp_path / "m")
    victim = root / "query" / "0002_c1s1_000451_01.jpg"
    victim.chmod(0)
    out = _digest_and_prepare_in_child(
        root,
        tmp_path,
        drop_dac=True,
        prefix=readable_in_child_body(victim) + "result = 'readable' if readable else None\n",
    )
    if out.get("result") == "readable":
        pytest.skip("dropping CAP_DAC_OVERRIDE did not make a mode-000 file unreadable here")
    one_line_error(out, str(victim), "permission denied", "chmod")
    # prepare alone (the digest passed elsewhere, say): the same line, from the decoder's open
    victim.chmod(0o644)
    digest_ok = _digest_and_prepare_in_child(root, tmp_path, prefix="result = None\n")
    assert digest_ok["ok"]
    victim.chmod(0)
    out = run_child(
        readable_in_child_body(victim)
        + f"from pathlib import Path\nfrom modelmatrix import data\nfrom modelmatrix.config import ARCH_CONTRACTS\n"
        f"result = data.prepare(Path({str(root)!r}), Path({str(tmp_path / 'out2')!r}), "
        f"ARCH_CONTRACTS['reid-strong-baseline'], (64, 32), workers=1)['images']",
        drop_dac=True,
    )
    one_line_error(out, str(victim), "permission denied")


def test_scan_refuses_a_non_utf8_image_name_and_skips_non_utf8_junk(tmp_path, caplog):
    root = _tiny(tmp_path / "m")
    junk = os.path.join(os.fsencode(root / "query"), b"notes_\xff.txt")
    with open(junk, "wb") as fh:
        fh.write(b"not an image")
    assert len(data.scan_dataset(root)) == 2  # junk: skipped (prepare never reads it)
    bad = os.path.join(os.fsencode(root / "bounding_box_test"), b"0001_c1s1_\xff.jpg")
    with open(bad, "wb") as fh:
        fh.write((root / "query" / "0002_c1s1_000451_01.jpg").read_bytes())
    with pytest.raises(DataError) as exc:
        data.scan_dataset(root)
    msg = _one_line(exc)
    assert f"{root}/bounding_box_test/0001_c1s1_\\xff.jpg" in msg and "not valid UTF-8" in msg
    assert msg.isprintable()


@pytest.mark.parametrize("char", ["\x1b", "\x07", "\n", "\t", "\x7f", "\u2028"])
def test_scan_refuses_control_characters_in_image_names(tmp_path, char):
    root = _tiny(tmp_path / "m")
    name = f"0002_c1s1_{char}[31m.jpg"
    shutil.copy(root / "query" / "0002_c1s1_000451_01.jpg", root / "query" / name)
    with pytest.raises(DataError) as exc:
        data.scan_dataset(root)
    msg = _one_line(exc)
    assert msg.isprintable() and "control character" in msg and "rename" in msg
    escaped = char.encode("unicode_escape").decode().replace("\\n", "\\x0a").replace("\\t", "\\x09")
    assert f"0002_c1s1_{escaped}[31m.jpg" in msg


def test_a_space_in_a_name_is_carried_without_ascend_bins_and_refused_with_them(tmp_path):
    root = _tiny(tmp_path / "m")
    spaced = root / "query" / "0002_c3s1_000451_01 copy.jpg"
    shutil.copy(root / "query" / "0002_c1s1_000451_01.jpg", spaced)
    with pytest.raises(DataError) as exc:
        data.prepare(root, tmp_path / "a", RSB, (64, 32), workers=1)
    msg = _one_line(exc)
    assert str(spaced) in msg and "whitespace" in msg and "prep_bin.info" in msg and "data.ascend_bins" in msg
    assert not (tmp_path / "a" / "inputs.npy").exists()
    data.prepare(root, tmp_path / "b", RSB, (64, 32), ascend_bins=False, workers=1)
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    assert "query/0002_c3s1_000451_01 copy.jpg" in [i["file"] for i in index["items"]]


# ============================================================================ the dataset digest


def test_dataset_digest_covers_exactly_what_prepare_reads(synthetic, tmp_path):
    root = _copy_old(synthetic[0], tmp_path / "m")
    cache = HashCache(tmp_path / "c.json")
    d0 = data.dataset_digest(root, cache, None)
    assert cache.hashed == len(data.scan_dataset(root))
    cache.save()
    # what prepare does not read: the training folder, junk (pid -1), Thumbs.db, notes
    train = sorted((root / "bounding_box_train").glob("*.jpg"))[0]
    train.write_bytes(b"changed")
    (root / "bounding_box_train" / "0999_c1s1_000001_01.jpg").write_bytes(b"new")
    junk = sorted((root / "bounding_box_test").glob("-1_*.jpg"))[0]
    junk.write_bytes(b"changed junk")
    (root / "query" / "Thumbs.db").write_bytes(b"other")
    (root / "query" / "notes.txt").write_text("hello")
    warm = HashCache(tmp_path / "c.json")
    assert data.dataset_digest(root, warm, None) == d0 and warm.hashed == 0 and not warm.dirty
    # what it reads: any image of the query or gallery
    img = sorted((root / "bounding_box_test").glob("0002_*.jpg"))[1]
    img.write_bytes(img.read_bytes() + b"\0")
    assert data.dataset_digest(root, warm, None) != d0 and warm.hashed == 1
    # limit: only the kept items are read
    limited = HashCache(tmp_path / "other.json")
    data.dataset_digest(root, limited, 2)
    assert limited.hashed == len(data.scan_dataset(root, 2)) < len(data.scan_dataset(root))


def test_dataset_digest_follows_renames_and_missing_folder(synthetic, tmp_path):
    root = _copy_old(synthetic[0], tmp_path / "m")
    cache = HashCache(tmp_path / "c.json")
    d0 = data.dataset_digest(root, cache)
    q = sorted((root / "query").glob("*.jpg"))
    os.rename(q[0], root / "query" / ("9" + q[0].name[1:]))  # same bytes, another person id
    assert data.dataset_digest(root, cache) != d0
    with pytest.raises(DataError) as exc:
        data.dataset_digest(tmp_path / "nope", cache)
    assert "dataset folder not found" in _one_line(exc)


# ============================================================================ a full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); CI runs as root and mounts it"
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _prepare_into(root: Path, out: Path, prefix: str = "") -> dict:
    return run_child(
        prefix
        + f"from pathlib import Path\nfrom modelmatrix import data\nfrom modelmatrix.config import ARCH_CONTRACTS\n"
        f"result = data.prepare(Path({str(root)!r}), Path({str(out)!r}), "
        f"ARCH_CONTRACTS['reid-strong-baseline'], (128, 64), workers=2)['images']",
        timeout=60,
    )


def test_prepare_refuses_up_front_when_the_disk_is_too_small(synthetic, small_tmpfs):
    out = small_tmpfs / "prep"
    msg = one_line_error(
        _prepare_into(synthetic[0], out), str(out), "not enough free space", "bytes needed", "bytes free"
    )
    free = int(re.search(r"(\d+) bytes free", msg).group(1))
    needed = int(re.search(r"(\d+) bytes needed", msg).group(1))
    assert free <= 2 * 2**20 < needed
    assert not list(out.rglob("*"))


def test_a_disk_that_fills_mid_write_is_one_line_and_leaves_nothing(synthetic, small_tmpfs):
    """The free-space check is passed (disk_usage reports plenty, as when another writer fills the
    disk meanwhile): the real ENOSPC from the 2 MiB tmpfs must become one line, nothing kept."""
    out = small_tmpfs / "prep"
    fake = "import shutil, collections\nshutil.disk_usage = lambda p: collections.namedtuple('u', 'total used free')(1 << 40, 0, 1 << 40)\n"
    one_line_error(_prepare_into(synthetic[0], out, prefix=fake), str(out), "no space left", "bytes needed")
    assert not list(out.rglob("*")), list(out.rglob("*"))
