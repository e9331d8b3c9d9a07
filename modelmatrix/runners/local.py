"""The embedded default: run a stage as a subprocess of this host's Python."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any

from .. import REPO_ROOT
from ..config import TargetDef
from ..errors import StageFailed
from ..provenance import host_environment
from .base import LogTail, Runner, StageRequest, device_reason, stage_exit_failure, stage_requires


def missing_requirements(requires: dict[str, list[str]]) -> str | None:
    """Why this host cannot run a target's code directly (checked without importing anything)."""
    for module in requires.get("modules", []):
        spec = importlib.util.find_spec(module)
        # A bare namespace package (e.g. the folder tensorrt-stubs leaves) is not the module.
        if spec is None or spec.origin is None:
            return f"python module '{module}' is not installed on this host"
    for command in requires.get("commands", []):
        if shutil.which(command) is None:
            return f"command '{command}' is not on PATH"
    return None


class LocalRunner(Runner):
    name = "local"

    def unavailable_reason(self, target: TargetDef) -> str | None:
        reason = missing_requirements(target.requires) or device_reason(target)
        return f"{reason} (local runner)" if reason else None

    def stage_unavailable_reason(self, target: TargetDef, stage: str) -> str | None:
        reason = missing_requirements(stage_requires(target, stage)) or device_reason(target, stage)
        return f"{reason} (local runner)" if reason else None

    def fingerprint(self, target: TargetDef) -> str:
        """What the stage outputs depend on besides code and inputs: the toolchain versions."""
        versions = [f"python={sys.version.split()[0]}"]
        for module in target.requires.get("modules", []):
            try:
                versions.append(f"{module}={importlib.metadata.version(module)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{module}=?")
        return "local:" + ",".join(versions)

    def provenance(self, target: TargetDef) -> dict[str, Any]:
        """``runner: local``: this host's Python and the versions of the target's modules."""
        return host_environment("local", list(target.requires.get("modules", [])), self.fingerprint(target))

    def run(self, req: StageRequest) -> str:
        spec = req.write_spec(str(req.workspace))
        env = dict(os.environ)
        # The project the target's folder belongs to (targets/<t>/ -> its parent's parent): this
        # repository, or another project's tree with its own targets/ package (tests build such).
        root = str(req.target.folder.resolve().parent.parent)
        paths = [root] + ([str(REPO_ROOT)] if root != str(REPO_ROOT) else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        tail = LogTail(req.label)
        proc = subprocess.Popen(
            [sys.executable, "-m", req.module, str(spec)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            with _suppress_lookup():
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(req.timeout_s, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.feed(line)
            code = proc.wait()
        except BaseException:
            with _suppress_lookup():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            timer.cancel()
        if timed_out.is_set():
            raise StageFailed(
                f"timed out after {req.timeout_s:g} s and was killed "
                "(raise stage_timeout_s in matrix.yaml if it needs longer)",
                tail.text(),
            )
        if code != 0:
            raise stage_exit_failure(req.label, code, tail)
        req.check_result(tail.text())
        return tail.text()


class _suppress_lookup:
    def __enter__(self) -> _suppress_lookup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return exc_type is ProcessLookupError
