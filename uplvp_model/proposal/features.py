"""Dense backbone features for the feature-based proposers (``freemask``, ``maskcut``).

:func:`load_feature_backbone` builds one of our backbones (``uplvp_model.backbone``: ``tiny``,
``resnet18``, ``resnet50``) truncated after a feature level, loads local weights into it
strictly (every tensor up to that level; ``uplvp_model.checkpoint.load_backbone_checkpoint``)
and returns it in eval mode. The architecture is the one the checkpoint names (a backbone
stage's ``backbone.pt`` carries it) unless given; foreign files (torchvision, MoCo) name none
and default to ResNet-50.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import LITE0_LEVEL_BLOCKS, build_backbone
from ..checkpoint import load_backbone_checkpoint, read_backbone_file
from ..config import BACKBONES

logger = logging.getLogger(__name__)

FEATURE_LEVELS = ("layer1", "layer2", "layer3", "layer4")  # c2..c5
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
DEFAULT_BACKBONE = "resnet50"  # foreign checkpoints that name no architecture
RANDOM_INIT_SEED = 0
DEFAULT_TINY_CHANNELS = (16, 32, 64, 128)


@dataclass
class FeatureBackbone:
    """A truncated backbone: ``body(images [B, 3, H, W]) -> [B, channels, H/stride, W/stride]``."""

    body: nn.Module
    name: str
    feature_level: str
    stride: int
    channels: int


def checkpoint_architecture(checkpoint: str | None) -> tuple[str | None, tuple[int, ...] | None]:
    """(backbone name, tiny channels) that a checkpoint names, (None, None) for foreign files."""
    if checkpoint is None:
        return None, None
    _, payload = read_backbone_file(checkpoint)
    name = payload.get("backbone")
    channels = payload.get("tiny_channels")
    return (name if isinstance(name, str) else None,
            tuple(int(c) for c in channels) if isinstance(channels, (list, tuple)) else None)


def load_feature_backbone(backbone: str | None, checkpoint: str | None, feature_level: str,
                          device: str | torch.device = "cpu") -> FeatureBackbone:
    """The backbone (eval mode, on ``device``) truncated after ``feature_level``.

    backbone: ``tiny`` | ``resnet18`` | ``resnet50``, or None: the checkpoint's (else ResNet-50).
    A name that contradicts the checkpoint's is a ``ValueError``. checkpoint: local weights as
    ``load_backbone_checkpoint`` reads them (a file or a backbone stage's run folder);
    ``None`` gives seeded random weights and a loud warning (meaningless masks, tests only).
    """
    if feature_level not in FEATURE_LEVELS:
        choices = ", ".join(FEATURE_LEVELS)
        raise ValueError(f"unknown feature_level {feature_level!r}; choose one of {choices}")
    named, tiny_channels = checkpoint_architecture(checkpoint)
    if backbone is not None and backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if backbone is not None and named is not None and backbone != named:
        raise ValueError(f"{checkpoint}: a {named} backbone checkpoint, but backbone "
                         f"{backbone!r} was asked for (leave backbone unset to use the "
                         "checkpoint's)")
    name = backbone or named or DEFAULT_BACKBONE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        net = build_backbone(name, tiny_channels or DEFAULT_TINY_CHANNELS)
    level = FEATURE_LEVELS.index(feature_level)
    body = truncate(net.body, name, level)
    if checkpoint is None:
        logger.warning(
            "feature backbone %s has RANDOM weights (no checkpoint given): its masks are "
            "meaningless. Use this only for tests; pass a checkpoint for real runs.", name)
    else:  # every weight up to feature_level must fit
        load_backbone_checkpoint(body, checkpoint)
    return FeatureBackbone(body.to(device).eval(), name, feature_level, STRIDES[feature_level],
                           net.out_channels[level])


def truncate(body: nn.Module, name: str, level: int) -> nn.Sequential:
    """The backbone's weight module up to c(level + 2), child names kept (so the state-dict
    keys are the full backbone's)."""
    if name == "tiny":  # body = [stem, stage c2, c3, c4, c5]
        return nn.Sequential(OrderedDict(list(body.named_children())[: level + 2]))
    if name == "efficientnet_lite0":  # stem, then blocks up to the level's last
        blocks = body._blocks[: LITE0_LEVEL_BLOCKS[level] + 1]
        return nn.Sequential(OrderedDict([("_conv_stem", body._conv_stem), ("_bn0", body._bn0),
                                          ("_act", body._act), ("_blocks", blocks)]))
    stages = ["conv1", "bn1", "relu", "maxpool", *FEATURE_LEVELS[: level + 1]]
    return nn.Sequential(OrderedDict((n, getattr(body, n)) for n in stages))
