"""The backbones of the detector, all from scratch unless ``weights`` names a local file (nothing is ever
downloaded): ``tiny`` (CPU default: a small ResNet-style body + 64-channel FPN, ~3.8M parameters, 128 px input, small
RPN top-n and 128 sampled RoIs per image), ``resnet18_fpn`` and ``resnet50_fpn`` (the papers' setting: 800/1333 px,
torchvision's ResNet + FPN, 512 RoIs per image), with the per-backbone presets of the detector."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from lt_models.errors import ConfigError

BACKBONES = ("tiny", "resnet18_fpn", "resnet50_fpn")


# Per-backbone defaults: input size and the knobs that make `tiny` fast on a CPU.
PRESETS = {
    # ~3.8M parameters; 64-channel FPN and 1 RoIAlign sample per bin keep the CPU step cheap
    # (the RoIAlign backward, grid_sample's in lt_models/modeling/roi_pool.py, scales with channels x samples x RoIs).
    "tiny": dict(
        image_size=128,
        fpn_channels=64,
        representation_size=256,
        sampling_ratio=1,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=128,
    ),
    # torchvision / Detectron defaults (the papers' setting)
    "resnet18_fpn": dict(
        image_size=800,
        fpn_channels=256,
        representation_size=1024,
        sampling_ratio=2,
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=1000,
        rpn_batch_size_per_image=256,
        box_batch_size_per_image=512,
    ),
}


def default_image_size(backbone: str) -> int:
    """Shorter-edge input size of a backbone preset (128 for tiny, 800 for the ResNet-FPN presets)."""
    check_backbone(backbone)
    return PRESETS[backbone]["image_size"]


def check_backbone(backbone: str) -> None:
    if backbone not in PRESETS:
        raise ConfigError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")


# ----------------------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------------------
class TinyBody(nn.Module):
    """A small ResNet-style body for CPU training at ~128 px: a stride-2 stem and four stages of torchvision
    ``BasicBlock``s at strides 4, 8, 16, 32 (channels 32, 64, 128, 256). ``layer2..layer4`` feed the FPN."""

    layer1: nn.Sequential  # the stages, set with setattr in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, channels=(32, 64, 128, 256), blocks=(1, 1, 2, 2), norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.stem = Conv2dNormActivation(3, channels[0], kernel_size=3, stride=2, norm_layer=norm_layer)
        in_ch = channels[0]
        for i, (ch, n) in enumerate(zip(channels, blocks), start=1):
            layers = []
            for b in range(n):
                stride = 2 if b == 0 else 1
                downsample = None
                if stride != 1 or in_ch != ch:
                    downsample = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride=stride, bias=False), norm_layer(ch))
                layers.append(
                    torchvision.models.resnet.BasicBlock(in_ch, ch, stride, downsample, norm_layer=norm_layer)
                )
                in_ch = ch
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.channels = tuple(channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # used only as a classifier body; the FPN wraps children
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _load_backbone_weights(module: nn.Module, weights: str | Path) -> None:
    """Load a local state dict (e.g. ImageNet ResNet weights) into a backbone body; never downloads."""
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(
            f"backbone weights file {str(path)!r} does not exist: give a local .pt/.pth state dict "
            "or leave `weights` empty to train from scratch (nothing is downloaded)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(
            f"backbone weights file {str(path)!r} does not hold a state dict (got {type(state).__name__})"
        )
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:  # a partial load would silently train a half-random backbone
        raise ConfigError(
            f"backbone weights file {str(path)!r}: {len(missing)} of the backbone's {len(own)} tensors "
            f"are missing or have another shape (e.g. {missing[0]!r}); give a state dict of this "
            f"backbone architecture (a classification model's extra 'fc.*' tensors are ignored)"
        )
    module.load_state_dict(usable, strict=False)


def build_backbone(name: str, weights, fpn_channels: int, norm: str) -> BackboneWithFPN:
    if norm == "bn":
        norm_layer = nn.BatchNorm2d
    elif norm == "frozen_bn":
        norm_layer = FrozenBatchNorm2d
    else:
        raise ConfigError(
            f"unknown norm {norm!r}: choose 'bn' (trainable BatchNorm, from scratch) or 'frozen_bn' "
            "(pretrained weights)"
        )
    if name == "tiny":
        body = TinyBody(norm_layer=norm_layer)
        in_channels = list(body.channels[1:])
    else:
        body = getattr(torchvision.models, name.removesuffix("_fpn"))(weights=None, norm_layer=norm_layer)
        c = 64 if name == "resnet18_fpn" else 256
        in_channels = [c, 2 * c, 4 * c, 8 * c]
    if weights is not None:
        _load_backbone_weights(body, weights)
    if name == "tiny":
        return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
    else:
        return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
