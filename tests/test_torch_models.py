"""The two architectures (targets/torch/models.py) against shared/REFERENCE.md: keys, stem,
pooling, feature-map sizes, neck_feat, in-model normalisation, seeded calibrated random init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from targets.torch import models as M

SMALL = [64, 32]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def cfg(arch, **kw):
    base = dict(
        arch=arch, num_classes=751, last_stride=1, neck_feat="after", input_size=SMALL, seed=0, calibration_batches=2
    )
    base.update(kw)
    return base


def images(arch, n, size=SMALL, seed=123):
    return M.apply_contract(M.smooth_images(n, size, torch.Generator().manual_seed(seed)), M.ARCH_CONTRACTS[arch])


def resnet_keys(prefix):
    keys = {f"{prefix}.conv1.weight"} | {f"{prefix}.bn1.{k}" for k in BN_KEYS}
    for layer, blocks in zip(range(1, 5), (3, 4, 6, 3), strict=True):
        for i in range(blocks):
            for j in (1, 2, 3):
                keys.add(f"{prefix}.layer{layer}.{i}.conv{j}.weight")
                keys |= {f"{prefix}.layer{layer}.{i}.bn{j}.{k}" for k in BN_KEYS}
        keys.add(f"{prefix}.layer{layer}.0.downsample.0.weight")
        keys |= {f"{prefix}.layer{layer}.0.downsample.1.{k}" for k in BN_KEYS}
    return keys


@pytest.fixture(scope="module")
def strong():
    return M.init_random_model(cfg("reid-strong-baseline"))


@pytest.fixture(scope="module")
def fastreid():
    return M.init_random_model(cfg("fastreid-bagtricks-r50"))


def test_strong_baseline_state_dict_keys(strong):
    sd = strong.state_dict()
    expected = resnet_keys("base") | {f"bottleneck.{k}" for k in BN_KEYS} | {"classifier.weight"}
    assert set(sd) == expected
    assert sd["classifier.weight"].shape == (751, 2048)
    assert sd["bottleneck.weight"].shape == (2048,)
    assert not strong.bottleneck.bias.requires_grad
    assert strong.classifier.bias is None
    assert sd["base.layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert M.inference_state_dict(strong).keys() == expected - {"classifier.weight"}


def test_fastreid_state_dict_keys(fastreid):
    sd = fastreid.state_dict()
    expected = resnet_keys("backbone") | {f"heads.bottleneck.0.{k}" for k in BN_KEYS} | {"heads.weight"}
    assert set(sd) == expected  # pixel_mean/std are not persistent
    assert sd["heads.weight"].shape == (751, 2048)
    assert not fastreid.heads.bottleneck[0].bias.requires_grad
    assert isinstance(fastreid.heads.bottleneck[0], torch.nn.BatchNorm2d)
    assert fastreid.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    assert fastreid.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375])


def _maxpool_input(model, trunk, x):
    seen = {}
    handle = trunk.maxpool.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"]


def test_stem_relu_absent_in_strong_baseline_present_in_fastreid(strong, fastreid):
    assert _maxpool_input(strong, strong.base, images("reid-strong-baseline", 2)).min() < 0
    assert _maxpool_input(fastreid, fastreid.backbone, images("fastreid-bagtricks-r50", 2)).min() >= 0
    pool_s, pool_f = strong.base.maxpool, fastreid.backbone.maxpool
    assert (pool_s.kernel_size, pool_s.stride, pool_s.padding, pool_s.ceil_mode) == (3, 2, 1, False)
    assert (pool_f.kernel_size, pool_f.stride, pool_f.padding, pool_f.ceil_mode) == (3, 2, 0, True)


def _map_sizes(model, trunk, size):
    sizes = []
    hooks = [
        m.register_forward_hook(lambda mod, a, out: sizes.append(tuple(out.shape[2:])))
        for m in (trunk.conv1, trunk.maxpool, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, *size))
    for h in hooks:
        h.remove()
    return sizes


def test_feature_map_sizes_at_256x128():
    full = [256, 128]
    sb = M.build_model(cfg("reid-strong-baseline", input_size=full))
    assert _map_sizes(sb, sb.base, full) == [(128, 64), (64, 32), (64, 32), (32, 16), (16, 8), (16, 8)]
    sb2 = M.build_model(cfg("reid-strong-baseline", input_size=full, last_stride=2))
    assert _map_sizes(sb2, sb2.base, full)[-1] == (8, 4)
    fr = M.build_model(cfg("fastreid-bagtricks-r50", input_size=full))
    # p0 + ceil: 128x64 -> ceil(125/2)+1 = 64 x ceil(61/2)+1 = 32 (floor would give 63x31)
    assert _map_sizes(fr, fr.backbone, full) == [(128, 64), (64, 32), (64, 32), (32, 16), (16, 8), (16, 8)]
    odd = [250, 126]  # 125x63 after conv1: ceil p0 gives 62x31, floor p1 gives 63x32
    assert _map_sizes(fr, fr.backbone, odd)[1] == (62, 31)
    assert _map_sizes(sb, sb.base, odd)[1] == (63, 32)


def _bn_eval(x, bn):
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


@pytest.mark.parametrize("arch", list(M.ARCHS))
def test_neck_feat_before_and_after(arch, strong, fastreid):
    model = strong if arch == "reid-strong-baseline" else fastreid
    before = M.build_model(cfg(arch, neck_feat="before")).eval()
    before.load_state_dict(model.state_dict())
    x = images(arch, 3)
    with torch.no_grad():
        f_after, f_before = model(x), before(x)
    assert f_after.shape == f_before.shape == (3, 2048)
    assert f_before.min() >= 0  # a pooled ReLU output: BN not applied
    bn = model.bottleneck if arch == "reid-strong-baseline" else model.heads.bottleneck[0]
    torch.testing.assert_close(f_after, _bn_eval(f_before, bn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(M.ARCHS))
def test_training_forward_returns_logits_and_feature(arch):
    model = M.build_model(cfg(arch, num_classes=10)).train()
    scores, feat = model(images(arch, 2))
    assert scores.shape == (2, 10) and feat.shape == (2, 2048)


def test_fastreid_normalises_inside_and_leaves_input_alone(fastreid):
    x = images("fastreid-bagtricks-r50", 2)
    assert x.max() > 100  # the 0..255 contract
    x_copy = x.clone()
    with torch.no_grad():
        out = fastreid(x)
        normalised = (x - fastreid.pixel_mean) / fastreid.pixel_std
        manual = fastreid.heads.bottleneck(fastreid.heads.pool_layer(fastreid.backbone(normalised)))
    assert torch.equal(x, x_copy)
    torch.testing.assert_close(out, manual.flatten(1), rtol=1e-5, atol=1e-5)
    imagenet = M.apply_contract(x, M.ARCH_CONTRACTS["reid-strong-baseline"])  # x/255, then mean/std
    torch.testing.assert_close(normalised, imagenet, rtol=1e-4, atol=1e-4)


def _cosines(feats):
    f = F.normalize(feats, dim=1)
    c = f @ f.T
    return c[~torch.eye(len(f), dtype=torch.bool)]


@pytest.mark.parametrize("arch", list(M.ARCHS))
def test_random_init_is_not_collapsed(arch, strong, fastreid):
    model = strong if arch == "reid-strong-baseline" else fastreid
    with torch.no_grad():
        cos = _cosines(model(images(arch, 8, seed=7)))
    assert cos.max() < 0.9 and cos.mean().abs() < 0.5, cos
    # the failure it prevents: default BN statistics make every image look the same
    raw = M.build_model(cfg(arch))
    M.seeded_init(raw, 0)
    with torch.no_grad():
        assert _cosines(raw.eval()(images(arch, 8, seed=7))).min() > 0.99


def textured(n, size, seed):
    """Photograph-like 1/f noise in 0..255: statistics the smooth calibration images lack."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    freq = torch.sqrt(torch.fft.fftfreq(h).view(h, 1) ** 2 + torch.fft.rfftfreq(w).view(1, -1) ** 2)
    amp = 1.0 / freq.clamp_min(1.0 / max(h, w))
    amp[0, 0] = 0
    spec = torch.complex(
        torch.randn(n, 3, h, w // 2 + 1, generator=gen), torch.randn(n, 3, h, w // 2 + 1, generator=gen)
    )
    x = torch.fft.irfft2(spec * amp, s=(h, w))
    x = x / x.flatten(1).std(1).view(n, 1, 1, 1)
    return (0.45 + 0.2 * x + 0.15 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)).clamp(0, 1) * 255


@pytest.mark.parametrize("arch", list(M.ARCHS))
def test_calibrating_on_the_data_itself(arch, strong, fastreid):
    synthetic = strong if arch == "reid-strong-baseline" else fastreid
    contract = M.ARCH_CONTRACTS[arch]
    test = M.apply_contract(textured(8, SMALL, seed=5), contract)
    with torch.no_grad():
        assert _cosines(synthetic(test)).mean() > 0.9  # smooth-image statistics do not carry over
    calibrated = M.init_random_model(cfg(arch), M.apply_contract(textured(16, SMALL, seed=6), contract))
    with torch.no_grad():
        cos = _cosines(calibrated(test))  # other images of the same kind: spread out
    assert cos.max() < 0.9 and cos.mean().abs() < 0.5, cos
    with pytest.raises(ValueError, match="at least 2 images"):
        M.init_random_model(cfg(arch), test[:1])


def test_calibration_uses_the_input_contract(fastreid):
    # fast-reid is calibrated on 0..255 input: the stem BN saw conv outputs of that scale,
    # i.e. mean/std inside the model turned it back to ImageNet-normalised values.
    x = images("fastreid-bagtricks-r50", 4)
    with torch.no_grad():
        conv = fastreid.backbone.conv1((x - fastreid.pixel_mean) / fastreid.pixel_std)
    ratio = conv.var(dim=(0, 2, 3)) / fastreid.backbone.bn1.running_var
    assert 0.2 < ratio.median() < 5


def test_same_seed_same_weights_other_seed_other_weights(strong):
    rng = torch.random.get_rng_state()
    again = M.init_random_model(cfg("reid-strong-baseline"))
    assert torch.equal(rng, torch.random.get_rng_state())  # the caller's RNG is left alone
    a, b = strong.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = M.init_random_model(cfg("reid-strong-baseline", seed=1)).state_dict()
    assert not torch.equal(a["base.conv1.weight"], other["base.conv1.weight"])
    assert not torch.equal(a["bottleneck.running_mean"], other["bottleneck.running_mean"])


def test_build_model_rejects_unknown_arch_and_neck():
    with pytest.raises(ValueError, match="unknown arch"):
        M.build_model(cfg("resnet18"))
    with pytest.raises(ValueError, match="neck_feat"):
        M.build_model(cfg("reid-strong-baseline", neck_feat="middle"))
