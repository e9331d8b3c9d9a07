"""modelmatrix.hashing: file/tree digests and the (path, size, mtime_ns) cache, on real files.

Hostile entries are real: FIFOs (os.mkfifo), unix sockets (socket.bind), a character device
(os.mknod, as root), broken and looping symbolic links, unreadable files (a child process that
has dropped CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so even root gets EACCES), non-UTF-8 names.
Anything that could hang (a FIFO, /dev/zero) runs in a child process with a timeout.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelmatrix.errors import DataError
from modelmatrix.hashing import HashCache, iter_files, sha256_file, shown

REPO = Path(__file__).resolve().parent.parent
OLD_NS = 1_500_000_000 * 10**9  # a past mtime: entries for it are never "racy"
KINDS = ["fifo", "socket", "device", "dangling", "loop"]
KIND_WORDS = {
    "fifo": "named pipe (FIFO)",
    "socket": "a socket",
    "device": "a device file",
    "dangling": "broken symbolic link",
    "loop": "symbolic link loop",
}


# --------------------------------------------------------------------------- helpers (used by test_data too)


def make_special(path: Path, kind: str) -> None:
    """A real FIFO, unix socket, character device (/dev/zero's numbers), broken or looping link."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cwd = os.getcwd()
        os.chdir(path.parent)  # a relative name: sun_path holds 108 bytes at most
        try:
            sock.bind(path.name)
        finally:
            os.chdir(cwd)
            sock.close()
    elif kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # reads zeros forever
        except PermissionError as exc:
            pytest.skip(f"mknod is not permitted here ({exc}); CI runs as root with CAP_MKNOD")
    elif kind == "dangling":
        os.symlink(path.parent / "no-such-file.jpg", path)
    elif kind == "loop":
        os.symlink(path.name, path)  # points at itself
    else:
        raise ValueError(kind)


def _drop_dac() -> None:
    """In the child before exec: drop the capabilities that let root read a mode-000 file."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_child(body: str, timeout: float = 20, drop_dac: bool = False) -> dict:
    """Run ``body`` (Python that sets ``result``) in a child process with a timeout.

    Returns {"ok": True, "result": ...} or {"ok": False, "type": ..., "message": ...} for a
    ModelMatrixError; any other exception fails the test with the child's traceback, and a child
    that hangs fails it too (instead of hanging CI)."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from modelmatrix.errors import ModelMatrixError\n"
        "try:\n"
        "    result = None\n"
        + "".join(f"    {line}\n" for line in body.strip("\n").splitlines())
        + "    print(json.dumps({'ok': True, 'result': result}))\n"
        "except ModelMatrixError as exc:\n"
        "    print(json.dumps({'ok': False, 'type': type(exc).__name__, 'message': str(exc)}))\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            preexec_fn=_drop_dac if drop_dac else None,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child hung for {timeout} s (it opened something it must not)")
    assert proc.returncode == 0, f"child died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_line_error(out: dict, *words: str) -> str:
    assert out["ok"] is False and out["type"] == "DataError", out
    msg = out["message"]
    assert "\n" not in msg and msg.isprintable(), repr(msg)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _old(path: Path) -> None:
    os.utime(path, ns=(OLD_NS, OLD_NS))


# --------------------------------------------------------------------------- hostile entries


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["file", "tree"])
def test_special_entries_are_one_line_errors_never_opened(tmp_path, kind, how):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"regular")
    victim = folder / "b_0001_c1s1.jpg"
    make_special(victim, kind)
    target = victim if how == "file" else folder
    out = run_child(
        f"from pathlib import Path\nfrom modelmatrix.hashing import HashCache\n"
        f"result = HashCache(Path({str(tmp_path / 'c.json')!r})).{how}(Path({str(target)!r}))"
    )
    one_line_error(out, str(victim), KIND_WORDS[kind])


def readable_in_child_body(victim: Path) -> str:
    """Child code that sets result = 'readable' when the dropped capabilities did not take."""
    return (
        f"import os\ntry:\n    os.close(os.open({str(victim)!r}, os.O_RDONLY))\n    readable = True\n"
        f"except PermissionError:\n    readable = False\n"
    )


def test_unreadable_file_is_one_line_even_for_root(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    victim = folder / "locked.bin"
    victim.write_bytes(b"secret")
    victim.chmod(0)
    for how in ("file", "tree"):
        target = victim if how == "file" else folder
        out = run_child(
            readable_in_child_body(victim) + f"from pathlib import Path\nfrom modelmatrix.hashing import HashCache\n"
            f"result = 'readable' if readable else "
            f"HashCache(Path({str(tmp_path / 'c.json')!r})).{how}(Path({str(target)!r}))",
            drop_dac=True,
        )
        if out.get("result") == "readable":
            pytest.skip("dropping CAP_DAC_OVERRIDE did not make a mode-000 file unreadable here")
        one_line_error(out, str(victim), "permission denied", "chmod")


def test_iter_files_leaves_special_entries_out(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    os.mkfifo(tmp_path / "pipe.py")
    make_special(tmp_path / "sock", "socket")
    os.symlink(tmp_path / "missing", tmp_path / "dangling.py")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert list(iter_files(tmp_path)) == [tmp_path / "a.py", tmp_path / "sub" / "b.py"]


def test_non_utf8_name_in_a_tree_is_hashed_and_cached(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    bad = os.path.join(os.fsencode(folder), b"0001_c1s1_\xff.jpg")
    with open(bad, "wb") as fh:
        fh.write(b"jpeg-ish")
    os.utime(bad, ns=(OLD_NS, OLD_NS))
    cache = HashCache(tmp_path / "c.json")
    first = cache.tree(folder)
    cache.save()
    again = HashCache(tmp_path / "c.json")
    assert again.tree(folder) == first and again.hashed == 0  # the entry survived JSON
    with open(bad, "wb") as fh:
        fh.write(b"other bytes")
    assert HashCache(tmp_path / "c.json").tree(folder) != first
    assert shown(bad) == f"{folder}/0001_c1s1_\\xff.jpg"


def test_shown_escapes_control_characters():
    assert shown("a\x1b[31mb\x07\nc") == "a\\x1b[31mb\\x07\\x0ac"
    assert shown("plain name.jpg") == "plain name.jpg"
    assert shown("caf\u00e9") == "caf\u00e9"


# --------------------------------------------------------------------------- the cache file


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00",
        b"[]",
        b'"text"',
        b'{"k": 1}',
        b'{"k": [1, 2]}',
        b'{"k": [1, 2, 3]}',
        b'{"k": ["1", 2, "' + b"a" * 64 + b'"]}',
    ],
)
def test_corrupt_cache_is_discarded_with_one_warning_and_rebuilt(tmp_path, caplog, content):
    path = tmp_path / ".cache" / "hashes.json"
    path.parent.mkdir()
    path.write_bytes(content)
    f = tmp_path / "x.bin"
    f.write_bytes(b"one")
    with caplog.at_level(logging.WARNING, logger="modelmatrix.hashing"):
        cache = HashCache(path)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert cache.entries == {}
    digest = cache.file(f)
    cache.save()
    rebuilt = json.loads(path.read_text())
    assert rebuilt == {str(f.resolve()): [3, f.stat().st_mtime_ns, digest]}


def test_cache_that_is_a_fifo_does_not_hang(tmp_path):
    path = tmp_path / "hashes.json"
    os.mkfifo(path)
    out = run_child(
        f"import logging\nfrom pathlib import Path\nfrom modelmatrix.hashing import HashCache\n"
        f"result = HashCache(Path({str(path)!r})).entries"
    )
    assert out == {"ok": True, "result": {}}


def test_an_unchanged_cache_is_not_rewritten(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.bin").write_bytes(bytes([i]) * 10)
        _old(folder / f"{i}.bin")
    cache = HashCache(tmp_path / "c.json")
    digest = cache.tree(folder)
    cache.save()
    before = os.stat(tmp_path / "c.json")
    warm = HashCache(tmp_path / "c.json")
    assert warm.tree(folder) == digest and warm.hashed == 0 and not warm.dirty
    warm.save()
    after = os.stat(tmp_path / "c.json")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_tree_through_a_symlinked_root_shares_entries(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a")
    _old(folder / "a.bin")
    os.symlink(folder, tmp_path / "link")
    cache = HashCache(tmp_path / "c.json")
    digest = cache.tree(folder)
    assert cache.tree(tmp_path / "link") == digest and cache.hashed == 1
    assert cache.file(tmp_path / "link" / "a.bin") and cache.hashed == 1


def test_recent_external_entry_is_not_trusted(tmp_path):
    """A same-size rewrite within one timestamp tick keeps (size, mtime_ns); for inputs someone
    else writes (external=True) an entry made that close to the mtime is not stored."""
    f = tmp_path / "img.jpg"
    f.write_bytes(b"AAAA")
    now = time.time_ns()
    os.utime(f, ns=(now, now))
    cache = HashCache(tmp_path / "c.json")
    first = cache.file(f, external=True)
    f.write_bytes(b"BBBB")
    os.utime(f, ns=(now, now))  # same size, same mtime
    assert cache.file(f, external=True) == sha256_file(f) != first
    _old(f)
    cache.file(f, external=True)
    hashed = cache.hashed
    assert cache.file(f, external=True) and cache.hashed == hashed  # an old file is cached


def test_sha256_file_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "p")
    out = run_child(f"from modelmatrix.hashing import sha256_file\nresult = sha256_file({str(tmp_path / 'p')!r})")
    one_line_error(out, "named pipe")
    with pytest.raises(DataError):
        sha256_file(tmp_path / "missing")


# --------------------------------------------------------------------------- the no-op benchmark


def test_noop_hash_bench_reads_nothing_when_warm(tmp_path):
    from modelmatrix.bench import noop_hash_bench

    r = noop_hash_bench(tmp_path, files=120, runs=2)
    assert r["cold"]["files_read"] == r["files_digested"] == 120
    assert r["warm"]["files_read"] == [0, 0] and r["warm"]["runs"] == 2
    assert r["warm"]["min"] <= r["warm"]["median"]
    again = noop_hash_bench(tmp_path, files=120, runs=1)
    assert again["set"] == "up to date" and again["warm"]["files_read"] == [0]
