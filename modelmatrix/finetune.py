"""`invoke finetune --synthetic`: a briefly trained checkpoint for tests and demos of reduced precision.

Three steps, each keyed like a matrix stage (an unchanged request is a no-op):

1. ``prepare`` (the matrix's own node): the query/gallery inputs every target reads;
2. ``finetune.trainset`` (host): a synthetic training split written beside the workspace,
   identities disjoint from the test ones (the generator's train kind), ``images_per_identity``
   crops across the cameras, preprocessed once into ``train.npy`` + ``labels.json``;
3. ``torch.finetune`` (targets/torch/finetune.py, on demand, run by the chosen runner): the training.

The checkpoint is a plain state dict that ``model.checkpoint`` accepts. Rank-1/mAP on the synthetic
query/gallery are reported for the random weights and for the trained ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from targets.common.contract import atomic_write_bytes, atomic_write_json

from . import data
from .config import Matrix
from .errors import ModelMatrixError
from .hashing import sha256_json
from .pipeline import MatrixRun, select_runner
from .plan import build_plan, code_hash, node_key, stage_node
from .runners.base import StageRequest
from .workspace import Workspace

log = logging.getLogger(__name__)

TRAINSET_VERSION = 1  # bump when write_synthetic_train's output changes
TRAINSET_NODE = "finetune.trainset"
TRAIN_PID0 = 5000  # training pids: disjoint from the test set's (2 + 3i, 0 and -1)


def write_synthetic_train(
    root: Path, identities: int, per_identity: int, cameras: int, seed: int
) -> list[dict[str, Any]]:
    """``root/bounding_box_train/``: ``identities`` people (the generator's training kind, never a
    test identity), ``per_identity`` crops each, cycling through the cameras. Returns the items."""
    folder = root / data.TRAIN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    namer = data._Namer()
    looks = [data._camera_look(seed, c) for c in range(cameras)]
    items = []
    for t in range(identities):
        person = data._person(seed, 7, t)
        pid = TRAIN_PID0 + t
        for k in range(per_identity):
            cam = (t + k) % cameras
            name = namer.name(pid, cam)
            data._save(folder, name, person, looks[cam], (seed, 8, t, cam, k))
            items.append({"file": f"{data.TRAIN_DIR}/{name}", "pid": pid, "camid": cam, "split": "train"})
    return items


def _trainset(matrix: Matrix, ws: Workspace, cfg: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    contract = matrix.contract()
    params = {"version": TRAINSET_VERSION, "contract": contract, **cfg}
    key = sha256_json({"node": TRAINSET_NODE, "code": code_hash_host(), "params": params})
    outputs = ["train.npy", "labels.json"]
    with ws.stage(TRAINSET_NODE, key, outputs) as slot:
        if not slot.cached:
            assert slot.tmp is not None
            log.info(
                "  writing    %-22s %d identities x %d images",
                TRAINSET_NODE,
                cfg["identities"],
                cfg["images_per_identity"],
            )
            with tempfile.TemporaryDirectory(prefix=".trainset-", dir=ws.root) as tmp:
                items = write_synthetic_train(
                    Path(tmp), cfg["identities"], cfg["images_per_identity"], cfg["cameras"], cfg["seed"]
                )
                arr = data.preprocess(items, Path(tmp), contract, tuple(contract["input_size"]))
            atomic_write_bytes(slot.tmp / "train.npy", _npy_bytes(arr))
            atomic_write_json(
                slot.tmp / "labels.json", {"pids": [it["pid"] for it in items], "camids": [it["camid"] for it in items]}
            )
    assert slot.stamp is not None
    return slot.dir, {n: slot.stamp["outputs"][n] for n in outputs}


def code_hash_host() -> str:
    from .plan import Node

    return code_hash(Node("host", None, "host"))


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
    return buf.getvalue()


def _retrieval(features: np.ndarray, index: dict[str, Any], max_rank: int) -> dict[str, Any]:
    from .verify import retrieval_or_error

    ret, err = retrieval_or_error(features, index, max_rank)
    if ret is None:
        raise ModelMatrixError(f"finetune: cannot score the features: {err}")
    return ret


def run_finetune(
    matrix: Matrix,
    runner_choice: str | None = None,
    out: Path | None = None,
    identities: int = 64,
    images_per_identity: int = 8,
    force: bool = False,
) -> dict[str, Any]:
    """Train (or reuse) the checkpoint; copy it to ``out`` (default workspace/finetune/checkpoint.pth);
    return a summary with Rank-1/mAP before and after."""
    if matrix.model["arch"] != "reid-strong-baseline":
        raise ModelMatrixError(
            f"{matrix.path}: model.arch: finetune trains reid-strong-baseline only, got {matrix.model['arch']!r}"
        )
    if identities < 8 or images_per_identity < 2:
        raise ModelMatrixError("finetune: --identities must be >= 8 and --images-per-identity >= 2")
    synthetic = matrix.raw["data"]["synthetic"]
    cfg = {
        "identities": identities,
        "images_per_identity": images_per_identity,
        "cameras": synthetic["cameras"],
        "seed": synthetic["seed"],
    }
    ws = Workspace(matrix.workspace)
    runner, _ = select_runner(matrix, runner_choice)
    tdef = matrix.targets["torch"]
    try:
        with ws.lock():
            ws.sweep()
            plan = build_plan(matrix)
            run = MatrixRun(matrix, runner, ws=ws)
            prep = run.run([n for n in plan if n.id == "prepare"])["prepare"]
            if not prep.ok or prep.dir is None or prep.stamp is None:
                raise ModelMatrixError(f"finetune: prepare did not run ({prep.reason})")
            tdir, tdigests = _trainset(matrix, ws, cfg)
            reason = runner.unavailable_reason(tdef)
            if reason:
                raise ModelMatrixError(f"finetune: the torch target cannot run here: {reason}")
            runner.prepare(tdef)
            node = stage_node(matrix, "torch", "finetune")
            paths = {"train": tdir / "train.npy", "labels": tdir / "labels.json", "eval": prep.dir / "inputs.npy"}
            digests = {
                **{k: tdigests[Path(v).name] for k, v in paths.items() if k != "eval"},
                "eval": prep.stamp["outputs"]["inputs.npy"],
            }
            paths = {k: v for k, v in paths.items() if k in node.inputs}
            fingerprint = runner.fingerprint(tdef)
            key = node_key(node, fingerprint, {k: digests[k] for k in paths}, tdef.folder)
            with ws.stage(node.id, key, node.outputs, force=force) as slot:
                if not slot.cached:
                    assert slot.tmp is not None
                    log.info("  training   %-22s (seeded; a few minutes at most)", node.id)
                    req = StageRequest(
                        target=tdef,
                        stage="finetune",
                        workspace=ws.root,
                        inputs={k: ws.rel(v) for k, v in paths.items()},
                        out_dir=ws.rel(slot.tmp),
                        params=node.params,
                        timeout_s=float(matrix.raw["stage_timeout_s"]),
                    )
                    runner.run(req)
                else:
                    log.info("  up to date %-22s", node.id)
            assert slot.stamp is not None
            ws.hashes.save()
            result = json.loads((slot.dir / "finetune.json").read_text())
            index = json.loads((prep.dir / "index.json").read_text())
            max_rank = matrix.raw["verify"]["max_rank"]
            n = len(index["items"])
            scores = {
                name: _retrieval(data.load_features(slot.dir / f"{stem}.npy", n), index, max_rank)
                for name, stem in (("random", "eval_features_random"), ("trained", "eval_features"))
            }
            dest = Path(out) if out else ws.root / "finetune" / "checkpoint.pth"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            shutil.copyfile(slot.dir / "checkpoint.pth", tmp)
            os.replace(tmp, dest)
    finally:
        runner.close()
    summary = {
        "checkpoint": str(dest),
        "stage_dir": str(slot.dir),
        "key": key,
        "checkpoint_sha256": result["checkpoint_sha256"],
        "train_seconds": result["train_seconds"],
        "identities": result["identities"],
        "images": result["images"],
        "input_size": result["input_size"],
        "params": result["params"],
        "retrieval": {k: {"rank1": v["rank1"], "mAP": v["mAP"]} for k, v in scores.items()},
    }
    atomic_write_json(ws.root / "finetune" / "finetune.json", summary)
    return summary
