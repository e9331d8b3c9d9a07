"""targets/torch/checkpoint.py: the accepted layouts, and one clear line for every bad file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from targets.common.contract import StageError
from targets.torch import checkpoint as C
from targets.torch import models as M


def cfg(arch, **kw):
    base = dict(
        arch=arch, num_classes=751, last_stride=1, neck_feat="after", input_size=[64, 32], seed=0, calibration_batches=1
    )
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def strong_sd():
    return M.init_random_model(cfg("reid-strong-baseline", seed=3)).state_dict()


@pytest.fixture(scope="module")
def fastreid_sd():
    return M.init_random_model(cfg("fastreid-bagtricks-r50", seed=3)).state_dict()


def fresh(arch="reid-strong-baseline", **kw):
    return M.build_model(cfg(arch, **kw))


def same_weights(model, sd):
    got = model.state_dict()
    return all(torch.equal(got[k], v) for k, v in sd.items() if not M.is_classifier_key(k))


def bad(path, model=None):
    """Load and expect a StageError; returns its one-line message."""
    with pytest.raises(StageError) as info:
        C.load_into(model or fresh(), path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# --------------------------------------------------------------------------- accepted layouts


def test_plain_state_dict(tmp_path, strong_sd):
    torch.save(strong_sd, tmp_path / "market.pth")
    model = fresh()
    C.load_into(model, tmp_path / "market.pth")
    assert same_weights(model, strong_sd) and not model.training


def test_fastreid_model_key_with_module_prefix_and_other_classifier(tmp_path, fastreid_sd):
    sd = {f"module.{k}": v for k, v in fastreid_sd.items()}
    sd["module.heads.weight"] = torch.zeros(702, 2048)  # DukeMTMC's classes: ignored
    torch.save({"model": sd, "optimizer": {}, "iteration": 5}, tmp_path / "model_final.pth")
    model = fresh("fastreid-bagtricks-r50")
    C.load_into(model, tmp_path / "model_final.pth")
    assert same_weights(model, fastreid_sd)


def test_state_dict_key_classifier_dropped_num_batches_tracked_optional(tmp_path, strong_sd):
    sd = {k: v for k, v in strong_sd.items() if not k.endswith("num_batches_tracked")}
    sd["classifier.weight"] = torch.zeros(10, 2048)
    torch.save({"state_dict": sd, "epoch": 120}, tmp_path / "ckpt.pth")
    model = fresh()
    C.load_into(model, tmp_path / "ckpt.pth")
    assert same_weights(model, sd)


# --------------------------------------------------------------------------- refused files


def test_not_a_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    assert "not a state dict (the file holds a list)" in bad(tmp_path / "list.pth")


def test_dict_without_tensors(tmp_path):
    torch.save({"epoch": 3, "arch": "resnet50"}, tmp_path / "meta.pth")
    assert "not a state dict (key 'epoch' holds a int)" in bad(tmp_path / "meta.pth")


def test_wrong_shapes_listed(tmp_path, strong_sd):
    sd = dict(strong_sd)
    sd["base.conv1.weight"] = torch.zeros(32, 3, 7, 7)
    sd["bottleneck.weight"] = torch.zeros(1024)
    torch.save(sd, tmp_path / "shapes.pth")
    msg = bad(tmp_path / "shapes.pth")
    assert "2 tensors have the wrong shape" in msg
    assert "base.conv1.weight: got (32, 3, 7, 7) expected (64, 3, 7, 7)" in msg
    assert "bottleneck.weight: got (1024,) expected (2048,)" in msg


def test_other_architecture_missing_and_unexpected_keys(tmp_path, fastreid_sd):
    torch.save({"model": fastreid_sd}, tmp_path / "fastreid.pth")
    msg = bad(tmp_path / "fastreid.pth", fresh("reid-strong-baseline"))
    # 323 inference keys; 54 of the missing ones are optional num_batches_tracked
    assert "missing 269 keys (base.conv1.weight," in msg and "(269 in all)" in msg
    assert "unexpected 323 keys (backbone.conv1.weight," in msg
    assert "looks like a fastreid-bagtricks-r50 checkpoint: check model.arch" in msg


def test_a_few_missing_keys(tmp_path, strong_sd):
    sd = {k: v for k, v in strong_sd.items() if not k.startswith("base.layer4.2.")}
    torch.save(sd, tmp_path / "partial.pth")
    msg = bad(tmp_path / "partial.pth")
    assert "missing 15 keys (base.layer4.2.conv1.weight" in msg and "unexpected" not in msg


class Baseline(torch.nn.Module):  # what reid-strong-baseline's trainer pickles whole
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


def test_whole_pickled_model_gets_the_fix(tmp_path):
    path = tmp_path / "resnet50_model_120.pth"
    torch.save(Baseline(), path)
    msg = bad(path)
    assert msg == (
        f"{path}: this file is a whole pickled model, not a state dict; re-save it where "
        f"its class is importable with torch.save(torch.load({str(path)!r}, "
        "weights_only=False).state_dict(), 'model_sd.pth') (only if you trust the file)"
    )


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_code_running_pickle_is_refused_not_run(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"model": Evil(marker)}, path)
        assert "refused: the pickle would call" in bad(path) and "system" in bad(path)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"model": Evil(marker)}, fh, protocol=2)
        assert "refused" in bad(path) or "not a PyTorch state-dict checkpoint" in bad(path)
    assert not marker.exists()


def test_truncated_file(tmp_path, strong_sd):
    torch.save(strong_sd, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    assert "truncated or corrupt" in bad(tmp_path / "cut.pth")


@pytest.mark.parametrize("content", [b"", b"<html>404 Not Found</html>"])
def test_garbage_file(tmp_path, content):
    (tmp_path / "x.pth").write_bytes(content)
    assert "truncated or corrupt" in bad(tmp_path / "x.pth")


def test_missing_file(tmp_path):
    assert "checkpoint file not found" in bad(tmp_path / "nope.pth")


def test_nan_weights_are_refused_naming_the_tensors(tmp_path, strong_sd):
    """A diverged run's checkpoint would make every reference feature NaN: refused at export."""
    sd = {k: v.clone() for k, v in strong_sd.items()}
    sd["base.layer4.2.bn3.weight"][0] = float("nan")
    sd["bottleneck.running_var"][3] = float("inf")
    path = tmp_path / "diverged.pth"
    torch.save(sd, path)
    msg = bad(path)
    assert "2 tensors hold NaN or infinite values" in msg
    assert "base.layer4.2.bn3.weight" in msg and "bottleneck.running_var" in msg
    torch.save(strong_sd, path)  # the same file with finite weights loads
    model = fresh()
    C.load_into(model, path)
    assert same_weights(model, strong_sd)
