"""Content hashing: sha256 of files and trees, and the persisted (path, size, mtime_ns) cache.

The cache lives in the workspace (``.cache/hashes.json``) so an unchanged file is never re-read.

Nothing here opens a path that is not a regular file: every open is ``O_NONBLOCK`` and checked
with ``fstat`` before a byte is read, so a FIFO, socket or device file named like an image gives
a one-line :class:`~modelmatrix.errors.DataError` instead of hanging (a FIFO) or reading forever
(``/dev/zero``). Broken or looping symbolic links and unreadable files are one-line errors too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from targets.common.contract import atomic_write_bytes

from .errors import DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# A cache entry made less than this long after its file's mtime is not trusted for an input
# someone else may rewrite (``external=True``): a same-size rewrite within the file system's
# timestamp granularity (a jiffy on ext4, 1 s on ext3/HFS+, 2 s on FAT) would keep the same
# (size, mtime_ns). Git calls these entries "racily clean".
RACY_WINDOW_NS = 2_000_000_000
SKIP_DIRS = ("__pycache__",)
SKIP_SUFFIXES = (".pyc", ".pyo")

StrPath = str | os.PathLike


# --------------------------------------------------------------------------- paths shown to people


def shown(path: StrPath) -> str:
    """``path`` as one printable line: control characters and undecodable bytes escaped.

    A file name may hold any byte but ``/`` and NUL; an error message naming it must still be one
    line that a terminal (or an XML report) can carry. Bytes that were not UTF-8 (Python keeps them
    as lone surrogates, PEP 383) are shown as ``\\xNN``, control characters as ``\\xNN``/``\\uNNNN``.
    """
    s = os.fsdecode(os.fspath(path))
    if s.isprintable():
        return s
    out = []
    for ch in s:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # surrogateescape: the original byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif o <= 0xFF:
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return "".join(out)


def name_problem(name: str) -> str | None:
    """Why a file name cannot be carried through the workspace files, or None.

    Refused: bytes that are not UTF-8 (index.json, reports and the Ascend list are UTF-8 text) and
    control characters (they break terminal output, line-based lists such as prep_bin.info and XML
    1.0, which cannot carry them even escaped).
    """
    if name.isascii():
        if name.isprintable():
            return None
    else:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid UTF-8"
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return f"contains the control character {shown(ch)}"
    return None


def kind_of(mode: int) -> str:
    """What a stat mode is, in words, for messages."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def os_problem(path: StrPath, exc: OSError, what: str = "file") -> DataError:
    """A one-line DataError for an OSError met while looking at or reading ``path``."""
    p = shown(path)
    code = exc.errno
    if code == errno.ENOENT and os.path.islink(path):
        target = shown(os.readlink(os.fspath(path)))
        return DataError(
            f"{p}: broken symbolic link (points to {target}, which does not exist); fix or delete the link"
        )
    if code == errno.ENOENT:
        return DataError(f"{p}: {what} not found (deleted while the run was reading?); check the path")
    if code == errno.ELOOP:
        return DataError(f"{p}: symbolic link loop (the link points back at itself); fix or delete the link")
    if code in (errno.EACCES, errno.EPERM):
        return DataError(
            f"{p}: permission denied reading this {what}; make it readable (chmod a+r) or move it out of the folder"
        )
    reason = exc.strerror or type(exc).__name__
    return DataError(f"{p}: cannot read this {what} ({reason}); fix or replace it")


def not_regular(path: StrPath, mode: int) -> DataError:
    return DataError(
        f"{shown(path)}: is {kind_of(mode)}, not a regular file, so it is never opened; "
        f"delete it or move it out of the folder"
    )


# --------------------------------------------------------------------------- reading regular files


def open_regular(path: StrPath) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (checked on the open descriptor).

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the fstat
    check then refuses it (and sockets, devices) before anything is read. DataError, one line, for
    anything else that goes wrong (missing, broken link, link loop, permission denied).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise os_problem(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _sha256_regular(path: StrPath) -> tuple[str, os.stat_result]:
    """(sha256, fstat of what was read) of a regular file; DataError otherwise."""
    with open_regular(path) as fh:
        st = os.fstat(fh.fileno())
        h = hashlib.sha256()
        try:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        except OSError as exc:
            raise os_problem(path, exc) from None
    return h.hexdigest(), st


def sha256_file(path: StrPath) -> str:
    """sha256 of a regular file; DataError (one line) for anything else."""
    return _sha256_regular(path)[0]


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- walking trees


def _walk(root: str, rel: str = "") -> Iterator[tuple[str, os.DirEntry]]:
    """(relative path, entry) under ``root`` in the order os.walk gave: a folder's files sorted by
    name, then its sub-folders (sorted), depth first. Symbolic links to folders are yielded, not
    followed (no loops); caches (``__pycache__``, ``.tmp-*``, ``*.pyc``) are left out."""
    folder = os.path.join(root, rel) if rel else root
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise os_problem(folder, exc, "folder") from None
    subdirs = []
    for e in entries:
        try:
            real_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            real_dir = False
        if real_dir:
            if e.name not in SKIP_DIRS and not e.name.startswith(".tmp-"):
                subdirs.append(e)
        elif not e.name.endswith(SKIP_SUFFIXES):
            yield (f"{rel}/{e.name}" if rel else e.name), e
    for d in subdirs:
        yield from _walk(root, f"{rel}/{d.name}" if rel else d.name)


def iter_files(root: Path) -> Iterator[Path]:
    """Regular files under root (symbolic links to regular files included), sorted, skipping caches.

    Anything else (a FIFO, socket, device, broken link, link to a folder) is left out with a debug
    note: the callers read what this yields."""
    root = Path(root)
    for rel, e in _walk(str(root)):
        try:
            regular = stat.S_ISREG(e.stat().st_mode)
        except OSError:
            regular = False
        if regular:
            yield root / rel
        else:
            log.debug("%s: not a regular file, left out", shown(e.path))


# --------------------------------------------------------------------------- the cache


def _valid_entries(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    for v in obj.values():
        if (
            type(v) is not list
            or len(v) != 3
            or type(v[0]) is not int
            or type(v[1]) is not int
            or type(v[2]) is not str
            or len(v[2]) != 64
        ):
            return False
    return True


class HashCache:
    """sha256 of files keyed by (path, size, mtime_ns): the git-index trick.

    Keys are absolute paths: a tree's files are keyed by the tree's root resolved ONCE plus the
    relative path (no per-file ``resolve()``), so the same file reached through a symlinked root
    shares its entry. ``hashed`` counts the files actually read since this object was made.
    A corrupt cache file (not JSON, or JSON of another shape) is discarded with one warning.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.dirty = False
        self.hashed = 0
        self.entries: dict[str, list] = self._load()

    def _load(self) -> dict[str, list]:
        try:
            with open_regular(self.path) as fh:
                raw = fh.read()
        except DataError as exc:
            if not os.path.lexists(self.path):
                return {}
            return self._discard(f"unreadable: {exc}")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._discard(f"not JSON: {' '.join(str(exc).split())}")
        if not _valid_entries(obj):
            return self._discard("not a map of path -> [size, mtime_ns, sha256]")
        return obj

    def _discard(self, reason: str) -> dict[str, list]:
        log.warning(
            "%s: hash cache discarded (%s); it is rebuilt, so files are read again once", shown(self.path), reason
        )
        self.dirty = True  # rewrite it on save even if nothing is hashed
        return {}

    # -- lookups
    def digest(self, path: StrPath, key: str, st: os.stat_result, external: bool = False) -> str:
        """sha256 of ``path`` whose ``os.stat`` is ``st``, through the entry ``key``.

        ``external``: the file is an input someone may rewrite at any time (a dataset image, a
        checkpoint): an entry made within RACY_WINDOW_NS of the file's mtime is not stored, so a
        same-size rewrite in the same timestamp tick is still seen."""
        hit = self.entries.get(key)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
        digest, fst = _sha256_regular(path)
        self.hashed += 1
        if external and time.time_ns() - fst.st_mtime_ns < RACY_WINDOW_NS:
            if self.entries.pop(key, None) is not None:
                self.dirty = True
        else:
            self.entries[key] = [fst.st_size, fst.st_mtime_ns, digest]
            self.dirty = True
        return digest

    def file(self, path: Path, external: bool = False) -> str:
        """sha256 of one regular file (DataError, one line, for anything else)."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise os_problem(path, exc) from None
        return self.digest(path, os.path.realpath(path), st, external)

    def tree(self, root: Path, external: bool = False) -> str:
        """sha256 over a folder's files (relative path + content digest, in :func:`iter_files`
        order); a symbolic link to a folder enters as its target text. DataError, one line, for a
        FIFO, socket, device, broken link or unreadable file in it (nothing of the kind is opened)."""
        root_s = os.fspath(root)
        base = os.path.realpath(root_s)
        h = hashlib.sha256()
        for rel, e in _walk(root_s):
            try:
                st = e.stat()
            except OSError as exc:
                raise os_problem(e.path, exc) from None
            name = os.fsencode(rel)
            if stat.S_ISDIR(st.st_mode):  # a symlink to a folder (not followed)
                h.update(name + b"\0-> " + os.fsencode(os.readlink(e.path)) + b"\n")
                continue
            d = self.digest(e.path, f"{base}/{rel}", st, external)
            h.update(name + b"\0" + d.encode() + b"\n")
        return h.hexdigest()

    def moved(self, old: Path, new: Path) -> None:
        """A folder was renamed: carry its files' entries over instead of re-reading them."""
        old_prefix, new_prefix = str(Path(old).resolve()) + os.sep, str(Path(new).resolve()) + os.sep
        for key in [k for k in self.entries if k.startswith(old_prefix)]:
            self.entries[new_prefix + key[len(old_prefix) :]] = self.entries.pop(key)
            self.dirty = True

    def any(self, path: Path, external: bool = False) -> str:
        return self.tree(path, external) if os.path.isdir(path) else self.file(path, external)

    def save(self) -> None:
        """Write the cache (compact JSON, atomically) only if an entry changed."""
        if self.dirty:
            atomic_write_bytes(self.path, json.dumps(self.entries, separators=(",", ":")).encode())
            self.dirty = False
