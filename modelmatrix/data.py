"""Market1501 data on the host: a synthetic set, scanning, preprocessing ONCE, features files.

Layout (Market1501): ``query/``, ``bounding_box_test/`` (the gallery), ``bounding_box_train/``;
names like ``0002_c1s1_000451_03.jpg`` where ``([-\\d]+)_c(\\d)`` gives the person id and the
camera (1..6, stored 0-based). pid -1 is junk (skipped), pid 0 a distractor (kept).

Preprocessing follows the model's contract (``config.ARCH_CONTRACTS``) and reproduces
torchvision's ``Resize -> ToTensor -> Normalize`` on PIL images bit for bit:
``Image.open().convert("RGB")``, ``resize((W, H), BILINEAR|BICUBIC)`` (what torchvision's Resize
calls for PIL images; PIL's resize is antialiased), float32, ``/ 255`` (a division, as ToTensor
does, when ``1/scale`` is an integer; otherwise ``* scale``), then ``(x - mean) / std`` in
float32, channels first (checked equal, bit for bit, to torch's ``.float().div(255)`` and
``Normalize``). fast-reid's own deploy scripts resize with cv2 INTER_CUBIC, which is not PIL's
antialiased bicubic; every backend reads the same prepared tensor, so parity is unaffected.
A truncated JPEG is an error as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` stays False
(Pillow's default; nothing here changes it).

This module imports numpy and Pillow only (no toolchain).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from targets.common.contract import atomic_write_bytes, atomic_write_json

from .errors import DataError
from .hashing import HashCache, kind_of, name_problem, not_regular, open_regular, os_problem, shown

log = logging.getLogger(__name__)

QUERY_DIR = "query"
GALLERY_DIR = "bounding_box_test"
TRAIN_DIR = "bounding_box_train"
SPLITS = ((QUERY_DIR, "query"), (GALLERY_DIR, "gallery"))
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
NAME_PATTERN = re.compile(r"([-\d]+)_c(\d)")
NAME_EXAMPLE = "0002_c1s1_000451_03.jpg"
# A name every check would accept (printable ASCII, image suffix, pid -1 or >= 0, camera 1..6):
# scanning takes it without the general checks. Anything else goes through them all.
_FAST_NAME = re.compile(r"(-1|\d+)_c([1-6])[ -~]*\.(?i:jpg|jpeg|png|bmp)", re.ASCII)
ASCEND_DIR = "ascend"
ASCEND_INFO = "prep_bin.info"
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
SYNTHETIC_RECIPE = "synthetic.json"  # how the set was made; an identical request is a no-op
SYNTHETIC_VERSION = 1  # bump when the generator's output changes
NO_DATASET_FIX = "run `invoke data --synthetic` or set data.dataset in matrix.yaml"


# =========================================================================== synthetic set


def make_synthetic(
    out_dir: Path,
    identities: int = 30,
    cameras: int = 6,
    gallery_per_camera: int = 2,
    junk: int = 4,
    distractors: int = 6,
    seed: int = 0,
    *,
    queries_per_identity: int = 2,
    train_identities: int = 3,
    force: bool = False,
) -> dict[str, Any]:
    """Write a small Market1501-layout set into ``out_dir`` and return a summary.

    Each identity has ``gallery_per_camera`` gallery crops in EVERY camera and
    ``queries_per_identity`` query crops in distinct cameras, so each query has gallery matches in
    other cameras (and same-camera matches, which the protocol drops). The gallery also holds
    ``distractors`` crops with pid 0000 and ``junk`` crops with pid -1; every folder has a
    ``Thumbs.db``. Identities differ in layout (upper/lower body colours, a pattern, a bag);
    images differ by camera tint and background, small shifts and scale, pose and noise.

    Deterministic for a seed. The set is built in a temporary sibling folder and renamed into
    place; an existing non-empty ``out_dir`` is an error unless ``force`` (then it is replaced).
    """
    out_dir = Path(out_dir)
    _check_synthetic_args(
        identities, cameras, gallery_per_camera, junk, distractors, queries_per_identity, train_identities
    )
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; choose another path for the dataset")
    recipe = {
        "generator": SYNTHETIC_VERSION,
        "identities": identities,
        "cameras": cameras,
        "gallery_per_camera": gallery_per_camera,
        "junk": junk,
        "distractors": distractors,
        "seed": seed,
        "queries_per_identity": queries_per_identity,
        "train_identities": train_identities,
    }
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        existing = _read_recipe(out_dir)
        if existing is not None and existing.get("recipe") == recipe:
            return {**existing, "path": str(out_dir), "status": "up to date"}
        raise DataError(f"{out_dir}: folder exists and is not empty; delete it or pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp's 0700 would hide the dataset from other users
    try:
        counts = _write_synthetic(
            tmp,
            identities,
            cameras,
            gallery_per_camera,
            junk,
            distractors,
            seed,
            queries_per_identity,
            train_identities,
        )
        summary = {"recipe": recipe, **counts}
        atomic_write_json(tmp / SYNTHETIC_RECIPE, summary)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "path": str(out_dir), "status": "written"}


SIZED_VERSION = 1  # bump when make_market_sized's output changes
SIZED_MTIME_NS = 1_600_000_000 * 10**9  # a fixed past mtime: the set is the same bytes and stamps each time


def make_market_sized(out_dir: Path, images: int = 32000, seed: int = 0, *, force: bool = False) -> dict[str, Any]:
    """A Market1501-sized set for benchmarks: ``images`` files that prepare reads (query +
    gallery, pid != -1), plus junk, Thumbs.db and a bounding_box_train/ folder a third that size.

    Real, decodable JPEGs with Market1501 names, written fast: a pool of crops rendered by the
    synthetic generator, each file made unique by a JPEG comment segment naming it. Every file
    gets a fixed past mtime (``SIZED_MTIME_NS``). Same arguments, same bytes; an identical request
    on an existing set is a no-op (``status: up to date``), built in a temporary sibling otherwise.
    """
    out_dir = Path(out_dir)
    if isinstance(images, bool) or not isinstance(images, int) or not 40 <= images <= 200_000:
        raise DataError(f"images: expected an integer in 40..200000, got {images!r}")
    recipe = {"generator": f"market-sized-{SIZED_VERSION}", "images": images, "seed": seed}
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        existing = _read_recipe(out_dir)
        if existing is not None and existing.get("recipe") == recipe:
            return {**existing, "path": str(out_dir), "status": "up to date"}
        raise DataError(f"{shown(out_dir)}: folder exists and is not empty; delete it or pass force")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        counts = _write_sized(tmp, images, seed)
        summary = {"recipe": recipe, **counts}
        atomic_write_json(tmp / SYNTHETIC_RECIPE, summary)
        os.utime(tmp / SYNTHETIC_RECIPE, ns=(SIZED_MTIME_NS, SIZED_MTIME_NS))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "path": str(out_dir), "status": "written"}


def _write_sized(root: Path, images: int, seed: int) -> dict[str, int]:
    import io

    cameras, gpc, qpi = 6, 3, 2
    distractors = min(1000, images // 32)
    identities, extra = divmod(images - distractors, qpi + cameras * gpc)
    distractors += extra
    junk = min(1000, images // 32)
    looks = [_camera_look(seed, c) for c in range(cameras)]
    pool: list[list[bytes]] = []  # [camera][k] -> JPEG bytes
    for cam in range(cameras):
        row = []
        for k in range(16):
            buf = io.BytesIO()
            img = _render(_person(seed, 1, k), looks[cam], _rng(seed, 12, cam, k))
            Image.fromarray(img).save(buf, "JPEG", quality=90)
            row.append(buf.getvalue())
        pool.append(row)
    namer = _Namer()
    stamp = (SIZED_MTIME_NS, SIZED_MTIME_NS)

    def put(sub: str, pid: int, cam: int) -> None:
        name = namer.name(pid, cam)
        jpeg = pool[cam][namer.counter % 16]
        comment = name.encode()
        segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
        path = root / sub / name
        with open(path, "wb") as fh:
            fh.write(jpeg[:2] + segment + jpeg[2:])  # SOI, COM naming the file, the rest
        os.utime(path, ns=stamp)

    for sub in (QUERY_DIR, GALLERY_DIR, TRAIN_DIR):
        (root / sub).mkdir()
        (root / sub / "Thumbs.db").write_bytes(_THUMBS_DB)
    for i in range(identities):
        pid = 2 + 3 * i
        for k in range(qpi):
            put(QUERY_DIR, pid, (i + 3 * k) % cameras)
        for cam in range(cameras):
            for _ in range(gpc):
                put(GALLERY_DIR, pid, cam)
    for d in range(distractors):
        put(GALLERY_DIR, 0, d % cameras)
    for j in range(junk):
        put(GALLERY_DIR, -1, j % cameras)
    train = images // 3
    for t in range(train):
        put(TRAIN_DIR, 2 + 3 * identities + 3 * (t // 2), t % 2)
    return {
        "query": identities * qpi,
        "gallery": identities * cameras * gpc + distractors,
        "junk": junk,
        "distractors": distractors,
        "train": train,
    }


def _read_recipe(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / SYNTHETIC_RECIPE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_synthetic_args(
    identities: Any, cameras: Any, gallery_per_camera: Any, junk: Any, distractors: Any, qpi: Any, train: Any
) -> None:
    checks = [
        ("identities", identities, 2, 3000),
        ("cameras", cameras, 2, 6),
        ("gallery_per_camera", gallery_per_camera, 1, 50),
        ("junk", junk, 0, 1000),
        ("distractors", distractors, 0, 1000),
        ("queries_per_identity", qpi, 1, cameras),
        ("train_identities", train, 0, 100),
    ]
    for name, value, lo, hi in checks:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise DataError(
                f"data.synthetic.{name}: expected an integer in {lo}..{hi}, got {value!r}; fix it in matrix.yaml"
            )


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first, then deleted."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.rename(out_dir, trash / out_dir.name)
    os.rename(tmp, out_dir)
    shutil.rmtree(trash)


_THUMBS_DB = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)  # an OLE2 header, like Windows writes


def _write_synthetic(
    root: Path,
    identities: int,
    cameras: int,
    gpc: int,
    junk: int,
    distractors: int,
    seed: int,
    qpi: int,
    train_ids: int,
) -> dict[str, int]:
    for sub in (QUERY_DIR, GALLERY_DIR, TRAIN_DIR):
        (root / sub).mkdir()
        (root / sub / "Thumbs.db").write_bytes(_THUMBS_DB)
    namer = _Namer()
    cam_looks = [_camera_look(seed, c) for c in range(cameras)]
    n_query = n_gallery = n_train = 0
    for i in range(identities):
        pid = 2 + 3 * i  # sparse ids, as in Market1501 (0002, 0005, ...)
        person = _person(seed, 1, i)
        q_cams = [(i + k * max(1, cameras // qpi)) % cameras for k in range(qpi)]
        for k, cam in enumerate(q_cams):
            _save(root / QUERY_DIR, namer.name(pid, cam), person, cam_looks[cam], (seed, 2, i, cam, k))
            n_query += 1
        for cam in range(cameras):
            for k in range(gpc):
                _save(root / GALLERY_DIR, namer.name(pid, cam), person, cam_looks[cam], (seed, 3, i, cam, k))
                n_gallery += 1
    for d in range(distractors):
        cam = d % cameras
        _save(root / GALLERY_DIR, namer.name(0, cam), _person(seed, 4, d), cam_looks[cam], (seed, 5, d, cam, 0))
    for j in range(junk):
        cam = j % cameras
        _save(root / GALLERY_DIR, namer.name(-1, cam), None, cam_looks[cam], (seed, 6, j, cam, 0))
    for t in range(train_ids):
        pid = 2 + 3 * identities + 3 * t  # disjoint from the test identities
        person = _person(seed, 7, t)
        for cam in (0, 1):
            _save(root / TRAIN_DIR, namer.name(pid, cam), person, cam_looks[cam], (seed, 8, t, cam, 0))
            n_train += 1
    return {
        "query": n_query,
        "gallery": n_gallery + distractors,
        "junk": junk,
        "distractors": distractors,
        "train": n_train,
    }


class _Namer:
    """Unique Market-style names: ``PPPP_cCsS_FFFFFF_NN.jpg`` (junk: ``-1_cCsS_...``)."""

    def __init__(self) -> None:
        self.counter = 0

    def name(self, pid: int, cam: int) -> str:
        self.counter += 1
        seq = 1 + (self.counter * 7 + cam) % 6
        frame = 151 + 25 * self.counter
        box = 1 + self.counter % 4
        head = "-1" if pid == -1 else f"{pid:04d}"
        return f"{head}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}.jpg"


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _person(seed: int, kind: int, index: int) -> dict[str, Any]:
    """The look of one identity: colours spread around the hue wheel, a pattern, a bag."""
    r = _rng(seed, kind, index, 11)
    golden = 0.6180339887
    hue_up = (index * golden + r.uniform(0, 0.05)) % 1.0
    hue_low = (hue_up + 0.33 + 0.34 * r.random()) % 1.0
    dark_low = r.random() < 0.3
    return {
        "upper": _hsv(hue_up, r.uniform(0.55, 0.95), r.uniform(0.55, 0.98)),
        "lower": _hsv(hue_low, r.uniform(0.3, 0.9), r.uniform(0.12, 0.3) if dark_low else r.uniform(0.4, 0.9)),
        "accent": _hsv((hue_up + 0.5) % 1.0, r.uniform(0.3, 0.9), r.uniform(0.2, 1.0)),
        "pattern": int(r.integers(0, 5)),  # solid, h-stripes, v-stripes, checks, two-tone
        "stripe": int(r.integers(5, 12)),
        "hair": _hsv(r.uniform(0.02, 0.12), r.uniform(0.2, 0.7), r.uniform(0.05, 0.45)),
        "skin": _hsv(r.uniform(0.03, 0.1), r.uniform(0.25, 0.55), r.uniform(0.55, 0.95)),
        "bag": int(r.integers(0, 3)),  # none, backpack, side bag
        "bag_colour": _hsv(r.random(), r.uniform(0.2, 0.8), r.uniform(0.15, 0.8)),
        "width": r.uniform(0.34, 0.5),
        "waist": r.uniform(0.5, 0.6),
        "shoes": _hsv(r.random(), r.uniform(0.0, 0.5), r.uniform(0.1, 0.95)),
    }


def _camera_look(seed: int, cam: int) -> dict[str, Any]:
    r = _rng(seed, 9, cam)
    return {
        "tint": r.uniform(0.82, 1.18, size=3).astype(np.float32),
        "gain": float(r.uniform(0.85, 1.12)),
        "bg_top": r.uniform(60, 200, size=3).astype(np.float32),
        "bg_bottom": r.uniform(40, 170, size=3).astype(np.float32),
        "noise": float(r.uniform(3.0, 8.0)),
    }


def _save(folder: Path, name: str, person: dict | None, look: dict, key: tuple) -> None:
    r = _rng(*key)
    img = _render(person, look, r)
    Image.fromarray(img).save(folder / name, "JPEG", quality=int(r.integers(85, 96)))


def _render(person: dict | None, look: dict, r: np.random.Generator) -> np.ndarray:
    """One 64x128 crop (rendered at 2x, then downsampled for smooth edges)."""
    H, W = 256, 128
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    t = (yy / H)[..., None]
    img = look["bg_top"] * (1 - t) + look["bg_bottom"] * t
    img = img + r.normal(0, 10, size=(H // 32, W // 32, 3)).repeat(32, 0).repeat(32, 1)
    if person is None:  # junk: a blurred fragment of background and clothes
        colour = _hsv(r.random(), r.uniform(0.2, 0.8), r.uniform(0.2, 0.9))
        y0 = int(r.integers(0, H // 2))
        img[y0 : y0 + int(r.integers(30, 120)), :] = colour
    else:
        _draw_person(img, person, r, yy, xx)
    img = img * look["tint"] * look["gain"] * r.uniform(0.9, 1.1)
    img = np.clip(img, 0, 255).astype(np.uint8)
    small: np.ndarray = np.asarray(Image.fromarray(img).resize((64, 128), Image.Resampling.BOX), dtype=np.float32)
    small = small + r.normal(0, look["noise"], size=small.shape)
    return np.clip(small + 0.5, 0, 255).astype(np.uint8)


def _draw_person(img: np.ndarray, p: dict[str, Any], r: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> None:
    H, W = img.shape[:2]
    cx = W / 2 + r.uniform(-8, 8)
    scale = r.uniform(0.93, 1.07)
    top = H * 0.06 + r.uniform(-8, 8)
    height = H * 0.9 * scale
    half = W * p["width"] / 2 * scale
    waist = top + height * p["waist"]
    head_r = height * 0.07
    head_cy = top + head_r
    neck = head_cy + head_r
    feet = top + height
    # legs: two columns, apart by a random stride
    stride = r.uniform(0.0, 0.5) * half
    leg_w = half * 0.45
    for side in (-1, 1):
        lx = cx + side * (half * 0.35 + stride * 0.5)
        leg = (np.abs(xx - lx) < leg_w) & (yy >= waist) & (yy < feet - 8)
        img[leg] = p["lower"]
        shoe = (np.abs(xx - lx) < leg_w * 1.1) & (yy >= feet - 8) & (yy < feet)
        img[shoe] = p["shoes"]
    # torso with the identity's pattern; arms in the upper colour
    torso = (np.abs(xx - cx) < half) & (yy >= neck) & (yy < waist)
    img[torso] = _pattern(p, yy, xx, cx, neck)[torso]
    for side in (-1, 1):
        ax = cx + side * (half + 6)
        arm = (np.abs(xx - ax) < 6) & (yy >= neck + 4) & (yy < waist + height * 0.08)
        img[arm] = p["upper"] * 0.85
    head = (xx - cx) ** 2 + ((yy - head_cy) / 1.2) ** 2 < head_r**2
    img[head] = p["skin"]
    hair = head & (yy < head_cy - head_r * 0.2)
    img[hair] = p["hair"]
    if p["bag"] == 1:  # backpack: a block over the torso
        bag = (np.abs(xx - cx - half * 0.1) < half * 0.75) & (yy >= neck + 10) & (yy < waist - 6)
        img[bag] = p["bag_colour"]
    elif p["bag"] == 2:  # side bag at the hip
        bx = cx + half + 4
        bag = (np.abs(xx - bx) < 10) & (np.abs(yy - waist) < 16)
        img[bag] = p["bag_colour"]


def _pattern(p: dict[str, Any], yy: np.ndarray, xx: np.ndarray, cx: float, neck: float) -> np.ndarray:
    up, acc, k = p["upper"], p["accent"], p["stripe"]
    kind = p["pattern"]
    if kind == 1:
        mask = ((yy - neck) // k) % 2 == 0
    elif kind == 2:
        mask = ((xx - cx) // k) % 2 == 0
    elif kind == 3:
        mask = (((yy - neck) // k) + ((xx - cx) // k)) % 2 == 0
    elif kind == 4:
        mask = xx < cx
    else:
        mask = np.ones_like(yy, dtype=bool)
    return np.where(mask[..., None], up, acc)


# =========================================================================== scanning


def scan_dataset(root: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Items of ``query/`` then ``bounding_box_test/``, each sorted by file name.

    Each item: ``{"file": "query/0002_c1s1_000451_03.jpg", "pid": 2, "camid": 0, "split": "query"}``.
    Skipped quietly: names containing ``.db`` (Thumbs.db), hidden files, sub-folders and files
    that are not images (by suffix: .jpg .jpeg .png .bmp); a FIFO, socket, device file or broken
    link among those is skipped with a logged note. Skipped as junk: pid -1.

    An image-named entry (by suffix) must be a regular file (or a link to one) with a name that is
    UTF-8 without control characters: a FIFO, socket or device file, a broken or looping link, a
    non-UTF-8 name or a control character is a one-line DataError naming it. Nothing is opened.

    ``limit`` keeps the first ``limit`` queries (in that sorted order) and, from the gallery, every
    image of those queries' identities plus the first ``limit`` other gallery images (distractors
    and other identities, in sorted order), so each kept query keeps all its matches and
    retrieval still has something to reject. Same inputs, same subset.
    """
    return [{"file": f, "pid": pid, "camid": cam, "split": split} for f, pid, cam, split, _ in _scan(Path(root), limit)]


def dataset_digest(root: Path, hashes: HashCache, limit: int | None = None) -> str:
    """sha256 over exactly what :func:`prepare` reads: the scanned query + gallery items, in order,
    each as its relative path and content digest. Files prepare does not read (bounding_box_train/,
    junk pid -1, Thumbs.db, notes) do not enter, so touching them re-runs nothing.

    Cheap when nothing changed: one ``scandir`` per folder and one ``stat`` per image (taken during
    the scan and reused), a cache entry per file keyed by the dataset root resolved once plus the
    relative path; a file is read only when its (size, mtime_ns) changed. DataError, one line, for
    what the scan refuses and for an image that cannot be read (permission denied).
    """
    root = Path(root)
    scanned = _scan(root, limit)
    base = os.path.realpath(root)
    prefix = os.path.join(os.fspath(root), "")
    base += "/"
    entries = hashes.entries
    parts = []
    for rel, _pid, _cam, _split, st in scanned:
        key = base + rel
        hit = entries.get(key)  # the cache's hit test, inlined: 32,000 calls add up
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            digest = hit[2]
        else:
            digest = hashes.digest(prefix + rel, key, st, external=True)
        parts.append(f"{rel}\0{digest}\n")
    return hashlib.sha256("".join(parts).encode()).hexdigest()


# One scanned image: (relative file, pid, 0-based camera, split, os.stat of it). Plain tuples, not
# the item dicts: a no-op digest of 32,000 files builds none.
_Row = tuple[str, int, int, str, os.stat_result]


def _scan(root: Path, limit: int | None) -> list[_Row]:
    if not root.is_dir():
        raise DataError(f"{shown(root)}: dataset folder not found; {NO_DATASET_FIX}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"data.limit: expected an integer >= 1 or null, got {limit!r}; fix matrix.yaml")
    for sub, _ in SPLITS:  # both folders first: the layout error before any other
        if not (root / sub).is_dir():
            raise DataError(
                f"{shown(root / sub)}: folder not found; a Market1501 dataset has {QUERY_DIR}/ and "
                f"{GALLERY_DIR}/ ({NO_DATASET_FIX})"
            )
    query = _scan_split(root, QUERY_DIR, "query")
    gallery = _scan_split(root, GALLERY_DIR, "gallery")
    if limit is not None:
        query, gallery = _limit(query, gallery, limit)
    return query + gallery


def _scan_split(root: Path, sub: str, split: str) -> list[_Row]:
    folder = root / sub
    folder_s = os.fspath(folder)
    items = []
    found_images = 0
    try:
        with os.scandir(folder_s) as it:
            entries = sorted(it, key=_entry_name)
    except OSError as exc:
        raise os_problem(folder_s, exc, "folder") from None
    fast = _FAST_NAME.fullmatch
    is_reg = stat.S_ISREG
    for entry in entries:
        name = entry.name
        m = fast(name) if ".db" not in name else None
        if m is None:  # the general path: every check, with its message
            if ".db" in name or name.startswith("."):
                continue
            dot = name.rfind(".")
            if dot <= 0 or name[dot:].lower() not in IMAGE_SUFFIXES:
                _note_skipped(entry)
                continue
            problem = name_problem(name)
            if problem:
                raise DataError(
                    f"{shown(entry.path)}: file name {problem}; rename the file (Market1501 "
                    f"names look like {NAME_EXAMPLE}) or move it out of the folder"
                )
        try:
            st = entry.stat()  # follows a link; one syscall, reused by dataset_digest
        except OSError as exc:
            raise os_problem(entry.path, exc, "image") from None
        if not is_reg(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                log.info("%s: a folder named like an image; skipped", shown(entry.path))
                continue
            raise not_regular(entry.path, st.st_mode)
        found_images += 1
        if m is not None:
            p, c = m.group(1, 2)
            pid, camid = int(p), int(c) - 1
        else:
            pid, camid = _parse(name, entry.path)
        if pid == -1:
            continue
        items.append((f"{sub}/{name}", pid, camid, split, st))
    if not items:
        what = "only junk images (pid -1)" if found_images else "no images"
        raise DataError(
            f"{shown(folder)}: {what}; expected Market1501 crops named like {NAME_EXAMPLE} ({NO_DATASET_FIX})"
        )
    return items


def _entry_name(entry: os.DirEntry) -> str:
    return entry.name


def _note_skipped(entry: os.DirEntry) -> None:
    """A non-image entry is skipped; a special file or a broken link gets a logged note."""
    try:
        mode = entry.stat().st_mode
    except OSError as exc:
        log.info("%s: skipped (not an image, and %s)", shown(entry.path), exc.strerror or "unreadable")
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        log.info("%s: skipped (%s, not an image)", shown(entry.path), kind_of(mode))


def parse_name(path: Path) -> tuple[int, int]:
    """(pid, 0-based camera) from a Market1501 file name; DataError if it does not parse."""
    return _parse(Path(path).name, path)


def _parse(name: str, path: Any) -> tuple[int, int]:
    m = NAME_PATTERN.match(name)
    if not m:
        raise DataError(
            f"{shown(path)}: file name does not match the Market1501 pattern (like "
            f"{NAME_EXAMPLE}: <pid>_c<camera>...); rename the file or move it out of the folder"
        )
    try:
        pid = int(m.group(1))
    except ValueError:
        raise DataError(
            f"{shown(path)}: person id {m.group(1)!r} is not a number (like {NAME_EXAMPLE}); "
            f"rename the file or move it out of the folder"
        ) from None
    if pid < -1:
        raise DataError(
            f"{shown(path)}: person id {pid} is invalid (-1 junk, 0 distractor, else >= 1); "
            f"rename the file or move it out of the folder"
        )
    cam = int(m.group(2))
    if not 1 <= cam <= 6:
        raise DataError(
            f"{shown(path)}: camera {cam} is outside 1..6 (Market1501 has cameras c1..c6); "
            f"rename the file or move it out of the folder"
        )
    return pid, cam - 1


def _limit(query: list[_Row], gallery: list[_Row], limit: int) -> tuple[list[_Row], list[_Row]]:
    query = query[:limit]
    pids = {q[1] for q in query}
    others = [g for g in gallery if g[1] not in pids][:limit]
    keep = {id(g) for g in others}
    return query, [g for g in gallery if g[1] in pids or id(g) in keep]


# =========================================================================== preprocessing


def _checked_contract(contract: dict[str, Any], input_size: Sequence[int]) -> tuple:
    """(resample, (W, H), scale-op, mean, std, bgr) from a contract; DataError on a bad key."""

    def bad(key: str, msg: str) -> DataError:
        return DataError(f"contract.{key}: {msg}; fix the architecture contract (config.ARCH_CONTRACTS)")

    if (
        not isinstance(input_size, (list, tuple))
        or len(input_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        raise DataError(
            f"model.input_size: expected [height, width] positive integers, got {input_size!r}; fix matrix.yaml"
        )
    interp = contract.get("interpolation")
    if interp not in INTERPOLATIONS:
        raise bad("interpolation", f"expected one of {', '.join(INTERPOLATIONS)}, got {interp!r}")
    color = contract.get("color", "RGB")
    if color not in ("RGB", "BGR"):
        raise bad("color", f"expected RGB or BGR, got {color!r}")
    scale = contract.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise bad("scale", f"expected a positive number, got {scale!r}")
    stats = []
    for key in ("mean", "std"):
        v = contract.get(key)
        if (
            not isinstance(v, (list, tuple))
            or len(v) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ):
            raise bad(key, f"expected 3 numbers, got {v!r}")
        stats.append(tuple(float(x) for x in v))
    if any(s == 0 for s in stats[1]):
        raise bad("std", f"must not contain 0, got {list(stats[1])}")
    size = contract.get("input_size")
    if size is not None and list(size) != list(input_size):
        raise bad("input_size", f"{list(size)} differs from model.input_size {list(input_size)}")
    inv = 1.0 / float(scale)
    divisor = float(round(inv)) if abs(inv - round(inv)) < 1e-6 else None
    H, W = input_size
    return (interp, (W, H), divisor, float(scale), stats[0], stats[1], color == "BGR")


def load_image(path: Path, params: tuple, out: np.ndarray | None = None) -> np.ndarray:
    """One image as float32 (3, H, W) per the checked contract ``params`` (written into ``out``)."""
    interp, size_wh, divisor, scale, mean, std, bgr = params
    with open_regular(path) as fh:  # never a FIFO, socket or device; one line if unreadable
        try:
            with Image.open(fh) as im:
                rgb = im.convert("RGB")  # decodes fully: a truncated file raises here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise os_problem(path, exc, "image") from None
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"{shown(path)}: cannot decode image ({reason}); replace or delete the file") from None
    if rgb.size != size_wh:
        rgb = rgb.resize(size_wh, INTERPOLATIONS[interp])
    hwc = np.asarray(rgb)
    if bgr:
        hwc = hwc[..., ::-1]
    if out is None:
        out = np.empty((3, size_wh[1], size_wh[0]), dtype=np.float32)
    out[...] = hwc.transpose(2, 0, 1)  # uint8 -> float32, channels first
    # The same float32 operations as ToTensor + Normalize; a no-op step is skipped (bit-exact).
    if divisor is not None:
        if divisor != 1.0:
            out /= np.float32(divisor)
    else:
        out *= np.float32(scale)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]  # in output channel order
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    if m.any():
        out -= m
    if (s != 1).any():
        out /= s
    return out


def _load_chunk(args: tuple) -> np.ndarray:
    paths, params, bin_paths = args
    W, H = params[1]
    out = np.empty((len(paths), 3, H, W), dtype=np.float32)
    for i, p in enumerate(paths):
        load_image(p, params, out[i])
        if bin_paths:
            with open(bin_paths[i], "wb") as fh:  # raw float32 CHW, no header; ENOSPC raises
                fh.write(memoryview(out[i]).cast("B"))
    return out


def _workers(workers: int) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise DataError(f"data.workers: expected an integer >= 0 (0 = all cores), got {workers!r}; fix matrix.yaml")
    return workers or (os.cpu_count() or 1)


def iter_preprocessed(
    items: Sequence[dict],
    root: Path,
    contract: dict,
    input_size: Sequence[int],
    workers: int = 0,
    chunk: int | None = None,
    bin_paths: Sequence[Path] | None = None,
) -> Generator[tuple[int, np.ndarray], None, None]:
    """Yield ``(start, array[n, 3, H, W])`` in item order, decoded in chunks by ``workers`` threads.

    ``bin_paths`` (one per item): the workers also write each image there as raw float32 CHW.

    Threads, not processes: Pillow releases the GIL while it decodes, converts and resizes and
    numpy does for the float arithmetic, so threads use every core without pickling 393 KB per
    image; a ``spawn`` pool re-imports the caller's ``__main__`` in every child (and respawns
    children forever when that fails), and ``fork`` is unsafe in a host process with threads
    (the Docker SDK's). At most ``2 * workers`` chunks are in flight, so memory stays bounded on
    the full set. The first error (a DataError naming the file) cancels the rest.
    """
    params = _checked_contract(contract, tuple(input_size))
    n_workers = _workers(workers)
    root = Path(root)
    paths = [root / it["file"] for it in items]
    if chunk is None:
        chunk = max(4, min(64, math.ceil(len(paths) / (n_workers * 4)) or 1))
    chunks = iter(
        [
            (paths[i : i + chunk], params, bin_paths[i : i + chunk] if bin_paths else None)
            for i in range(0, len(paths), chunk)
        ]
    )
    if n_workers == 1 or len(paths) <= chunk:
        start = 0
        for c in chunks:
            arr = _load_chunk(c)
            yield start, arr
            start += len(arr)
        return
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="modelmatrix-prep")
    try:
        pending = collections.deque(pool.submit(_load_chunk, c) for c in itertools.islice(chunks, 2 * n_workers))
        start = 0
        while pending:
            arr = pending.popleft().result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.submit(_load_chunk, nxt))
            yield start, arr
            start += len(arr)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def preprocess(
    items: Sequence[dict], root: Path, contract: dict, input_size: Sequence[int] = (256, 128), workers: int = 0
) -> np.ndarray:
    """All items as one float32 array (N, 3, H, W), row i = items[i]."""
    H, W = input_size
    out = np.empty((len(items), 3, H, W), dtype=np.float32)
    for start, arr in iter_preprocessed(items, root, contract, input_size, workers):
        out[start : start + len(arr)] = arr
    return out


# =========================================================================== prepare


def prepare(
    dataset: Path,
    out_dir: Path,
    contract: dict,
    input_size: Sequence[int],
    limit: int | None = None,
    ascend_bins: bool = True,
    workers: int = 0,
) -> dict[str, Any]:
    """Scan ``dataset``, preprocess every image ONCE and write the workspace inputs into ``out_dir``.

    Writes ``inputs.npy`` (float32 N,3,H,W), ``index.json`` and, if ``ascend_bins``,
    ``ascend/<stem>.bin`` (raw float32 CHW, no header) plus ``ascend/prep_bin.info`` in the
    format of ModelZoo's ``gen_dataset_info.py bin``: lines ``<index> <path> <width> <height>``,
    index from 0 in inputs.npy order, path ``ascend/<stem>.bin`` relative to ``out_dir`` (run
    Ascend's benchmark tool with ``out_dir`` as its working folder, or rewrite the paths).
    The caller hands a fresh temporary ``out_dir`` and renames it when this returns.
    """
    t0 = time.perf_counter()
    dataset, out_dir = Path(dataset), Path(out_dir)
    items = scan_dataset(dataset, limit)
    H, W = input_size
    _checked_contract(contract, tuple(input_size))  # a bad contract before any disk check
    stems = _ascend_stems(dataset, items) if ascend_bins else []
    out_dir.mkdir(parents=True, exist_ok=True)
    needed = _bytes_needed(len(items), H, W, ascend_bins)
    _check_free_space(out_dir, needed, len(items))
    made_ascend = False
    if ascend_bins and not (out_dir / ASCEND_DIR).exists():
        (out_dir / ASCEND_DIR).mkdir()
        made_ascend = True
    final = out_dir / "inputs.npy"
    tmp = out_dir / ".inputs.npy.tmp"
    try:
        bins = [out_dir / ASCEND_DIR / f"{s}.bin" for s in stems] if ascend_bins else None
        shape = (len(items), 3, H, W)
        # Plain writes, not a memory map: a full disk is then an OSError (ENOSPC) at write(),
        # not a SIGBUS that kills the process with no message and leaves the file behind.
        chunks = iter_preprocessed(items, dataset, contract, input_size, workers, bin_paths=bins)
        try:
            with open(tmp, "wb") as fh:
                np.lib.format.write_array_header_1_0(
                    fh,
                    {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                        "fortran_order": False,
                        "shape": shape,
                    },
                )
                for _start, arr in chunks:
                    fh.write(np.ascontiguousarray(arr, dtype=np.float32).data.cast("B"))
        finally:
            chunks.close()  # waits for the workers: none still writing a .bin
        os.replace(tmp, final)
        if ascend_bins:
            lines = [f"{i} {ASCEND_DIR}/{s}.bin {W} {H}\n" for i, s in enumerate(stems)]
            atomic_write_bytes(out_dir / ASCEND_DIR / ASCEND_INFO, "".join(lines).encode())
        num_query = sum(1 for it in items if it["split"] == "query")
        atomic_write_json(
            out_dir / "index.json", {"contract": contract, "input_size": [H, W], "items": items, "num_query": num_query}
        )
    except BaseException as exc:
        for leftover in (tmp, final):
            if leftover.exists():
                leftover.unlink()
        if made_ascend:
            shutil.rmtree(out_dir / ASCEND_DIR, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(out_dir)
            raise DataError(
                f"{shown(out_dir)}: no space left on the device while writing the prepared "
                f"inputs ({needed} bytes needed, {free} bytes free); nothing was kept: free "
                f"space there or point workspace: (matrix.yaml) at a larger disk"
            ) from None
        raise
    seconds = time.perf_counter() - t0
    return {
        "images": len(items),
        "query": num_query,
        "gallery": len(items) - num_query,
        "input_size": [H, W],
        "ascend_bins": bool(ascend_bins),
        "workers": _workers(workers),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(items) / seconds, 1),
    }


# Room kept free beyond what prepare writes (file system metadata, other writers, the report).
FREE_SPACE_MARGIN = 8 << 20


def _bytes_needed(n: int, H: int, W: int, ascend_bins: bool) -> int:
    """What prepare writes: inputs.npy, index.json and (Ascend) one .bin per image + the list."""
    image = 3 * H * W * 4
    total = 128 + n * image + 4096 + n * 256  # npy header + data, index.json
    if ascend_bins:
        total += n * (image + 4096) + n * 96  # bins (rounded up to a block), info
    return total + FREE_SPACE_MARGIN


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def _check_free_space(out_dir: Path, needed: int, n: int) -> None:
    free = _free_bytes(out_dir)
    if 0 <= free < needed:
        raise DataError(
            f"{shown(out_dir)}: not enough free space to prepare {n} images: {needed} bytes "
            f"needed ({needed / 2**20:.1f} MiB, incl. a {FREE_SPACE_MARGIN >> 20} MiB margin), "
            f"{free} bytes free ({free / 2**20:.1f} MiB); free space there, point workspace: "
            f"(matrix.yaml) at a larger disk, or set data.limit"
        )


def _ascend_stems(dataset: Path, items: Sequence[dict]) -> list[str]:
    """The ``<stem>`` of each ``ascend/<stem>.bin``: unique, and without whitespace, because
    prep_bin.info is split on whitespace (``<index> <path> <width> <height>``): a space in a name
    would make a 5-field line that the Ascend benchmark tool misreads."""
    seen: dict[str, str] = {}
    stems = []
    for it in items:
        stem = Path(it["file"]).stem
        if any(ch.isspace() for ch in stem):
            raise DataError(
                f"{shown(dataset / it['file'])}: file name contains whitespace, which would "
                f"split its line of ascend/{ASCEND_INFO} (<index> <path> <width> <height>); "
                f"rename the file (Market1501 names have none) or set data.ascend_bins: false"
            )
        if stem in seen:
            raise DataError(
                f"{shown(dataset / it['file'])}: same file stem as {shown(dataset / seen[stem])}; "
                f"Ascend inputs are named <stem>.bin, so rename one (or set data.ascend_bins: false)"
            )
        seen[stem] = it["file"]
        stems.append(stem)
    return stems


# =========================================================================== features


def load_features(path: Path, expected_rows: int, expected_cols: int | None = None) -> np.ndarray:
    """A backend's features.npy: 2-D float array with one row per image; DataError otherwise."""
    path = Path(path)
    fix = "re-run the infer stage of the target that wrote it"
    if not path.is_file():
        raise DataError(f"{path}: features file not found; {fix}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: not a readable .npy array ({reason}); {fix}") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected one .npy array, got {type(arr).__name__}; {fix}")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise DataError(
            f"{path}: expected a 2-D float array (images, feature_dim), got shape {arr.shape} dtype {arr.dtype}; {fix}"
        )
    if arr.shape[0] != expected_rows:
        raise DataError(
            f"{path}: expected {expected_rows} rows (one per image of inputs.npy), got shape {arr.shape}; {fix}"
        )
    if expected_cols is not None and arr.shape[1] != expected_cols:
        raise DataError(f"{path}: expected feature dimension {expected_cols}, got shape {arr.shape}; {fix}")
    return arr
