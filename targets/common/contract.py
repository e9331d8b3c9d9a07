"""The stage contract shared by the host and every target container.

The host writes a stage spec (JSON) into the stage's output folder and runs
``python -m targets.<target>.<stage> <spec.json>``. The stage reads its inputs,
writes its outputs into ``spec.out_dir`` and finally ``result.json`` (timings,
tool versions, anything small). The host treats a stage as done only when the
process exited 0 *and* ``result.json`` exists.

This module must stay importable with the standard library alone: it runs in
every target image, including ones whose Python is old (Caffe's bullseye 3.9).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict

SPEC_SCHEMA = 1
SPEC_NAME = "spec.json"
RESULT_NAME = "result.json"
#: a stage that crashes while its disk has less free than this crashed of a full disk
DISK_FULL_BYTES = 1 << 20


class StageError(Exception):
    """A problem the user can fix. Printed as one line; the stage exits 2."""


@dataclass
class Spec:
    target: str
    stage: str
    root: Path  # workspace root as seen by this process
    inputs: Dict[str, Path]  # absolute paths
    out_dir: Path  # absolute path; the only writable place
    params: Dict[str, Any] = field(default_factory=dict)
    origins: Dict[str, str] = field(default_factory=dict)  # input -> where the user's file came from

    def input(self, name: str) -> Path:
        try:
            return self.inputs[name]
        except KeyError:
            raise StageError(
                f"stage {self.target}.{self.stage}: spec has no input {name!r} "
                f"(it has: {', '.join(sorted(self.inputs)) or 'none'})"
            ) from None

    def label(self, name: str) -> str:
        """How to name an input in a message: the user's own path when the host imported it."""
        return self.origins.get(name) or str(self.input(name))

    def output(self, name: str) -> Path:
        return self.out_dir / name

    def param(self, name: str, default: Any = ...) -> Any:
        if name in self.params:
            return self.params[name]
        if default is ...:
            raise StageError(f"stage {self.target}.{self.stage}: missing parameter {name!r}")
        return default


def spec_to_json(
    target: str,
    stage: str,
    root: str,
    inputs: Dict[str, str],
    out_dir: str,
    params: Dict[str, Any],
    origins: Dict[str, str] | None = None,
) -> Dict[str, Any]:
    """The host side: paths relative to the workspace root, which the runner chooses."""
    return {
        "schema": SPEC_SCHEMA,
        "target": target,
        "stage": stage,
        "workspace": str(root),
        "inputs": dict(inputs),
        "out_dir": str(out_dir),
        "params": params,
        "origins": dict(origins or {}),
    }


def load_spec(path: str | os.PathLike) -> Spec:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: spec file not found") from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc})") from None
    if raw.get("schema") != SPEC_SCHEMA:
        raise StageError(
            f"{path}: spec schema {raw.get('schema')!r}, this code reads {SPEC_SCHEMA}; rebuild the target image"
        )
    root = Path(raw["workspace"])
    return Spec(
        target=raw["target"],
        stage=raw["stage"],
        root=root,
        inputs={k: root / v for k, v in raw["inputs"].items()},
        out_dir=root / raw["out_dir"],
        params=raw.get("params", {}),
        origins=raw.get("origins", {}),
    )


def temp_path(final: Path) -> Path:
    """A new empty file beside ``final`` to write and then rename over it. Its mode is what a
    plain open() would give (mkstemp's 0600 would make reports and archives unreadable to others)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + final.name + ".", suffix=".tmp", dir=final.parent)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    os.close(fd)
    return Path(tmp)


def atomic_write(final: Path, write: Callable[[Any], None]) -> None:
    """``write(binary file)`` into a temporary name, then rename it to ``final``; nothing half-written."""
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, final)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_npy(path: Path, array: Any) -> None:
    """np.save through a temporary name (numpy is imported lazily: not every image has it at import time)."""
    import numpy as np

    atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(array)))


#: A stage's progress message: one stdout line ``::progress <done>/<total>``, which the host relays
#: to its live progress line instead of the stage's log.
PROGRESS_PREFIX = "::progress "
#: at most one progress line per this many seconds (plus the first and the last)
PROGRESS_INTERVAL_S = 1.0


def progress(done: int, total: int) -> None:
    """Say how far the stage is (images done of total): one ``::progress`` line on stdout."""
    sys.stdout.write("%s%d/%d\n" % (PROGRESS_PREFIX, int(done), int(total)))
    sys.stdout.flush()


def parse_progress(line: str) -> tuple[int, int] | None:
    """(done, total) of a ``::progress`` line, else None."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    done, _, total = line[len(PROGRESS_PREFIX) :].strip().partition("/")
    if not (done.isdigit() and total.isdigit()):
        return None
    return int(done), int(total)


class Batches(list):
    """The batch boundaries of :func:`batched_timings`. Iterating them (``for start, stop in ...``,
    as every inference stage does) reports progress: after a batch's body ran, its ``stop`` images
    are done (the first batch, then at most one line per PROGRESS_INTERVAL_S, and the last)."""

    def __iter__(self):
        total = self[-1][1] if len(self) else 0
        last = None
        for i, item in enumerate(list.__iter__(self)):
            yield item
            now = time.monotonic()
            if last is None or now - last >= PROGRESS_INTERVAL_S or i == len(self) - 1:
                progress(item[1], total)
                last = now


def batched_timings(n_items: int, batch_size: int) -> list:
    """Batch boundaries [(start, stop), ...]; the last partial batch included. A loop over them
    reports progress (:class:`Batches`)."""
    if batch_size < 1:
        raise StageError(f"batch_size must be >= 1, got {batch_size}")
    return Batches((i, min(i + batch_size, n_items)) for i in range(0, n_items, batch_size))


def main(stage_fn: Callable[[Spec], Dict[str, Any]], argv: list | None = None) -> None:
    """Entry point of every stage module: ``main(run)`` under ``if __name__ == '__main__'``.

    ``run(spec)`` does the work and returns a JSON-able dict (timings, versions, ...),
    which is written to ``result.json`` last. A StageError (or a full disk) becomes one line on
    stderr and exit code 2; anything else is a crash (traceback, exit 1).
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m targets.<target>.<stage> SPEC.json", file=sys.stderr)
        sys.exit(2)
    spec = None
    try:
        spec = load_spec(argv[0])
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = stage_fn(spec) or {}
        result.setdefault("wall_seconds", time.perf_counter() - t0)
        result.setdefault("target", spec.target)
        result.setdefault("stage", spec.stage)
        atomic_write_json(spec.output(RESULT_NAME), result)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        # A full disk is the user's to fix: one line naming where, not a traceback. Toolchains
        # report it in their own words (torch.save: "file write failed"), so look at the disk too.
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        where = getattr(exc, "filename", None) or (str(spec.out_dir) if spec is not None else "the workspace")
        if not full and spec is not None:
            try:
                full = shutil.disk_usage(spec.out_dir).free < DISK_FULL_BYTES
            except OSError:
                pass
        if not full:
            raise
        print(f"error: {where}: no space left on the device; free some space and run again", file=sys.stderr)
        sys.exit(2)
