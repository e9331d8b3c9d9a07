"""`invoke matrix` across machines: the CI job matrix, per-job exports, and the gather.

A CI run fans out one job per enabled target (``invoke ci-plan``), each on a runner that has the
target's hardware (runner labels from ``requires.devices``). Each job runs ``invoke matrix
--target T`` in its own workspace, then packs what the report needs with ``invoke export-results
--target T --out DIR`` (:func:`export_results`). A gather job runs ``invoke verify --from DIR ...``
(:func:`gather`): it refuses exports computed from different prepared inputs or a different ONNX
(content digests, naming both folders), then verify runs once over the gathered features and
writes one report.

The reference is recomputed by every job (each ``invoke matrix --target T`` runs prepare,
torch.export and torch.infer itself: no job waits for another). The gather checks that every job
prepared the same bytes (``prepare/inputs.npy``, ``prepare/index.json``) and exported the same
``torch.export/model.onnx`` (sha256 equal), and that the jobs' reference features agree within
each target's own tolerance; the report's reference features are those of the first ``--from``.

An export folder::

    manifest.json                     schema, target, reference, the job's verdict, node stamps,
                                      digests, every file with its sha256
    report.json                       the job's own report (for people; the gather reads the manifest)
    <node>/stamp.json, result.json    for prepare, torch.export and every node of the two targets
    prepare/index.json                what verify reads besides the features
    torch.export/meta.json            the model facts the report states
    <target>.infer/features.npy       the reference's and the target's features
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np

from targets.common.contract import atomic_write_json

from .config import Matrix
from .errors import ConfigError, ModelMatrixError
from .hashing import sha256_file
from .plan import build_plan
from .provenance import sidecar_name

log = logging.getLogger(__name__)

EXPORT_SCHEMA = 1
EXPORT_KIND = "modelmatrix-export"
MANIFEST = "manifest.json"
#: requires.devices kind -> the runner label a CI job for the target must run on
DEVICE_LABELS = {"nvidia-gpu": "gpu", "ascend-npu": "ascend"}
#: digests every export must share with every other: same prepared inputs, same ONNX
SHARED_DIGESTS = ("prepare/inputs.npy", "prepare/index.json", "torch.export/model.onnx")
#: node files an export carries besides features (small)
NODE_FILES = ("stamp.json", "result.json")


# --------------------------------------------------------------------------- selection


def select_targets(matrix: Matrix, targets: list[str]) -> Matrix:
    """A copy of ``matrix`` with only ``targets`` (and the reference) enabled: what
    ``invoke matrix --target T`` runs (tasks._load does the same to the loaded matrix)."""
    raw = copy.deepcopy(matrix.raw)
    for t in targets:
        if t not in raw["targets"]:
            raise ConfigError(f"--target {t}: not in {matrix.path} targets (known: {', '.join(raw['targets'])})")
    keep = set(targets) | {raw["verify"]["reference"]}
    for name, stanza in raw["targets"].items():
        stanza["enabled"] = bool(stanza["enabled"] and name in keep or name in targets)
    return Matrix(path=matrix.path, root=matrix.root, raw=raw, targets=matrix.targets)


def runner_labels(matrix: Matrix, target: str) -> list[str]:
    """The labels a CI runner needs for ``target``: one per device kind it or any of its stages
    requires (ascend.infer needs the NPU though ascend.convert does not; [] = any CPU runner)."""
    tdef = matrix.targets[target]
    kinds = list(tdef.requires.get("devices", []))
    for stage in tdef.matrix_stages.values():
        kinds += [k for k in stage.requires.get("devices", []) if k not in kinds]
    labels = []
    for kind in kinds:
        if kind not in DEVICE_LABELS:
            raise ConfigError(
                f"targets/{target}/target.yaml: requires.devices: no CI runner label for {kind!r} "
                f"(known: {', '.join(DEVICE_LABELS)})"
            )
        labels.append(DEVICE_LABELS[kind])
    return labels


# --------------------------------------------------------------------------- ci-plan


def ci_plan(matrix: Matrix, runner: str = "docker") -> list[dict[str, Any]]:
    """One job per enabled target: what ``invoke matrix --target T`` runs there and where.

    ``runs_on`` is what GitHub Actions' ``runs-on`` takes: ``ubuntu-latest`` for CPU targets, else
    ``[self-hosted, linux, <labels>]``; ``artifact`` the name the job uploads its export as."""
    jobs = []
    for target in matrix.enabled_targets():
        labels = runner_labels(matrix, target)
        plan, broken = build_plan(select_targets(matrix, [target]), per_target_errors=True)
        cfg = matrix.target_cfg(target)
        jobs.append(
            {
                "target": target,
                "stages": [n.id for n in plan],
                "labels": labels,
                "runs_on": ["self-hosted", "linux", *labels] if labels else "ubuntu-latest",
                "runner": runner,
                "reference": target == matrix.raw["verify"]["reference"],
                "required": bool(cfg.get("required")),
                "allow_skip": cfg.get("allow_skip"),
                "artifact": f"modelmatrix-{target}",
                **({"broken": broken[target]} if target in broken else {}),
            }
        )
    return jobs


# --------------------------------------------------------------------------- export


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelMatrixError(f"{path}: not found ({what})") from None
    except (OSError, ValueError) as exc:
        raise ModelMatrixError(f"{path}: unreadable ({exc}); {what}") from None


def _current(ws: Path, node: str) -> Path | None:
    """The stage folder ``workspace/targets/<t>/<stage>`` points at, or None."""
    target, _, stage = node.partition(".")
    link = ws / "targets" / target / stage
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def _producer_dir(ws: Path, spec: dict[str, Any], producer: str) -> Path | None:
    """The folder of ``producer`` that a stage read (from its spec.json's input paths)."""
    for rel in spec.get("inputs", {}).values():
        parts = Path(rel).parts
        if len(parts) >= 3 and parts[0] == "stages" and parts[1] == producer:
            return ws / parts[0] / parts[1] / parts[2]
    return None


def export_results(matrix: Matrix, target: str, out: Path) -> Path:
    """Pack what the report needs about ``target`` from the workspace of the last ``invoke matrix
    --target T`` into ``out`` (written beside, then renamed into place). Returns the manifest path."""
    ws = matrix.workspace.resolve()
    ref = matrix.raw["verify"]["reference"]
    if target not in matrix.raw["targets"]:
        raise ConfigError(
            f"--target {target}: not in {matrix.path} targets (known: {', '.join(matrix.raw['targets'])})"
        )
    report_path = ws / "report.json"
    if not report_path.is_file():
        raise ModelMatrixError(
            f"{report_path}: no report in the workspace; run `invoke matrix --target {target}` "
            "first (a run that does not reach verify leaves none)"
        )
    report = _read_json(report_path, "the workspace's last report")
    if target not in report.get("targets", {}):
        raise ModelMatrixError(
            f"{report_path}: the last run did not include {target} (it has "
            f"{', '.join(report.get('targets', {}))}); run `invoke matrix --target {target}`"
        )
    stages = report.get("stages") or {}
    out = Path(out).resolve()
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ModelMatrixError(f"{out}: exists and is not an export (no {MANIFEST}); choose an empty or new folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _pack(matrix, ws, report, stages, target, ref, tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%d files) to %s", target, len(manifest["files"]), out)
    return out / MANIFEST


def _pack(
    matrix: Matrix, ws: Path, report: dict[str, Any], stages: dict[str, Any], target: str, ref: str, tmp: Path
) -> dict[str, Any]:
    files: dict[str, str] = {}
    nodes: dict[str, dict[str, Any]] = {}

    def copy_in(src: Path, rel: str) -> None:
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        files[rel] = sha256_file(dest)

    def take(node: str, folder: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        stamp = _read_json(folder / "stamp.json", f"the stored stage {node}")
        for name in NODE_FILES + extra:
            if (folder / name).is_file():
                copy_in(folder / name, f"{node}/{name}")
                sidecar = sidecar_name(name)  # what it was made from travels with it
                if (folder / sidecar).is_file():
                    copy_in(folder / sidecar, f"{node}/{sidecar}")
        nodes[node] = {
            "key": stamp.get("key"),
            "outputs": stamp.get("outputs", {}),
            "runner": stamp.get("runner"),
            "status": "ok",
        }
        return stamp

    wanted = [ref] + ([target] if target != ref else [])
    upstream: dict[str, Path] = {}
    for t in wanted:
        for stage in matrix.targets[t].matrix_stages:
            node = f"{t}.{stage}"
            st = stages.get(node)
            if not st or st.get("status") != "ok":
                continue
            folder = _current(ws, node)
            if folder is None:
                raise ModelMatrixError(
                    f"{ws}/targets/{t}/{stage}: missing, though the last report says {node} "
                    f"ran; run `invoke matrix --target {target}` again"
                )
            take(node, folder, ("features.npy", "meta.json") if stage in ("infer", "export") else ())
            spec = _read_json(folder / "spec.json", f"the stored stage {node}")
            for producer in ("prepare", "source", "torch.export"):
                found = _producer_dir(ws, spec, producer)
                if found is None:
                    continue
                if producer in upstream and upstream[producer] != found:
                    raise ModelMatrixError(
                        f"{ws}: {node} read another {producer} ({found.name}) than "
                        f"{ref}'s ({upstream[producer].name}); run `invoke matrix --target "
                        f"{target}` again"
                    )
                upstream[producer] = found
    if "prepare" in upstream:
        take("prepare", upstream["prepare"], ("index.json",))
    digests = {}
    for node, outs in (("prepare", ("inputs.npy", "index.json")), ("torch.export", ("model.onnx",))):
        for name in outs:
            if node in nodes and name in nodes[node]["outputs"]:
                digests[f"{node}/{name}"] = nodes[node]["outputs"][name]
    copy_in(ws / "report.json", "report.json")
    order = [f"{t}.{s}" for t in wanted for s in matrix.targets[t].matrix_stages]
    own = {n: stages[n] for n in ["source", "prepare", *order] if n in stages}
    return {
        "schema": EXPORT_SCHEMA,
        "kind": EXPORT_KIND,
        "target": target,
        "reference": ref,
        "job": {
            "host": socket.gethostname(),
            "workspace": str(ws),
            "exit_code": report.get("exit_code"),
            "passed": report.get("passed"),
            "runner": report.get("runner"),
        },
        "targets": {
            t: {k: report["targets"][t].get(k) for k in ("status", "reason", "kind", "stage")}
            for t in wanted
            if t in report.get("targets", {})
        },
        "stage_order": [n for n in ["source", "prepare", *order] if n in stages],
        "stages": own,
        "nodes": nodes,
        "digests": digests,
        "files": files,
    }


# --------------------------------------------------------------------------- gather


class Export:
    """One export folder, checked against its manifest."""

    def __init__(self, folder: Path):
        self.dir = Path(folder).resolve()
        path = self.dir / MANIFEST
        if not path.is_file():
            raise ModelMatrixError(
                f"{self.dir}: not an export (no {MANIFEST}); make one with `invoke export-results --target T --out DIR`"
            )
        m = _read_json(path, "the export's manifest; export it again")
        if not isinstance(m, dict) or m.get("kind") != EXPORT_KIND or m.get("schema") != EXPORT_SCHEMA:
            raise ModelMatrixError(
                f"{path}: not a modelmatrix export of schema {EXPORT_SCHEMA} "
                f"(kind {m.get('kind') if isinstance(m, dict) else '?'!r}); export it again "
                "with this version"
            )
        for rel, digest in m["files"].items():
            f = self.dir / rel
            if not f.is_file():
                raise ModelMatrixError(f"{f}: missing from the export (its manifest lists it); export it again")
            if sha256_file(f) != digest:
                raise ModelMatrixError(
                    f"{f}: does not match the sha256 in {MANIFEST} (damaged in transfer?); export it again"
                )
        self.m = m
        self.target: str = m["target"]
        self.reference: str = m["reference"]

    def features(self, target: str) -> Path | None:
        p = self.dir / f"{target}.infer" / "features.npy"
        return p if f"{target}.infer/features.npy" in self.m["files"] else None

    def status(self, target: str) -> tuple[str, Any]:
        """("features", path) | ("skipped", reason) | ("failed", {stage, reason, kind}) | ("none", None)."""
        feats = self.features(target)
        if feats is not None:
            return "features", feats
        entry = self.m["targets"].get(target) or {}
        st = entry.get("status")
        if st == "error" and entry.get("kind") != "required but skipped":
            return "failed", {
                "stage": entry.get("stage") or target,
                "reason": entry.get("reason") or "",
                "kind": entry.get("kind") or "failed",
            }
        for node in self.m["stage_order"]:
            s = self.m["stages"][node]
            if node.split(".")[0] == target and s.get("status") != "ok":
                if s.get("status") == "skipped":
                    return "skipped", f"{node}: {s.get('reason', '')}"
                return "failed", {
                    "stage": node,
                    "reason": f"{node}: {s.get('reason', '')}",
                    "kind": entry.get("kind") or "failed",
                }
        if st == "skipped":
            return "skipped", entry.get("reason") or "skipped"
        return "none", None


def _check_shared(exports: list[Export]) -> None:
    """Every export from the same prepared inputs and the same ONNX, by content digest."""
    for key in SHARED_DIGESTS:
        first: Export | None = None
        for e in exports:
            d = e.m["digests"].get(key)
            if d is None:
                continue
            if first is None:
                first = e
            elif d != first.m["digests"][key]:
                what = "the same ONNX" if key.endswith(".onnx") else "the same prepared inputs"
                raise ModelMatrixError(
                    f"{first.dir} and {e.dir} were not computed from {what}: {key} sha256 "
                    f"{first.m['digests'][key][:12]} vs {d[:12]}; run every job on the same commit, "
                    "matrix.yaml and dataset"
                )


def gather(matrix: Matrix, folders: list[Path], force: bool = False, html: bool = True) -> Any:
    """Check the exports against each other, then run verify once over them in ``matrix``'s
    workspace; the RunSummary (its report is the gathered one)."""
    from .pipeline import required_targets, run_verify

    if not folders:
        raise ModelMatrixError("verify: give at least one --from DIR (written by `invoke export-results`)")
    exports = [Export(Path(f)) for f in folders]
    ref = matrix.raw["verify"]["reference"]
    by_target: dict[str, Export] = {}
    for e in exports:
        if e.reference != ref:
            raise ModelMatrixError(
                f"{e.dir}: its reference is {e.reference!r}, {matrix.path} says verify.reference "
                f"{ref!r}; gather exports of the same matrix.yaml"
            )
        if e.target in by_target and e.target != ref:
            raise ModelMatrixError(
                f"{by_target[e.target].dir} and {e.dir} are both exports of {e.target}; give one export per target"
            )
        if e.target not in matrix.raw["targets"]:
            raise ModelMatrixError(f"{e.dir}: target {e.target!r} is not in {matrix.path} targets")
        by_target.setdefault(e.target, e)
    _check_shared(exports)
    with_ref = [e for e in exports if e.features(ref) is not None]
    selected = select_targets(matrix, [t for t in by_target if t != ref])
    features: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, dict[str, str]] = {}
    spread: dict[str, float] = {}
    chosen = with_ref[0] if with_ref else exports[0]
    for t in selected.enabled_targets():
        owner = chosen if t == ref else by_target.get(t)
        if owner is None:
            skipped[t] = f"no export of {t} among the --from folders"
            continue
        kind, value = owner.status(t)
        if kind == "features":
            features[t] = value
        elif kind == "skipped":
            skipped[t] = value
        elif kind == "failed":
            failed[t] = value
        else:
            skipped[t] = f"{owner.dir}: the export has no result for {t}"
    if ref in features:
        base = np.load(features[ref], allow_pickle=False)
        for e in with_ref:
            if e is chosen or e.target == ref:
                continue
            mine = e.features(ref)
            assert mine is not None
            other = np.load(mine, allow_pickle=False)
            diff = float(np.max(np.abs(other.astype(np.float64) - base))) if other.shape == base.shape else float("inf")
            spread[str(e.dir)] = diff
            tol = selected.target_cfg(e.target)["tolerance"]
            if not (other.shape == base.shape and np.allclose(other, base, rtol=tol["rtol"], atol=tol["atol"])):
                raise ModelMatrixError(
                    f"{chosen.dir} and {e.dir} computed different reference features (max |diff| {diff:.3g}, "
                    f"beyond targets.{e.target}.tolerance); the jobs' {ref} runs disagree: use the same image/runner"
                )
    stages: dict[str, Any] = {}
    for e in [chosen, *[x for x in exports if x is not chosen]]:
        for node in e.m["stage_order"]:
            owner_t = node.split(".")[0]
            if node in stages:
                continue
            if owner_t in ("source", "prepare", ref) and e is not chosen:
                continue
            stages[node] = e.m["stages"][node]
    index = chosen.dir / "prepare" / "index.json"
    if not index.is_file():
        raise ModelMatrixError(
            f"{chosen.dir}: the export has no prepare/index.json (its job did not prepare "
            "the dataset); export a job that ran"
        )
    meta = chosen.dir / "torch.export" / "meta.json"
    runners = sorted({str(e.m["job"].get("runner")) for e in exports})
    gathered = {
        "exports": [
            {
                "dir": str(e.dir),
                "target": e.target,
                "host": e.m["job"].get("host"),
                "job_exit_code": e.m["job"].get("exit_code"),
            }
            for e in exports
        ],
        "digests": {k: chosen.m["digests"].get(k) for k in SHARED_DIGESTS if chosen.m["digests"].get(k)},
        "reference_from": str(chosen.dir),
        "reference_max_abs_spread": spread,
    }
    return run_verify(
        selected,
        features=features,
        index=index,
        meta=meta if meta.is_file() else None,
        skipped=skipped,
        failed=failed,
        stages=stages,
        runner=",".join(runners),
        required=required_targets(selected),
        gathered=gathered,
        html=html,
        force=force,
    )
