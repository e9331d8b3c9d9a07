"""The two ReID architectures, written out without torchvision (facts: shared/REFERENCE.md).

``reid-strong-baseline`` (michuanhaohao/reid-strong-baseline @ 3da7e6f, ``modeling/baseline.py``)
and ``fastreid-bagtricks-r50`` (JDAI-CV/fast-reid, Baseline + ResNet50 + EmbeddingHead). Module
attribute names reproduce the upstream state-dict keys exactly, so released checkpoints load
strictly. Both share one ResNet-50 trunk (Bottleneck v1.5: the stride is on the 3x3 conv); they
differ in the stem (ReLU or not, max-pool padding/rounding), the neck (BatchNorm1d vs
BatchNorm2d) and where the input is normalised (outside vs inside the model).

Without a checkpoint, :func:`init_random_model` gives seeded weights whose BatchNorm statistics
are measured on images in the model's own input contract: a sample of the prepared dataset when
the caller has one, else smooth random images. Default BN statistics make every image's feature
nearly the same (cosine >= 0.99), which would make parity checks meaningless.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from targets.common.archs import ARCH_CONTRACTS

FEATURE_DIM = 2048
RESNET50_LAYERS = (3, 4, 6, 3)
CALIBRATION_BATCH = 8

#: fast-reid's cfg.MODEL.PIXEL_MEAN / PIXEL_STD (ImageNet statistics x 255), applied in forward().
FASTREID_PIXEL_MEAN = [123.675, 116.28, 103.53]
FASTREID_PIXEL_STD = [58.395, 57.12, 57.375]

NECK_FEATS = ("after", "before")


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck, identical in both upstreams (stride on conv2)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNet50(nn.Module):
    """The trunk; ``stem_relu`` and ``maxpool`` carry the one difference between the upstreams."""

    def __init__(self, last_stride: int, stem_relu: bool, maxpool: nn.MaxPool2d):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        # reid-strong-baseline has the stem ReLU commented out upstream (kept off for weight
        # compatibility); fast-reid has it. Identity has no state, so the keys are the same.
        self.stem_act = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        self.maxpool = maxpool
        self.layer1 = self._make_layer(64, RESNET50_LAYERS[0], stride=1)
        self.layer2 = self._make_layer(128, RESNET50_LAYERS[1], stride=2)
        self.layer3 = self._make_layer(256, RESNET50_LAYERS[2], stride=2)
        self.layer4 = self._make_layer(512, RESNET50_LAYERS[3], stride=last_stride)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem_act(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


class StrongBaseline(nn.Module):
    """reid-strong-baseline ``Baseline`` (neck='bnneck'); input normalised OUTSIDE the model."""

    arch = "reid-strong-baseline"

    def __init__(self, num_classes: int, last_stride: int, neck_feat: str):
        super().__init__()
        self.neck_feat = _check_neck_feat(neck_feat)
        self.base = ResNet50(last_stride, stem_relu=False, maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = nn.BatchNorm1d(FEATURE_DIM)
        self.bottleneck.bias.requires_grad_(False)  # "no shift": frozen at 0, still saved
        self.classifier = nn.Linear(FEATURE_DIM, num_classes, bias=False)  # training only

    def forward(self, x: torch.Tensor):
        # Upstream's own form, so the exported graph is the one users get: view(B, -1) exports
        # to a Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain that converters must handle.
        global_feat = self.gap(self.base(x))
        global_feat = global_feat.view(global_feat.shape[0], -1)
        feat = self.bottleneck(global_feat)
        if self.training:
            return self.classifier(feat), global_feat
        return feat if self.neck_feat == "after" else global_feat


class EmbeddingHead(nn.Module):
    """fast-reid EmbeddingHead (bagtricks): GlobalAvgPool, BatchNorm2d neck, classifier ``weight``."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.pool_layer = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = nn.Sequential(nn.BatchNorm2d(FEATURE_DIM))
        self.bottleneck[0].bias.requires_grad_(False)  # bias_freeze=True
        self.weight = nn.Parameter(torch.empty(num_classes, FEATURE_DIM))  # training only


class FastReidBagTricks(nn.Module):
    """fast-reid Baseline (bagtricks R50); input is RGB 0..255, mean/std applied in forward()."""

    arch = "fastreid-bagtricks-r50"

    def __init__(self, num_classes: int, last_stride: int, neck_feat: str):
        super().__init__()
        self.neck_feat = _check_neck_feat(neck_feat)
        self.backbone = ResNet50(
            last_stride, stem_relu=True, maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        )
        self.heads = EmbeddingHead(num_classes)
        # Not persistent: fast-reid does not save them. Not in place either (fast-reid's
        # sub_/div_ mutates the caller's tensor).
        self.register_buffer("pixel_mean", torch.tensor(FASTREID_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(FASTREID_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor):
        x = (x - self.pixel_mean) / self.pixel_std
        pooled = self.heads.pool_layer(self.backbone(x))
        neck = self.heads.bottleneck(pooled)
        if self.training:
            return F.linear(torch.flatten(neck, 1), self.heads.weight), torch.flatten(pooled, 1)
        # fast-reid's EmbeddingHead returns feat[..., 0, 0] in eval (exports as two Gathers).
        return (neck if self.neck_feat == "after" else pooled)[..., 0, 0]


ARCHS = {StrongBaseline.arch: StrongBaseline, FastReidBagTricks.arch: FastReidBagTricks}


def _check_neck_feat(neck_feat: str) -> str:
    if neck_feat not in NECK_FEATS:
        raise ValueError(f"neck_feat must be one of {', '.join(NECK_FEATS)}, got {neck_feat!r}")
    return neck_feat


def build_model(model_cfg: Dict[str, Any]) -> nn.Module:
    """The architecture named by the resolved matrix ``model`` section (weights: torch defaults)."""
    arch = model_cfg["arch"]
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    # Construction draws torch's default init from the global RNG; keep the caller's RNG intact.
    with torch.random.fork_rng(devices=[]):
        return ARCHS[arch](
            num_classes=int(model_cfg["num_classes"]),
            last_stride=int(model_cfg["last_stride"]),
            neck_feat=model_cfg["neck_feat"],
        )


def is_classifier_key(key: str) -> bool:
    """Training-only classifier weights: skipped on load (as upstream's load_param does)."""
    return "classifier" in key or key == "heads.weight" or key.startswith("heads.classifier")


def inference_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict without the training-only classifier."""
    return {k: v for k, v in model.state_dict().items() if not is_classifier_key(k)}


# --------------------------------------------------------------------------- seeded random weights


def seeded_init(model: nn.Module, seed: int) -> None:
    """Upstream-style init from a private generator: conv N(0, sqrt(2/n)), BN weight 1 bias 0,
    classifier N(0, 0.001)."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out), generator=gen)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.001, generator=gen)
        if isinstance(model, FastReidBagTricks):
            nn.init.normal_(model.heads.weight, 0.0, 0.001, generator=gen)


def smooth_images(n: int, input_size: List[int], gen: torch.Generator) -> torch.Tensor:
    """Smooth random RGB images in 0..255: coarse noise upsampled, a colour cast per image."""
    height, width = int(input_size[0]), int(input_size[1])
    coarse = torch.rand(n, 3, max(2, height // 16), max(2, width // 16), generator=gen)
    cast = torch.rand(n, 3, 1, 1, generator=gen)
    img = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (0.6 * img + 0.4 * cast).clamp(0.0, 1.0) * 255.0


def apply_contract(pixels: torch.Tensor, contract: Dict[str, Any]) -> torch.Tensor:
    """What the host's prepare stage does to 0..255 RGB pixels: x * scale, - mean, / std."""
    mean = torch.tensor(contract["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(contract["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels * float(contract["scale"]) - mean) / std


def calibration_count(model_cfg: Dict[str, Any]) -> int:
    """How many images calibrate the BN statistics: calibration_batches x 8."""
    return CALIBRATION_BATCH * int(model_cfg.get("calibration_batches", 4))


def synthetic_calibration_images(model_cfg: Dict[str, Any]) -> torch.Tensor:
    """Smooth random images in the model's input contract (when no real inputs are at hand)."""
    contract = model_cfg.get("contract") or ARCH_CONTRACTS[model_cfg["arch"]]
    gen = torch.Generator().manual_seed(int(model_cfg.get("seed", 0)) + 1)
    pixels = smooth_images(calibration_count(model_cfg), list(model_cfg["input_size"]), gen)
    return apply_contract(pixels, contract)


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Data-dependent BN statistics: reset, momentum=None, then ONE train-mode pass over all
    calibration images (already in the model's input contract).

    One pass, not one per batch of 8: train mode normalises with the batch's own statistics, so
    with small batches every layer downstream sees activations that eval mode (normalising with
    the pooled statistics) does not reproduce, and the final features come out 2-3x larger than
    unit variance. With the whole set in one batch the stored statistics are exactly those eval
    mode sees on the calibration images. Memory: about 0.7 GB process peak for 32 images at
    256x128."""
    if images.shape[0] < 2:
        raise ValueError(f"BatchNorm calibration needs at least 2 images, got {images.shape[0]}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


def init_random_model(model_cfg: Dict[str, Any], images: Optional[torch.Tensor] = None) -> nn.Module:
    """Build, seed and calibrate; returned in eval(). Deterministic for a given model section and
    calibration set.

    ``images``: the calibration set in the model's input contract, e.g. a sample of the prepared
    dataset (strongly preferred: statistics measured on smooth random images do not carry over to
    photographs, whose features then collapse again, cosine ~0.98 between different people).
    Default: :func:`synthetic_calibration_images`."""
    model = build_model(model_cfg)
    seeded_init(model, int(model_cfg.get("seed", 0)))
    calibrate_batchnorm(model, synthetic_calibration_images(model_cfg) if images is None else images)
    return model
