"""One runner interface, two homes: the local subprocess runner (the embedded default) and Docker.

A runner executes ONE stage of a target: it writes the stage spec into the stage's (temporary)
output folder, with paths as seen from where the stage runs, and runs
``python -m targets.<target>.<stage> <spec.json>``. It raises StageFailed (with the tail of the
stage's log) on a non-zero exit, a timeout, or a stage that wrote no result.json.
"""
from __future__ import annotations

import abc
import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from targets.common.contract import RESULT_NAME, SPEC_NAME, atomic_write_json, spec_to_json

from ..config import TargetDef
from ..errors import StageFailed

LOG_TAIL_LINES = 40
#: a stage's own output: shown on the console only with -v (`invoke matrix -v`); always kept in its log
stage_log = logging.getLogger("modelmatrix.stage")


# --------------------------------------------------------------------------- devices

def _nvidia_present() -> str | None:
    if not Path("/dev/nvidiactl").exists():
        return "no /dev/nvidiactl on this host"
    return None


def _ascend_present() -> str | None:
    if not any(Path("/dev").glob("davinci[0-9]*")):
        return "no /dev/davinci* on this host"
    return None


#: requires.devices kind -> probe returning a reason when the host lacks it
DEVICE_PROBES = {"nvidia-gpu": _nvidia_present, "ascend-npu": _ascend_present}


def device_reason(target: TargetDef) -> str | None:
    """None when the host has every device the target requires, else a one-line reason."""
    for kind in target.requires.get("devices", []):
        if kind not in DEVICE_PROBES:
            return (f"targets/{target.name}/target.yaml: requires.devices: unknown kind {kind!r} "
                    f"(known: {', '.join(DEVICE_PROBES)})")
        missing = DEVICE_PROBES[kind]()
        if missing:
            return f"{target.name} needs {kind} (requires.devices): {missing}"
    return None


@dataclass
class StageRequest:
    target: TargetDef
    stage: str
    workspace: Path                  # host path of the workspace root
    inputs: dict[str, str]           # name -> path relative to the workspace root
    out_dir: str                     # relative to the workspace root; created by the caller
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 3600.0
    origins: dict[str, str] = field(default_factory=dict)   # for messages only; not part of any key

    @property
    def label(self) -> str:
        return f"{self.target.name}.{self.stage}"

    @property
    def module(self) -> str:
        return f"targets.{self.target.name}.{self.stage}"

    def write_spec(self, root_seen_by_stage: str) -> Path:
        """Write spec.json into the out dir; returns its host path."""
        path = self.workspace / self.out_dir / SPEC_NAME
        atomic_write_json(path, spec_to_json(self.target.name, self.stage, root_seen_by_stage,
                                             self.inputs, self.out_dir, self.params, self.origins))
        return path

    def check_result(self, log_tail: str) -> None:
        if not (self.workspace / self.out_dir / RESULT_NAME).is_file():
            raise StageFailed(f"exited 0 but wrote no {RESULT_NAME} "
                              f"in {self.out_dir}; the stage is broken", log_tail)


class LogTail:
    """Keeps the last lines of a stage's output (for the failure message) and relays every line to
    the ``modelmatrix.stage`` logger at DEBUG, so the console shows them only when asked (-v)."""

    def __init__(self, label: str, lines: int = LOG_TAIL_LINES):
        self.label = label
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.everything: list[str] = []

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        self.lines.append(line)
        self.everything.append(line)
        stage_log.debug("  [%s] %s", self.label, line)

    def text(self) -> str:
        return "\n".join(self.lines)


def stage_exit_failure(label: str, code: int, tail: LogTail, where: str = "") -> StageFailed:
    """The StageFailed for a stage process that exited ``code``. Exit 2 with a last line
    ``error: ...`` is the stage contract's user error: its message is the reason, said once and
    without a repeated ``<label>:`` prefix; anything else is a crash (exit code and last line)."""
    lines = [ln.strip() for ln in tail.lines if ln.strip()]
    last = lines[-1] if lines else ""
    if code == 2 and last.startswith("error: "):
        message = last.removeprefix("error: ")
        message = message.removeprefix(f"{label}: ").removeprefix(f"stage {label}: ")
        return StageFailed(message, tail.text(), user_error=True)
    detail = f": {last[:300]}" if last else ""
    return StageFailed(f"exited with code {code}{where}{detail}", tail.text())


class Runner(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def unavailable_reason(self, target: TargetDef) -> str | None:
        """None when this runner can run the target's stages, else a one-line reason."""

    @abc.abstractmethod
    def fingerprint(self, target: TargetDef) -> str:
        """The environment a stage's outputs depend on (toolchain versions, image id): part of its key."""

    @abc.abstractmethod
    def run(self, req: StageRequest) -> str:
        """Run one stage; return the tail of its log. Raise StageFailed on failure."""

    def prepare(self, target: TargetDef) -> None:  # noqa: B027 - optional hook
        """Make the target runnable (e.g. build its image). Raises a ModelMatrixError (one line)
        when that fails: the target is then FAILED, unlike unavailable_reason's SKIPPED."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
