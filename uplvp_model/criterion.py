"""Training criteria: ``PretrainCriterion`` (kernel supervision) and ``SetCriterion`` (fine-tuning).

Both are called as ``criterion(outputs, targets, *, kernel_to_prompt=None, step=0)`` where

- ``outputs`` holds ``"pred_logits"`` [B, N, C + 1] (last = no object), ``"pred_masks"``
  [B, N, h, w] mask logits, ``"kernels"`` [B, N, D] and ``"aux_outputs"`` (a list of dicts with
  the same keys, one per earlier decoder stage);
- ``targets`` is a list of B dicts: ``"labels"`` LongTensor [M], ``"masks"`` BoolTensor [M, H, W]
  at input resolution, and for pre-training ``"prompts"`` [M, D] (the encoded prompt of each
  pseudo mask, for the embedding loss) and, for the text loss, ``"text_embeddings"`` [V, E] (one
  vocabulary for the whole batch: the first image's is used) and ``"label_index"`` LongTensor [M].

They return ``dict[str, Tensor]``: every term already multiplied by its weight (final layer
``"loss_<term>"``, aux layer i ``"loss_<term>_aux<i>"``) and ``"loss"``, their sum.
Mask terms compare matched predictions and targets at K random points per mask (``num_points``;
uniform, or importance-sampled in ``SetCriterion``) or, with ``num_points=None``, on the
prediction grid (targets resampled bilinearly). Mask and objectness terms are normalised by the number of target masks in the batch
(under ``torch.distributed``: the mean count over ranks, as DETR does, so that the gradient
averaged by DistributedDataParallel equals that of the whole global batch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from uplvp_model.decoders import DECODERS
from uplvp_model.losses import (
    kernel_embedding_loss,
    mask_bce_loss,
    mask_dice_loss,
    point_sample,
    resize_masks,
    sample_points,
    semantic_focal_loss,
    semantic_label_map,
    text_alignment_loss,
    uncertain_points,
)
from uplvp_model.matcher import HungarianMatcher, identity_weight_schedule

Indices = list[tuple[Tensor, Tensor]]


def objectness_logits(pred_logits: Tensor) -> Tensor:
    """Log-odds that a kernel is an object: [B, N, C + 1] -> [B, N].

    ``logsumexp(logits[..., :C]) - logits[..., C]``, so ``sigmoid`` of it equals the softmax
    probability of "any class" (for C = 1: ``softmax(logits)[..., 0]``).
    """
    return torch.logsumexp(pred_logits[..., :-1].float(), dim=-1) - pred_logits[..., -1].float()


def decoder_layers(outputs: dict) -> list[tuple[str, dict]]:
    """(name suffix, layer outputs) for the final layer ("") and each aux layer ("_aux<i>")."""
    layers = [("", outputs)]
    layers += [(f"_aux{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    return layers


STAGE_ASSIGNMENTS = ("own", "previous")


# fine-tuning mask-loss (and matching cost) weights of each decoder's reference: K-Net's
# KernelUpdateHead (BCE 1, dice 4), Mask2Former's criterion (BCE 5, dice 5); both weigh the
# class term 2
def reference_mask_weights(decoder: str) -> dict[str, float]:
    """The BCE / dice weights of ``decoder``'s reference implementation (its registry entry:
    K-Net 1 / 4, Mask2Former 5 / 5)."""
    return dict(DECODERS.info(decoder)["reference_mask_weights"])


def assignment_layers(outputs: dict, assignment: str) -> list[tuple[str, dict, dict]]:
    """(name suffix, layer outputs, outputs its targets are assigned from) per decoder layer, in
    :func:`decoder_layers` order.

    ``"previous"``: the layer of stage s > 0 from those of stage s - 1 (stage 0, the first aux
    layer, from its own), so the kernel whose mask covered an object at s - 1, and so grouped
    its pixels, is the one trained to predict that object at s. Otherwise (``"own"``) every
    layer is assigned from its own predictions.
    """
    layers = decoder_layers(outputs)
    if assignment != "previous":
        return [(suffix, layer, layer) for suffix, layer in layers]
    stages = [layer for _, layer in layers[1:]] + [outputs]  # stage order: aux0, aux1, ..., final
    source = {id(layer): stages[max(s - 1, 0)] for s, layer in enumerate(stages)}
    return [(suffix, layer, source[id(layer)]) for suffix, layer in layers]


def semantic_loss(outputs: dict, targets: list[dict]) -> Tensor | None:
    """K-Net's dense semantic loss of ``outputs["pred_semantic"]`` [B, C, h, w] (a model with
    ``semantic_head``) against the targets' per-pixel labels at that size
    (:func:`~uplvp_model.losses.semantic_focal_loss`); None when the outputs have none."""
    semantic = outputs.get("pred_semantic")
    if semantic is None:
        return None
    labels = semantic_label_map(targets, semantic.shape[1], tuple(semantic.shape[-2:]))
    return semantic_focal_loss(semantic, labels)


def check_targets(targets: list[dict], batch: int, keys: tuple[str, ...]) -> None:
    """Raise ValueError unless there are ``batch`` target dicts each holding ``keys``."""
    if len(targets) != batch:
        raise ValueError(f"criterion: {len(targets)} target dicts for a batch of {batch}")
    for i, target in enumerate(targets):
        for key in keys:
            if target.get(key) is None:
                raise ValueError(f"criterion: targets[{i}] has no {key!r}")
        if target["masks"].dim() != 3 or target["masks"].shape[0] != target["labels"].shape[0]:
            raise ValueError(
                f"criterion: targets[{i}]['masks'] must be [M, H, W] with M = {target['labels'].shape[0]} "
                f"labels, got {tuple(target['masks'].shape)}"
            )


def matched_mask_samples(
    pred_masks: Tensor,
    targets: list[dict],
    indices: Indices,
    num_points: int | None,
    generator: torch.Generator | None,
    importance_sample_ratio: float = 0.0,
    oversample_ratio: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Matched mask logits and targets brought to the same samples: two [sum M_i, K] tensors.

    With ``num_points`` K each matched pair gets its own K uniform random points, or, with
    ``importance_sample_ratio`` > 0, Mask2Former's importance-sampled points
    (:func:`~uplvp_model.losses.uncertain_points`); with None, K = h * w and the targets are
    resampled to the prediction grid.
    """
    size = tuple(pred_masks.shape[-2:])
    logits, values = [], []
    for i, (src, tgt) in enumerate(indices):
        pred = pred_masks[i, src.to(pred_masks.device)]
        target = targets[i]["masks"][tgt.to(targets[i]["masks"].device)].to(pred_masks.device)
        if num_points is None:
            logits.append(pred.flatten(1))
            values.append(resize_masks(target, size).flatten(1))
        else:
            if importance_sample_ratio > 0:
                points = uncertain_points(pred, num_points, oversample_ratio=oversample_ratio,
                                          importance_sample_ratio=importance_sample_ratio,
                                          generator=generator)
            else:
                points = sample_points(num_points, num_sets=len(src), generator=generator,
                                       device=pred_masks.device)
            logits.append(point_sample(pred, points))
            values.append(point_sample(target, points))
    return torch.cat(logits), torch.cat(values)


def num_masks_normaliser(targets: list[dict], device: torch.device) -> float:
    """Number of target masks in the batch, at least 1.

    With ``torch.distributed`` initialised every rank must call this at the same point (it is a
    collective): the count is summed over ranks (``all_reduce`` on ``device``, which must suit
    the backend: CUDA for nccl) and divided by the world size before the clamp.
    """
    count = torch.tensor(float(sum(int(t["labels"].shape[0]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(float(count), 1.0)


def _matched_kernels(kernels: Tensor, indices: Indices) -> Tensor:
    """Kernels of matched pairs, image by image: [sum M_i, D]."""
    return torch.cat([kernels[i, src.to(kernels.device)] for i, (src, _) in enumerate(indices)])


def _matched_target_rows(targets: list[dict], key: str, indices: Indices, device: torch.device) -> Tensor:
    """``targets[i][key][target index]`` of matched pairs, image by image: [sum M_i, ...]."""
    return torch.cat([targets[i][key].to(device)[tgt.to(device)] for i, (_, tgt) in enumerate(indices)])


class PretrainCriterion(nn.Module):
    """Kernel supervision for pre-training on pseudo masks.

    Terms per decoder layer (defaults: focal 2, BCE 1, dice 4, embedding 1, text 0 = off):

    - ``focal``: sigmoid focal loss (alpha 0.25, gamma 2) on :func:`objectness_logits` of all
      B x N kernels, target 1 for matched kernels and 0 otherwise; summed, / number of masks.
    - ``bce`` / ``dice``: mask losses of matched pairs (``uplvp_model.losses``).
    - ``embedding``: mean ``1 - cos(matched kernel, prompt of its target)`` (prompts detached
      unless ``detach_prompt_targets=False``).
    - ``text`` (optional): CE of ``text_projection(matched kernel)`` against the vocabulary
      ``text_embeddings`` with the target's ``label_index``; needs ``kernel_dim`` and
      ``text_dim`` and creates the learnable ``text_projection`` (train it with the model).

    Once per batch, when the outputs hold ``pred_semantic`` (a model with ``semantic_head``):
    ``semantic``, K-Net's dense semantic focal loss (:func:`semantic_loss`, weight
    ``semantic_weight``, default 1 as K-Net's ``loss_rpn_seg``).

    Matching: ``HungarianMatcher`` (class 2, BCE 1, dice 4), blended with the prompt-identity
    cost using ``identity_weight_schedule(step, identity_warmup_steps, identity_start,
    identity_end)`` when ``kernel_to_prompt`` is given.
    """

    def __init__(
        self,
        *,
        focal_weight: float = 2.0,
        bce_weight: float = 1.0,
        dice_weight: float = 4.0,
        embedding_weight: float = 1.0,
        text_weight: float = 0.0,
        kernel_dim: int | None = None,
        text_dim: int | None = None,
        text_temperature: float = 0.07,
        identity_warmup_steps: int = 1000,
        identity_start: float = 0.1,
        identity_end: float = 1.0,
        num_points: int | None = 12544,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        detach_prompt_targets: bool = True,
        semantic_weight: float = 1.0,
        stage_assignment: str = "own",
        matcher: HungarianMatcher | None = None,
    ) -> None:
        super().__init__()
        self.semantic_weight = semantic_weight
        self.stage_assignment = _checked_assignment(stage_assignment, "PretrainCriterion")
        if text_weight > 0 and (kernel_dim is None or text_dim is None):
            raise ValueError("PretrainCriterion: text_weight > 0 needs kernel_dim and text_dim")
        self.weights = {
            "focal": focal_weight,
            "bce": bce_weight,
            "dice": dice_weight,
            "embedding": embedding_weight,
            "text": text_weight,
        }
        self.text_projection = nn.Linear(kernel_dim, text_dim) if text_weight > 0 else None
        self.text_temperature = text_temperature
        self.identity_warmup_steps = identity_warmup_steps
        self.identity_start = identity_start
        self.identity_end = identity_end
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.detach_prompt_targets = detach_prompt_targets
        self.matcher = matcher or HungarianMatcher(
            class_weight=2.0, bce_weight=1.0, dice_weight=4.0, num_points=num_points
        )

    def identity_weight(self, step: int) -> float:
        """Weight of the prompt-identity cost in the matcher at ``step``."""
        return identity_weight_schedule(step, self.identity_warmup_steps, self.identity_start, self.identity_end)

    def forward(
        self,
        outputs: dict,
        targets: list[dict],
        *,
        kernel_to_prompt: list[Tensor] | None = None,
        step: int = 0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Weighted loss terms and their sum ``"loss"`` (module docstring); ``generator``
        (CPU) drives the random sample points (default: global RNG)."""
        keys = ("labels", "masks")
        if self.weights["embedding"] > 0:
            keys += ("prompts",)
        if self.text_projection is not None:
            keys += ("text_embeddings", "label_index")
        check_targets(targets, outputs["pred_logits"].shape[0], keys)
        identity = self.identity_weight(step) if kernel_to_prompt is not None else 0.0
        num_masks = num_masks_normaliser(targets, outputs["pred_logits"].device)
        losses: dict[str, Tensor] = {}
        for suffix, layer, source in assignment_layers(outputs, self.stage_assignment):
            indices = self.matcher(
                source["pred_logits"], source["pred_masks"], targets,
                kernel_to_prompt=kernel_to_prompt, identity_weight=identity, generator=generator,
            )
            for name, value in self._layer_losses(layer, targets, indices, num_masks, generator).items():
                losses[f"loss_{name}{suffix}"] = self.weights[name] * value
        semantic = semantic_loss(outputs, targets)
        if semantic is not None:
            losses["loss_semantic"] = self.semantic_weight * semantic
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def _layer_losses(
        self,
        layer: dict,
        targets: list[dict],
        indices: Indices,
        num_masks: float,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        logits = layer["pred_logits"]
        object_target = torch.zeros(logits.shape[:2], device=logits.device)
        for i, (src, _) in enumerate(indices):
            object_target[i, src.to(logits.device)] = 1.0
        focal = sigmoid_focal_loss(
            objectness_logits(logits), object_target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        mask_logits, mask_targets = matched_mask_samples(
            layer["pred_masks"], targets, indices, self.num_points, generator
        )
        losses = {
            "focal": focal / num_masks,
            "bce": mask_bce_loss(mask_logits, mask_targets, num_masks),
            "dice": mask_dice_loss(mask_logits, mask_targets, num_masks),
        }
        if self.weights["embedding"] > 0:
            kernels = _matched_kernels(layer["kernels"], indices)
            prompts = _matched_target_rows(targets, "prompts", indices, kernels.device)
            if self.detach_prompt_targets:
                prompts = prompts.detach()
            losses["embedding"] = kernel_embedding_loss(kernels, prompts)
        if self.text_projection is not None:
            kernels = _matched_kernels(layer["kernels"], indices)
            labels = _matched_target_rows(targets, "label_index", indices, kernels.device)
            vocabulary = targets[0]["text_embeddings"].to(kernels.device)
            losses["text"] = text_alignment_loss(
                self.text_projection(kernels), vocabulary, labels, temperature=self.text_temperature
            )
        return losses


class SetCriterion(nn.Module):
    """Fine-tuning set-prediction losses (Mask2Former style).

    Terms per decoder layer (defaults: ce 2, BCE 5, dice 5):

    - ``ce``: softmax cross-entropy over C + 1 classes for all B x N kernels, unmatched kernels
      target the last (no-object) class whose class weight is ``no_object_weight`` (0.1);
      weighted mean as in ``F.cross_entropy(weight=...)``.
    - ``bce`` / ``dice``: mask losses of matched pairs, at ``num_points`` points per mask: uniform,
      or with ``importance_sample_ratio`` > 0 Mask2Former's importance sampling (that share of
      the points where the prediction is least certain, among ``oversample_ratio`` x as many
      uniform candidates; Mask2Former uses 0.75 and 3). Matching always uses uniform points.

    Once per batch, when the outputs hold ``pred_semantic``: ``semantic`` (:func:`semantic_loss`,
    weight ``semantic_weight``, default 1).

    Matching: ``HungarianMatcher`` whose cost weights are the loss weights (as in Mask2Former),
    unless a ``matcher`` is given. ``kernel_to_prompt`` must be None
    and ``step`` is unused (the arguments exist so both criteria share one call).
    """

    def __init__(
        self,
        *,
        ce_weight: float = 2.0,
        bce_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int | None = 12544,
        semantic_weight: float = 1.0,
        importance_sample_ratio: float = 0.0,
        oversample_ratio: float = 3.0,
        stage_assignment: str = "own",
        matcher: HungarianMatcher | None = None,
    ) -> None:
        super().__init__()
        self.stage_assignment = _checked_assignment(stage_assignment, "SetCriterion")
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(f"SetCriterion: importance_sample_ratio must be in [0, 1], got "
                             f"{importance_sample_ratio}")
        if not oversample_ratio >= 1.0:
            raise ValueError(f"SetCriterion: oversample_ratio must be >= 1, got {oversample_ratio}")
        self.importance_sample_ratio = importance_sample_ratio
        self.oversample_ratio = oversample_ratio
        self.weights = {"ce": ce_weight, "bce": bce_weight, "dice": dice_weight}
        self.semantic_weight = semantic_weight
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        # the assignment optimises what the loss measures: a user who re-weights a loss term
        # re-weights its matching cost too
        self.matcher = matcher or HungarianMatcher(
            class_weight=ce_weight, bce_weight=bce_weight, dice_weight=dice_weight,
            num_points=num_points,
        )

    def forward(
        self,
        outputs: dict,
        targets: list[dict],
        *,
        kernel_to_prompt: list[Tensor] | None = None,
        step: int = 0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Weighted loss terms and their sum ``"loss"`` (module docstring)."""
        if kernel_to_prompt is not None:
            raise ValueError("SetCriterion: kernel_to_prompt is for pre-training; pass None when fine-tuning")
        check_targets(targets, outputs["pred_logits"].shape[0], ("labels", "masks"))
        num_masks = num_masks_normaliser(targets, outputs["pred_logits"].device)
        losses: dict[str, Tensor] = {}
        for suffix, layer, source in assignment_layers(outputs, self.stage_assignment):
            indices = self.matcher(source["pred_logits"], source["pred_masks"], targets,
                                   generator=generator)
            logits = layer["pred_logits"]
            num_classes = logits.shape[-1] - 1
            target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
            for i, (src, tgt) in enumerate(indices):
                target_classes[i, src.to(logits.device)] = targets[i]["labels"].to(logits.device)[tgt.to(logits.device)]
            class_weight = torch.ones(num_classes + 1, device=logits.device)
            class_weight[-1] = self.no_object_weight
            mask_logits, mask_targets = matched_mask_samples(
                layer["pred_masks"], targets, indices, self.num_points, generator,
                self.importance_sample_ratio, self.oversample_ratio,
            )
            terms = {
                "ce": F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=class_weight),
                "bce": mask_bce_loss(mask_logits, mask_targets, num_masks),
                "dice": mask_dice_loss(mask_logits, mask_targets, num_masks),
            }
            for name, value in terms.items():
                losses[f"loss_{name}{suffix}"] = self.weights[name] * value
        semantic = semantic_loss(outputs, targets)
        if semantic is not None:
            losses["loss_semantic"] = self.semantic_weight * semantic
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses


def _checked_assignment(assignment: str, owner: str) -> str:
    if assignment not in STAGE_ASSIGNMENTS:
        raise ValueError(f"{owner}: stage_assignment must be one of {STAGE_ASSIGNMENTS}, got "
                         f"{assignment!r}")
    return assignment
