"""Load a checkpoint into one of the models, safely, or say in one line why not.

Always ``torch.load(weights_only=True)``: a checkpoint is data, never code. Accepted layouts:
a plain state dict (reid-strong-baseline's released weight), fast-reid's ``{"model": sd, ...}``
and ``{"state_dict": sd, ...}``; ``module.`` prefixes (DataParallel) are stripped and the
training-only classifier is ignored, as upstream's ``load_param`` does.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from targets.common.contract import StageError

from .models import is_classifier_key

SHOW = 5  # keys listed per problem in an error message

#: Modules a pickle names only to run code when it is loaded.
CODE_RUNNING_MODULES = {
    "os",
    "posix",
    "nt",
    "subprocess",
    "builtins",
    "__builtin__",
    "sys",
    "shutil",
    "socket",
    "runpy",
    "importlib",
    "pty",
    "code",
    "ctypes",
    "webbrowser",
    "commands",
    "multiprocessing",
    "pickle",
    "marshal",
    "types",
}

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def whole_model_fix(path: str) -> str:
    return (
        "this file is a whole pickled model, not a state dict; re-save it where its class is "
        f"importable with torch.save(torch.load({str(path)!r}, weights_only=False).state_dict(), "
        "'model_sd.pth') (only if you trust the file)"
    )


def _unpickling_message(path: str, exc: pickle.UnpicklingError) -> str:
    text = str(exc)
    found = _GLOBAL_RE.search(text)
    if found is None:
        reason = next(
            (
                ln.strip()
                for ln in reversed(text.splitlines())
                if ln.strip() and "documentation of torch.load" not in ln
            ),
            "unknown reason",
        )
        return (
            f"{path}: not a PyTorch state-dict checkpoint, or truncated or corrupt (weights-only "
            f"unpickler: {reason[:160]}); download it again or save the weights with "
            "torch.save(model.state_dict(), PATH)"
        )
    name = found.group(1)
    if name.split(".")[0] in CODE_RUNNING_MODULES or "is blocked" in text:
        return (
            f"{path}: refused: the pickle would call {name} when loaded (it can run code); "
            "it was not loaded; use a checkpoint saved with torch.save(model.state_dict(), PATH)"
        )
    if name.rsplit(".", 1)[-1][:1].isupper():
        return f"{path}: {whole_model_fix(path)}"
    return (
        f"{path}: refused: the pickle references {name}, which a weights-only load does not "
        "allow; use a checkpoint saved with torch.save(model.state_dict(), PATH)"
    )


def read_checkpoint(path: Path, shown: Optional[str] = None) -> object:
    """torch.load(weights_only=True), every failure turned into one StageError line.

    ``shown``: how to name the file in messages (the user's own path when the host copied it)."""
    path = Path(path)
    where = shown or str(path)
    if not path.is_file():
        raise StageError(f"{where}: checkpoint file not found; check model.checkpoint")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": every outcome is reported below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StageError(_unpickling_message(where, exc)) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise StageError(
            f"{where}: not a readable PyTorch checkpoint, truncated or corrupt ({detail}); download or save it again"
        ) from None


def extract_state_dict(path: str, obj: Any) -> Dict[str, torch.Tensor]:
    """The state dict inside ``obj``: module. stripped, classifier dropped."""
    if not isinstance(obj, Mapping):
        raise StageError(
            f"{path}: not a state dict (the file holds a {type(obj).__name__}); "
            "save one with torch.save(model.state_dict(), PATH)"
        )
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        what = f"key {bad[0]!r} holds a {type(obj[bad[0]]).__name__}" if bad else "it is empty"
        raise StageError(
            f"{path}: not a state dict ({what}); expected parameter names -> tensors, "
            "plain or under 'model' / 'state_dict'"
        )
    out = {}
    for key, value in obj.items():
        key = str(key)
        while key.startswith("module."):
            key = key[len("module.") :]
        if not is_classifier_key(key):
            out[key] = value
    return out


def _listed(keys: List[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def _guess_arch(keys) -> str:
    if any(k.startswith("backbone.") for k in keys):
        return "; the file looks like a fastreid-bagtricks-r50 checkpoint: check model.arch"
    if any(k.startswith("base.") for k in keys):
        return "; the file looks like a reid-strong-baseline checkpoint: check model.arch"
    return "; check model.arch and that this is a ResNet-50 ReID checkpoint"


def apply_state_dict(model: nn.Module, given: Dict[str, torch.Tensor], path: str) -> None:
    """Strict load of ``given`` into ``model`` (classifier excepted; num_batches_tracked optional)."""
    expected = {k: v for k, v in model.state_dict().items() if not is_classifier_key(k)}
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_listed(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_listed(unexpected)})")
        raise StageError(
            f"{path}: does not fit {getattr(model, 'arch', 'the model')}: "
            f"{'; '.join(parts)}{_guess_arch(given) if unexpected else ''}"
        )
    wrong = [
        f"{k}: got {tuple(given[k].shape)} expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    if wrong:
        raise StageError(
            f"{path}: {len(wrong)} tensors have the wrong shape ({_listed(wrong)}); "
            "check model.arch: the checkpoint is of another network"
        )
    # NaN/inf weights (a diverged training run) make every feature NaN: refuse them here, naming
    # the tensors, instead of exporting a model whose reference is not finite.
    nonfinite = [
        k for k in expected if k in given and given[k].is_floating_point() and not bool(torch.isfinite(given[k]).all())
    ]
    if nonfinite:
        raise StageError(
            f"{path}: {len(nonfinite)} tensors hold NaN or infinite values ({_listed(nonfinite)}); "
            "the checkpoint is from a diverged run: use an earlier one"
        )
    full = model.state_dict()
    full.update(given)
    model.load_state_dict(full, strict=True)


def load_into(model: nn.Module, path: Path, shown: Optional[str] = None) -> None:
    """Read ``path`` and load it into ``model`` (then put in eval mode); messages name ``shown``."""
    where = shown or str(path)
    apply_state_dict(model, extract_state_dict(where, read_checkpoint(path, where)), where)
    model.eval()
