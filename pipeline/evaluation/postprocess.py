"""Model outputs -> final instances per image -> COCO results dicts (pure functions).

Post-processing follows Mask2Former's instance inference:

1. class probabilities: ``softmax(pred_logits)`` over C + 1 entries, the last ("no object")
   dropped -> [N, C];
2. mask score of each kernel: the mean sigmoid probability inside its binarised mask
   (logit > 0), computed at mask stride over the valid (unpadded) region; 0 for an empty mask;
3. candidate score = class probability x mask score, for all N x C (kernel, class) pairs; the
   ``max_detections`` best are kept (stable sort: on ties the lower kernel, then class, wins);
   those with score <= ``score_threshold`` are dropped;
4. each kept mask's logits are upsampled (bilinear) to the padded input size, cropped to the
   valid ``image_size`` region, resized (bilinear) to the original image size and binarised at
   probability 0.5 (logit > 0); instances whose final mask is empty are dropped.

Coordinates: masks are indexed [row, col] = [y, x]; sizes are (height, width); COCO boxes are
``[x, y, w, h]`` in pixels of the original image, the tight box of the final mask.

Category map: class index i (0..C-1) is COCO category ``category_ids[i]``, where
``category_ids`` is sorted ascending (as stored in fine-tuned checkpoints).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor

# Kept masks are upsampled this many at a time, bounding memory at
# RESIZE_CHUNK x padded height x padded width floats.
RESIZE_CHUNK = 16


@dataclass(frozen=True)
class Instances:
    """Final instances of one image, best first.

    masks: BoolTensor [K, H0, W0] at the original image size. scores: FloatTensor [K], in
    (0, 1], descending. labels: LongTensor [K], contiguous class indices 0..C-1.
    """

    masks: Tensor
    scores: Tensor
    labels: Tensor


def mask_scores(mask_logits: Tensor) -> Tensor:
    """Mean sigmoid probability inside each binarised mask (logit > 0).

    mask_logits: [N, h, w] float -> [N] float in [0, 1]; 0 where a mask has no positive pixel.
    """
    probs = mask_logits.sigmoid()
    inside = (mask_logits > 0).to(probs.dtype)
    return (probs * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1.0)


def valid_mask_region(padded_size: tuple[int, int], mask_size: tuple[int, int],
                      image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a [h, w] mask map that cover the valid ``image_size`` part of the
    ``padded_size`` input: ``ceil(image_h * h / padded_h)``, ``ceil(image_w * w / padded_w)``."""
    rows = -(-image_size[0] * mask_size[0] // padded_size[0])
    cols = -(-image_size[1] * mask_size[1] // padded_size[1])
    return rows, cols


def select_candidates(pred_logits: Tensor, valid_mask_logits: Tensor, max_detections: int
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The ``max_detections`` best (kernel, class) pairs of one image.

    pred_logits: [N, C+1] class logits (last = no object). valid_mask_logits: [N, h', w'] mask
    logits restricted to the valid region. Returns ``(scores [K], labels [K], kernels [K])``,
    K = min(max_detections, N*C), scores descending (ties: lower kernel index, then lower class
    index first); labels are class indices 0..C-1, kernels index the N kernels.
    """
    if pred_logits.dim() != 2 or pred_logits.shape[1] < 2:
        raise ValueError(f"pred_logits must be [N, C+1] with C >= 1, got {list(pred_logits.shape)}")
    if valid_mask_logits.dim() != 3 or valid_mask_logits.shape[0] != pred_logits.shape[0]:
        raise ValueError(f"mask logits must be [N, h, w] with N = {pred_logits.shape[0]}, got "
                         f"{list(valid_mask_logits.shape)}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    num_classes = pred_logits.shape[1] - 1
    class_probs = pred_logits.float().softmax(-1)[:, :num_classes]
    scores = class_probs * mask_scores(valid_mask_logits.float())[:, None]
    flat_scores, order = torch.sort(scores.flatten(), descending=True, stable=True)
    keep = order[:max_detections]
    return flat_scores[:max_detections], keep % num_classes, keep // num_classes


def resize_masks(mask_logits: Tensor, padded_size: tuple[int, int],
                 image_size: tuple[int, int], orig_size: tuple[int, int]) -> Tensor:
    """Mask logits [K, h, w] at mask stride -> BoolTensor [K, H0, W0] at the original size.

    Bilinear upsampling to ``padded_size`` (align_corners=False), crop to the top-left
    ``image_size`` region, bilinear resize to ``orig_size``, then logit > 0 (probability > 0.5).
    """
    out = torch.zeros((mask_logits.shape[0], *orig_size), dtype=torch.bool,
                      device=mask_logits.device)
    for start in range(0, mask_logits.shape[0], RESIZE_CHUNK):
        chunk = mask_logits[start:start + RESIZE_CHUNK, None].float()
        chunk = F.interpolate(chunk, size=padded_size, mode="bilinear", align_corners=False)
        chunk = chunk[..., : image_size[0], : image_size[1]]
        if tuple(image_size) != tuple(orig_size):
            chunk = F.interpolate(chunk, size=orig_size, mode="bilinear", align_corners=False)
        out[start:start + RESIZE_CHUNK] = chunk[:, 0] > 0
    return out


def postprocess_image(pred_logits: Tensor, pred_masks: Tensor, padded_size: tuple[int, int],
                      image_size: tuple[int, int], orig_size: tuple[int, int],
                      max_detections: int = 100, score_threshold: float = 0.0) -> Instances:
    """One image's outputs -> :class:`Instances` (steps 1-4 of the module docstring).

    pred_logits: [N, C+1]; pred_masks: [N, h, w] mask logits at mask stride of the padded
    input; padded_size: (H, W) of the padded input batch; image_size: (h, w) valid region of
    this image inside the padding; orig_size: (H0, W0) original image size.
    """
    if pred_masks.dim() != 3:
        raise ValueError(f"pred_masks must be [N, h, w], got {list(pred_masks.shape)}")
    for name, (height, width) in (("image_size", image_size), ("orig_size", orig_size)):
        if height < 1 or width < 1:
            raise ValueError(f"{name} must be positive, got {(height, width)}")
    if image_size[0] > padded_size[0] or image_size[1] > padded_size[1]:
        raise ValueError(f"image_size {tuple(image_size)} exceeds the padded size "
                         f"{tuple(padded_size)}")
    rows, cols = valid_mask_region(padded_size, tuple(pred_masks.shape[-2:]), image_size)
    scores, labels, kernels = select_candidates(
        pred_logits, pred_masks[:, :rows, :cols], max_detections)
    keep = scores > score_threshold
    scores, labels, kernels = scores[keep], labels[keep], kernels[keep]
    masks = resize_masks(pred_masks[kernels], padded_size, image_size, orig_size)
    nonempty = masks.flatten(1).any(1)
    return Instances(masks=masks[nonempty], scores=scores[nonempty], labels=labels[nonempty])


def postprocess_batch(outputs: dict, padded_size: tuple[int, int],
                      image_sizes: Sequence[tuple[int, int]],
                      orig_sizes: Sequence[tuple[int, int]], max_detections: int = 100,
                      score_threshold: float = 0.0) -> list[Instances]:
    """:func:`postprocess_image` for each image of a batch.

    outputs: the model's ``pred_logits`` [B, N, C+1] and ``pred_masks`` [B, N, h, w];
    padded_size: (H, W) of the batch's ``images``; image_sizes / orig_sizes: B (h, w) pairs.
    """
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    if not logits.shape[0] == masks.shape[0] == len(image_sizes) == len(orig_sizes):
        raise ValueError(f"batch sizes differ: pred_logits {logits.shape[0]}, pred_masks "
                         f"{masks.shape[0]}, image_sizes {len(image_sizes)}, orig_sizes "
                         f"{len(orig_sizes)}")
    return [postprocess_image(logits[i], masks[i], padded_size, tuple(image_sizes[i]),
                              tuple(orig_sizes[i]), max_detections, score_threshold)
            for i in range(len(image_sizes))]


def check_category_ids(category_ids: Sequence[int], num_classes: int) -> None:
    """``ValueError`` unless ``category_ids`` holds ``num_classes`` distinct ints, ascending."""
    ids = list(category_ids)
    if len(ids) != num_classes:
        raise ValueError(f"category map has {len(ids)} ids but the model predicts "
                         f"{num_classes} classes")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
        raise ValueError(f"category ids must be integers, got {ids}")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"category ids must be strictly ascending, got {ids}")


def instances_to_coco(instances: Instances, image_id: int,
                      category_ids: Sequence[int]) -> list[dict]:
    """COCO results dicts of one image, in the order of ``instances`` (best first):
    ``{"image_id", "category_id": category_ids[label], "segmentation": RLE with str counts
    (size [H0, W0]), "bbox": [x, y, w, h] tight box of the mask, "score"}``."""
    if len(instances.scores) == 0:
        return []
    masks = instances.masks.cpu().numpy()
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    boxes = mask_utils.toBbox(rles)
    results = []
    for rle, box, score, label in zip(rles, boxes, instances.scores.tolist(),
                                      instances.labels.tolist()):
        results.append({
            "image_id": int(image_id),
            "category_id": int(category_ids[label]),
            "segmentation": {"size": [int(s) for s in rle["size"]],
                             "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in box],
            "score": float(score),
        })
    return results


def batch_to_coco_results(outputs: dict, batch: dict, category_ids: Sequence[int],
                          max_detections: int = 100, score_threshold: float = 0.0
                          ) -> list[dict]:
    """Model outputs for one batch (the training contract's batch dict: ``images``
    [B, 3, H, W], ``image_ids``, ``image_sizes``, ``orig_sizes``) -> COCO results dicts of all
    its images, image by image, best first within an image."""
    check_category_ids(category_ids, outputs["pred_logits"].shape[-1] - 1)
    padded_size = tuple(batch["images"].shape[-2:])
    per_image = postprocess_batch(outputs, padded_size, batch["image_sizes"],
                                  batch["orig_sizes"], max_detections, score_threshold)
    results: list[dict] = []
    for image_id, instances in zip(batch["image_ids"], per_image):
        results.extend(instances_to_coco(instances, image_id, category_ids))
    return results
