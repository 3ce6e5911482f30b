"""The whole inference of one image as one traceable module, for ONNX / TorchScript export.

:class:`InstanceSegmenter` wraps a fine-tuned :class:`~uplvp_model.model.QEISModel`:

    image uint8 [1, 3, H, W] RGB (any H, W)
      -> resize (bilinear, keep aspect: short side ``short_side``, long side at most
         ``max_long_side``) -> normalise with
         ``PIXEL_MEAN`` / ``PIXEL_STD`` -> zero-pad bottom/right to multiples of 32
      -> model -> the final stage's ``pred_logits`` [N, C+1] and ``pred_masks`` [N, h, w]
      -> ``masks`` float32 [K, H, W] (mask probabilities at the input image's size),
         ``scores`` float32 [K] (descending), ``labels`` int64 [K] (COCO category ids)

with K = min(``max_detections``, N * C), fixed when the module is built. Every step is that
of ``uplvp predict`` run with one image per batch (``pipeline.transforms`` /
``pipeline.evaluation.postprocess``; the same formulas, written here with tensor sizes so that a trace
keeps H and W symbolic):

- resized size ``(int(h * scale + 0.5), int(w * scale + 0.5))``, ``scale = min(short_side /
  min(h, w), max_long_side / max(h, w))`` (computed in float64, as Python does); predict resizes
  with OpenCV (``INTER_LINEAR`` on uint8, rounded to uint8), this module with
  ``F.interpolate(bilinear, align_corners=False)`` on floats, not rounded (a rounding would turn
  last-bit differences between runtimes into whole grey levels): the two differ by at most
  about a grey level; an image already at the target size is not changed by either;
- score of a (kernel, class) pair: softmax class probability (the "no object" entry dropped)
  x the kernel's mask score (mean sigmoid inside its binarised mask over the valid, unpadded
  mask-stride region; 0 for an empty mask); the K best pairs, ties to the lower kernel, then
  class index;
- each kept mask's logits: bilinear upsampling to the padded size, crop to the resized image,
  bilinear resize to the input size, then sigmoid (``masks > 0.5`` is predict's binary mask).

No score threshold and no empty-mask filtering is applied: all K candidates come out, best
first; a caller keeps ``scores > threshold`` (predict's default: 0.5) and drops empty masks.
The wrapped model is a copy made traceable for any input size (:func:`traceable_copy`), with
the same weights and the same results:

- every TF-"SAME" convolution of the EfficientNet-Lite backbone
  (:class:`~uplvp_model.backbone.SameConv2d`, whose padding is computed from the input size in
  Python and so would be frozen into a trace) becomes a :class:`FixedPadConv2d`, the same
  convolution with the padding it has on inputs divisible by its stride: the padded input is a
  multiple of 32, so every such convolution sees one;
- a Mask2Former decoder becomes a :class:`TraceableMask2FormerDecoder`, whose "a query with
  an empty attention mask looks everywhere" step is an elementwise ``&`` instead of the boolean
  index assignment, which the ONNX exporter would record with the traced image's size.

This module imports nothing from ``pipeline`` or ``stages``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import PIXEL_MEAN, PIXEL_STD, SameConv2d
from .decoders.mask2former import Mask2FormerDecoder
from .model import QEISModel

PAD_MULTIPLE = 32  # as pipeline.transforms.PAD_MULTIPLE
INPUT_NAME = "image"
OUTPUT_NAMES = ("masks", "scores", "labels")


class InstanceSegmenter(nn.Module):
    """``forward(image uint8 [1, 3, H, W]) -> (masks [K, H, W], scores [K], labels [K])``
    (module docstring). It holds a :func:`traceable_copy` of ``model``; the module is in eval
    mode, as every export needs."""

    def __init__(self, model: QEISModel, category_ids: list[int], *, short_side: int = 800,
                 max_long_side: int = 1333, max_detections: int = 100) -> None:
        super().__init__()
        num_classes = model.cfg.num_classes
        if len(category_ids) != num_classes:
            raise ValueError(f"{len(category_ids)} category ids for a model of {num_classes} "
                             "classes")
        for name, value in (("short_side", short_side), ("max_long_side", max_long_side),
                            ("max_detections", max_detections)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model = traceable_copy(model).eval()
        self.num_classes = num_classes
        self.short_side = float(short_side)
        self.max_long_side = float(max_long_side)
        self.num_detections = min(max_detections, model.cfg.num_kernels * num_classes)
        self.register_buffer("category_ids", torch.tensor(category_ids, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1),
                             persistent=False)
        self.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if image.dim() != 4:
            raise ValueError(f"image must be [1, 3, H, W], got {list(image.shape)}")
        size = torch._shape_as_tensor(image)  # int64 [4]; traced as the graph's Shape
        orig_h, orig_w = size[2], size[3]
        height, width = self.resized_size(orig_h, orig_w)
        pad_h = (height + PAD_MULTIPLE - 1) // PAD_MULTIPLE * PAD_MULTIPLE
        pad_w = (width + PAD_MULTIPLE - 1) // PAD_MULTIPLE * PAD_MULTIPLE

        pixels = F.interpolate(image.float(), size=(height, width), mode="bilinear",
                               align_corners=False)
        normalised = (pixels / 255.0 - self.pixel_mean) / self.pixel_std
        padded = F.pad(normalised, (0, pad_w - width, 0, pad_h - height))

        outputs = self.model(padded)
        logits, mask_logits = outputs["pred_logits"][0], outputs["pred_masks"][0]
        mask_size = torch._shape_as_tensor(mask_logits)
        rows = (height * mask_size[1] + pad_h - 1) // pad_h  # pipeline valid_mask_region
        cols = (width * mask_size[2] + pad_w - 1) // pad_w
        scores, classes, kernels = self.select(logits, mask_logits[:, :rows, :cols])

        kept = mask_logits[kernels][:, None].float()  # [K, 1, h, w]
        kept = F.interpolate(kept, size=(pad_h, pad_w), mode="bilinear", align_corners=False)
        kept = kept[:, :, :height, :width]
        kept = F.interpolate(kept, size=(orig_h, orig_w), mode="bilinear", align_corners=False)
        return kept[:, 0].sigmoid(), scores, self.category_ids[classes]

    def resized_size(self, height: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
        """``pipeline.transforms.resized_size`` on int64 0-dim tensors (float64 arithmetic)."""
        h, w = height.double(), width.double()
        scale = torch.minimum(self.short_side / torch.minimum(h, w),
                              self.max_long_side / torch.maximum(h, w))
        new_h = torch.floor(h * scale + 0.5).long().clamp(min=1)
        new_w = torch.floor(w * scale + 0.5).long().clamp(min=1)
        return new_h, new_w

    def select(self, logits: Tensor, valid_mask_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``pipeline.evaluation.postprocess.select_candidates``: ``(scores [K], class indices [K],
        kernel indices [K])`` of the K best (kernel, class) pairs, ties to the lower index."""
        probs = valid_mask_logits.float().sigmoid()
        inside = (valid_mask_logits > 0).to(probs.dtype)
        mask_score = (probs * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1.0)
        class_probs = logits.float().softmax(-1)[:, : self.num_classes]
        flat = (class_probs * mask_score[:, None]).flatten()
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            # ONNX TopK (and torch.export's) put the lower index first on ties
            scores, order = torch.topk(flat, self.num_detections)
        else:
            scores, order = torch.sort(flat, descending=True, stable=True)
            scores, order = scores[: self.num_detections], order[: self.num_detections]
        return scores, order % self.num_classes, order // self.num_classes


class FixedPadConv2d(nn.Conv2d):
    """A :class:`~uplvp_model.backbone.SameConv2d` with the padding it computes for an input
    whose height and width are multiples of its stride: ``max(d * (k - 1) + 1 - s, 0)`` per
    side pair, the extra pixel right / bottom; static, so it traces for any input size."""

    def __init__(self, conv: SameConv2d) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                         conv.dilation, conv.groups, conv.bias is not None,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.bias = conv.bias
        pads = []
        for k, s, d in zip(self.kernel_size, self.stride, self.dilation):
            total = max(d * (k - 1) + 1 - s, 0)
            pads.append((total // 2, total - total // 2))
        self.pads = (pads[1][0], pads[1][1], pads[0][0], pads[0][1])

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.pads), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class TraceableMask2FormerDecoder(Mask2FormerDecoder):
    """:class:`~uplvp_model.decoders.mask2former.Mask2FormerDecoder` whose ``_predict``
    unblocks the rows of an all-blocked attention mask with ``blocked & ~all(blocked)``, the
    same values as the original's ``blocked[blocked.all(-1)] = False``."""

    def _predict(self, queries: Tensor, mask_features: Tensor, next_size: tuple[int, int]
                 ) -> tuple[dict, Tensor]:
        normed = self.decoder_norm(queries)
        logits = self.class_head(normed)
        masks = torch.einsum("bnd,bdhw->bnhw", self.mask_embed(normed), mask_features)
        resized = F.interpolate(masks.detach(), size=next_size, mode="bilinear",
                                align_corners=False)
        blocked = resized.flatten(2).sigmoid() < 0.5
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        return {"pred_logits": logits, "pred_masks": masks, "kernels": queries}, blocked


def traceable_copy(model: QEISModel) -> QEISModel:
    """A deep copy of ``model`` with every :class:`~uplvp_model.backbone.SameConv2d` replaced
    by a :class:`FixedPadConv2d` and a Mask2Former decoder turned into a
    :class:`TraceableMask2FormerDecoder` (module docstring)."""
    copied = copy.deepcopy(model)
    for module in list(copied.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SameConv2d):
                setattr(module, name, FixedPadConv2d(child))
    if type(copied.decoder) is Mask2FormerDecoder:
        copied.decoder.__class__ = TraceableMask2FormerDecoder
    return copied
