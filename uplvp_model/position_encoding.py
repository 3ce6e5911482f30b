"""Fixed sine position encodings (DETR style) for boxes and for feature maps.

Every scalar coordinate ``x`` (normalised to [0, 1]) becomes ``num_feats`` features

    slot 2k     = sin(x * scale / temperature ** (2k / num_feats))
    slot 2k + 1 = cos(x * scale / temperature ** (2k / num_feats))

(sin and cos interleaved, frequencies shared by each sin/cos pair), with ``scale = 2*pi`` and
``temperature = 10000`` as in DETR. A coordinate of 0 therefore gives 0 in every even slot and 1
in every odd slot.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_TEMPERATURE = 10000.0
DEFAULT_SCALE = 2.0 * math.pi
BOX_FORMATS = ("cxcywh", "xyxy")


def sine_encoding(
    coords: Tensor,
    num_feats: int,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    scale: float = DEFAULT_SCALE,
) -> Tensor:
    """Encode each coordinate of ``coords`` [..., K] into ``num_feats`` sine features.

    Returns [..., K * num_feats] in ``coords``' dtype: the ``num_feats`` features of coordinate
    0 first, then those of coordinate 1, and so on (layout in the module docstring).
    """
    if num_feats < 2 or num_feats % 2:
        raise ValueError(f"sine_encoding: num_feats must be a positive even number, got {num_feats}")
    if not coords.is_floating_point():
        raise ValueError(f"sine_encoding: coords must be floating point, got {coords.dtype}")
    pair_index = torch.arange(num_feats, device=coords.device, dtype=torch.float32) // 2
    dim_t = temperature ** (2.0 * pair_index / num_feats)
    pos = coords.float()[..., None] * scale / dim_t  # [..., K, F]
    encoded = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return encoded.flatten(-2).to(coords.dtype)


def box_position_encoding(
    boxes: Tensor,
    d_model: int,
    *,
    box_format: str = "cxcywh",
    temperature: float = DEFAULT_TEMPERATURE,
) -> Tensor:
    """Sine encoding of boxes: [P, 4] xyxy normalised to [0, 1] -> [P, d_model].

    With ``box_format="cxcywh"`` (default) the box is first converted to (cx, cy, w, h); each of
    the 4 coordinates gets ``d_model / 4`` features, in that order (so slots
    ``[0, d_model/4)`` encode cx). ``"xyxy"`` encodes (x0, y0, x1, y1) directly.
    ``d_model`` must be a multiple of 8.
    """
    if d_model % 8:
        raise ValueError(f"box_position_encoding: d_model must be a multiple of 8, got {d_model}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"box_position_encoding: boxes must be [P, 4], got {tuple(boxes.shape)}")
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_position_encoding: box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    if box_format == "cxcywh":
        x0, y0, x1, y1 = boxes.unbind(-1)
        boxes = torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)
    return sine_encoding(boxes, d_model // 4, temperature=temperature)


def sine_position_map(
    height: int,
    width: int,
    d_model: int,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """2-D sine position map [d_model, height, width] for a feature map.

    Pixel (i, j) has normalised centre y = (i + 0.5) / height, x = (j + 0.5) / width. Channels
    ``[0, d_model/2)`` encode y and ``[d_model/2, d_model)`` encode x (DETR order).
    ``d_model`` must be a multiple of 4.
    """
    if d_model % 4:
        raise ValueError(f"sine_position_map: d_model must be a multiple of 4, got {d_model}")
    if height < 1 or width < 1:
        raise ValueError(f"sine_position_map: size must be positive, got {height}x{width}")
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    num_feats = d_model // 2
    y_enc = sine_encoding(ys[:, None], num_feats, temperature=temperature)  # [H, F]
    x_enc = sine_encoding(xs[:, None], num_feats, temperature=temperature)  # [W, F]
    pos = torch.cat(
        (
            y_enc[:, None, :].expand(height, width, num_feats),
            x_enc[None, :, :].expand(height, width, num_feats),
        ),
        dim=-1,
    )
    return pos.permute(2, 0, 1).contiguous().to(dtype)
