"""Stage ``torch.finetune`` (run by ``invoke finetune``, never by ``invoke matrix``): a brief,
seeded, reproducible training of the ReID model, so that reduced precision is tested on a network
whose activations look like a trained one's (random weights do not: int8 cosine to fp32 0.46-0.75
whatever the calibration method).

As reid-strong-baseline trains (simplified): ID loss (cross-entropy with label smoothing 0.1) on the
classifier over the BNNeck feature, plus batch-hard triplet loss (margin 0.3) on the pooled feature;
P identities x K images per batch; Adam. Starts from the seeded random weights with BatchNorm
statistics measured on the training images; the layers up to ``freeze`` stay frozen (eval mode),
so their outputs are computed once and cached (what keeps this to a few minutes on 2 cores).

Inputs: ``train`` (float32 N x 3 x H x W in the model's input contract), ``labels`` (labels.json:
``{"pids": [...]}``, one per image) and, optional, ``eval`` (the prepared query+gallery
inputs.npy): its features with the random and with the trained weights are written for the host
to score. Outputs: ``checkpoint.pth`` (a plain state dict, classifier included: model.checkpoint
accepts it and ignores the classifier), ``finetune.json`` (losses per epoch, params, sha256),
``eval_features.npy`` and ``eval_features_random.npy`` (with ``eval``).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from targets.common.arrays import load_inputs
from targets.common.contract import Spec, StageError, atomic_write_bytes, atomic_write_json, main, save_npy

from .export import check_model_cfg
from .models import StrongBaseline, build_model, calibrate_batchnorm, seeded_init

#: Frozen prefixes of the backbone, in order (``freeze: layer2`` freezes the stem, layer1, layer2).
FREEZE_POINTS = ("none", "stem", "layer1", "layer2", "layer3")


def versions() -> Dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__}


def read_labels(path: Path, n: int) -> np.ndarray:
    try:
        raw = json.loads(Path(path).read_text())
        pids = raw["pids"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f'{path}: not a labels file ({type(exc).__name__}); expected {{"pids": [...]}}') from None
    if not isinstance(pids, list) or len(pids) != n or not all(isinstance(p, int) for p in pids):
        raise StageError(
            f"{path}: expected {n} integer pids (one per training image), got "
            f"{len(pids) if isinstance(pids, list) else type(pids).__name__}"
        )
    _, labels = np.unique(np.asarray(pids), return_inverse=True)
    return labels.astype(np.int64)


def _parts(model: nn.Module, freeze: str) -> Tuple[List[nn.Module], List[nn.Module]]:
    """(frozen modules in order, trained backbone modules in order) for reid-strong-baseline."""
    base = model.base
    order = [
        ("stem", nn.Sequential(base.conv1, base.bn1, base.maxpool)),
        ("layer1", base.layer1),
        ("layer2", base.layer2),
        ("layer3", base.layer3),
        ("layer4", base.layer4),
    ]
    cut = FREEZE_POINTS.index(freeze)
    return [m for _, m in order[:cut]], [m for _, m in order[cut:]]


def frozen_features(frozen: List[nn.Module], images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """The frozen prefix's output for every image, once (eval mode, no grad)."""
    outs = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
            for m in frozen:
                x = m(x)
            outs.append(x)
    return torch.cat(outs) if outs else torch.empty(0)


def triplet_hard(feat: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (reid-strong-baseline's TripletLoss with hard example mining)."""
    dist = torch.cdist(feat, feat).clamp(min=1e-12)
    same = labels[:, None] == labels[None, :]
    hardest_pos = (dist * same).max(dim=1).values
    hardest_neg = (dist + same * 1e6).min(dim=1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def pk_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> List[np.ndarray]:
    """One epoch of P x K batches (each identity's images shuffled, drawn with replacement when fewer than K)."""
    ids = np.unique(labels)
    pools = {i: rng.permutation(np.flatnonzero(labels == i)) for i in ids}
    order = rng.permutation(ids)
    batches = []
    for start in range(0, len(order) - p + 1, p):
        rows = []
        for i in order[start : start + p]:
            pool = pools[i]
            rows.append(pool[:k] if len(pool) >= k else rng.choice(pool, size=k, replace=True))
        batches.append(np.concatenate(rows))
    return batches


def features(model: nn.Module, images: np.ndarray, batch: int = 32) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))).numpy())
    return np.concatenate(out).astype(np.float32)


def check_params(spec: Spec) -> Dict[str, Any]:
    p = {
        "epochs": int(spec.param("finetune_epochs", 12)),
        "lr": float(spec.param("finetune_lr", 1e-3)),
        "seed": int((spec.param("model") or {}).get("seed", 0)),
        "freeze": str(spec.param("finetune_freeze", "layer2")),
        "identities_per_batch": int(spec.param("identities_per_batch", 8)),
        "images_per_identity": int(spec.param("images_per_identity", 4)),
        "margin": float(spec.param("margin", 0.3)),
        "threads": int(spec.param("threads", 0)),
    }
    if p["freeze"] not in FREEZE_POINTS:
        raise StageError(f"freeze: expected one of {', '.join(FREEZE_POINTS)}, got {p['freeze']!r}")
    if p["epochs"] < 1 or p["lr"] <= 0 or p["identities_per_batch"] < 2 or p["images_per_identity"] < 2:
        raise StageError(
            "epochs >= 1, lr > 0, identities_per_batch >= 2 and images_per_identity >= 2 "
            "(the triplet loss needs two identities and two images of each per batch)"
        )
    return p


def run(spec: Spec) -> Dict[str, Any]:
    cfg = check_model_cfg(spec.param("model"))
    if cfg["arch"] != StrongBaseline.arch:
        raise StageError(f"params.model.arch: finetune trains {StrongBaseline.arch} only, got {cfg['arch']!r}")
    p = check_params(spec)
    if p["threads"] > 0:
        torch.set_num_threads(p["threads"])
    torch.manual_seed(p["seed"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    size = cfg["input_size"]
    train = np.array(load_inputs(spec.input("train"), (3, *size), "the finetune stage"))
    labels = read_labels(spec.input("labels"), train.shape[0])
    n_ids = int(labels.max()) + 1
    if n_ids < p["identities_per_batch"]:
        raise StageError(
            f"{spec.input('labels')}: {n_ids} identities, fewer than identities_per_batch "
            f"{p['identities_per_batch']}; write a larger training set"
        )
    t0 = time.perf_counter()
    cfg_train = dict(cfg, num_classes=n_ids)
    model = build_model(cfg_train)
    seeded_init(model, int(cfg["seed"]))
    sample = np.linspace(0, train.shape[0] - 1, min(train.shape[0], 64)).round().astype(int)
    calibrate_batchnorm(model, torch.from_numpy(train[np.unique(sample)]))
    evaluate = "eval" in spec.inputs
    if evaluate:
        eval_inputs = np.array(load_inputs(spec.input("eval"), (3, *size), "the finetune stage"))
        save_npy(spec.output("eval_features_random.npy"), features(model, eval_inputs))

    frozen, trained = _parts(model, p["freeze"])
    for m in frozen:
        m.eval()
        for q in m.parameters():
            q.requires_grad_(False)
    cached = frozen_features(frozen, train)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=p["lr"], weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p["epochs"])
    rng = np.random.default_rng(p["seed"])
    history = []
    for epoch in range(p["epochs"]):
        for m in trained:
            m.train()
        model.bottleneck.train()
        totals = {"id": 0.0, "triplet": 0.0, "batches": 0}
        for rows in pk_batches(labels, p["identities_per_batch"], p["images_per_identity"], rng):
            x = cached[torch.from_numpy(rows)]
            y = torch.from_numpy(labels[rows])
            for m in trained:
                x = m(x)
            pooled = model.gap(x).flatten(1)
            logits = model.classifier(model.bottleneck(pooled))
            id_loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            tri = triplet_hard(pooled, y, p["margin"])
            opt.zero_grad()
            (id_loss + tri).backward()
            opt.step()
            totals["id"] += float(id_loss.detach())
            totals["triplet"] += float(tri.detach())
            totals["batches"] += 1
        sched.step()
        b = max(1, totals["batches"])
        history.append(
            {"epoch": epoch + 1, "id_loss": round(totals["id"] / b, 4), "triplet_loss": round(totals["triplet"] / b, 4)}
        )
        print(
            f"epoch {epoch + 1}/{p['epochs']}: id {history[-1]['id_loss']:.3f} "
            f"triplet {history[-1]['triplet_loss']:.3f}",
            flush=True,
        )
    model.eval()
    train_s = time.perf_counter() - t0
    state = model.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise StageError(
            f"training diverged: {len(bad)} tensors hold NaN or infinite values (first {bad[0]}); lower lr"
        )
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write_bytes(spec.output("checkpoint.pth"), data)
    if evaluate:
        save_npy(spec.output("eval_features.npy"), features(model, eval_inputs))
    summary = {
        "params": p,
        "identities": n_ids,
        "images": int(train.shape[0]),
        "input_size": list(size),
        "history": history,
        "train_seconds": round(train_s, 2),
        "checkpoint_sha256": hashlib.sha256(data).hexdigest(),
        "versions": versions(),
    }
    atomic_write_json(spec.output("finetune.json"), summary)
    return summary


if __name__ == "__main__":
    main(run)
