"""Model configuration: one typed dataclass and named presets (``model_configs/*.json``).

``model_config("base", num_classes=80)`` returns a validated :class:`ModelConfig`. A config
round-trips through plain Python values (:meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`) so it can be stored in a ``weights_only`` checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field, StrictBool, StrictInt, ValidationError
from pydantic.dataclasses import dataclass

Backbone = Literal["tiny", "resnet18", "resnet50", "efficientnet_lite0"]
BACKBONES = get_args(Backbone)
Positive = Annotated[StrictInt, Field(ge=1)]
NonNegative = Annotated[StrictInt, Field(ge=0)]


@dataclass(config=ConfigDict(extra="forbid", validate_assignment=False))
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

    backbone: Backbone = "resnet50"
    backbone_checkpoint: str | None = None
    backbone_allow_partial: StrictBool = False
    backbone_norm: Literal["auto", "frozen", "bn", "syncbn"] = "auto"
    freeze_backbone: StrictBool = False
    decoder: str = "knet"
    hidden_dim: Positive = 256
    num_kernels: Positive = 100
    num_stages: Positive = 3
    num_classes: Positive = 1
    mask_stride: Literal[4, 8] = 4
    num_heads: Positive = 8
    ffn_dim: Positive = 2048
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    num_feature_levels: Annotated[StrictInt, Field(ge=1, le=4)] = 3
    mask_features_position: StrictBool = False
    semantic_head: StrictBool = False
    pixel_encoder_layers: NonNegative = 0
    pixel_encoder_levels: Literal[1, 2, 3] = 3
    knet_cls_fcs: NonNegative = 1
    knet_mask_fcs: NonNegative = 1
    # K-Net's reference grouping and update (issue 16; measured in the study's phase 10);
    # configs stored without these fields keep the old ones (STORED_BEFORE)
    knet_hard_masks: StrictBool = True
    knet_init_std: Annotated[float, Field(gt=0.0)] | None = 1.0
    knet_gate_relu: StrictBool = False
    knet_feature_transform: StrictBool = True
    m2f_mask_mlp_layers: Positive = 3
    tiny_channels: tuple[Positive, Positive, Positive, Positive] = (16, 32, 64, 128)

    def __post_init__(self) -> None:
        """The checks that involve several fields or the decoder registry (each field's own
        type and range are declared above and checked by pydantic)."""
        from .decoders import DECODERS  # registered by the decoder modules, which import this one

        if self.backbone_norm == "auto":
            self.backbone_norm = "frozen" if self.backbone_checkpoint else "bn"
        if self.decoder not in DECODERS:
            raise ValueError(
                f"ModelConfig.decoder must be one of {DECODERS.names()}, got {self.decoder!r}")
        if self.mask_features_position and self.hidden_dim % 4:
            raise ValueError(f"ModelConfig.mask_features_position needs hidden_dim divisible by "
                             f"4, got {self.hidden_dim}")
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"ModelConfig.hidden_dim ({self.hidden_dim}) must be divisible by "
                f"num_heads ({self.num_heads})"
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
        return build_config(cls, {**STORED_BEFORE, **values})


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


PRESET_DIR = Path(__file__).with_name("model_configs")


def _read_presets() -> dict[str, dict[str, Any]]:
    """``model_configs/<name>.json``: a ``description`` and ModelConfig fields (as open_clip's
    ``model_configs``); a new preset is a new file."""
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        values = json.loads(path.read_text(encoding="utf-8"))
        values.pop("description", None)
        presets[path.stem] = values
    return presets


MODEL_PRESETS: dict[str, dict[str, Any]] = _read_presets()


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The named preset with ``overrides`` applied; an unknown preset or field raises
    ``ValueError``."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in STORED_BEFORE}
    return ModelConfig.from_dict({**defaults, **MODEL_PRESETS[preset], **overrides})


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` with a pydantic error as one ``ValueError`` line naming the field
    (``ModelConfig.dropout: Input should be less than 1``)."""
    try:
        return cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field_name = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        where = f"{cls.__name__}.{field_name}: " if field_name else ""
        raise ValueError(f"{where}{message}") from None
