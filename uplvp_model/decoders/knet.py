"""K-Net-style dynamic-kernel decoder.

N kernels [B, N, D] each predict a mask as the dot product of the kernel with every pixel of
``mask_features`` [B, D, h, w]. Stage 0 uses the initial kernels directly; each of the S update
stages then

1. groups pixel features by the current masks: ``sum_hw w(mask) * feature`` -> [B, N, D], with
   ``w = sigmoid(mask)`` or, with ``knet_hard_masks`` (K-Net's ``hard_mask_thr=0.5``), the
   detached binary mask ``sigmoid(mask) > 0.5``; with ``knet_feature_transform`` each stage
   first maps the mask features through its own 1x1 convolution (K-Net's ``feat_transform``),
   used for grouping and for the stage's new masks,
2. fuses them into the kernels with a gated update (K-Net's KernelUpdator: input and update
   gates computed from the product of both projections),
3. lets the kernels attend to each other (multi-head self-attention) and applies an FFN,
4. predicts class logits and a new mask kernel (and so new masks) from the updated kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .registry import DECODERS


def _fc_blocks(dim: int, count: int) -> nn.Sequential:
    """``count`` x (Linear, LayerNorm, ReLU) at width ``dim``."""
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class KernelUpdator(nn.Module):
    """Gated fusion of mask-pooled features into kernels (K-Net's KernelUpdator).

    ``forward(pooled [B, N, D], kernels [B, N, D]) -> [B, N, D]``:
    ``gate = (W_u pooled)_in * (W_k kernels)_in``;
    ``out = sigmoid(LN(G_u gate)) * act(LN(pooled_out)) + sigmoid(LN(G_k gate)) * act(LN(kernels_out))``
    followed by Linear-LayerNorm-ReLU; ``act`` is ReLU when ``gate_relu`` else the identity
    (the reference's ``activate_out=False``).
    """

    def __init__(self, dim: int, gate_relu: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.gate_relu = gate_relu
        self.update_proj = nn.Linear(dim, 2 * dim)
        self.kernel_proj = nn.Linear(dim, 2 * dim)
        self.update_gate = nn.Linear(dim, dim)
        self.kernel_gate = nn.Linear(dim, dim)
        self.update_gate_norm = nn.LayerNorm(dim)
        self.kernel_gate_norm = nn.LayerNorm(dim)
        self.update_norm = nn.LayerNorm(dim)
        self.kernel_norm = nn.LayerNorm(dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True))

    def forward(self, pooled: Tensor, kernels: Tensor) -> Tensor:
        update_in, update_out = self.update_proj(pooled).split(self.dim, dim=-1)
        kernel_in, kernel_out = self.kernel_proj(kernels).split(self.dim, dim=-1)
        gate = update_in * kernel_in
        update_gate = self.update_gate_norm(self.update_gate(gate)).sigmoid()
        kernel_gate = self.kernel_gate_norm(self.kernel_gate(gate)).sigmoid()
        update_out, kernel_out = self.update_norm(update_out), self.kernel_norm(kernel_out)
        if self.gate_relu:
            update_out, kernel_out = update_out.relu(), kernel_out.relu()
        return self.out(update_gate * update_out + kernel_gate * kernel_out)


class KernelUpdateStage(nn.Module):
    """One K-Net stage: group, gated update, self-attention, FFN, class and mask heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.hard_masks = cfg.knet_hard_masks
        self.feature_transform = nn.Conv2d(d, d, 1) if cfg.knet_feature_transform else None
        self.updator = KernelUpdator(d, gate_relu=cfg.knet_gate_relu)
        self.attention = nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.dropout,
                                               batch_first=True)
        self.attention_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_dim, d), nn.Dropout(cfg.dropout),
        )
        self.ffn_norm = nn.LayerNorm(d)
        self.cls_fcs = _fc_blocks(d, cfg.knet_cls_fcs)
        self.class_head = nn.Linear(d, cfg.num_classes + 1)
        self.mask_fcs = _fc_blocks(d, cfg.knet_mask_fcs)
        self.mask_kernel = nn.Linear(d, d)

    def forward(self, kernels: Tensor, masks: Tensor, mask_features: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``kernels`` [B, N, D], previous ``masks`` [B, N, h, w] logits, ``mask_features``
        [B, D, h, w] -> (new kernels [B, N, D], logits [B, N, C+1], mask logits [B, N, h, w])."""
        if self.feature_transform is not None:
            mask_features = self.feature_transform(mask_features)
        # Grouping sums over every pixel (~67k at 800 px, stride 4), which overflows float16
        # (max 65504): under autocast it and the gated update run in float32.
        with torch.autocast(device_type=masks.device.type, enabled=False):
            weights = (masks.detach() > 0).float() if self.hard_masks else masks.float().sigmoid()
            pooled = weights.flatten(2) @ mask_features.float().flatten(2).transpose(1, 2)
            kernels = self.updator(pooled, kernels.float())
        kernels = self.attention_norm(kernels + self.attention(kernels, kernels, kernels,
                                                               need_weights=False)[0])
        kernels = self.ffn_norm(kernels + self.ffn(kernels))
        logits = self.class_head(self.cls_fcs(kernels))
        mask_kernels = self.mask_kernel(self.mask_fcs(kernels))
        return kernels, logits, kernel_masks(mask_kernels, mask_features)


def kernel_masks(kernels: Tensor, mask_features: Tensor) -> Tensor:
    """Mask logits [B, N, h, w] = ``kernels`` [B, N, D] . ``mask_features`` [B, D, h, w]."""
    b, d, h, w = mask_features.shape
    return (kernels @ mask_features.flatten(2)).view(b, kernels.shape[1], h, w)


@DECODERS.register("knet", reference_mask_weights={"bce": 1.0, "dice": 4.0})
class KNetDecoder(nn.Module):
    """Initial kernels (normal, std ``knet_init_std``, None: D^-0.5) plus ``num_stages``
    :class:`KernelUpdateStage` s (see module docstring).

    ``forward(features, kernels)`` returns the final stage's predictions and, in
    ``aux_outputs``, stage 0 (initial kernels, masks = kernels . features, logits from
    ``init_class_head``) followed by stages 1..S-1.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.init_kernels = nn.Embedding(cfg.num_kernels, cfg.hidden_dim)
        std = cfg.knet_init_std if cfg.knet_init_std is not None else cfg.hidden_dim ** -0.5
        nn.init.normal_(self.init_kernels.weight, std=std)
        self.init_class_head = nn.Linear(cfg.hidden_dim, cfg.num_classes + 1)
        self.stages = nn.ModuleList(KernelUpdateStage(cfg) for _ in range(cfg.num_stages))

    def class_heads(self) -> list[nn.Linear]:
        """Every Linear whose output size is num_classes + 1."""
        return [self.init_class_head] + [stage.class_head for stage in self.stages]

    def forward(self, features: dict, kernels: Tensor) -> dict:
        mask_features = features["mask_features"]
        masks = kernel_masks(kernels, mask_features)
        logits = self.init_class_head(kernels)
        stage_outputs = [{"pred_logits": logits, "pred_masks": masks, "kernels": kernels}]
        for stage in self.stages:
            kernels, logits, masks = stage(kernels, masks, mask_features)
            stage_outputs.append({"pred_logits": logits, "pred_masks": masks, "kernels": kernels})
        return {**stage_outputs[-1], "aux_outputs": stage_outputs[:-1]}
