"""Prompt -> kernel assignment and injection of prompts into the initial kernels.

``assign_prompts`` gives, per image, ``kernel_to_prompt``: a LongTensor [N] holding for each
kernel the index of the prompt it receives, or -1. Strategies:

- ``"spread"`` (reference): the prompt indices are tiled (0, 1, .., P-1, 0, 1, ..) to exactly
  ``prompts_per_image`` entries (truncated if P is larger) and the entries are spread evenly over
  the N kernels: kernel n takes entry ``floor(n * prompts_per_image / N)`` (N=100, 20 entries ->
  5 consecutive kernels per entry). Every kernel receives a prompt when P > 0.
- ``"cosine"``: each kernel takes its most similar prompt (cosine similarity; ties -> lowest
  prompt index). Every kernel receives a prompt when P > 0.
- ``"hungarian"``: one-to-one ``scipy.optimize.linear_sum_assignment`` on the cost
  1 - cos(prompt, kernel); min(P, N) kernels receive a prompt, the rest get -1.

``inject`` adds each kept prompt to the kernels that received it; prompt dropout removes whole
prompts (each prompt of an image is dropped with probability ``dropout`` while training).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

STRATEGIES = ("spread", "cosine", "hungarian")


@torch.no_grad()
def assign_prompts(
    prompts: Tensor,
    kernels: Tensor,
    strategy: str,
    *,
    prompts_per_image: int = 20,
) -> Tensor:
    """Assign prompts [P, D] to kernels [N, D]; returns ``kernel_to_prompt`` LongTensor [N].

    Entries are prompt indices in [0, P) or -1 (no prompt). ``prompts_per_image`` is used by
    ``"spread"`` only. The result is on ``kernels``' device and carries no gradient.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"assign_prompts: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if prompts.dim() != 2 or kernels.dim() != 2 or prompts.shape[1] != kernels.shape[1]:
        raise ValueError(
            f"assign_prompts: expected prompts [P, D] and kernels [N, D], "
            f"got {tuple(prompts.shape)} and {tuple(kernels.shape)}"
        )
    num_prompts, num_kernels = prompts.shape[0], kernels.shape[0]
    device = kernels.device
    unassigned = torch.full((num_kernels,), -1, dtype=torch.long, device=device)
    if num_prompts == 0 or num_kernels == 0:
        return unassigned
    if strategy == "spread":
        if prompts_per_image < 1:
            raise ValueError(f"assign_prompts: prompts_per_image must be >= 1, got {prompts_per_image}")
        entry = torch.arange(num_kernels, device=device) * prompts_per_image // num_kernels
        return entry % num_prompts
    similarity = F.normalize(prompts.float(), dim=1) @ F.normalize(kernels.float(), dim=1).T  # [P, N]
    if strategy == "cosine":
        return similarity.argmax(dim=0).to(device)
    prompt_idx, kernel_idx = linear_sum_assignment((1.0 - similarity).cpu().numpy())
    unassigned[torch.as_tensor(kernel_idx, device=device)] = torch.as_tensor(prompt_idx, device=device)
    return unassigned


def assign_prompts_batch(
    prompts: list[Tensor],
    kernels: Tensor,
    strategy: str,
    *,
    prompts_per_image: int = 20,
) -> list[Tensor]:
    """``assign_prompts`` for each image: prompts B x [P_i, D], kernels [B, N, D] -> B x [N]."""
    if kernels.dim() != 3 or len(prompts) != kernels.shape[0]:
        raise ValueError(
            f"assign_prompts_batch: expected kernels [B, N, D] with B = {len(prompts)}, got {tuple(kernels.shape)}"
        )
    return [
        assign_prompts(p, k, strategy, prompts_per_image=prompts_per_image)
        for p, k in zip(prompts, kernels)
    ]


class InjectionResult(NamedTuple):
    """Output of :func:`inject`.

    kernels: [B, N, D] kernels with the kept prompts added.
    dropped: B BoolTensors [P_i], True where the whole prompt was dropped.
    received: B LongTensors [N], the prompt index actually added to each kernel: the input
        ``kernel_to_prompt`` with kernels of dropped prompts set to -1.
    """

    kernels: Tensor
    dropped: list[Tensor]
    received: list[Tensor]


def inject(
    kernels: Tensor,
    prompts: list[Tensor],
    kernel_to_prompt: list[Tensor],
    dropout: float = 0.1,
    generator: torch.Generator | None = None,
    training: bool = True,
) -> InjectionResult:
    """Add matched prompts to their kernels, with whole-prompt dropout.

    Args:
        kernels: [B, N, D] initial kernels.
        prompts: B tensors [P_i, D].
        kernel_to_prompt: B LongTensors [N] with values in [-1, P_i).
        dropout: probability of dropping each prompt (only when ``training``).
        generator: CPU ``torch.Generator`` for the dropout draws (default: global RNG). One
            ``torch.rand(P_i)`` per image, in batch order, is drawn only when training with
            ``dropout > 0``; a prompt is dropped where the draw is < ``dropout``.
        training: no prompt is dropped when False.

    Kernels that receive no kept prompt are returned bit-identical. Gradients flow to
    ``kernels`` and ``prompts``.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"inject: dropout must be in [0, 1), got {dropout}")
    if kernels.dim() != 3:
        raise ValueError(f"inject: kernels must be [B, N, D], got {tuple(kernels.shape)}")
    batch, num_kernels, dim = kernels.shape
    if len(prompts) != batch or len(kernel_to_prompt) != batch:
        raise ValueError(
            f"inject: batch of {batch} kernels but {len(prompts)} prompt tensors and "
            f"{len(kernel_to_prompt)} kernel_to_prompt tensors"
        )
    out, dropped_all, received_all = [], [], []
    for i in range(batch):
        image_prompts, assignment = prompts[i], kernel_to_prompt[i].to(kernels.device)
        num_prompts = image_prompts.shape[0] if image_prompts.dim() == 2 else -1
        if image_prompts.dim() != 2 or image_prompts.shape[1] != dim:
            raise ValueError(f"inject: prompts[{i}] must be [P, {dim}], got {tuple(image_prompts.shape)}")
        if assignment.shape != (num_kernels,):
            raise ValueError(f"inject: kernel_to_prompt[{i}] must be [{num_kernels}], got {tuple(assignment.shape)}")
        if bool(((assignment < -1) | (assignment >= num_prompts)).any()):
            raise ValueError(f"inject: kernel_to_prompt[{i}] has values outside [-1, {num_prompts})")
        if training and dropout > 0 and num_prompts > 0:
            dropped = (torch.rand(num_prompts, generator=generator) < dropout).to(kernels.device)
        else:
            dropped = torch.zeros(num_prompts, dtype=torch.bool, device=kernels.device)
        has_prompt = assignment >= 0
        safe = assignment.clamp(min=0)
        if num_prompts > 0:
            has_prompt = has_prompt & ~dropped[safe]
            added = kernels[i] + image_prompts.to(kernels.dtype)[safe]
        else:
            added = kernels[i]
        out.append(torch.where(has_prompt[:, None], added, kernels[i]))
        dropped_all.append(dropped)
        received_all.append(torch.where(has_prompt, assignment, torch.full_like(assignment, -1)))
    return InjectionResult(torch.stack(out), dropped_all, received_all)
