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
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from targets.common.contract import PROGRESS_PREFIX, RESULT_NAME, SPEC_NAME, atomic_write_json, spec_to_json

from ..config import TargetDef
from ..errors import StageFailed

LOG_TAIL_LINES = 40
#: a stage's own output: shown on the console only with -v (`invoke matrix -v`); always kept in its log
stage_log = logging.getLogger("modelmatrix.stage")


# --------------------------------------------------------------------------- devices

NVIDIA_SMI_TIMEOUT_S = 20.0
GPU_FIELDS = ("index", "uuid", "name", "compute_cap", "driver_version")


def nvidia_gpus(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> tuple[list[dict[str, str]], str | None]:
    """The GPUs ``nvidia-smi`` lists (index, uuid, name, compute_cap, driver_version), or ([], why not)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], "nvidia-smi is not on PATH (the NVIDIA driver's utilities are not installed)"
    try:
        proc = subprocess.run(
            [exe, f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return [], f"nvidia-smi did not answer within {timeout_s:g} s"
    except OSError as exc:
        return [], f"nvidia-smi could not run ({exc.strerror or exc})"
    if proc.returncode != 0:
        first = (proc.stdout + proc.stderr).strip().splitlines()
        return [], f"nvidia-smi failed (exit {proc.returncode}: {first[0][:160] if first else 'no output'})"
    gpus = [
        dict(zip(GPU_FIELDS, (p.strip() for p in line.split(",")), strict=True))
        for line in proc.stdout.splitlines()
        if line.count(",") == len(GPU_FIELDS) - 1
    ]
    return (gpus, None) if gpus else ([], "nvidia-smi answered but lists no GPU")


def nvidia_reason(dev: Path = Path("/dev")) -> str | None:
    """Why this host cannot give a stage an NVIDIA GPU: no driver device node, or nvidia-smi missing,
    failing or listing nothing; None when it can."""
    if not (dev / "nvidiactl").exists():
        return f"no {dev / 'nvidiactl'} on this host"
    return nvidia_gpus()[1]


def gpu_request_reason(gpus: dict[str, Any] | None, listed: list[dict[str, str]], where: str) -> str | None:
    """Why a GPU request (``container.gpus``: count or device_ids) cannot be met by the GPUs listed."""
    ids = list((gpus or {}).get("device_ids") or [])
    known = {g["index"] for g in listed} | {g["uuid"] for g in listed}
    here = ", ".join(f"{g['index']} ({g['name']})" for g in listed) or "none"
    missing = [i for i in ids if i not in known]
    if missing:
        return f"{where}.device_ids: GPU {missing[0]!r} does not exist on this host (nvidia-smi lists: {here})"
    count = (gpus or {}).get("count")
    if isinstance(count, int) and count > len(listed):
        return f"{where}.count: {count} GPUs asked for, this host has {len(listed)} ({here})"
    return None


def engine_gpu_reason(info: dict[str, Any]) -> str | None:
    """Why a Docker engine (its ``docker info``) cannot give containers NVIDIA GPUs: it lists neither an
    ``nvidia`` runtime nor CDI ``nvidia.com/gpu`` devices; None when it lists one of them."""
    if "nvidia" in (info.get("Runtimes") or {}):
        return None
    for d in info.get("DiscoveredDevices") or []:
        if isinstance(d, dict) and str(d.get("ID", "")).startswith("nvidia.com/gpu"):
            return None
    return (
        "the Docker engine lists no nvidia runtime and no CDI nvidia.com/gpu device (docker info): install "
        "the NVIDIA container toolkit and run `nvidia-ctk runtime configure --runtime=docker`"
    )


def device_fingerprint(target: TargetDef, device_ids: list[str] | None = None) -> str:
    """The devices a target's outputs depend on, for its stage keys ("" for a target that needs none):
    for nvidia-gpu the name, compute capability and driver of each GPU used (``device_ids``, else
    all), so a workspace shared between hosts never reuses an engine built for another GPU."""
    if "nvidia-gpu" not in target.requires.get("devices", []):
        return ""
    gpus, why = nvidia_gpus()
    if why:
        raise StageFailed(f"{target.name}: cannot fingerprint the GPU for the stage keys: {why}")
    if device_ids:
        gpus = [g for g in gpus if g["index"] in device_ids or g["uuid"] in device_ids]
    return "nvidia-gpu=" + ";".join(f"{g['name']}/sm{g['compute_cap']}/driver{g['driver_version']}" for g in gpus)


def _nvidia_present() -> str | None:
    return nvidia_reason()


def _ascend_present() -> str | None:
    if not any(Path("/dev").glob("davinci[0-9]*")):
        return "no /dev/davinci* on this host"
    return None


#: requires.devices kind -> probe returning a reason when the host lacks it
DEVICE_PROBES = {"nvidia-gpu": _nvidia_present, "ascend-npu": _ascend_present}


def stage_requires(target: TargetDef, stage: str | None) -> dict[str, list[str]]:
    """What one stage needs (its own ``requires``, else the target's); the target's for None."""
    sdef = target.stages.get(stage) if stage else None
    return sdef.requires if sdef is not None else target.requires


def ascend_device_reason(device_ids: list[int], dev: Path = Path("/dev")) -> str | None:
    """Why the configured Ascend device ids cannot be given to a stage: /dev/davinci<N> is missing."""
    found = sorted(p.name for p in dev.glob("davinci[0-9]*"))
    for i in device_ids:
        if not (dev / f"davinci{i}").exists():
            return (
                f"device id {i}: {dev / f'davinci{i}'} does not exist on this host (found: "
                f"{', '.join(found) or 'no davinci device'}); set targets.ascend.params.device_id"
            )
    return None


def device_reason(target: TargetDef, stage: str | None = None) -> str | None:
    """None when the host has every device the target (or one of its stages) requires, else a one-line reason."""
    for kind in stage_requires(target, stage).get("devices", []):
        if kind not in DEVICE_PROBES:
            return (
                f"targets/{target.name}/target.yaml: requires.devices: unknown kind {kind!r} "
                f"(known: {', '.join(DEVICE_PROBES)})"
            )
        missing = DEVICE_PROBES[kind]()
        if missing:
            return f"{target.name} needs {kind} (requires.devices): {missing}"
    return None


@dataclass
class StageRequest:
    target: TargetDef
    stage: str
    workspace: Path  # host path of the workspace root
    inputs: dict[str, str]  # name -> path relative to the workspace root
    out_dir: str  # relative to the workspace root; created by the caller
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 3600.0
    origins: dict[str, str] = field(default_factory=dict)  # for messages only; not part of any key

    @property
    def label(self) -> str:
        return f"{self.target.name}.{self.stage}"

    @property
    def module(self) -> str:
        return f"targets.{self.target.name}.{self.stage}"

    def write_spec(self, root_seen_by_stage: str) -> Path:
        """Write spec.json into the out dir; returns its host path."""
        path = self.workspace / self.out_dir / SPEC_NAME
        atomic_write_json(
            path,
            spec_to_json(
                self.target.name, self.stage, root_seen_by_stage, self.inputs, self.out_dir, self.params, self.origins
            ),
        )
        return path

    def check_result(self, log_tail: str) -> None:
        if not (self.workspace / self.out_dir / RESULT_NAME).is_file():
            raise StageFailed(f"exited 0 but wrote no {RESULT_NAME} in {self.out_dir}; the stage is broken", log_tail)


class LogTail:
    """Keeps the last lines of a stage's output (for the failure message) and relays every line to
    the ``modelmatrix.stage`` logger at DEBUG, so the console shows them only when asked (-v)."""

    def __init__(self, label: str, lines: int = LOG_TAIL_LINES):
        self.label = label
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.everything: list[str] = []

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        stage_log.debug("  [%s] %s", self.label, line)  # progress lines are relayed from here
        if line.startswith(PROGRESS_PREFIX):
            return  # not the stage's log
        self.lines.append(line)
        self.everything.append(line)

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

    def provenance(self, target: TargetDef) -> dict[str, Any]:
        """Where the target's stages run, for their outputs' provenance sidecars (modelmatrix/provenance.py)."""
        return {"runner": self.name, "fingerprint": self.fingerprint(target)}

    @abc.abstractmethod
    def run(self, req: StageRequest) -> str:
        """Run one stage; return the tail of its log. Raise StageFailed on failure."""

    def stage_unavailable_reason(self, target: TargetDef, stage: str) -> str | None:
        """None when this runner can run this one stage (its own ``requires``: ascend.convert needs the
        toolkit only, ascend.infer also /dev/davinci*), else a one-line reason (the stage is skipped)."""
        return device_reason(target, stage)

    def device_fingerprint(self, target: TargetDef) -> str:
        """The devices the target's stages use here (part of their keys; "" when none): the GPUs
        CUDA_VISIBLE_DEVICES names, else all."""
        ids = [i.strip() for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip()]
        return device_fingerprint(target, ids or None)

    def prepare(self, target: TargetDef) -> None:  # noqa: B027 - optional hook
        """Make the target runnable (e.g. build its image). Raises a ModelMatrixError (one line)
        when that fails: the target is then FAILED, unlike unavailable_reason's SKIPPED."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
