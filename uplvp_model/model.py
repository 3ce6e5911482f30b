"""The query-based instance segmentation (QEIS) model: backbone + FPN pixel decoder + a
K-Net or Mask2Former kernel decoder, assembled from a :class:`ModelConfig`.

Typical use (prompts are added to the initial kernels between the two calls)::

    model = build_model(model_config("tiny"))
    features = model.extract_features(images)            # images [B, 3, H, W], normalised
    kernels = model.initial_kernels(images.shape[0])     # [B, N, D]
    outputs = model.decode(features, kernels + prompt_offsets)
"""
from __future__ import annotations

import dataclasses
import logging
import math

from torch import Tensor, nn

from .backbone import PixelDecoder, build_backbone, freeze_batch_norm
from .checkpoint import (
    LoadReport,
    backbone_checkpoint_name,
    load_backbone_checkpoint,
    resolve_backbone_path,
)
from .config import ModelConfig
from .decoders import build_decoder

logger = logging.getLogger(__name__)


class QEISModel(nn.Module):
    """Backbone, pixel decoder and kernel decoder. See ``docs/model.md`` for the contract.

    Attributes:
        cfg: the config it was built from (``num_classes`` follows :meth:`reset_class_head`).
        backbone_load_report: what loading ``cfg.backbone_checkpoint`` did, else None.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.tiny_channels)
        self.pixel_decoder = PixelDecoder(
            self.backbone.out_channels, cfg.hidden_dim, cfg.mask_stride,
            position=cfg.mask_features_position, encoder_layers=cfg.pixel_encoder_layers,
            encoder_levels=cfg.pixel_encoder_levels, num_heads=cfg.num_heads,
            ffn_dim=cfg.ffn_dim, dropout=cfg.dropout)
        self.decoder = build_decoder(cfg)
        self.semantic_head = (build_semantic_head(cfg.hidden_dim, cfg.num_classes)
                              if cfg.semantic_head else None)
        self.backbone_load_report: LoadReport | None = None

    def extract_features(self, images: Tensor) -> dict:
        """``images`` [B, 3, H, W] float, normalised (H, W multiples of 32 give exact sizes).

        Returns ``mask_features`` [B, D, H/s, W/s]; ``multi_scale``: the
        ``cfg.num_feature_levels`` coarsest FPN levels, coarse to fine, each [B, D, H/r, W/r]
        (r = 32, 16, 8, 4); ``prompt_features`` [B, D, H/32, W/32] (the coarsest level, P5);
        ``image_size``: (H, W).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        mask_features, levels = self.pixel_decoder(self.backbone(images))
        return {
            "mask_features": mask_features,
            "multi_scale": levels[: self.cfg.num_feature_levels],
            "prompt_features": levels[0],
            "image_size": (int(images.shape[-2]), int(images.shape[-1])),
        }

    def initial_kernels(self, batch_size: int) -> Tensor:
        """The learnable initial kernels repeated over the batch: [B, N, D] (a new tensor, so
        in-place edits do not touch the parameter; gradients flow to it)."""
        return self.decoder.init_kernels.weight.unsqueeze(0).repeat(batch_size, 1, 1)

    def decode(self, features: dict, kernels: Tensor) -> dict:
        """Run the kernel decoder from ``kernels`` [B, N, D] (N = cfg.num_kernels).

        Returns ``pred_logits`` [B, N, C+1] (last index = no object), ``pred_masks``
        [B, N, H/s, W/s] mask logits, ``kernels`` [B, N, D] final kernel states and
        ``aux_outputs``: ``cfg.num_stages`` dicts with the same keys, stage 0 (predictions from
        the input kernels) first; with ``cfg.semantic_head`` also ``pred_semantic`` [B, C,
        H/s, W/s], per-class logits of every pixel of ``mask_features``.
        """
        b = features["mask_features"].shape[0]
        expected = (b, self.cfg.num_kernels, self.cfg.hidden_dim)
        if tuple(kernels.shape) != expected:
            raise ValueError(f"kernels must be [B, N, D] = {list(expected)}, "
                             f"got {list(kernels.shape)}")
        outputs = self.decoder(features, kernels)
        if self.semantic_head is not None:
            outputs["pred_semantic"] = self.semantic_head(features["mask_features"])
        return outputs

    def forward(self, images: Tensor, kernels: Tensor | None = None,
                return_features: bool = False) -> dict:
        """``extract_features`` + ``decode`` (from :meth:`initial_kernels` when ``kernels`` is
        None). With ``return_features`` the feature dict is added under ``"features"``."""
        features = self.extract_features(images)
        if kernels is None:
            kernels = self.initial_kernels(images.shape[0])
        outputs = self.decode(features, kernels)
        if return_features:
            outputs["features"] = features
        return outputs

    def class_head_keys(self) -> list[str]:
        """State-dict keys of the class-count-dependent layers (sorted)."""
        heads = {id(m) for m in self.decoder.class_heads()}
        if self.semantic_head is not None:
            heads.add(id(self.semantic_head))
        return sorted(f"{name}.{p}" for name, module in self.named_modules()
                      if id(module) in heads for p, _ in module.named_parameters())

    def reset_class_head(self, num_classes: int) -> None:
        """Replace every class head by a freshly initialised Linear(D, num_classes + 1) (and
        the semantic head by a fresh :func:`build_semantic_head`) on the same device and
        dtype; everything else is kept."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        heads = {id(head) for head in self.decoder.class_heads()}
        for name, module in list(self.decoder.named_modules()):
            if id(module) in heads:
                parent_name, _, attr = name.rpartition(".")
                parent = self.decoder.get_submodule(parent_name) if parent_name else self.decoder
                setattr(parent, attr, nn.Linear(module.in_features, num_classes + 1,
                                                device=module.weight.device,
                                                dtype=module.weight.dtype))
        if self.semantic_head is not None:
            weight = self.semantic_head.weight
            self.semantic_head = build_semantic_head(self.cfg.hidden_dim, num_classes).to(
                device=weight.device, dtype=weight.dtype)
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)


def build_semantic_head(dim: int, num_classes: int) -> nn.Conv2d:
    """1x1 conv ``dim -> num_classes``, K-Net's init: weights normal (std 0.01), bias at a
    prior probability of 0.01 (``-log(99)``), so the dense focal loss starts small."""
    head = nn.Conv2d(dim, num_classes, 1)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.constant_(head.bias, -math.log(99.0))
    return head


def build_model(cfg: ModelConfig) -> QEISModel:
    """Build the model; load ``cfg.backbone_checkpoint`` (logging the report, kept as
    ``model.backbone_load_report``), set the backbone's normalisation (``cfg.backbone_norm``)
    and then freeze the backbone if asked."""
    model = QEISModel(cfg)
    if cfg.backbone_checkpoint is not None:
        named = backbone_checkpoint_name(cfg.backbone_checkpoint)
        if named is not None and named != cfg.backbone and not cfg.backbone_allow_partial:
            raise ValueError(f"{resolve_backbone_path(cfg.backbone_checkpoint)}: a {named} "
                             f"backbone checkpoint, but the model's backbone is {cfg.backbone} "
                             "(choose the preset it was trained for)")
        report = load_backbone_checkpoint(model.backbone.body, cfg.backbone_checkpoint,
                                          allow_partial=cfg.backbone_allow_partial)
        logger.info("backbone checkpoint %s: %s", cfg.backbone_checkpoint, report.summary())
        model.backbone_load_report = report
    if cfg.backbone_norm == "frozen":
        freeze_batch_norm(model.backbone)
    elif cfg.backbone_norm == "syncbn":
        nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)  # converts its children in place
    if cfg.freeze_backbone:
        model.backbone.freeze()
    return model
