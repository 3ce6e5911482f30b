"""Config sections shared by `pretrain` and `finetune`: the model and the training data.

Both stages build the same QEIS model from a preset plus overrides (``uplvp_model.config``), so
a pre-trained checkpoint loads into the fine-tuning model with only the class head skipped.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from pipeline.errors import InputError
from pipeline.transforms import AugmentConfig, eval_config
from uplvp_model.config import MODEL_PRESETS, ModelConfig, model_config
from uplvp_model.decoders import DECODERS


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = "small"  # a file of uplvp_model/model_configs (tiny, small, lite, base)
    decoder: str = "knet"  # a registered decoder (uplvp_model/decoders: knet, mask2former)
    backbone_checkpoint: str | None = None
    # the backbone's BatchNorm: auto = frozen with a backbone checkpoint, else bn (docs/model.md)
    norm: Literal["auto", "frozen", "bn", "syncbn"] = "auto"
    # None: the stage's default (pretrain freezes a checkpoint-initialised backbone, as the
    # reference freezes its MoCo backbone; finetune trains it)
    freeze_backbone: bool | None = None
    # load only what fits from backbone_checkpoint / finetune's init (default: a checkpoint of
    # another depth or width is an error; finetune's class head is re-initialised either way)
    allow_partial_init: bool = False
    overrides: dict[str, Any] = {}  # any uplvp_model.config.ModelConfig field

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {value!r}; choose one of "
                             f"{', '.join(sorted(MODEL_PRESETS))}")
        return value

    @field_validator("decoder")
    @classmethod
    def _known_decoder(cls, value: str) -> str:
        return DECODERS.check(value)

    def build_config(self, num_classes: int, freeze_pretrained_backbone: bool = False
                     ) -> ModelConfig:
        """The model config; ``freeze_pretrained_backbone``: the stage's default for
        ``freeze_backbone`` when a backbone checkpoint is given (off without one)."""
        freeze = self.freeze_backbone
        if freeze is None:
            freeze = freeze_pretrained_backbone and self.backbone_checkpoint is not None
        try:
            return model_config(
                self.preset,
                decoder=self.decoder,
                backbone_checkpoint=self.backbone_checkpoint,
                backbone_allow_partial=self.allow_partial_init,
                backbone_norm=self.norm,
                freeze_backbone=freeze,
                num_classes=num_classes,
                **self.overrides,
            )
        except (TypeError, ValueError) as err:
            raise InputError(f"config: model: {err}") from None


class DataSection(BaseModel):
    """Batching and augmentation. ``batch_size`` is the global batch (summed over GPUs)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = 16
    short_side: tuple[int, int] = (640, 800)  # scale jitter range of the short side
    max_long_side: int = 1333
    flip_prob: float = 0.5
    eval_short_side: int = 800
    num_workers: int = 2
    persistent_workers: bool = True  # keep the loader's workers from one epoch to the next
    pin_memory: bool | None = None  # page-locked batches; None: on when training on CUDA
    seed: int = 0

    def augment(self) -> AugmentConfig:
        try:
            return AugmentConfig(tuple(self.short_side), self.max_long_side, self.flip_prob)
        except ValueError as err:
            raise InputError(f"config: data: {err}") from None

    def eval_resize(self) -> AugmentConfig:
        return eval_config(self.eval_short_side, self.max_long_side)

    def worker_options(self, device: torch.device) -> dict:
        """The loader keywords for worker processes on ``device``: ``num_workers``,
        ``persistent_workers``, ``pin_memory`` (None resolved: on for a CUDA device)."""
        pin = self.pin_memory if self.pin_memory is not None else device.type == "cuda"
        return {"num_workers": self.num_workers, "persistent_workers": self.persistent_workers,
                "pin_memory": pin}


def build_stage_model(cfg: ModelConfig):
    """``uplvp_model.model.build_model``, with a backbone checkpoint that cannot be read or does
    not fit as one :class:`InputError` line."""
    from uplvp_model.model import build_model

    try:
        return build_model(cfg)
    except ValueError as err:
        raise InputError(str(err)) from None
