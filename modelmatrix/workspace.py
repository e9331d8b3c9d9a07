"""The shared workspace: layout, the lock, and the stage store.

Layout (all under the workspace root, shared with containers as a volume):

    stages/<node>/<key16>/          one finished stage: its outputs, one <output>.provenance.json
                                    per output (modelmatrix/provenance.py), spec.json, result.json, stamp.json
    stages/<node>/.tmp-<key16>-<pid>  a stage being produced (never read as a result)
    targets/<target>/<stage>        symlink to the current stages/<node>/<key16>
    report.json, report.md, junit.xml   copies of the latest verify outputs
    .cache/hashes.json              (path, size, mtime_ns) -> sha256, so unchanged files are not re-read

A stage folder is renamed into place only after its stamp.json (key + output digests + the
digests of the provenance sidecars) is written, so a killed stage leaves at most a .tmp-* folder,
which nothing mistakes for a result and which the next run removes. The sidecars are part of the
result: one that is missing or changed makes the stored result damaged (rebuilt), like an output.

The store owns the whole per-stage transaction (:meth:`Workspace.stage`): it looks the key up,
re-checks every stored output against the digest in its stamp (cheaply: through the hash cache,
re-reading only files whose size or mtime changed), and either hands back the stored result, or a
temporary folder to produce it in, committed when the block ends without an exception. One place
decides "up to date", "rebuild" or "damaged, rebuild".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from targets.common.contract import atomic_write_bytes, atomic_write_json

from . import provenance as _provenance
from .errors import ModelMatrixError
from .hashing import HashCache, iter_files, sha256_file, sha256_json  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

STAMP = "stamp.json"
REPORT_FILES = ("report.json", "report.md", "junit.xml")


def disk_error(exc: OSError, where: Path | str, doing: str) -> ModelMatrixError:
    """An OSError while writing the workspace, as one line naming the path and the fix."""
    path = exc.filename or where
    if exc.errno == errno.ENOSPC:
        return ModelMatrixError(
            f"{path}: no space left on the device while {doing}; free some space "
            "(or point `workspace:` in matrix.yaml elsewhere) and run again"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ModelMatrixError(
            f"{path}: cannot write ({exc.strerror}) while {doing}; make the workspace "
            "writable or set `workspace:` in matrix.yaml to a writable folder"
        )
    return ModelMatrixError(f"{path}: {exc.strerror or exc} while {doing}")


@dataclass
class Slot:
    """One stage's transaction: either a stored result (``stamp``) or a folder to produce it in."""

    node: str
    key: str
    dir: Path  # the final folder (stored result, or where tmp is committed to)
    stamp: dict[str, Any] | None = None  # set when up to date, and after commit
    tmp: Path | None = None  # set when the stage must run
    damaged: str | None = None  # why a stored result was refused (then it is rebuilt)
    extra: dict[str, Any] | None = None  # merged into the stamp at commit
    provenance: dict[str, Any] | None = None  # what every output's sidecar says besides node, key, digests

    @property
    def cached(self) -> bool:
        return self.tmp is None and self.stamp is not None


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
        if self.root.exists() and not self.root.is_dir():
            raise ModelMatrixError(
                f"{self.root}: the workspace is not a folder (it is a file); "
                "set `workspace:` in matrix.yaml to a folder path"
            )
        try:
            (self.root / "stages").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelMatrixError(
                f"{self.root}: cannot create the workspace ({exc.strerror}); "
                "set `workspace:` in matrix.yaml to a writable folder"
            ) from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer per workspace at a time: `invoke matrix`, bench, clean, data --force."""
        self.ensure()
        try:
            fh: IO[str] = open(self.root / ".lock", "w")
        except OSError as exc:
            raise ModelMatrixError(
                f"{self.root / '.lock'}: cannot take the workspace lock ({exc.strerror}); "
                "the workspace must be writable: fix its permissions or set "
                "`workspace:` in matrix.yaml to a writable folder"
            ) from None
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise ModelMatrixError(
                        f"{self.root}: another modelmatrix run holds this workspace; "
                        "wait for it or use another workspace"
                    ) from None
                raise
            yield
        finally:
            fh.close()

    # ----------------------------------------------------------------- the stage store
    def find(self, node: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(stamp, None) for a stored result whose outputs still match their digests; (None, why)
        for one that exists but is damaged; (None, None) when there is none."""
        folder = self.stage_dir(node, key)
        try:
            data = json.loads((folder / STAMP).read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, f"its {STAMP} is unreadable"
        if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("outputs"), dict):
            return None, f"its {STAMP} does not belong to this key"
        for name, digest in data["outputs"].items():
            path = folder / name
            if not path.exists():
                return None, f"its output {name} was deleted"
            try:
                now = self.hashes.any(path)
            except (OSError, ModelMatrixError) as exc:
                return None, f"its output {name} cannot be read ({exc})"
            if now != digest:
                return None, f"its output {name} no longer matches the digest it was stored with"
        why = _provenance.sidecar_problem(folder, data, self.hashes)
        if why:
            return None, why
        return data, None

    def lookup(self, node: str, key: str) -> dict[str, Any] | None:
        """The stamp of a finished, undamaged stage with this key, or None."""
        return self.find(node, key)[0]

    @contextlib.contextmanager
    def stage(self, node: str, key: str, outputs: list[str], *, force: bool = False) -> Iterator[Slot]:
        """The per-stage transaction. ``slot.cached``: use ``slot.stamp`` / ``slot.dir`` as they
        are. Otherwise produce the outputs in ``slot.tmp``: on a clean exit they are hashed, stamped
        and renamed into place (``slot.stamp`` is then set); on any exception the folder is removed."""
        slot = Slot(node, key, self.stage_dir(node, key))
        if not force:
            slot.stamp, slot.damaged = self.find(node, key)
            if slot.damaged:
                log.warning("%s: the stored result is damaged (%s); rebuilding it", node, slot.damaged)
        if slot.stamp is not None:
            yield slot
            return
        slot.tmp = self.begin(node, key)
        try:
            yield slot
            slot.stamp = self.commit(node, key, slot.tmp, outputs, extra=slot.extra, provenance=slot.provenance)
        except BaseException:
            self.abandon(slot.tmp)
            raise

    def begin(self, node: str, key: str) -> Path:
        tmp = self.node_dir(node) / f".tmp-{key[:16]}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(
        self,
        node: str,
        key: str,
        tmp: Path,
        outputs: list[str],
        extra: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Hash the declared outputs, write one provenance sidecar per output (``provenance``: what
        they say besides node, key and digests), write the stamp, then rename the folder into place."""
        digests = {}
        for name in outputs:
            path = tmp / name
            if not path.exists():
                raise ModelMatrixError(
                    f"finished without its declared output {name}; the stage code is "
                    f"broken (targets/.../target.yaml declares it; see {tmp.name}/result.json)"
                )
            digests[name] = self.hashes.any(path)
        common = {"node": node, "key": key, **(provenance or {})}
        sidecars = _provenance.write_sidecars(tmp, digests, common, self.hashes)
        stamp = {"key": key, "node": node, "outputs": digests, _provenance.STAMP_KEY: sidecars, **(extra or {})}
        atomic_write_json(tmp / STAMP, stamp)
        final = self.stage_dir(node, key)
        if final.exists():  # a stale, damaged or concurrent copy: replace it
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
        """targets/<target>/<stage> -> the current stage folder (atomic symlink swap); a no-op when
        it already points there."""
        link = self.root / "targets" / target / stage
        rel = os.path.relpath(final, link.parent)
        if link.is_symlink() and os.readlink(link) == rel:
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{stage}.tmp-{os.getpid()}")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(rel, tmp)
        os.replace(tmp, link)

    # ----------------------------------------------------------------- published reports
    def publish(self, src: Path, name: str) -> Path:
        """Copy ``src`` to the workspace root as ``name``; nothing is written when the published copy
        already has the same bytes (a no-op run writes nothing, even on a full disk)."""
        dest = self.root / name
        data = Path(src).read_bytes()
        try:
            if dest.is_file() and dest.stat().st_size == len(data) and dest.read_bytes() == data:
                return dest
        except OSError:
            pass
        atomic_write_bytes(dest, data)
        return dest

    def unpublish(self, names: tuple[str, ...] = REPORT_FILES) -> list[str]:
        """Remove published reports that no longer describe the workspace (a run that did not reach
        verify): a CI step must never publish an old pass."""
        removed = []
        for name in names:
            path = self.root / name
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(name)
        return removed

    def clear(self) -> list[str]:
        """Delete the workspace's contents (under the lock); what was really removed, relative names."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for entry in sorted(os.listdir(self.root)):
            if entry == ".lock":
                continue
            path = self.root / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(entry)
        return removed
