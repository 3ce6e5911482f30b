"""Hungarian assignment of predictions (kernels) to target masks, Mask2Former style.

Per image the cost of kernel n for target m is

    match[n, m] = class_weight * (-softmax(pred_logits[n])[label_m])
                + bce_weight * BCE(mask_n, mask_m) + focal_weight * focal(mask_n, mask_m)
                + dice_weight * dice(mask_n, mask_m)

with the mask terms averaged over K shared sample points (uniform random points from a seeded
generator) or over all pixels of the prediction grid (targets resampled to it). When the kernels
received prompts (pre-training), the prompt-identity cost ``identity[n, m]`` (0 where kernel n
received prompt m, i.e. the prompt made from target m, else 1) is blended in:

    cost = (1 - w) * match + w * identity,    w = identity_weight_schedule(step, ...)

``scipy.optimize.linear_sum_assignment`` then picks a one-to-one assignment (min(N, M) pairs).
At w = 1 kernels sharing a prompt (``spread``) tie; the solver breaks ties.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from uplvp_model.losses import point_sample, resize_masks, sample_points


def identity_weight_schedule(step: int, warmup_steps: int, start: float = 0.1, end: float = 1.0) -> float:
    """Identity-cost weight: linear from ``start`` at step 0 to ``end`` at ``warmup_steps``, then ``end``.

    ``warmup_steps <= 0`` gives ``end`` at every step.
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(end)
    fraction = max(step, 0) / warmup_steps
    return float(start + (end - start) * fraction)


def pairwise_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE-with-logits over K points of every (prediction, target) pair: [N, K], [M, K] -> [N, M].

    Uses ``BCE(x, t) = softplus(x) - x t`` (any t in [0, 1]): one softplus over the predictions
    and one matmul, instead of Mask2Former's two of each.
    """
    logits, targets = logits.float(), targets.float()
    return (_softplus(logits).sum(1, keepdim=True) - logits @ targets.T) / logits.shape[1]


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` as ``max(x, 0) + log(1 + exp(-|x|))`` (absolute error < 1.2e-7):
    ``F.softplus`` calls ``log1p``, about 10x slower than ``log`` on the CPU builds measured here
    (0.38 vs 0.04 ms for a [20, 1536] tensor), and this cost runs for every layer and image."""
    return x.clamp(min=0) + torch.log(1 + torch.exp(-x.abs()))


def pairwise_focal_cost(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Mean sigmoid focal loss over K points of every pair: [N, K], [M, K] -> [N, M]."""
    logits, targets = logits.float(), targets.float()
    prob = logits.sigmoid()
    pos = alpha * (1 - prob) ** gamma * F.softplus(-logits)
    neg = (1 - alpha) * prob**gamma * F.softplus(logits)
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft dice loss ``1 - (2 p.t + 1) / (sum p + sum t + 1)`` of every pair: [N, K], [M, K] -> [N, M]."""
    prob, targets = logits.float().sigmoid(), targets.float()
    numerator = 2 * prob @ targets.T + 1
    denominator = prob.sum(1)[:, None] + targets.sum(1)[None, :] + 1
    return 1 - numerator / denominator


def identity_cost(kernel_to_prompt: Tensor, num_targets: int) -> Tensor:
    """[N, M] float: 0 where kernel n received prompt m (``kernel_to_prompt[n] == m``), else 1."""
    if kernel_to_prompt.dim() != 1:
        raise ValueError(f"identity_cost: kernel_to_prompt must be [N], got {tuple(kernel_to_prompt.shape)}")
    if bool((kernel_to_prompt >= num_targets).any()) or bool((kernel_to_prompt < -1).any()):
        raise ValueError(
            f"identity_cost: kernel_to_prompt has values outside [-1, {num_targets}) "
            f"(prompt m must be the prompt of target m)"
        )
    targets = torch.arange(num_targets, device=kernel_to_prompt.device)
    return (kernel_to_prompt[:, None] != targets[None, :]).float()


def solve_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of a [N, M] cost: (row indices, column indices) on CPU,
    sorted by row. Non-finite costs raise ValueError."""
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("solve_assignment: the cost matrix has NaN or infinite entries (diverged predictions?)")
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


class HungarianMatcher:
    """Assign kernels to targets per image (see module docstring).

    Args:
        class_weight: weight of the class cost ``-prob(target class)`` (softmax over C + 1).
        bce_weight / focal_weight / dice_weight: weights of the mask costs.
        num_points: K uniform random points per image for the mask costs, or None to use every
            pixel of the prediction grid (targets resampled bilinearly to it).
        focal_alpha / focal_gamma: focal cost parameters.
    """

    def __init__(
        self,
        *,
        class_weight: float = 2.0,
        bce_weight: float = 1.0,
        dice_weight: float = 4.0,
        focal_weight: float = 0.0,
        num_points: int | None = 12544,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if num_points is not None and num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1 or None, got {num_points}")
        self.class_weight = class_weight
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.focal_weight = focal_weight
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        labels: Tensor,
        target_masks: Tensor,
        *,
        points: Tensor | None = None,
    ) -> Tensor:
        """Match cost [N, M] of one image (no identity term).

        Args:
            pred_logits: [N, C + 1] class logits (last = no object).
            pred_masks: [N, h, w] mask logits.
            labels: [M] long class indices in [0, C).
            target_masks: [M, H, W] bool/float at any resolution (same extent as the image).
            points: [K, 2] (x, y) in [0, 1] to sample both at, or None for the dense grid.
        """
        num_classes = pred_logits.shape[-1] - 1
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"HungarianMatcher: target labels must be in [0, {num_classes}), got {labels.tolist()}")
        if target_masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {labels.shape[0]} labels but {target_masks.shape[0]} target masks"
            )
        prob = pred_logits.float().softmax(-1)
        cost = -self.class_weight * prob[:, labels.to(prob.device)]
        if points is None:
            pred = pred_masks.flatten(1)
            target = resize_masks(target_masks.to(pred_masks.device), tuple(pred_masks.shape[-2:])).flatten(1)
        else:
            pred = point_sample(pred_masks, points)
            target = point_sample(target_masks.to(pred_masks.device), points)
        if self.bce_weight:
            cost = cost + self.bce_weight * pairwise_bce_cost(pred, target)
        if self.focal_weight:
            cost = cost + self.focal_weight * pairwise_focal_cost(
                pred, target, alpha=self.focal_alpha, gamma=self.focal_gamma
            )
        if self.dice_weight:
            cost = cost + self.dice_weight * pairwise_dice_cost(pred, target)
        return cost

    @torch.no_grad()
    def __call__(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: list[dict],
        *,
        kernel_to_prompt: list[Tensor] | None = None,
        identity_weight: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Match a batch.

        Args:
            pred_logits: [B, N, C + 1]; pred_masks: [B, N, h, w] mask logits.
            targets: B dicts with ``"labels"`` [M] long and ``"masks"`` [M, H, W] bool.
            kernel_to_prompt: B LongTensors [N] (prompt m = prompt of target m) to blend the
                identity cost with weight ``identity_weight``; None for no identity term.
            generator: CPU generator for the sample points (default: global RNG).

        Returns:
            B pairs (kernel indices, target indices), LongTensors on the CPU sorted by kernel.
        """
        if not 0.0 <= identity_weight <= 1.0:
            raise ValueError(f"HungarianMatcher: identity_weight must be in [0, 1], got {identity_weight}")
        if len(targets) != pred_logits.shape[0] or pred_masks.shape[:2] != pred_logits.shape[:2]:
            raise ValueError(
                f"HungarianMatcher: pred_logits {tuple(pred_logits.shape)}, pred_masks "
                f"{tuple(pred_masks.shape)} and {len(targets)} targets do not agree"
            )
        if kernel_to_prompt is not None and len(kernel_to_prompt) != len(targets):
            raise ValueError(
                f"HungarianMatcher: {len(kernel_to_prompt)} kernel_to_prompt tensors for {len(targets)} images"
            )
        indices = []
        for i, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.long)
                indices.append((empty, empty.clone()))
                continue
            points = (
                None
                if self.num_points is None
                else sample_points(self.num_points, generator=generator, device=pred_masks.device)
            )
            cost = self.cost_matrix(pred_logits[i], pred_masks[i], labels, masks, points=points)
            if kernel_to_prompt is not None and identity_weight > 0:
                identity = identity_cost(kernel_to_prompt[i].to(cost.device), labels.shape[0])
                cost = (1 - identity_weight) * cost + identity_weight * identity
            indices.append(solve_assignment(cost))
        return indices
