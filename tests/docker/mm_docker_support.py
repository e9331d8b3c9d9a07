"""Helpers shared by the docker tests (a plain module: tests/ is not a package, and a package
named ``docker`` would shadow the Docker SDK)."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from modelmatrix import REPO_ROOT
from modelmatrix.config import Matrix, load_matrix

CI_BASE = "modelmatrix/base:bookworm-minbase"  # built by `invoke bases` (debuerreotype)
BULLSEYE_BASE = "modelmatrix/base:bullseye-minbase"


def unavailable(reason: str) -> None:
    """Skip with the reason - except under CI=true, where the docker tests must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the docker tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- throwaway targets

STAGES = {
    "noop.py": """
        from targets.common.contract import main
        if __name__ == "__main__":
            main(lambda spec: {"ok": True})
        """,
    "crash.py": """
        from targets.common.contract import main

        def run(spec):
            print("about to crash", flush=True)
            raise RuntimeError("boom from mmtest.crash")

        if __name__ == "__main__":
            main(run)
        """,
    "hang.py": """
        import time
        from targets.common.contract import main

        def run(spec):
            print("hanging now", flush=True)
            time.sleep(3600)

        if __name__ == "__main__":
            main(run)
        """,
    "nothing.py": """
        print("doing nothing, writing nothing")
        """,
    "probe.py": """
        import os, socket
        from targets.common.contract import atomic_write_bytes, main

        def run(spec):
            facts = {"uid": os.getuid(), "gid": os.getgid(), "home": os.environ.get("HOME"),
                     "input": spec.input("data").read_text()}
            try:
                (spec.root / "intruder.txt").write_text("x")
                facts["workspace_writable"] = True
            except OSError as exc:
                facts["workspace_writable"], facts["workspace_errno"] = False, exc.errno
            facts["interfaces"] = sorted(os.listdir("/sys/class/net"))
            try:
                socket.create_connection(("1.1.1.1", 53), timeout=2).close()
                facts["network"] = True
            except OSError:
                facts["network"] = False
            for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
                if os.path.exists(p):
                    facts["memory_limit"] = open(p).read().strip()
                    break
            atomic_write_bytes(spec.output("owned.txt"), b"mine")
            return facts

        if __name__ == "__main__":
            main(run)
        """,
    "harden.py": """
        import os, sys
        from targets.common.contract import atomic_write_bytes, main

        def status(name):
            for line in open("/proc/self/status"):
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()

        def run(spec):
            facts = {"cap_eff": status("CapEff"), "cap_bnd": status("CapBnd"),
                     "no_new_privs": status("NoNewPrivs"), "home": os.environ.get("HOME"),
                     "dont_write_bytecode": sys.dont_write_bytecode}
            for p in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"):
                if os.path.exists(p):
                    facts["pids_max"] = open(p).read().strip()
                    break
            for path in ("/opt/modelmatrix/intruder.txt", "/intruder.txt"):
                try:
                    open(path, "w").close()
                    facts[path] = "written"
                except OSError as exc:
                    facts[path] = exc.errno
            with open("/tmp/scratch.txt", "w") as fh:
                fh.write("tmp is writable")
            facts["tmp"] = open("/tmp/scratch.txt").read()
            facts["mounts"] = {f[1]: [f[2], f[3].split(",")] for f in
                               (line.split() for line in open("/proc/self/mounts")) if f[1] in ("/", "/tmp")}
            atomic_write_bytes(spec.output("owned.txt"), b"mine")
            return facts

        if __name__ == "__main__":
            main(run)
        """,
}


def make_project(
    root: Path, name: str, dockerfile: str, base: str, stages: dict | None = None, memory_limit: str = "1g"
) -> Matrix:
    """A throwaway project (targets/, images/, matrix.yaml) with one target ``name`` whose stages
    are ``stages`` (file name -> code; default :data:`STAGES`; empty: the no-op stage only)."""
    targets = root / "targets"
    if not (targets / "common").is_dir():
        shutil.copytree(
            REPO_ROOT / "targets" / "common", targets / "common", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copyfile(REPO_ROOT / "targets" / "__init__.py", targets / "__init__.py")
    tdir = targets / name
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "__init__.py").write_text("")
    # a target manifest declares at least one stage: "no stages" means just the no-op one
    stages = STAGES if stages is None else stages or {"noop.py": STAGES["noop.py"]}
    for fname, text in stages.items():
        (tdir / fname).write_text(textwrap.dedent(text).lstrip())
    write_yaml(tdir / "target.yaml", {"name": name, "image": {"base": base}, "stages": {f[:-3]: {} for f in stages}})
    (root / "images" / name).mkdir(parents=True, exist_ok=True)
    (root / "images" / name / "Dockerfile").write_text(textwrap.dedent(dockerfile).lstrip())
    path = write_yaml(
        root / f"matrix-{name}.yaml",
        {
            "workspace": str(root / "ws"),
            "verify": {"reference": name},
            "images": {"memory_limit": memory_limit},
            "targets": {name: {}},
        },
    )
    return load_matrix(path, targets_dir=targets)


ON_TOP = """
    ARG BASE_IMAGE=modelmatrix/onnxruntime
    FROM ${BASE_IMAGE}
    COPY targets /opt/modelmatrix/targets
    """


def stage_request(
    m: Matrix, target: str, stage: str, ws: Path, out: str, timeout_s: float = 120, inputs: dict | None = None
):
    """A StageRequest for ``target.stage`` writing to ``ws/out`` (created here, as the pipeline does)."""
    from modelmatrix.runners.base import StageRequest

    (ws / out).mkdir(parents=True, exist_ok=True)
    return StageRequest(m.targets[target], stage, ws, inputs or {}, out, timeout_s=timeout_s)
