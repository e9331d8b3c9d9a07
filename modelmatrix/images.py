"""Target images: recipes -> content-addressed tags, builds through the Docker SDK, ship/load/push.

A target's *recipe* is its build context, assembled here (never the repo root):

    Dockerfile                    images/<t>/Dockerfile
    <other files>                 the rest of images/<t>/ (e.g. requirements.txt)
    targets/__init__.py, targets/common/**, targets/<t>/**     the code that runs in the image
    targets/<u>/**                every target <u> whose target.yaml says ``image: {use: <t>}``: it
                                  runs in this image (onnxruntime_int8 in onnxruntime's), so its
                                  code is part of the recipe and of the image ID its keys hold
    .mm/ca/extra-ca.pem           the extra CA bundle for pip/apt in the builder stage (empty: none)
    .mm/wheels/*                  wheelhouse files the recipe's requirements.txt names

plus its build args and the resolved base image ID. The tar is normalised (sorted, fixed mtime,
modes 644/755, owner 0), and ``sha256`` over (path, mode, content) of every file, the build args
and the base ID is the recipe hash. The image is tagged ``modelmatrix/<t>:<hash[:16]>``: an
unchanged recipe finds its tag locally and is not rebuilt; any change gives a new tag.

Build: the context is built untagged (streaming the log with a step display), the toolchain
versions are read from /opt/modelmatrix/versions.json inside that image, a label-only build adds
the labels, and only then is the result tagged: a failed build leaves no tag.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from targets.common.contract import atomic_write, atomic_write_bytes

from . import REPO_ROOT, __version__
from .archive import (
    Layer,
    Saved,
    canonical_json,
    iso_epoch,
    layer_differences,
    normalized_config,
    unpack_save,
    write_gzip_archive,
)
from .bases import BaseInfo, resolve, target_base
from .config import Matrix, TargetDef, discover_targets
from .docker_client import Engine
from .errors import BuildFailed, ConfigError, DataError, DockerError, ImageMissing, UserFileMissing
from .lock import explain_build_failure

IMAGE_NAMESPACE = "modelmatrix"
RECIPE_SCHEMA = "modelmatrix-recipe-1"
CONTEXT_MTIME = 315532800  # 1980-01-01T00:00:00Z: fixed mtime of every context entry
VERSIONS_PATH = "/opt/modelmatrix/versions.json"
CA_ARCNAME = ".mm/ca/extra-ca.pem"
WHEELS_DIR = ".mm/wheels"
#: user-supplied files (targets/<t>/target.yaml image.files), streamed into the context here
USER_FILES_DIR = ".mm/files"
#: a declared sha256 of 64 zeros: not recorded yet (the build refuses the file until it is)
UNRECORDED_SHA256 = "0" * 64
CA_ENV_VARS = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
log = logging.getLogger(__name__)

PROXY_ARGS = {"http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy"}
SKIP_NAMES = ("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".DS_Store")
BUILD_TAIL_LINES = 80
LABEL_PREFIX = "io.modelmatrix."
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _say(target: str, msg: str, level: int = logging.INFO) -> None:
    log.log(level, "[%s] %s", target, msg)


# --------------------------------------------------------------------------- inputs


def ca_bundle(matrix: Matrix) -> Path | None:
    """images.ca_bundle: "auto" = first of $PIP_CERT/$SSL_CERT_FILE/$REQUESTS_CA_BUNDLE naming a file,
    null = none, else a path (relative to matrix.yaml)."""
    value = matrix.raw["images"]["ca_bundle"]
    if value is None:
        return None
    if value == "auto":
        for var in CA_ENV_VARS:
            found = os.environ.get(var)
            if found and Path(found).is_file():
                return Path(found)
        return None
    path = matrix.resolve(value)
    if not path.is_file():
        raise ConfigError(
            f"{matrix.path.name}: images.ca_bundle: {path} is not a file; give a PEM bundle, 'auto' or null"
        )
    return path


def wheelhouses(matrix: Matrix) -> list[Path]:
    """images.wheelhouses (relative to matrix.yaml; each must exist) plus the local folders of $PIP_FIND_LINKS."""
    out: list[Path] = []
    for i, entry in enumerate(matrix.raw["images"]["wheelhouses"]):
        path = matrix.resolve(entry)
        if not path.is_dir():
            raise ConfigError(f"{matrix.path.name}: images.wheelhouses[{i}]: {path} is not a folder")
        out.append(path)
    for entry in os.environ.get("PIP_FIND_LINKS", "").split():
        entry = entry.removeprefix("file://")
        if "://" not in entry and Path(entry).is_dir():
            out.append(Path(entry))
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path) -> dict[str, str | None]:
    """Normalised package name -> pinned version (``==``) or None, from a requirements file."""
    if not path.is_file():
        return {}
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(?:===?\s*([^\s;,]+))?", line)
        if m:
            out[_norm(m.group(1))] = m.group(3)
    return out


def select_wheels(dirs: list[Path], requirements: dict[str, str | None]) -> list[Path]:
    """Wheelhouse files the requirements name (and, when pinned, at that version); first folder wins."""
    chosen: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted(folder.glob("*.whl")):
            parts = path.name[:-4].split("-")
            if len(parts) < 5:
                continue
            name, version = _norm(parts[0]), parts[1]
            if name not in requirements:
                continue
            pinned = requirements[name]
            if pinned and version != pinned and ("+" in pinned or version.split("+")[0] != pinned):
                continue
            chosen.setdefault(path.name, path)
    return [chosen[k] for k in sorted(chosen)]


def user_build_args(matrix: Matrix, target: str) -> dict[str, str]:
    """targets.<t>.image.build_args; proxies are refused (they would land in the image history)."""
    args = dict(matrix.target_cfg(target)["image"]["build_args"])
    for key in args:
        if key.lower() in PROXY_ARGS:
            raise ConfigError(
                f"{matrix.path.name}: targets.{target}.image.build_args.{key}: proxy settings "
                "are not recipe inputs; configure the Docker daemon's proxy instead"
            )
        if key == "BASE_IMAGE":
            raise ConfigError(
                f"{matrix.path.name}: targets.{target}.image.build_args.BASE_IMAGE: set "
                f"targets.{target}.image.base instead"
            )
    return args


# --------------------------------------------------------------------------- image.use


def image_owner(matrix: Matrix, target: str) -> TargetDef:
    """The target whose image ``target`` runs in: itself, or the one its ``image.use`` names (one
    level: the named target must have an image of its own). It need not be in the matrix."""
    tdef = matrix.targets[target]
    use = tdef.image.get("use")
    if not use:
        return tdef
    where = f"targets/{target}/target.yaml: image.use"
    owner = matrix.targets.get(use) or discover_targets(tdef.folder.parent).get(use)
    if owner is None or use == target:
        raise ConfigError(
            f"{where}: {use!r} is not another target (a folder targets/<name>/ with a "
            "target.yaml); name the target whose image this one runs in"
        )
    if owner.image.get("use"):
        raise ConfigError(
            f"{where}: {use!r} itself uses {owner.image['use']!r}'s image; name {owner.image['use']!r} directly"
        )
    return owner


def image_users(owner: TargetDef) -> list[TargetDef]:
    """Every target on disk (not only the matrix's) that runs in ``owner``'s image, by name."""
    return [t for _, t in sorted(discover_targets(owner.folder.parent).items()) if t.image.get("use") == owner.name]


def _owner_base(matrix: Matrix, owner: TargetDef) -> str:
    """The owner's base: its stanza's when it is in the matrix, else its manifest's."""
    if owner.name in matrix.raw["targets"]:
        return target_base(matrix, owner.name)
    if not owner.image.get("base"):
        raise ConfigError(f"targets/{owner.name}/target.yaml: image.base: empty; name the base image")
    return str(owner.image["base"])


# --------------------------------------------------------------------------- context and hash


def _skipped(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in SKIP_NAMES)


def _tree(root: Path, prefix: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        rel = Path(dirpath).relative_to(root)
        for fname in sorted(filenames):
            if not _skipped(fname):
                out[str(Path(prefix) / rel / fname)] = Path(dirpath) / fname
    return out


def _snapshot(files: dict[str, Path]) -> dict[str, Path | bytes]:
    """Read source files now, so the hash and the tar see the same bytes even if a file is being
    edited meanwhile; executables stay Paths (their mode matters) as do big files (wheels)."""
    return {arc: src if os.access(src, os.X_OK) else src.read_bytes() for arc, src in files.items()}


def context_files(
    target: TargetDef, ca: Path | None, wheels: list[Path], users: Iterable[TargetDef] = ()
) -> dict[str, Path | bytes]:
    """The build context of a target, arcname -> source file (or bytes); ``users``: the targets
    that run in its image (their code is copied beside its own)."""
    image_dir = target.dockerfile.parent
    if not target.dockerfile.is_file():
        raise ConfigError(f"{target.dockerfile}: not found; every target needs images/{target.name}/Dockerfile")
    targets_dir = target.folder.parent
    files: dict[str, Path | bytes] = {"Dockerfile": target.dockerfile.read_bytes()}
    for arc, src in _snapshot(_tree(image_dir, "")).items():
        if arc == "Dockerfile":
            continue
        if arc.split("/")[0] in ("targets", ".mm"):
            raise ConfigError(
                f"{image_dir / arc}: images/{target.name}/{arc.split('/')[0]} clashes with "
                "the assembled context; rename it"
            )
        files[arc] = src
    if (targets_dir / "__init__.py").is_file():
        files["targets/__init__.py"] = (targets_dir / "__init__.py").read_bytes()
    files.update(_snapshot(_tree(targets_dir / "common", "targets/common")))
    files.update(_snapshot(_tree(target.folder, f"targets/{target.name}")))
    for user in users:
        files.update(_snapshot(_tree(user.folder, f"targets/{user.name}")))
    files[CA_ARCNAME] = ca.read_bytes() if ca else b""
    for wheel in wheels:
        files[f"{WHEELS_DIR}/{wheel.name}"] = wheel
    return dict(sorted(files.items()))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(src: Path | bytes) -> str:
    if isinstance(src, bytes):
        return hashlib.sha256(src).hexdigest()
    st = src.stat()
    key = (str(src.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(src, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _mode(src: Path | bytes) -> int:
    return 0o755 if isinstance(src, Path) and os.access(src, os.X_OK) else 0o644


def recipe_hash(
    files: dict[str, Path | bytes], build_args: dict[str, str], base_id: str, declared: dict[str, str] | None = None
) -> str:
    """``declared``: arcname -> sha256 of the user-supplied files (image.files): hashed by their
    declared digest, so the tag is known without the files (only a build needs them)."""
    h = hashlib.sha256(RECIPE_SCHEMA.encode() + b"\n")
    for arc in sorted(files):
        h.update(f"{arc}\0{_mode(files[arc]):o}\0{_sha256(files[arc])}\n".encode())
    for arc, digest in sorted((declared or {}).items()):
        h.update(f"{arc}\0user-file\0{digest}\n".encode())
    h.update(b"build-args\0" + json.dumps(build_args, sort_keys=True).encode() + b"\n")
    h.update(b"base-id\0" + base_id.encode() + b"\n")
    return h.hexdigest()


def _dirs_of(arcnames: Iterable[str]) -> list[str]:
    dirs = {WHEELS_DIR, ".mm/ca", ".mm"}
    for arc in arcnames:
        parts = arc.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs)


def write_context(files: dict[str, Path | bytes], fileobj: IO[bytes]) -> None:
    """A normalised tar of the context: sorted, fixed mtime, owner 0, modes 644/755."""
    entries = [(d, None) for d in _dirs_of(files)] + sorted(files.items())
    entries.sort(key=lambda e: e[0])
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for arc, src in entries:
            info = tarfile.TarInfo(arc)
            info.mtime, info.uid, info.gid, info.uname, info.gname = CONTEXT_MTIME, 0, 0, "", ""
            if src is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif isinstance(src, bytes):
                info.size, info.mode = len(src), 0o644
                tf.addfile(info, io.BytesIO(src))
            else:
                info.size, info.mode = src.stat().st_size, _mode(src)
                with open(src, "rb") as fh:
                    tf.addfile(info, fh)


# --------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    target: str
    dockerfile: Path
    files: dict[str, Path | bytes]
    build_args: dict[str, str]  # the user's (hashed); the builder also gets BASE_IMAGE
    base: BaseInfo
    ca: Path | None
    wheels: list[Path] = field(default_factory=list)
    hash: str = ""
    declared: dict[str, str] = field(default_factory=dict)  # user files: arcname -> sha256

    @property
    def repository(self) -> str:
        return f"{IMAGE_NAMESPACE}/{self.target}"

    @property
    def tag_name(self) -> str:
        return self.hash[:16]

    @property
    def tag(self) -> str:
        return f"{self.repository}:{self.tag_name}"

    def builder_args(self) -> dict[str, str]:
        """Build args as sent to the engine: FROM the base by ID, so the builder never pulls."""
        return {**self.build_args, "BASE_IMAGE": self.base.image_id, "SOURCE_DATE_EPOCH": str(self.base.epoch)}

    @property
    def ca_label(self) -> str:
        return f"sha256:{_sha256(self.files[CA_ARCNAME])}" if self.ca else "none"


def plan(matrix: Matrix, target: str, base: BaseInfo) -> Recipe:
    """The recipe of a target's image once its base is resolved (no engine needed); for a target
    with ``image.use``, the used target's recipe (its repository and tag)."""
    tdef = image_owner(matrix, target)
    ca = ca_bundle(matrix)
    reqs = read_requirements(tdef.dockerfile.parent / "requirements.txt")
    wheels = select_wheels(wheelhouses(matrix), reqs) if reqs else []
    files = context_files(tdef, ca, wheels, image_users(tdef))
    args = user_build_args(matrix, tdef.name) if tdef.name in matrix.raw["targets"] else {}
    declared = {f"{USER_FILES_DIR}/{f['filename']}": f["sha256"] for f in tdef.image.get("files") or []}
    return Recipe(
        tdef.name,
        tdef.dockerfile,
        files,
        args,
        base,
        ca,
        wheels,
        recipe_hash(files, args, base.image_id, declared),
        declared,
    )


def user_files(matrix: Matrix, target: str, given: dict[str, str] | None = None) -> dict[str, Path]:
    """arcname -> path of each file the target's image.files declares, checked before a build
    starts: the path from ``given`` (``invoke build --file name=PATH``) or the stanza's
    ``image.files.<name>``; it must exist and have the declared sha256 (hashed once: a persisted
    cache keyed by path, size and mtime, workspace/.cache/user-files.json). Anything else is one
    line naming the file, the expected sha256 and where to get it."""
    from .hashing import HashCache

    tdef = image_owner(matrix, target)
    declared = list(tdef.image.get("files") or [])
    given = dict(given or {})
    names = [f["name"] for f in declared]
    for name in given:
        if name not in names:
            raise ConfigError(
                f"--file {name}=...: targets/{tdef.name}/target.yaml declares no such file "
                f"(image.files: {', '.join(names) or 'none'})"
            )
    if not declared:
        return {}
    stanza = (
        (matrix.target_cfg(tdef.name).get("image") or {}).get("files") or {}
        if tdef.name in matrix.raw["targets"]
        else {}
    )
    cache = HashCache(matrix.workspace / ".cache" / "user-files.json")
    out: dict[str, Path] = {}
    for f in declared:
        what = (
            f"{f['filename']} (targets/{tdef.name}/target.yaml image.files {f['name']}, sha256 "
            f"{f['sha256']}; get it from {f['where']})"
        )
        raw = given.get(f["name"]) or stanza.get(f["name"])
        if not raw:
            raise UserFileMissing(
                f"{tdef.name}: the build needs {what}: pass --file {f['name']}=PATH "
                f"(or targets.{tdef.name}.image.files.{f['name']} in matrix.yaml)"
            )
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else (Path.cwd() / path if f["name"] in given else matrix.resolve(path))
        if f["sha256"] == UNRECORDED_SHA256:
            raise ConfigError(
                f"targets/{tdef.name}/target.yaml: image.files {f['name']}: no sha256 recorded "
                f"for {f['filename']} (64 zeros); put the sha256 of your verified download "
                f"(`sha256sum {path}`) there; it comes from {f['where']}"
            )
        if not path.is_file():
            raise ConfigError(f"{path}: not found; the build needs {what}")
        digest = cache.file(path)
        if digest != f["sha256"]:
            raise ConfigError(
                f"{path}: sha256 {digest} is not the expected {f['sha256']} of {f['filename']} "
                f"(targets/{tdef.name}/target.yaml image.files {f['name']}); get the right file "
                f"from {f['where']}"
            )
        out[f"{USER_FILES_DIR}/{f['filename']}"] = path
    try:
        cache.save()
    except OSError as exc:
        log.debug("could not save the user-file hash cache %s: %s", cache.path, exc)
    return out


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def image_labels(recipe: Recipe, versions: dict[str, Any]) -> dict[str, str]:
    labels = {
        "org.opencontainers.image.title": f"modelmatrix {recipe.target}",
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.base.digest": recipe.base.image_id,
        LABEL_PREFIX + "target": recipe.target,
        LABEL_PREFIX + "recipe-hash": recipe.hash,
        LABEL_PREFIX + "base-id": recipe.base.image_id,
        LABEL_PREFIX + "ca-bundle": recipe.ca_label,
        LABEL_PREFIX + "wheelhouse": ",".join(w.name for w in recipe.wheels) or "none",
        LABEL_PREFIX + "versions": json.dumps(versions, sort_keys=True, separators=(",", ":")),
    }
    if recipe.declared:
        labels[LABEL_PREFIX + "user-files"] = ",".join(
            f"{arc.rsplit('/', 1)[-1]}=sha256:{d}" for arc, d in sorted(recipe.declared.items())
        )
    # Only what the recipe hash covers: the tag is shared by every build of the recipe, so a label
    # of how the base was named (python:3.11-slim-bookworm or its bootstrap tag), of the clone's
    # path or of its git HEAD would make two builds of one tag differ (found by verify-image); the
    # shipped manifest records those.
    source = _git("remote", "get-url", "origin")
    if source and re.match(r"^(https?|ssh|git)://|^[\w.-]+@[\w.-]+:", source):  # a URL, not a local clone
        labels["org.opencontainers.image.source"] = source
    labels[LABEL_PREFIX + "source-date-epoch"] = str(recipe.base.epoch)
    return labels


# --------------------------------------------------------------------------- status


def _engine(engine: Engine | None) -> Engine:
    return engine or Engine()


def _empty_row(target: str) -> dict[str, Any]:
    return {
        "target": target,
        "tag": None,
        "recipe_hash": None,
        "image_id": None,
        "size": None,
        "up_to_date": False,
        "base": None,
        "base_source": None,
        "versions": {},
        "other_tags": [],
        "problem": None,
    }


def _recipe_row(recipe: Recipe, engine: Engine) -> dict[str, Any]:
    row = _empty_row(recipe.target)
    row.update(tag=recipe.tag, recipe_hash=recipe.hash, base=recipe.base.ref, base_source=recipe.base.source)
    img = engine.image(recipe.tag)
    if img:
        labels = img["Config"].get("Labels") or {}
        row.update(
            image_id=img["Id"],
            size=img["Size"],
            up_to_date=True,
            versions=json.loads(labels.get(LABEL_PREFIX + "versions", "{}")),
        )
    else:
        row["problem"] = f"{recipe.tag} is not built; run `invoke build --target {recipe.target}`"
    return _with_other_tags(row, engine)


def image_status(matrix: Matrix, target_name: str, engine: Engine | None = None) -> dict[str, Any]:
    """Where a target's image stands. Never pulls or builds; problems go in ``problem``."""
    engine = _engine(engine)
    row = _empty_row(target_name)
    try:
        owner = image_owner(matrix, target_name).name
        row["base"] = _owner_base(matrix, image_owner(matrix, target_name))
        base = resolve(matrix, row["base"], engine, allow_pull=False, where=f"targets.{owner}.image.base")
        recipe = plan(matrix, target_name, base)
    except (ImageMissing, ConfigError) as exc:
        row.update(problem=str(exc), base_source="missing")
        return _with_other_tags(row, engine)
    return _used_by(_recipe_row(recipe, engine), target_name)


def _used_by(row: dict[str, Any], target_name: str) -> dict[str, Any]:
    """A row of the used image, shown under the using target's name (``uses``: whose image it is)."""
    if row["target"] != target_name:
        row = {**row, "target": target_name, "uses": row["target"]}
    return row


def _with_other_tags(row: dict[str, Any], engine: Engine) -> dict[str, Any]:
    repo = f"{IMAGE_NAMESPACE}/{row['target']}"
    for img in engine.images(f"{LABEL_PREFIX}target={row['target']}"):
        for tag in img.get("RepoTags") or []:
            if tag.startswith(repo + ":") and tag != row["tag"]:
                row["other_tags"].append(tag)
    row["other_tags"].sort()
    return row


def list_images(matrix: Matrix, engine: Engine | None = None) -> list[dict[str, Any]]:
    engine = _engine(engine)
    return [image_status(matrix, t, engine) for t in matrix.targets]


# --------------------------------------------------------------------------- building


class BuildStream:
    """Consumes the engine's decoded build messages: a step display, a tail, the image ID."""

    def __init__(self, target: str, dockerfile: str, lines: int = BUILD_TAIL_LINES):
        self.target, self.dockerfile = target, dockerfile
        self.step = ""
        self.step_lines: deque[str] = deque(maxlen=lines)
        self.image_id: str | None = None
        self._partial = ""

    def consume(self, chunks: Iterable[dict[str, Any]]) -> str:
        for chunk in chunks:
            if "error" in chunk:
                self._flush()
                raise self._failure(str(chunk.get("error") or chunk.get("errorDetail")))
            if isinstance(chunk.get("aux"), dict) and chunk["aux"].get("ID"):
                self.image_id = chunk["aux"]["ID"]
            if "stream" in chunk:
                self._text(str(chunk["stream"]))
            elif "status" in chunk:
                self._line(f"{chunk['status']} {chunk.get('progress', '')}".rstrip())
        self._flush()
        if not self.image_id:
            raise BuildFailed(f"{self.dockerfile}: the engine finished without an image ID", self.tail())
        return self.image_id

    def _text(self, text: str) -> None:
        text = self._partial + text.replace("\r\n", "\n").replace("\r", "\n")
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._line(line)

    def _flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, line: str) -> None:
        line = ANSI_ESCAPE.sub("", line)  # the classic builder colours stderr red
        m = re.match(r"^Step (\d+/\d+) : (.*)$", line)
        if m:
            self.step = f"step {m.group(1)} ({_shorten(m.group(2), 100)})"
            self.step_lines.clear()
            self.step_lines.append(line)
            _say(self.target, f"Step {m.group(1)} : {_shorten(m.group(2), 160)}")
            return
        if not line.strip():
            return
        self.step_lines.append(line)
        if not re.match(r"^( ---> Running in |Removing intermediate container )", line):
            _say(self.target, f"  {line}", logging.DEBUG)

    def tail(self) -> str:
        return "\n".join(self.step_lines)

    def _failure(self, error: str) -> BuildFailed:
        error = error.strip().splitlines()[0] if error.strip() else "unknown error"
        code = re.search(r"returned a non-zero code: (\d+)", error)
        what = f"exited {code.group(1)}" if code else _shorten(error, 200)
        output = [ln for ln in list(self.step_lines)[1:] if not re.match(r"^( ---> |Removing interm)", ln)]
        last = f"; last output: {_shorten(output[-1].strip(), 200)}" if output else ""
        where = self.step or "the build"
        stale = explain_build_failure(output, str(Path(self.dockerfile).parent / "requirements.txt"))
        if stale:  # a pin the lock or the mirror no longer honours: say which, not pip's 30 lines
            return BuildFailed(f"{self.dockerfile}: {where} failed: {stale}", self.tail())
        return BuildFailed(f"{self.dockerfile}: {where} failed: {what}{last}", self.tail())


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _build_context(
    engine: Engine,
    files: dict[str, Path | bytes],
    *,
    buildargs: dict[str, str],
    labels: dict[str, str],
    stream: BuildStream,
    nocache: bool = False,
) -> str:
    with tempfile.TemporaryFile(prefix="mm-context-") as ctx:
        write_context(files, ctx)
        ctx.seek(0)
        return stream.consume(engine.build(ctx, buildargs=buildargs, labels=labels, nocache=nocache))


def _versions(engine: Engine, image_id: str, recipe: Recipe) -> dict[str, Any]:
    raw = engine.read_file(image_id, VERSIONS_PATH)
    where = _rel(recipe.dockerfile)
    if raw is None:
        raise BuildFailed(
            f"{where}: the image has no {VERSIONS_PATH}; its last stage must write the "
            "toolchain versions there (images/README.md)"
        )
    try:
        versions = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BuildFailed(f"{where}: {VERSIONS_PATH} is not valid JSON ({exc})") from None
    if not isinstance(versions, dict):
        raise BuildFailed(f"{where}: {VERSIONS_PATH} must hold a JSON object (name -> version)")
    return versions


def build(
    matrix: Matrix,
    target_name: str,
    *,
    force: bool = False,
    engine: Engine | None = None,
    allow_pull: bool = True,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Build a target's image unless its tag exists (``force``: rebuild without the layer cache).

    ``allow_pull``: try the registry once for a base that is not local (`invoke build`); the matrix
    run passes False, so a no-op run never waits on a registry and never switches bases under you."""
    engine = _engine(engine)
    t0 = time.monotonic()
    ref = _owner_base(matrix, image_owner(matrix, target_name))
    base = resolve(
        matrix, ref, engine, allow_pull=allow_pull, where=f"targets.{image_owner(matrix, target_name).name}.image.base"
    )
    _say(target_name, f"base {base.ref} ({base.image_id[7:19]}): {base.why}")
    recipe = plan(matrix, target_name, base)
    _say(
        target_name,
        f"recipe {recipe.hash[:16]}: {len(recipe.files)} context files, CA bundle "
        f"{recipe.ca or 'none'}, wheels {', '.join(w.name for w in recipe.wheels) or 'none'}",
    )
    existing = engine.image(recipe.tag)
    if existing and not force:
        _say(target_name, f"{recipe.tag} is up to date (recipe unchanged); not rebuilding")
        return _used_by(_result(recipe, engine, built=False, seconds=time.monotonic() - t0), target_name)
    supplied = user_files(matrix, target_name, files)  # checked before the engine sees anything
    final_id, versions = _build_image(engine, recipe, supplied, nocache=force)
    engine.tag(final_id, recipe.repository, recipe.tag_name)
    if existing and existing["Id"] != final_id:
        _drop_untagged(engine, existing["Id"], target_name)
    seconds = time.monotonic() - t0
    out = _used_by(_result(recipe, engine, built=True, seconds=seconds), target_name)
    _say(
        target_name,
        f"built {recipe.tag} ({final_id[7:19]}, {out['size'] / 1e6:.0f} MB) in {seconds:.0f}s; "
        f"versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}",
    )
    return out


def _build_image(
    engine: Engine, recipe: Recipe, supplied: dict[str, Path], *, nocache: bool
) -> tuple[str, dict[str, Any]]:
    """Build the recipe (``nocache``: every step runs again), then add the labels; the image is
    left untagged. Returns (image ID, versions)."""
    where = _rel(recipe.dockerfile)
    stream = BuildStream(recipe.target, where)
    image_id = _build_context(
        engine, {**recipe.files, **supplied}, buildargs=recipe.builder_args(), labels={}, stream=stream, nocache=nocache
    )
    versions = _versions(engine, image_id, recipe)
    final_id = _build_context(
        engine,
        {"Dockerfile": f"FROM {image_id}\n".encode()},
        buildargs={},
        labels=image_labels(recipe, versions),
        stream=BuildStream(recipe.target, f"{where} (labels)", False),
    )
    return final_id, versions


def _drop_untagged(engine: Engine, image_id: str, target: str) -> None:
    img = engine.image(image_id)
    if img and not img.get("RepoTags"):
        try:
            engine.remove_image(image_id)
        except DockerError as exc:
            _say(target, f"note: the previous image {image_id[7:19]} was kept: {exc}")


def _result(recipe: Recipe, engine: Engine, *, built: bool, seconds: float) -> dict[str, Any]:
    row = _recipe_row(recipe, engine)
    row.update(built=built, seconds=round(seconds, 1))
    return row


# --------------------------------------------------------------------------- ship / load / push


def _current(matrix: Matrix, target: str, engine: Engine) -> dict[str, Any]:
    row = image_status(matrix, target, engine)
    if not row["up_to_date"]:
        raise ImageMissing(row["problem"] or f"{target}: no image; run `invoke build --target {target}`")
    return row


def ship(
    matrix: Matrix, target_name: str, out_dir: str | Path, engine: Engine | None = None, compresslevel: int = 3
) -> Path:
    """The current image as a deterministic ``.tar.gz`` (archive.py: the same layers and labels give
    the same bytes) plus a manifest JSON next to it: image and layer IDs, the archive's sha256, the
    recipe's inputs and an SBOM (dpkg packages and a CycloneDX list of the Python packages, read
    from the shipped layers themselves)."""
    engine = _engine(engine)
    row = _current(matrix, target_name, engine)
    img = engine.image(row["image_id"])
    if img is None:
        raise ImageMissing(
            f"{target_name}: image {row['image_id'][7:19]} vanished from the engine; "
            f"run `invoke build --target {target_name}`"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{IMAGE_NAMESPACE}-{target_name}-{row['recipe_hash'][:16]}"
    archive = out_dir / f"{stem}.tar.gz"
    recipe = plan(matrix, target_name, _base_of(matrix, target_name, engine))
    with _saved(engine, row["image_id"], out_dir) as saved:
        config = shipped_config(saved.config, img)
        box: dict[str, Any] = {}

        def write(raw: IO[bytes]) -> None:
            box["id"], box["sha"], box["size"] = write_gzip_archive(
                raw, config, saved.layers, [row["tag"]], compresslevel
            )

        atomic_write(archive, write)
        sbom = sbom_of(saved.layers, row["tag"], _epoch_of(img))
    manifest = {
        "schema": 2,
        "target": target_name,
        "tag": row["tag"],
        "image_id": box["id"],  # the ID `docker load` of the archive gives (its config is normalised)
        "built_image_id": row["image_id"],  # the builder's ID here (its config holds build times)
        "diff_ids": list(img["RootFS"].get("Layers") or []),
        "labels": img["Config"].get("Labels") or {},
        "size": img["Size"],
        "recipe_hash": row["recipe_hash"],
        "recipe_inputs": recipe_inputs(recipe),
        "versions": row["versions"],
        "archive": archive.name,
        "archive_sha256": box["sha"],
        "archive_bytes": box["size"],
        "sbom": sbom,
        "shipped_from": {"git_revision": _git("rev-parse", "HEAD"), "engine": engine.address},
        "modelmatrix_version": __version__,
    }
    _atomic_text(out_dir / f"{stem}.manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return archive


def _base_of(matrix: Matrix, target_name: str, engine: Engine) -> BaseInfo:
    owner = image_owner(matrix, target_name)
    return resolve(
        matrix, _owner_base(matrix, owner), engine, allow_pull=False, where=f"targets.{owner.name}.image.base"
    )


def _epoch_of(img: dict[str, Any]) -> int:
    value = str(((img.get("Config") or {}).get("Labels") or {}).get(LABEL_PREFIX + "source-date-epoch", ""))
    return int(value) if value.isdigit() else CONTEXT_MTIME


def shipped_config(config: dict[str, Any], img: dict[str, Any]) -> bytes:
    return canonical_json(normalized_config(config, _epoch_of(img)))


def _saved(engine: Engine, image_id: str, near: Path) -> Saved:
    scratch = Path(os.environ.get("MM_SHIP_TMP") or near)
    return unpack_save(engine.save(image_id), f"image {image_id[7:19]}", scratch)


def recipe_inputs(recipe: Recipe) -> dict[str, Any]:
    """What the recipe hash is made of, each input by its sha256 (the CA bundle and wheels too)."""
    return {
        "files": {arc: _sha256(src) for arc, src in sorted(recipe.files.items())},
        "user_files": dict(sorted(recipe.declared.items())),
        "build_args": recipe.builder_args(),
        "base": {"ref": recipe.base.ref, "image_id": recipe.base.image_id, "epoch": recipe.base.epoch},
    }


def sbom_of(layers: list[Layer], name: str, epoch: int) -> dict[str, Any]:
    """dpkg's installed packages and the Python distributions, as the layers leave them."""
    dpkg_status: bytes | None = None
    dists: dict[str, tuple[str, str]] = {}  # dist-info dir -> (name, version)
    for layer in layers:
        with tarfile.open(layer.path, mode="r:") as tf:
            for member in tf:
                path = member.name.removeprefix("./")
                base = path.rsplit("/", 1)[-1]
                if base.startswith(".wh."):  # a deletion; ".wh..wh..opq" hides the whole folder below
                    folder = path.rsplit("/", 1)[0] if "/" in path else ""
                    gone = folder if base == ".wh..wh..opq" else (f"{folder}/" if folder else "") + base[4:]
                    dists = {k: v for k, v in dists.items() if not (k == gone or k.startswith(gone + "/"))}
                    if gone in ("var/lib/dpkg/status", "var/lib/dpkg", "var/lib", "var"):
                        dpkg_status = None
                    continue
                if path == "var/lib/dpkg/status" and member.isfile():
                    fh = tf.extractfile(member)
                    dpkg_status = fh.read() if fh else None
                elif re.search(r"[^/]+\.dist-info/METADATA$", path) and member.isfile():
                    fh = tf.extractfile(member)
                    meta = (fh.read() if fh else b"").decode(errors="replace")
                    fields = dict(re.findall(r"^(Name|Version): *(.+?)\s*$", meta.split("\n\n", 1)[0], re.M))
                    if "Name" in fields and "Version" in fields:
                        dists[path.rsplit("/", 1)[0]] = (fields["Name"], fields["Version"])
    packages = []
    for para in (dpkg_status or b"").decode(errors="replace").split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Architecture|Status): *(.+?)\s*$", para, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            packages.append(
                {
                    "package": fields["Package"],
                    "version": fields.get("Version", ""),
                    "arch": fields.get("Architecture", ""),
                }
            )
    components = sorted(
        {
            (n, v, f"{d.split('/site-packages/')[0]}" if "/site-packages/" in d else d.rsplit("/", 1)[0])
            for d, (n, v) in dists.items()
        }
    )
    return {
        "dpkg": sorted(packages, key=lambda p: (p["package"], p["arch"])),
        "python": {
            "bomFormat": "CycloneDX",
            "specVersion": "1.5",
            "version": 1,
            "metadata": {"timestamp": iso_epoch(epoch), "component": {"type": "container", "name": name}},
            "components": [
                {
                    "type": "library",
                    "bom-ref": f"pkg:pypi/{_norm(n)}@{v}?location=/{where}",
                    "name": n,
                    "version": v,
                    "purl": f"pkg:pypi/{_norm(n)}@{v}",
                    "properties": [{"name": "modelmatrix:location", "value": f"/{where}"}],
                }
                for n, v, where in components
            ],
        },
    }


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def manifest_path(archive: Path) -> Path:
    name = archive.name.removesuffix(".gz").removesuffix(".tar")
    return archive.with_name(f"{name}.manifest.json")


def load(archive_path: str | Path, engine: Engine | None = None) -> dict[str, Any]:
    """Load an archive written by :func:`ship`; checks its sha256 before and the image ID after."""
    archive = Path(archive_path)
    mpath = manifest_path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: not found")
    if not mpath.is_file():
        raise DataError(f"{mpath}: not found next to the archive; `invoke ship` writes both")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not {"archive_sha256", "tag", "image_id"} <= set(manifest):
        raise DataError(f"{mpath}: not a modelmatrix ship manifest (archive_sha256, tag, image_id missing)")
    if _sha256(archive) != manifest["archive_sha256"]:
        raise DataError(f"{archive}: sha256 differs from {mpath.name}; the archive is damaged, ship it again")
    engine = _engine(engine)
    with open(archive, "rb") as fh:
        lines = engine.load(fh)
    img = engine.image(manifest["tag"])
    if not img or img["Id"] != manifest["image_id"]:
        raise DockerError(f"{archive}: loaded, but {manifest['tag']} is not image {manifest['image_id'][:19]}")
    if manifest.get("diff_ids") and list(img["RootFS"].get("Layers") or []) != manifest["diff_ids"]:
        raise DockerError(f"{archive}: loaded, but the layers of {manifest['tag']} are not the manifest's diff_ids")
    return {
        "archive": str(archive),
        "target": manifest["target"],
        "tag": manifest["tag"],
        "image_id": img["Id"],
        "recipe_hash": manifest["recipe_hash"],
        "loaded": lines,
    }


# --------------------------------------------------------------------------- verify-image


def verify_image(
    matrix: Matrix, target_name: str, engine: Engine | None = None, *, keep: bool = False, scratch: Path | None = None
) -> dict[str, Any]:
    """Rebuild the target's image without the layer cache under a scratch tag and compare it with
    the current one: layer diff IDs and the sha256 of the archive `invoke ship` would write. For
    each layer that differs, the paths that differ (diffoscope's first lines where installed)."""
    engine = _engine(engine)
    t0 = time.monotonic()
    current = build(matrix, target_name, engine=engine, allow_pull=False)  # a no-op when up to date
    owner = image_owner(matrix, target_name)
    recipe = plan(matrix, target_name, _base_of(matrix, target_name, engine))
    scratch_tag = f"verify-{recipe.tag_name}"
    _say(target_name, f"rebuilding {recipe.tag} without the layer cache as {recipe.repository}:{scratch_tag}")
    rebuilt_id, _versions_ = _build_image(engine, recipe, user_files(matrix, target_name), nocache=True)
    engine.tag(rebuilt_id, recipe.repository, scratch_tag)
    try:
        a, b = engine.image(current["image_id"]), engine.image(rebuilt_id)
        if a is None or b is None:
            raise ImageMissing(f"{target_name}: an image vanished during verify-image; run it again")
        la, lb = list(a["RootFS"].get("Layers") or []), list(b["RootFS"].get("Layers") or [])
        where = Path(scratch or os.environ.get("MM_SHIP_TMP") or tempfile.gettempdir())
        with _saved(engine, a["Id"], where) as sa, _saved(engine, b["Id"], where) as sb:
            sha_a = write_gzip_archive(None, shipped_config(sa.config, a), sa.layers, [recipe.tag])[1]
            sha_b = write_gzip_archive(None, shipped_config(sb.config, b), sb.layers, [recipe.tag])[1]
            differences = []
            for i, (x, y) in enumerate(zip(sa.layers, sb.layers, strict=False)):
                if x.diff_id != y.diff_id:
                    differences.append(
                        {
                            "layer": i,
                            "current": x.diff_id,
                            "rebuild": y.diff_id,
                            "paths": layer_differences(x.path, y.path),
                            "diffoscope": _diffoscope(x.path, y.path),
                        }
                    )
        if len(la) != len(lb):
            differences.append(
                {
                    "layer": min(len(la), len(lb)),
                    "current": None,
                    "rebuild": None,
                    "paths": [f"{len(la)} layers in the current image, {len(lb)} in the rebuild"],
                    "diffoscope": None,
                }
            )
    finally:
        if not keep:
            engine.remove_image(f"{recipe.repository}:{scratch_tag}", force=True)
    identical = la == lb and sha_a == sha_b and not differences
    return {
        "target": owner.name,
        "tag": recipe.tag,
        "identical": identical,
        "layers": len(la),
        "diff_ids": la,
        "rebuild_diff_ids": lb,
        "archive_sha256": sha_a,
        "rebuild_archive_sha256": sha_b,
        "image_ids": [a["Id"], b["Id"]],
        "differences": differences,
        "kept": f"{recipe.repository}:{scratch_tag}" if keep else None,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _diffoscope(a: Path, b: Path, lines: int = 40) -> list[str] | None:
    if not shutil.which("diffoscope"):
        return None
    try:
        out = subprocess.run(
            ["diffoscope", "--no-progress", "--text", "-", str(a), str(b)], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"diffoscope did not finish: {exc}"]
    return out.stdout.splitlines()[:lines]


def push(matrix: Matrix, target_name: str, engine: Engine | None = None) -> dict[str, Any]:
    """Push the current image to images.registry (tagged <registry>/modelmatrix/<t>:<hash16>)."""
    registry = matrix.raw["images"]["registry"]
    if not registry:
        raise ConfigError(
            f"{matrix.path.name}: images.registry: not set; give a registry "
            "(e.g. registry.example.com:5000) to push, or use `invoke ship`"
        )
    engine = _engine(engine)
    row = _current(matrix, target_name, engine)
    repo = f"{registry.rstrip('/')}/{IMAGE_NAMESPACE}/{target_name}"
    tag = row["recipe_hash"][:16]
    engine.tag(row["image_id"], repo, tag)
    digest = None
    for chunk in engine.push(repo, tag):
        if "error" in chunk:
            raise DockerError(f"push {repo}:{tag}: {str(chunk['error']).strip().splitlines()[0][:300]}")
        if isinstance(chunk.get("aux"), dict) and chunk["aux"].get("Digest"):
            digest = chunk["aux"]["Digest"]
        if chunk.get("status") and not chunk.get("progressDetail"):
            _say(target_name, f"push: {chunk.get('id', '')} {chunk['status']}".replace("  ", " "))
    return {"target": target_name, "pushed": f"{repo}:{tag}", "digest": digest, "image_id": row["image_id"]}
