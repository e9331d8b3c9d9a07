"""The stage store: atomic commits, stamps, sweeping what a killed run left."""

from __future__ import annotations

import os

import pytest

from modelmatrix.errors import ModelMatrixError
from modelmatrix.workspace import Workspace


def test_commit_is_atomic_and_keyed(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    tmp = ws.begin("t.s", "a" * 64)
    (tmp / "out.npy").write_bytes(b"123")
    assert ws.lookup("t.s", "a" * 64) is None  # not a result until committed
    stamp = ws.commit("t.s", "a" * 64, tmp, ["out.npy"])
    assert not tmp.exists()
    assert ws.lookup("t.s", "a" * 64) == stamp
    assert stamp["outputs"]["out.npy"] == "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3"
    assert ws.lookup("t.s", "b" * 64) is None


def test_missing_declared_output_is_an_error(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    tmp = ws.begin("t.s", "c" * 64)
    with pytest.raises(ModelMatrixError, match="without its declared output features.npy"):
        ws.commit("t.s", "c" * 64, tmp, ["features.npy"])
    assert ws.lookup("t.s", "c" * 64) is None


def test_folder_without_stamp_is_not_a_result(tmp_path):
    """A stage folder that somehow lacks its stamp (or has another key's) is never reused."""
    ws = Workspace(tmp_path / "ws")
    d = ws.stage_dir("t.s", "d" * 64)
    d.mkdir(parents=True)
    (d / "features.npy").write_bytes(b"half")
    assert ws.lookup("t.s", "d" * 64) is None
    (d / "stamp.json").write_text('{"key": "other"}')
    assert ws.lookup("t.s", "d" * 64) is None


def test_sweep_removes_what_a_killed_run_left(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    stale = ws.begin("t.s", "e" * 64)
    (stale / "features.npy").write_bytes(b"half-written")
    with ws.lock():
        assert ws.sweep() == [stale]
    assert not stale.exists()
    assert ws.lookup("t.s", "e" * 64) is None


def test_hash_cache_reuses_and_detects_change(tmp_path):
    ws = Workspace(tmp_path / "ws")
    f = tmp_path / "x.bin"
    f.write_bytes(b"one")
    d1 = ws.hashes.file(f)
    ws.hashes.save()
    ws2 = Workspace(tmp_path / "ws")
    assert ws2.hashes.file(f) == d1 and not ws2.hashes.dirty
    f.write_bytes(b"two!")
    assert ws2.hashes.file(f) != d1


def test_lock_refuses_a_second_run(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with ws.lock():
        with pytest.raises(ModelMatrixError, match="another modelmatrix run"):
            with Workspace(tmp_path / "ws").lock():
                pass


def test_point_symlink(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    tmp = ws.begin("onnxruntime.infer", "1" * 64)
    (tmp / "features.npy").write_bytes(b"x")
    ws.commit("onnxruntime.infer", "1" * 64, tmp, ["features.npy"])
    ws.point("onnxruntime", "infer", ws.stage_dir("onnxruntime.infer", "1" * 64))
    assert (ws.root / "targets/onnxruntime/infer/features.npy").read_bytes() == b"x"
    assert os.path.islink(ws.root / "targets/onnxruntime/infer")


def test_a_result_whose_output_was_deleted_is_not_reused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    tmp = ws.begin("t.s", "9" * 64)
    (tmp / "features.npy").write_bytes(b"x")
    ws.commit("t.s", "9" * 64, tmp, ["features.npy"])
    (ws.stage_dir("t.s", "9" * 64) / "features.npy").unlink()
    assert ws.lookup("t.s", "9" * 64) is None


def test_written_files_are_not_private(tmp_path):
    """Reports and archives are for other people too: not mkstemp's 0600."""
    from targets.common.contract import atomic_write_json

    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
