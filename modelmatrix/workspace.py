"""The shared workspace: layout, content hashing, and the stage store.

Layout (all under the workspace root, shared with containers as a volume):

    stages/<node>/<key16>/          one finished stage: its outputs + spec.json, result.json, stamp.json
    stages/<node>/.tmp-<key16>-<pid>  a stage being produced (never read as a result)
    targets/<target>/<stage>        symlink to the current stages/<node>/<key16>
    report.json, report.md, junit.xml   copies of the latest verify outputs
    .cache/hashes.json              (path, size, mtime_ns) -> sha256, so unchanged files are not re-read

A stage folder is renamed into place only after its stamp.json (key + output digests) is
written, so a killed stage leaves at most a .tmp-* folder, which nothing mistakes for a result
and which the next run removes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from targets.common.contract import atomic_write_bytes, atomic_write_json

from .errors import ModelMatrixError
from .hashing import HashCache, iter_files, sha256_file, sha256_json  # noqa: F401 (re-exported)

STAMP = "stamp.json"


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.hashes = HashCache(self.root / ".cache" / "hashes.json")

    # ----------------------------------------------------------------- layout
    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def node_dir(self, node: str) -> Path:
        return self.root / "stages" / node

    def stage_dir(self, node: str, key: str) -> Path:
        return self.node_dir(node) / key[:16]

    def ensure(self) -> None:
        try:
            (self.root / "stages").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelMatrixError(f"{self.root}: cannot create the workspace ({exc.strerror}); "
                                   "set `workspace:` in matrix.yaml to a writable folder") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One `invoke matrix` per workspace at a time."""
        self.ensure()
        fh = open(self.root / ".lock", "w")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise ModelMatrixError(f"{self.root}: another modelmatrix run holds this workspace; "
                                           "wait for it or use another workspace") from None
                raise
            yield
        finally:
            fh.close()

    # ----------------------------------------------------------------- the stage store
    def lookup(self, node: str, key: str) -> dict | None:
        """The stamp of a finished stage with this key, or None."""
        stamp = self.stage_dir(node, key) / STAMP
        try:
            data = json.loads(stamp.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("key") != key:
            return None
        # An output deleted by hand since: not a result any more (the stage runs again).
        if not all((stamp.parent / name).exists() for name in data.get("outputs", {})):
            return None
        return data

    def begin(self, node: str, key: str) -> Path:
        tmp = self.node_dir(node) / f".tmp-{key[:16]}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, node: str, key: str, tmp: Path, outputs: list[str], extra: dict | None = None) -> dict:
        """Hash the declared outputs, write the stamp, then rename the folder into place."""
        digests = {}
        for name in outputs:
            path = tmp / name
            if not path.exists():
                raise ModelMatrixError(f"{node}: finished without its declared output {name}; "
                                       f"the stage code is broken (see {tmp / 'result.json'})")
            digests[name] = self.hashes.any(path)
        stamp = {"key": key, "node": node, "outputs": digests, **(extra or {})}
        atomic_write_json(tmp / STAMP, stamp)
        final = self.stage_dir(node, key)
        if final.exists():       # a stale or concurrent copy: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.hashes.moved(tmp, final)
        return stamp

    def abandon(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def sweep(self) -> list[Path]:
        """Remove every .tmp-* folder: what killed runs left. Call only while holding lock()."""
        stages = self.root / "stages"
        removed = sorted(stages.glob("*/.tmp-*")) if stages.is_dir() else []
        for tmp in removed:
            shutil.rmtree(tmp, ignore_errors=True)
        return removed

    def point(self, target: str, stage: str, final: Path) -> None:
        """targets/<target>/<stage> -> the current stage folder (atomic symlink swap)."""
        link = self.root / "targets" / target / stage
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{stage}.tmp-{os.getpid()}")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(final, link.parent), tmp)
        os.replace(tmp, link)

    def publish(self, src: Path, name: str) -> Path:
        dest = self.root / name
        atomic_write_bytes(dest, Path(src).read_bytes())
        return dest
