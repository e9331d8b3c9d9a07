"""Content hashing: sha256 of files and trees, and the persisted (path, size, mtime_ns) cache.

The cache lives in the workspace (``.cache/hashes.json``) so an unchanged file is never re-read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from targets.common.contract import atomic_write_json

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def iter_files(root: Path) -> Iterator[Path]:
    """Files under root, sorted, skipping caches."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith(".tmp-"))
        for name in sorted(filenames):
            if not name.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / name


class HashCache:
    """sha256 of files keyed by (path, size, mtime_ns): the git-index trick."""

    def __init__(self, path: Path):
        self.path = path
        self.dirty = False
        try:
            self.entries: dict[str, list] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.entries = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def tree(self, root: Path) -> str:
        h = hashlib.sha256()
        for f in iter_files(root):
            h.update(f"{f.relative_to(root).as_posix()}\0{self.file(f)}\n".encode())
        return h.hexdigest()

    def moved(self, old: Path, new: Path) -> None:
        """A folder was renamed: carry its files' entries over instead of re-reading them."""
        old_prefix, new_prefix = str(Path(old).resolve()) + os.sep, str(Path(new).resolve()) + os.sep
        for key in [k for k in self.entries if k.startswith(old_prefix)]:
            self.entries[new_prefix + key[len(old_prefix):]] = self.entries.pop(key)
            self.dirty = True

    def any(self, path: Path) -> str:
        return self.tree(path) if path.is_dir() else self.file(path)

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.path, self.entries)
            self.dirty = False
