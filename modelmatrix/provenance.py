"""Provenance sidecars: every stage output carries a JSON that says where it came from.

Beside each declared output ``<name>`` of a stored stage (``stages/<node>/<key16>/``, also seen as
``targets/<target>/<stage>/``) the stage transaction writes ``<name>.provenance.json``, so that one
artifact copied out of the workspace can be copied with its provenance:

- ``artifact``, ``kind`` (file or folder), ``sha256`` (of the file; of a folder: the workspace's tree
  digest, with ``files`` giving each file's own sha256 and size) and ``size``;
- ``node``, ``target``, ``stage``, ``key`` (the stage key) and ``code`` (the hash of the code it ran);
- ``environment``: for the Docker runner the image id, tag, layer diff ids (``RootFS.Layers``), the
  image's labels and the toolchain versions of its ``io.modelmatrix.versions`` label; for the local
  runner ``runner: local`` with the host's Python and the versions of the target's modules; for host
  stages (prepare, verify) ``runner: host`` with Python, numpy and Pillow; ``fingerprint`` is the
  string the stage key was built from;
- ``inputs``: name -> ``{"from": "<producer>/<file>", "sha256": ...}``, exactly the digests the key was
  built from; ``params``: the stage's parameters as keyed;
- ``stage_outputs``: every output of the same stage run with its sha256 (a prototxt's sidecar names
  the caffemodel that belongs to it);
- ``nondeterministic``: null, or the reason the target's manifest gives for this artifact's bytes
  differing between two runs of the same inputs (TensorRT's timed tactic choice, atc): such an
  artifact is judged by the outputs it produces (its target's features), never by its bytes.

The sidecars are written after the outputs are hashed and before the stamp; the stamp records each
sidecar's digest (``provenance``), and a stored result whose sidecar is missing, unreadable or
changed is damaged, exactly like a damaged output: it is rebuilt (:func:`sidecar_problem`). A stamp
without the ``provenance`` entry (an older store) is damaged too. Host-side only: no toolchain is
imported here (versions come from package metadata and image labels).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

from targets.common.contract import atomic_write_json

from .errors import ModelMatrixError
from .hashing import HashCache, iter_files

log = logging.getLogger(__name__)

SCHEMA = "modelmatrix-provenance/1"
SUFFIX = ".provenance.json"
#: the stamp's entry: sidecar name -> its sha256
STAMP_KEY = "provenance"
#: the labels of an image that say what it is (all io.modelmatrix.* and org.opencontainers.* ones)
LABEL_PREFIXES = ("io.modelmatrix.", "org.opencontainers.")


def sidecar_name(output: str) -> str:
    """The sidecar of output ``output`` (a file or a folder of the stage): ``<output>.provenance.json``."""
    return output + SUFFIX


# --------------------------------------------------------------------------- environments


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def module_version(module: str) -> str | None:
    """The installed version of the distribution providing ``module`` (read from package metadata,
    never by importing it), or None when it is not installed."""
    names = [module, *_distributions().get(module, [])]
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def host_environment(runner: str, modules: list[str], fingerprint: str) -> dict[str, Any]:
    """This host's Python and the versions of ``modules`` (None: not installed here)."""
    return {
        "runner": runner,
        "fingerprint": fingerprint,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "machine": platform.machine(),
        "versions": {m: module_version(m) for m in modules},
    }


def docker_environment(
    image_id: str, tag: str, inspect: dict[str, Any], fingerprint: str, engine: str | None = None
) -> dict[str, Any]:
    """An image's identity from its ``docker inspect``: id, tag, layer diff ids, labels, toolchain versions."""
    labels = (inspect.get("Config") or {}).get("Labels") or {}
    try:
        versions = json.loads(labels.get("io.modelmatrix.versions", "{}"))
    except ValueError:
        versions = {"unreadable label io.modelmatrix.versions": labels.get("io.modelmatrix.versions")}
    env: dict[str, Any] = {
        "runner": "docker",
        "fingerprint": fingerprint,
        "image": {
            "id": image_id,
            "tag": tag,
            "diff_ids": list((inspect.get("RootFS") or {}).get("Layers") or []),
            "labels": {k: v for k, v in sorted(labels.items()) if k.startswith(LABEL_PREFIXES)},
        },
        "versions": versions,
    }
    if engine:
        env["engine"] = engine
    return env


# --------------------------------------------------------------------------- writing


def _describe(path: Path, digest: str, hashes: HashCache) -> dict[str, Any]:
    if path.is_dir():
        files = {
            f.relative_to(path).as_posix(): {"sha256": hashes.file(f), "size": f.stat().st_size}
            for f in iter_files(path)
        }
        return {
            "kind": "folder",
            "sha256": digest,
            "sha256_of": "the folder tree (relative path + each file's sha256, sorted)",
            "size": sum(v["size"] for v in files.values()),
            "files": files,
        }
    return {"kind": "file", "sha256": digest, "size": path.stat().st_size}


def record(common: dict[str, Any], name: str, path: Path, digests: dict[str, str], hashes: HashCache) -> dict[str, Any]:
    """The sidecar of output ``name`` (at ``path``) of one stage run."""
    nondet = (common.get("nondeterministic") or {}).get(name)
    rec: dict[str, Any] = {"schema": SCHEMA, "artifact": name, **_describe(path, digests[name], hashes)}
    rec.update({k: v for k, v in common.items() if k != "nondeterministic"})
    rec["stage_outputs"] = dict(digests)
    rec["nondeterministic"] = nondet
    return rec


def write_sidecars(folder: Path, digests: dict[str, str], common: dict[str, Any], hashes: HashCache) -> dict[str, str]:
    """Write one sidecar per output in ``digests`` (each atomically); sidecar name -> its sha256."""
    written = {}
    for name in digests:
        side = sidecar_name(name)
        if side in digests:
            raise ModelMatrixError(
                f"declares both {name} and {side}: {side} is {name}'s provenance sidecar; rename that "
                "output in its target.yaml"
            )
        atomic_write_json(folder / side, record(common, name, folder / name, digests, hashes))
        written[side] = hashes.file(folder / side)
    return written


# --------------------------------------------------------------------------- checking


def sidecar_problem(folder: Path, stamp: dict[str, Any], hashes: HashCache) -> str | None:
    """Why the sidecars of a stored stage cannot be trusted (then its result is damaged), or None."""
    recorded = stamp.get(STAMP_KEY)
    if not isinstance(recorded, dict):
        return "it has no provenance sidecars (stored by an older modelmatrix)"
    for name in stamp.get("outputs", {}):
        side = sidecar_name(name)
        if side not in recorded:
            return f"its output {name} has no provenance sidecar in {os.path.basename(folder)}/stamp.json"
        path = folder / side
        if not path.is_file():
            return f"its provenance sidecar {side} was deleted"
        try:
            now = hashes.file(path)
        except (OSError, ModelMatrixError) as exc:
            return f"its provenance sidecar {side} cannot be read ({exc})"
        if now != recorded[side]:
            return f"its provenance sidecar {side} no longer matches the digest it was stored with"
    return None


# --------------------------------------------------------------------------- what the report says


def nondeterministic_artifacts(targets: dict[str, Any], enabled: list[str]) -> list[dict[str, str]]:
    """Every artifact the enabled targets' manifests declare non-deterministic, with what is compared
    instead: ``targets`` is name -> TargetDef (its matrix stages' ``nondeterministic``)."""
    out = []
    for t in sorted(enabled):
        tdef = targets[t]
        stages = tdef.matrix_stages
        for sname, sdef in stages.items():
            for artifact, reason in sorted(sdef.nondeterministic.items()):
                compared = (
                    f"{t}.infer's features against the reference (the target's checks)"
                    if "infer" in stages and sname != "infer"
                    else "its values against the reference (the target's checks)"
                )
                out.append(
                    {
                        "target": t,
                        "node": f"{t}.{sname}",
                        "artifact": artifact,
                        "reason": reason,
                        "compared_by": compared,
                    }
                )
    return out
