"""Loss functions and mask sampling helpers (pure functions on tensors).

Mask losses take matched pairs already brought to the same sampling: ``logits`` [M, K] (mask
logits at K points or pixels) and ``targets`` [M, K] in [0, 1], and return
``sum over masks of (per-mask loss) / num_masks`` (``num_masks`` clamped to >= 1), as in
Mask2Former. With M = 0 they return an exact 0 that still carries a gradient (never NaN).
Computation is in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def _normaliser(num_masks: float | Tensor) -> Tensor | float:
    if isinstance(num_masks, Tensor):
        return num_masks.float().clamp(min=1.0)
    return max(float(num_masks), 1.0)


def mask_focal_loss(
    logits: Tensor,
    targets: Tensor,
    num_masks: float | Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Sigmoid focal loss (torchvision form), mean over the K points, summed over masks / num_masks.

    Per point: ``alpha_t * (1 - p_t) ** gamma * BCE(logit, target)``.
    """
    loss = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / _normaliser(num_masks)


def mask_bce_loss(logits: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """Binary cross-entropy with logits, mean over the K points, summed over masks / num_masks."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss.mean(1).sum() / _normaliser(num_masks)


def mask_dice_loss(logits: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """Soft dice loss ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` per mask, p = sigmoid(logits);
    summed over masks / num_masks."""
    probs = logits.float().sigmoid()
    targets = targets.float()
    numerator = 2 * (probs * targets).sum(1) + 1
    denominator = probs.sum(1) + targets.sum(1) + 1
    return (1 - numerator / denominator).sum() / _normaliser(num_masks)


def kernel_embedding_loss(kernels: Tensor, targets: Tensor) -> Tensor:
    """Mean over the M pairs of ``1 - cos(kernel, target)``: kernels, targets [M, D].

    M = 0 gives an exact 0 with a gradient.
    """
    if kernels.shape != targets.shape or kernels.dim() != 2:
        raise ValueError(
            f"kernel_embedding_loss: kernels and targets must both be [M, D], "
            f"got {tuple(kernels.shape)} and {tuple(targets.shape)}"
        )
    cos = F.cosine_similarity(kernels.float(), targets.float(), dim=1, eps=1e-8)
    return (1 - cos).sum() / max(kernels.shape[0], 1)


def text_alignment_loss(
    projections: Tensor,
    text_embeddings: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.07,
) -> Tensor:
    """Cross-entropy of kernel projections against a text vocabulary (CLIP-style).

    Args:
        projections: [M, E] kernel features projected to the text space.
        text_embeddings: [V, E] one embedding per vocabulary entry.
        labels: [M] long, the vocabulary index of each kernel's target.
        temperature: logits are ``cos(projection, text) / temperature``.

    Returns the mean CE over the M kernels (exact 0 with a gradient when M = 0).
    """
    if temperature <= 0:
        raise ValueError(f"text_alignment_loss: temperature must be > 0, got {temperature}")
    if projections.dim() != 2 or text_embeddings.dim() != 2 or projections.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"text_alignment_loss: expected projections [M, E] and text_embeddings [V, E], "
            f"got {tuple(projections.shape)} and {tuple(text_embeddings.shape)}"
        )
    if labels.shape != (projections.shape[0],):
        raise ValueError(f"text_alignment_loss: labels must be [{projections.shape[0]}], got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= text_embeddings.shape[0]):
        raise ValueError(f"text_alignment_loss: labels must index the {text_embeddings.shape[0]} text embeddings")
    logits = F.normalize(projections.float(), dim=1) @ F.normalize(text_embeddings.float(), dim=1).T
    loss = F.cross_entropy(logits / temperature, labels.long(), reduction="sum")
    return loss / max(projections.shape[0], 1)


def sample_points(
    num_points: int,
    *,
    num_sets: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform random points in [0, 1]^2 as (x, y): [num_points, 2], or [num_sets, num_points, 2].

    Drawn on the CPU (from ``generator``, default the global RNG) then moved to ``device``, so
    the same seed gives the same points on any device.
    """
    if num_points < 1:
        raise ValueError(f"sample_points: num_points must be >= 1, got {num_points}")
    shape = (num_points, 2) if num_sets is None else (num_sets, num_points, 2)
    return torch.rand(shape, generator=generator).to(device)


def uncertain_points(
    logits: Tensor,
    num_points: int,
    *,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Points where each mask is least certain, plus uniform ones: [M, num_points, 2] (x, y).

    Mask2Former's (PointRend's) importance sampling for the mask losses: draw
    ``int(num_points * oversample_ratio)`` uniform candidates per mask, keep the
    ``int(num_points * importance_sample_ratio)`` whose logit (bilinearly sampled from ``logits``
    [M, h, w], detached) is closest to 0 (uncertainty ``-|logit|``), and fill up with uniform
    points. All draws come from ``generator`` (CPU), as in :func:`sample_points`.
    """
    if logits.dim() != 3:
        raise ValueError(f"uncertain_points: logits must be [M, h, w], got {tuple(logits.shape)}")
    if not oversample_ratio >= 1.0:
        raise ValueError(f"uncertain_points: oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"uncertain_points: importance_sample_ratio must be in [0, 1], got "
                         f"{importance_sample_ratio}")
    num_masks = logits.shape[0]
    num_candidates = max(int(num_points * oversample_ratio), num_points)
    num_uncertain = int(num_points * importance_sample_ratio)
    candidates = sample_points(num_candidates, num_sets=num_masks, generator=generator,
                               device=logits.device)
    uncertainty = -point_sample(logits.detach(), candidates).abs()
    keep = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, keep[..., None].expand(-1, -1, 2))
    if num_uncertain == num_points:
        return chosen
    uniform = sample_points(num_points - num_uncertain, num_sets=num_masks, generator=generator,
                            device=logits.device)
    return torch.cat([chosen, uniform], dim=1)


def point_sample(masks: Tensor, points: Tensor) -> Tensor:
    """Bilinearly sample masks at normalised points.

    Args:
        masks: [M, H, W] (bool or float); the mask spans [0, 1]^2 (align_corners=False, so
            pixel (i, j) has centre ((j + 0.5) / W, (i + 0.5) / H)).
        points: (x, y) in [0, 1]: [K, 2] shared by all masks, or [M, K, 2] one set per mask.

    Returns [M, K] float (values outside the map are border-padded).
    """
    if masks.dim() != 3:
        raise ValueError(f"point_sample: masks must be [M, H, W], got {tuple(masks.shape)}")
    values = masks.float() if not masks.is_floating_point() else masks
    grid = (2.0 * points - 1.0).to(device=values.device, dtype=values.dtype)
    if points.dim() == 2:
        sampled = F.grid_sample(values[None], grid[None, None], align_corners=False, padding_mode="border")
        return sampled[0, :, 0]
    if points.dim() == 3 and points.shape[0] == masks.shape[0]:
        sampled = F.grid_sample(values[:, None], grid[:, None], align_corners=False, padding_mode="border")
        return sampled[:, 0, 0]
    raise ValueError(f"point_sample: points must be [K, 2] or [{masks.shape[0]}, K, 2], got {tuple(points.shape)}")


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks [M, H, W] (bool or float) -> [M, h, w] float in [0, 1] (bilinear, antialiased)."""
    if masks.dim() != 3:
        raise ValueError(f"resize_masks: masks must be [M, H, W], got {tuple(masks.shape)}")
    values = masks.float()
    if values.shape[0] == 0:
        return values.new_zeros((0, *size))
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    resized = F.interpolate(values[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[:, 0].clamp(0.0, 1.0)


def semantic_label_map(targets: list[dict], num_classes: int, size: tuple[int, int]) -> Tensor:
    """Per-pixel class index [B, h, w] (long) of the targets' instance masks at ``size``.

    Each target's ``masks`` [M, H, W] are resized (:func:`resize_masks`) and a pixel of value
    >= 0.5 takes the mask's label; where masks overlap the later one wins (K-Net's
    ``seg_targets``); pixels no mask covers hold ``num_classes`` (background).
    """
    device = targets[0]["masks"].device if targets else None
    labels = torch.full((len(targets), *size), num_classes, dtype=torch.long, device=device)
    for i, target in enumerate(targets):
        masks = resize_masks(target["masks"], size) >= 0.5
        for mask, label in zip(masks, target["labels"].tolist()):
            if not 0 <= label < num_classes:
                raise ValueError(f"semantic_label_map: label {label} outside [0, {num_classes})")
            labels[i][mask] = label
    return labels


def semantic_focal_loss(logits: Tensor, label_map: Tensor, *, alpha: float = 0.25,
                        gamma: float = 2.0) -> Tensor:
    """K-Net's dense semantic loss: sigmoid focal loss of every pixel and class of ``logits``
    [B, C, h, w] against the one-hot ``label_map`` [B, h, w] (value C = background: all C
    targets 0), summed and divided by the number of foreground pixels (at least 1)."""
    num_classes = logits.shape[1]
    if label_map.shape != (logits.shape[0], *logits.shape[-2:]):
        raise ValueError(f"semantic_focal_loss: label_map must be {[logits.shape[0], *logits.shape[-2:]]}, "
                         f"got {list(label_map.shape)}")
    one_hot = F.one_hot(label_map.to(logits.device), num_classes + 1)[..., :num_classes]
    targets = one_hot.permute(0, 3, 1, 2).float()
    loss = sigmoid_focal_loss(logits.float(), targets, alpha=alpha, gamma=gamma, reduction="sum")
    return loss / (label_map < num_classes).sum().clamp(min=1).float()
