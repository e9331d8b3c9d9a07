"""Base images without a registry.

A target's Dockerfile starts ``FROM ${BASE_IMAGE}``; the base comes from matrix.yaml
``targets.<t>.image.base`` (default: ``image.base`` of targets/<t>/target.yaml). To build, the base
must be local, or pullable, or declared under ``images.bases`` in matrix.yaml::

    images:
      bases:
        python:3.11-slim-bookworm:            # the ref a target asks for
          suite: bookworm                     # Debian suite
          variant: minbase                    # the only variant debuerreotype builds
          mirror: auto                        # or a URL; auto = first http(s) URI of the host's apt sources
          # timestamp: 2025-05-20T00:00:00Z   # instead of a mirror: Debian's snapshot archive at that time
          tag: modelmatrix/base:bookworm-minbase

and built once with ``invoke bases``: debuerreotype (init, minimizing-config, slimify, tar) gives a
reproducible rootfs tar whose epoch is the mirror's Release date (or the snapshot's timestamp); it
is loaded as a one-layer image with a fixed config (archive.py), so rebuilding over the same mirror
state gives the same layer diff ID and the same image ID. The labels record suite, mirror or
snapshot, epoch and the tar's sha256. A build never bootstraps by itself: it uses the declared tag
when it exists, says so, and otherwise stops with a message naming ``invoke bases``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .archive import Layer, canonical_json, iso_epoch, write_archive
from .config import Matrix
from .docker_client import Engine, _split_ref
from .errors import ConfigError, DockerError, ImageMissing
from .hashing import sha256_file

APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
PULL_ANSWER_TIMEOUT_S = 20.0
MIRROR_TIMEOUT_S = 20.0

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
    epoch: int = 315532800  # SOURCE_DATE_EPOCH of what is built on it (base_epoch)


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
        return BaseInfo(ref, ref, local["Id"], "local", f"{ref} is a local image", base_epoch(local))
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
                return BaseInfo(
                    ref, ref, pulled["Id"], "pulled", f"{ref} was pulled from its registry", base_epoch(pulled)
                )
            pull_reason = "pulled, yet not found afterwards"
        _PULL_FAILED[ref] = pull_reason
    tried = f"pull failed: {pull_reason}" if pull_reason else "not pulled yet: `invoke build` tries once"
    if found:
        key, decl = found
        boot = engine.image(decl["tag"])
        if boot:
            why = (
                f"{ref} is not local ({tried}); using {decl['tag']}, bootstrapped from "
                f"images.bases.{key} (debuerreotype {decl['suite']}, {decl['variant']})"
            )
            return BaseInfo(ref, decl["tag"], boot["Id"], "bootstrap", why, base_epoch(boot))
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
    """Build the declared base with debuerreotype and load it under its tag (tagged last).

    The rootfs tar is reproducible (debuerreotype: every mtime clamped to the epoch, sorted, no
    logs or caches) and the image is loaded from a config of ours (created = the epoch, no build
    host fields), so two runs over the same mirror state give the same layer diff ID *and* the same
    image ID: the images built on the base keep their recipe hash."""
    key, decl = _declaration_arg(matrix, base)
    engine = engine or Engine()
    tag = decl["tag"]
    existing = engine.image(tag)
    if existing and not force:
        _say(f"{tag} exists ({existing['Id'][7:19]}); not bootstrapping again (use --force)")
        return _bootstrap_result(key, decl, _source_label(existing), existing, created=False, seconds=0.0)
    _check_tools(matrix, key, decl)
    source = _source(matrix, key, decl)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mm-debuerreotype-", dir=os.environ.get("MM_BOOTSTRAP_TMP") or "/var/tmp"))
    try:
        rootfs, tar = tmp / "rootfs", tmp / "rootfs.tar"
        if "timestamp" in source:
            init = ["debuerreotype-init", str(rootfs), decl["suite"], source["timestamp"]]
        else:
            init = ["debuerreotype-init", "--non-debian", str(rootfs), decl["suite"], source["mirror"]]
        where = f"images.bases.{key}"
        for cmd in (
            init,
            ["debuerreotype-minimizing-config", str(rootfs)],
            ["debuerreotype-slimify", str(rootfs)],
            ["debuerreotype-tar", str(rootfs), str(tar)],
        ):
            _say(f"{tag}: {' '.join(cmd)}")
            _run_logged(cmd, where)
        epoch = int((rootfs / "debuerreotype-epoch").read_text().strip())
        _unmount_below(tmp)
        tar_sha = "sha256:" + sha256_file(tar)
        labels = {
            "io.modelmatrix.base.suite": decl["suite"],
            "io.modelmatrix.base.variant": decl["variant"],
            "io.modelmatrix.base.tool": f"debuerreotype {_tool_version()}",
            EPOCH_LABEL: str(epoch),
            "io.modelmatrix.base.rootfs-sha256": tar_sha,
            **{f"io.modelmatrix.base.{k}": v for k, v in source.items()},
        }
        image_id = _load_rootfs(engine, tar, tar_sha, labels, epoch, tmp)
        repo, tg = _split_ref(tag)
        engine.tag(image_id, repo, tg or "latest")
    finally:
        try:  # never let cleanup replace the real (one-line) error of the bootstrap
            _unmount_below(tmp)
            shutil.rmtree(tmp)
        except (OSError, subprocess.CalledProcessError) as exc:
            _say(f"could not remove {tmp} ({exc}); remove it by hand", logging.WARNING)
    seconds = time.monotonic() - t0
    img = engine.image(image_id) or {"Id": image_id}
    same = " (the same image as before)" if existing and existing["Id"] == image_id else ""
    _say(f"{tag} = {image_id[7:19]}, layer {tar_sha[:19]}, epoch {iso_epoch(epoch)}{same} ({seconds:.0f}s)")
    return _bootstrap_result(key, decl, _source_label(img), img, created=True, seconds=seconds)


EPOCH_LABEL = "io.modelmatrix.base.epoch"
DEFAULT_EPOCH = 315532800  # 1980-01-01, for a base that says nothing of its own


def base_epoch(image: dict[str, Any]) -> int:
    """SOURCE_DATE_EPOCH of the images built on ``image``: our bases carry it as a label (the
    mirror's Release date); any other base gives its own creation time (fixed for that image)."""
    labels = (image.get("Config") or {}).get("Labels") or {}
    if str(labels.get(EPOCH_LABEL, "")).isdigit():
        return int(labels[EPOCH_LABEL])
    created = str(image.get("Created") or "")
    with contextlib.suppress(ValueError):
        return int(datetime.fromisoformat(created[:19] + "+00:00").timestamp())
    return DEFAULT_EPOCH


def _source(matrix: Matrix, key: str, decl: dict[str, Any]) -> dict[str, str]:
    """Where the packages come from: a dated snapshot (``timestamp``) or a mirror, whose Release
    file must answer now (one line naming the URL otherwise)."""
    if decl.get("timestamp"):
        return {"snapshot": "http://snapshot.debian.org/archive/debian", "timestamp": decl["timestamp"]}
    mirror = mirror_of(matrix, key, decl).rstrip("/")
    url = f"{mirror}/dists/{decl['suite']}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=MIRROR_TIMEOUT_S) as answer:
            answer.read(1)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(
            f"{matrix.path.name}: images.bases.{key}: the mirror does not answer: {url} ({reason}); "
            "give a reachable mirror (mirror: URL) or a snapshot timestamp"
        ) from None
    return {"mirror": mirror}


def _source_label(image: dict[str, Any]) -> str:
    labels = (image.get("Config") or {}).get("Labels") or {}
    if labels.get("io.modelmatrix.base.snapshot"):
        return f"{labels['io.modelmatrix.base.snapshot']}@{labels.get('io.modelmatrix.base.timestamp', '')}"
    return str(labels.get("io.modelmatrix.base.mirror") or "")


def _tool_version() -> str:
    try:
        out = subprocess.run(["debuerreotype-version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.split()[0] if out.split() else "unknown"


def _arch() -> str:
    try:
        return subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def _load_rootfs(engine: Engine, tar: Path, diff_id: str, labels: dict[str, str], epoch: int, tmp: Path) -> str:
    """``docker load`` the rootfs tar as a one-layer image with a fixed config; returns its ID."""
    config = {
        "architecture": _arch(),
        "os": "linux",
        "created": iso_epoch(epoch),
        "config": {"Cmd": ["bash"], "Labels": labels},
        "history": [{"created": iso_epoch(epoch), "created_by": labels["io.modelmatrix.base.tool"]}],
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    archive = tmp / "base.tar"
    with open(archive, "wb") as fh:
        image_id = write_archive(fh, canonical_json(config), [Layer(diff_id, tar)], [])
    _say("docker load (through the SDK)")
    with open(archive, "rb") as fh:
        engine.load(fh)
    if not engine.image(image_id):
        raise DockerError(f"docker load of the base gave no image {image_id[:19]}")
    return image_id


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


def _check_tools(matrix: Matrix, key: str, decl: dict[str, Any]) -> None:
    if decl["variant"] != "minbase":
        raise ConfigError(
            f"{matrix.path.name}: images.bases.{key}.variant: debuerreotype builds minbase only; set variant: minbase"
        )
    if not shutil.which("debuerreotype-init"):
        raise ConfigError(
            f"images.bases.{key}: debuerreotype is not installed; `apt-get install debuerreotype debootstrap`"
        )
    if os.geteuid() != 0:
        raise ConfigError(f"images.bases.{key}: debuerreotype needs root; run `sudo invoke bases`")


def _run_logged(cmd: list[str], where: str) -> None:
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            _say(f"  {line.rstrip()}", logging.DEBUG)
    if proc.returncode != 0:
        raise DockerError(f"{where}: {cmd[0]} failed (exit {proc.returncode}): {tail[-1] if tail else ''}")


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
    key: str, decl: dict[str, Any], source: str, image: dict[str, Any], created: bool, seconds: float
) -> dict[str, Any]:
    labels = (image.get("Config") or {}).get("Labels") or {}
    layers = (image.get("RootFS") or {}).get("Layers") or []
    return {
        "base": key,
        "tag": decl["tag"],
        "suite": decl["suite"],
        "variant": decl["variant"],
        "mirror": source,
        "image_id": image["Id"],
        "diff_ids": list(layers),
        "epoch": int(labels[EPOCH_LABEL]) if str(labels.get(EPOCH_LABEL, "")).isdigit() else None,
        "rootfs_sha256": labels.get("io.modelmatrix.base.rootfs-sha256"),
        "tool": labels.get("io.modelmatrix.base.tool", "docker import (before debuerreotype)"),
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
