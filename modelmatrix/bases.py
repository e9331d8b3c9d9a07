"""Base images without a registry.

A target's Dockerfile starts ``FROM ${BASE_IMAGE}``; the base comes from matrix.yaml
``targets.<t>.image.base`` (default: ``image.base`` of targets/<t>/target.yaml). To build, the base
must be local, or pullable, or declared under ``images.bases`` in matrix.yaml::

    images:
      bases:
        python:3.11-slim-bookworm:            # the ref a target asks for
          suite: bookworm                     # debootstrap suite
          variant: minbase                    # debootstrap --variant
          mirror: auto                        # or a URL; auto = first http(s) URI of the host's apt sources
          tag: modelmatrix/base:bookworm-minbase

and bootstrapped once with ``invoke bases`` (debootstrap, then ``docker import`` through the SDK).
A build never bootstraps by itself: it uses the declared tag when it exists, says so, and otherwise
stops with a message naming ``invoke bases``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Matrix
from .docker_client import Engine, _split_ref
from .errors import ConfigError, DockerError, ImageMissing

APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
PULL_ANSWER_TIMEOUT_S = 20.0

#: ref -> reason, so a build tries to pull each missing base once per process.
_PULL_FAILED: dict[str, str] = {}


log = logging.getLogger(__name__)


@dataclass
class BaseInfo:
    requested: str  # the ref the target asks for
    ref: str  # the image actually used (the requested ref or its declared bootstrap tag)
    image_id: str
    source: str  # local | pulled | bootstrap
    why: str  # one sentence for the build output


def _say(msg: str, level: int = logging.INFO) -> None:
    log.log(level, "[bases] %s", msg)


# --------------------------------------------------------------------------- declarations


def target_base(matrix: Matrix, target: str) -> str:
    ref = matrix.target_cfg(target)["image"]["base"]
    if not ref:
        raise ConfigError(
            f"{matrix.path.name}: targets.{target}.image.base: empty, and "
            f"targets/{target}/target.yaml has no image.base; name the base image"
        )
    return ref


def declaration(matrix: Matrix, ref: str) -> tuple[str, dict[str, Any]] | None:
    """The ``images.bases`` entry for ``ref``: looked up by key, then by its tag."""
    decls = matrix.raw["images"]["bases"]
    if ref in decls:
        return ref, decls[ref]
    for key, decl in decls.items():
        if decl["tag"] == ref:
            return key, decl
    return None


def detect_mirror(sources_dir: Path = APT_SOURCES_DIR, sources_list: Path = APT_SOURCES_LIST) -> str | None:
    """First http(s) URI of the host's apt sources: ``*.sources`` (deb822) files, then sources.list."""
    files = sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"^\s*URIs\s*:\s*(.*)$", line, re.IGNORECASE)
            if m:
                for uri in m.group(1).split():
                    if uri.startswith(("http://", "https://")):
                        return uri
    if sources_list.is_file():
        for line in sources_list.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            rest = line[4:].strip()
            if rest.startswith("["):  # deb [arch=amd64 signed-by=...] URI suite ...
                rest = rest.split("]", 1)[1] if "]" in rest else ""
            words = rest.split()
            if words and words[0].startswith(("http://", "https://")):
                return words[0]
    return None


def mirror_of(matrix: Matrix, key: str, decl: dict[str, Any]) -> str:
    if decl["mirror"] != "auto":
        return decl["mirror"]
    mirror = detect_mirror()
    if not mirror:
        raise ConfigError(
            f"{matrix.path.name}: images.bases.{key}.mirror: 'auto' found no http(s) URI in "
            f"{APT_SOURCES_DIR}/*.sources or {APT_SOURCES_LIST}; give the mirror URL"
        )
    return mirror


# --------------------------------------------------------------------------- resolution


def resolve(matrix: Matrix, ref: str, engine: Engine, *, allow_pull: bool, where: str = "") -> BaseInfo:
    """Find the image a build FROMs. Never bootstraps; raises ImageMissing naming `invoke bases`."""
    where = where or "base image"
    local = engine.image(ref)
    if local:
        return BaseInfo(ref, ref, local["Id"], "local", f"{ref} is a local image")
    found = declaration(matrix, ref)
    if found and found[1]["tag"] == ref:
        # A bootstrap tag is local by definition: never ask a registry for it.
        raise ImageMissing(
            f"{where}: {ref} is not built; it is images.bases.{found[0]} in {matrix.path.name}: run `invoke bases`"
        )
    pull_reason = _PULL_FAILED.get(ref)
    if allow_pull and pull_reason is None:
        pull_reason = engine.pull(ref, PULL_ANSWER_TIMEOUT_S)
        if pull_reason is None:
            pulled = engine.image(ref)
            if pulled:
                return BaseInfo(ref, ref, pulled["Id"], "pulled", f"{ref} was pulled from its registry")
            pull_reason = "pulled, yet not found afterwards"
        _PULL_FAILED[ref] = pull_reason
    tried = f"pull failed: {pull_reason}" if pull_reason else "not pulled yet: `invoke build` tries once"
    if found:
        key, decl = found
        boot = engine.image(decl["tag"])
        if boot:
            why = (
                f"{ref} is not local ({tried}); using {decl['tag']}, bootstrapped from "
                f"images.bases.{key} (debootstrap {decl['suite']}, {decl['variant']})"
            )
            return BaseInfo(ref, decl["tag"], boot["Id"], "bootstrap", why)
        raise ImageMissing(
            f"{where}: {ref} is not available (not local; {tried}) and its bootstrap "
            f"{decl['tag']} (images.bases.{key}) is not built; run `invoke bases`"
        )
    raise ImageMissing(
        f"{where}: {ref} is not available (not local; {tried}); `docker load` it, or "
        f"declare it under images.bases in {matrix.path.name} (suite, mirror, tag) and run "
        "`invoke bases`"
    )


# --------------------------------------------------------------------------- bootstrap


def bootstrap(
    matrix: Matrix, base: str | dict[str, Any], force: bool = False, engine: Engine | None = None
) -> dict[str, Any]:
    """debootstrap the declared base and ``docker import`` it under its tag (atomic; tagged last)."""
    key, decl = _declaration_arg(matrix, base)
    engine = engine or Engine()
    tag = decl["tag"]
    existing = engine.image(tag)
    if existing and not force:
        _say(f"{tag} exists ({existing['Id'][7:19]}); not bootstrapping again (use --force)")
        return _bootstrap_result(key, decl, decl["mirror"], existing["Id"], created=False, seconds=0.0)
    mirror = mirror_of(matrix, key, decl)
    _check_debootstrap(matrix, key)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mm-debootstrap-", dir=os.environ.get("MM_BOOTSTRAP_TMP") or "/var/tmp"))
    try:
        rootfs = tmp / "rootfs"
        cmd = ["debootstrap", f"--variant={decl['variant']}", decl["suite"], str(rootfs), mirror]
        _say(f"{tag}: {' '.join(cmd)}")
        _run_logged(cmd, f"images.bases.{key}")
        _fixup(rootfs)
        image_id = _import(engine, rootfs, _labels(decl, mirror))
        repo, tg = _split_ref(tag)
        engine.tag(image_id, repo, tg or "latest")
    finally:
        try:  # never let cleanup replace the real (one-line) error of the bootstrap
            _unmount_below(tmp)
            shutil.rmtree(tmp)
        except (OSError, subprocess.CalledProcessError) as exc:
            _say(f"could not remove {tmp} ({exc}); remove it by hand", logging.WARNING)
    seconds = time.monotonic() - t0
    _say(f"{tag} = {image_id[7:19]} ({seconds:.0f}s)")
    return _bootstrap_result(key, decl, mirror, image_id, created=True, seconds=seconds)


def _declaration_arg(matrix: Matrix, base: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(base, dict):
        missing = [k for k in ("suite", "tag") if k not in base]
        if missing:
            raise ConfigError(f"base declaration: missing {', '.join(missing)}")
        return base["tag"], {"variant": "minbase", "mirror": "auto", **base}
    found = declaration(matrix, base)
    if not found:
        known = ", ".join(matrix.raw["images"]["bases"]) or "none"
        raise ConfigError(f"{matrix.path.name}: images.bases: no declaration for {base!r} (declared: {known})")
    return found


def _check_debootstrap(matrix: Matrix, key: str) -> None:
    if not shutil.which("debootstrap"):
        raise ConfigError(f"images.bases.{key}: debootstrap is not installed; `apt-get install debootstrap`")
    if os.geteuid() != 0:
        raise ConfigError(f"images.bases.{key}: debootstrap needs root; run `sudo invoke bases`")


def _run_logged(cmd: list[str], where: str) -> None:
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            _say(f"  {line.rstrip()}", logging.DEBUG)
    if proc.returncode != 0:
        raise DockerError(f"{where}: {cmd[0]} failed (exit {proc.returncode}): {tail[-1] if tail else ''}")


def _fixup(rootfs: Path) -> None:
    """Remove what differs between two bootstraps of the same packages (as debuerreotype-fixup does)."""
    for rel in (
        "var/log/dpkg.log",
        "var/log/bootstrap.log",
        "var/log/alternatives.log",
        "var/log/apt/history.log",
        "var/log/apt/term.log",
        "var/cache/ldconfig/aux-cache",
    ):
        (rootfs / rel).unlink(missing_ok=True)
    for rel in ("var/lib/apt/lists", "var/cache/apt/archives"):
        d = rootfs / rel
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() and p.name != "lock":
                    p.unlink()
    machine_id = rootfs / "etc/machine-id"
    if machine_id.exists():
        machine_id.write_text("")


def _labels(decl: dict[str, Any], mirror: str) -> dict[str, str]:
    return {
        "io.modelmatrix.base.suite": decl["suite"],
        "io.modelmatrix.base.variant": decl["variant"],
        "io.modelmatrix.base.mirror": mirror,
        "io.modelmatrix.base.tool": "debootstrap",
        "org.opencontainers.image.ref.name": decl["tag"],
    }


def _import(engine: Engine, rootfs: Path, labels: dict[str, str]) -> str:
    cmd = [
        "tar",
        "-C",
        str(rootfs),
        "--numeric-owner",
        "--sort=name",
        "--exclude=./dev/*",
        "--exclude=./proc/*",
        "--exclude=./sys/*",
        "-cf",
        "-",
        ".",
    ]
    changes = [f'LABEL {k}="{v}"' for k, v in sorted(labels.items())] + ['CMD ["bash"]']
    _say("docker import (through the SDK)")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as tar:
        assert tar.stdout is not None and tar.stderr is not None
        out = tar.stdout
        image_id = engine.import_tar(iter(lambda: out.read(1 << 20), b""), changes)
        err = tar.stderr.read().decode(errors="replace").strip()
    if tar.returncode != 0:
        engine.remove_image(image_id, force=True)
        raise DockerError(f"tar of the bootstrapped root failed (exit {tar.returncode}): {err[:200]}")
    return image_id


def _unmount_below(folder: Path) -> None:
    """debootstrap mounts proc/sys inside the target; an interrupted run can leave them mounted."""
    prefix = str(folder.resolve()) + "/"
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=True)


def _bootstrap_result(
    key: str, decl: dict[str, Any], mirror: str, image_id: str, created: bool, seconds: float
) -> dict[str, Any]:
    return {
        "base": key,
        "tag": decl["tag"],
        "suite": decl["suite"],
        "variant": decl["variant"],
        "mirror": mirror,
        "image_id": image_id,
        "created": created,
        "seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------- listing


def list_bases(matrix: Matrix, engine: Engine | None = None) -> list[dict[str, Any]]:
    """Every declared base and every base a target asks for, with what exists locally."""
    engine = engine or Engine()
    rows: dict[str, dict[str, Any]] = {}
    for key, decl in matrix.raw["images"]["bases"].items():
        img = engine.image(decl["tag"])
        rows[key] = {
            "base": key,
            "tag": decl["tag"],
            "suite": decl["suite"],
            "variant": decl["variant"],
            "mirror": decl["mirror"],
            "image_id": img["Id"] if img else None,
            "size": img["Size"] if img else None,
            "used_by": [],
        }
    for t in matrix.targets:
        ref = matrix.target_cfg(t)["image"]["base"]
        if not ref:
            continue
        found = declaration(matrix, ref)
        if found:
            rows[found[0]]["used_by"].append(t)
            continue
        row = rows.setdefault(
            ref,
            {
                "base": ref,
                "tag": None,
                "suite": None,
                "variant": None,
                "mirror": None,
                "image_id": None,
                "size": None,
                "used_by": [],
            },
        )
        img = engine.image(ref)
        row["image_id"], row["size"] = (img["Id"], img["Size"]) if img else (None, None)
        row["used_by"].append(t)
    return list(rows.values())
