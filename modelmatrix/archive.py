"""Deterministic ``docker load`` archives: the same image content gives the same bytes.

One writer serves the bases (``invoke bases``: a debuerreotype rootfs tar becomes a one-layer image
whose config is ours, so its image ID is reproducible too) and ``invoke ship`` (a ``docker save``
re-written). The format is the one ``docker load`` reads: ``manifest.json`` (``Config``,
``RepoTags``, ``Layers``), the config JSON named by its sha256, and one ``<diff-id>/layer.tar`` per
layer. Entries are sorted by name, every header has mtime 0, owner 0:0 and mode 0644, and gzip is
written without a name or a timestamp: with identical layers and config, the archive is
byte-identical. A layer tar is kept exactly as the engine stored it (its sha256 *is* the diff ID).

What the classic builder varies between two builds of identical layers lives only in the config:
``created`` and ``history[].created`` (set to the image's epoch here) and the per-build
``container``, ``container_config`` and ``config.Image`` (dropped).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from .errors import DataError
from .hashing import sha256_file

BUILD_VARYING_KEYS = ("container", "container_config")
CHUNK = 1 << 20


def iso_epoch(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def normalized_config(config: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The config with what a rebuild of the same layers varies fixed (module docstring)."""
    cfg = json.loads(json.dumps(config))
    created = iso_epoch(epoch)
    cfg["created"] = created
    for entry in cfg.get("history") or []:
        entry["created"] = created
    for key in BUILD_VARYING_KEYS:
        cfg.pop(key, None)
    if isinstance(cfg.get("config"), dict):
        cfg["config"].pop("Image", None)
    return cfg


@dataclass
class Layer:
    diff_id: str  # sha256:<hex> of the uncompressed layer tar
    path: Path  # the layer tar on disk


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(fileobj: IO[bytes], config: bytes, layers: list[Layer], repo_tags: list[str]) -> str:
    """Write the tar (uncompressed) to ``fileobj``; returns the image ID (sha256 of ``config``)."""
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = [
        {
            "Config": f"{image_id[7:]}.json",
            "RepoTags": list(repo_tags) or None,
            "Layers": [f"{layer.diff_id[7:]}/layer.tar" for layer in layers],
        }
    ]
    entries: dict[str, bytes | Path] = {
        f"{image_id[7:]}.json": config,
        "manifest.json": canonical_json(manifest),
    }
    for layer in layers:
        entries.setdefault(f"{layer.diff_id[7:]}/layer.tar", layer.path)
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
        for name in sorted(entries):
            src = entries[name]
            if isinstance(src, bytes):
                tf.addfile(_info(name, len(src)), io.BytesIO(src))
            else:
                with open(src, "rb") as fh:
                    tf.addfile(_info(name, src.stat().st_size), fh)
    return image_id


class HashingWriter(io.RawIOBase):
    """Passes bytes through to ``raw`` (or nowhere) and hashes them."""

    def __init__(self, raw: IO[bytes] | None = None) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.raw is not None:
            self.raw.write(data)
        return len(data)


def write_gzip_archive(
    out: IO[bytes] | None, config: bytes, layers: list[Layer], repo_tags: list[str], level: int = 3
) -> tuple[str, str, int]:
    """The archive gzipped (no name, mtime 0) into ``out`` (None: only hashed).
    Returns (image ID, sha256 of the .tar.gz, its size)."""
    hw = HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=hw, mtime=0, compresslevel=level) as gz:
        image_id = write_archive(gz, config, layers, repo_tags)  # type: ignore[arg-type]
    return image_id, hw.sha.hexdigest(), hw.size


@dataclass
class Saved:
    """A ``docker save`` unpacked in a scratch folder: the config and the layer tars by diff ID."""

    folder: Path
    config: dict[str, Any]
    layers: list[Layer]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Saved:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha256_stream(fh: IO[bytes]) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(CHUNK), b""):
        h.update(block)
    return h.hexdigest()


def unpack_save(chunks: Iterable[bytes], where: str, scratch: Path | None = None) -> Saved:
    """Unpack a ``docker save`` stream; each layer is checked against the config's diff IDs."""
    folder = Path(tempfile.mkdtemp(prefix="mm-save-", dir=scratch))
    try:
        members: dict[str, Path] = {}
        with tarfile.open(fileobj=_ChunkReader(iter(chunks)), mode="r|") as tf:
            for n, member in enumerate(tf):
                if not member.isfile():
                    continue
                dest = folder / f"m{n}"
                src = tf.extractfile(member)
                assert src is not None
                with open(dest, "wb") as fh:
                    shutil.copyfileobj(src, fh, CHUNK)
                members[member.name] = dest
        manifest = json.loads(members["manifest.json"].read_bytes())[0]
        config = json.loads(members[manifest["Config"]].read_bytes())
        diff_ids = config["rootfs"]["diff_ids"]
        layers = []
        for diff_id, name in zip(diff_ids, manifest["Layers"], strict=True):
            path = members[name]
            got = "sha256:" + sha256_file(path)
            if got != diff_id:
                raise DataError(f"{where}: docker save gave layer {name} with sha256 {got[:19]}, not {diff_id[:19]}")
            layers.append(Layer(diff_id, path))
        return Saved(folder, config, layers)
    except (KeyError, ValueError, tarfile.TarError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise DataError(f"{where}: docker save output is not a docker archive ({exc})") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf:
            try:
                self.buf = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def layer_members(path: Path) -> dict[str, tuple[str, int, int, int, str]]:
    """name -> (type, size, mtime, mode, sha256 of the content) of every entry of a layer tar."""
    out: dict[str, tuple[str, int, int, int, str]] = {}
    with tarfile.open(path, mode="r:") as tf:
        for member in tf:
            digest = ""
            if member.isfile():
                fh = tf.extractfile(member)
                assert fh is not None
                digest = _sha256_stream(fh)[:16]
            elif member.issym() or member.islnk():
                digest = "-> " + member.linkname
            out[member.name] = (
                member.type.decode(errors="replace"),
                member.size,
                int(member.mtime),
                member.mode,
                digest,
            )
    return out


def layer_differences(a: Path, b: Path, limit: int = 20) -> list[str]:
    """One line per path that differs between two layer tars (content, size, mtime, mode, presence)."""
    ma, mb = layer_members(a), layer_members(b)
    lines = []
    for name in sorted(set(ma) | set(mb)):
        x, y = ma.get(name), mb.get(name)
        if x == y:
            continue
        if x is None or y is None:
            lines.append(f"/{name}: only in the {'rebuild' if x is None else 'current image'}")
            continue
        what = []
        if x[4] != y[4]:
            what.append("content")
        if x[1] != y[1]:
            what.append(f"size {x[1]} -> {y[1]}")
        if x[2] != y[2]:
            what.append(f"mtime {iso_epoch(x[2])} -> {iso_epoch(y[2])}")
        if x[3] != y[3]:
            what.append(f"mode {x[3]:o} -> {y[3]:o}")
        if x[0] != y[0]:
            what.append("type")
        lines.append(f"/{name}: {', '.join(what)}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines
