"""The peers a user would pick instead of our models, on our batch contract.

Shared by ``experiments/peers.py`` (the equal-budget table) and ``experiments/low_data_study.py``
(the Mask R-CNN cells): transformers' ``Mask2FormerForUniversalSegmentation`` built from a
config (nothing downloaded) and torchvision's ``MaskRCNN`` on a ResNet FPN backbone with
``weights=None``; each gets our loader's padded, normalised batches, is trained by
``pipeline.engine.train`` and scored by ``pipeline.evaluation``'s pycocotools code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PEERS = ("hf_mask2former", "maskrcnn")
# transformers ResNet stage layout per torchvision depth (block type, blocks per stage, widths)
RESNET_LAYOUT = {
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
}


def build_hf_mask2former(num_classes: int, depth: str, **config: Any):
    """transformers' Mask2Former (its default config, or with ``config`` changes: tests use a
    smaller one) on a random transformers ResNet of ``depth``."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    layer_type, depths, widths = RESNET_LAYOUT[depth]
    backbone = ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=widths,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=num_classes,
                               use_pretrained_backbone=False, **config)
    return Mask2FormerForUniversalSegmentation(config)


def hf_mask2former_loss(model, batch: dict) -> dict:
    """transformers computes its own matching and losses from per-image masks and labels."""
    valid = valid_pixel_mask(batch)
    out = model(pixel_values=batch["images"], pixel_mask=valid,
                mask_labels=[t["masks"].float() for t in batch["targets"]],
                class_labels=[t["labels"] for t in batch["targets"]])
    return {"loss": out.loss}


def valid_pixel_mask(batch: dict) -> Tensor:
    """[B, H, W] long: 1 inside each image's valid region, 0 on the padding."""
    images = batch["images"]
    valid = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.long,
                        device=images.device)
    for i, (h, w) in enumerate(batch["image_sizes"]):
        valid[i, :h, :w] = 1
    return valid


class QueryOutputs(nn.Module):
    """transformers' Mask2Former returning our output contract (``pred_logits`` [B, Q, C+1],
    ``pred_masks`` [B, Q, H/4, W/4]), so that our post-processing scores it as it scores ours."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: Tensor) -> dict:
        out = self.inner(pixel_values=images)
        return {"pred_logits": out.class_queries_logits, "pred_masks": out.masks_queries_logits}


def build_maskrcnn(num_classes: int, depth: str, size: int, backbone_checkpoint: Path | None):
    """torchvision Mask R-CNN, ResNet-``depth`` FPN backbone, trained BatchNorm when random
    (FrozenBatchNorm2d with a checkpoint, as torchvision does), no resize of its own."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import misc

    norm = misc.FrozenBatchNorm2d if backbone_checkpoint else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name=depth, weights=None, norm_layer=norm,
                                   trainable_layers=5)
    if backbone_checkpoint:
        load_peer_backbone(backbone.body, backbone_checkpoint)

    model = MaskRCNN(backbone, num_classes=num_classes + 1, box_score_thresh=0.0,
                     box_detections_per_img=100)
    model.transform = _no_resize_transform(size)
    return model


def load_peer_backbone(body: nn.Module, checkpoint: str | Path) -> None:
    """Our backbone loader (``uplvp_model.checkpoint.load_backbone_checkpoint``: a file or a
    ``stage backbone`` run folder; every tensor must fit) into a peer's backbone body; what does
    not fit ends the benchmark with one line."""
    from uplvp_model.checkpoint import load_backbone_checkpoint

    try:
        load_backbone_checkpoint(body, checkpoint)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def _no_resize_transform(size: int):
    """torchvision's batching transform without its resize (our loader has resized) and with
    identity normalisation (our loader has normalised)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class NoResize(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    return NoResize(size, size, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


def maskrcnn_inputs(batch: dict) -> tuple[list, list]:
    """Our padded batch -> torchvision's per-image tensors cropped to the valid region and
    targets (xyxy boxes of the masks, labels 1..C, uint8 masks)."""
    from torchvision.ops import masks_to_boxes

    images, targets = [], []
    for i, (h, w) in enumerate(batch["image_sizes"]):
        images.append(batch["images"][i, :, :h, :w])
        target = batch["targets"][i]
        masks = target["masks"][:, :h, :w]
        boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)
        targets.append({"boxes": boxes, "labels": target["labels"] + 1,
                        "masks": masks.to(torch.uint8)})
    return images, targets


def maskrcnn_loss(model, batch: dict) -> dict:
    images, targets = maskrcnn_inputs(batch)
    losses = model(images, targets)
    return {"loss": sum(losses.values()), **losses}


def maskrcnn_results(model, batches, category_ids: list[int], device) -> list[dict]:
    """COCO results of Mask R-CNN: box scores, its pasted mask probabilities resized to the
    original image size and thresholded at 0.5 (torchvision's convention)."""
    import torch.nn.functional as F

    from pipeline.evaluation import Instances, instances_to_coco

    model.eval()
    results: list[dict] = []
    with torch.inference_mode():
        for batch in batches:
            images = [batch["images"][i, :, :h, :w].to(device)
                      for i, (h, w) in enumerate(batch["image_sizes"])]
            for image_id, orig, det in zip(batch["image_ids"], batch["orig_sizes"],
                                           model(images)):
                probs = det["masks"][:, :1].float()
                if len(probs):
                    probs = F.interpolate(probs, size=tuple(orig), mode="bilinear",
                                          align_corners=False)
                masks = probs[:, 0] > 0.5
                keep = masks.flatten(1).any(1)
                results.extend(instances_to_coco(
                    Instances(masks[keep].cpu(), det["scores"][keep].cpu(),
                              (det["labels"][keep] - 1).cpu()), image_id, category_ids))
    return results


def train_peer(name: str, train_set, category_ids: list[int], *, batch_size: int, augment,
               seed: int, train_cfg, run_dir: Path, device: torch.device, depth: str,
               size: int, backbone_checkpoint: str | None = None, resume: bool = False,
               val_set=None, eval_resize=None, width: int | None = None,
               freeze_backbone: bool = False) -> nn.Module:
    """Train peer ``name`` on ``train_set`` with our loader (``augment``: an AugmentConfig) and
    trainer; returns the model ready for :func:`score_peer`. ``size`` is Mask R-CNN's nominal
    image size (its own resize is off); ``depth`` ``"tiny"`` or a ``width`` builds
    :func:`build_maskrcnn_ours` on our backbone ``depth`` (FPN and heads ``width`` wide, 64 by
    default; ``freeze_backbone`` stops the backbone's gradients), other depths torchvision's
    full-width ResNet-FPN Mask R-CNN.
    With ``val_set`` (and ``eval_resize``) it is scored
    every ``train_cfg.eval_every`` steps, as our fine-tuning does: ``val/segm_AP`` and the
    other metrics go to the run's metrics.jsonl."""
    from pipeline.coco_dataset import finetune_loader
    from pipeline.evaluation import flat_metrics
    from pipeline.engine import seed_all, train

    seed_all(seed)
    if name == "hf_mask2former":
        inner = build_hf_mask2former(len(category_ids), depth)
        loss = hf_mask2former_loss
    elif name == "maskrcnn":
        checkpoint = Path(backbone_checkpoint) if backbone_checkpoint else None
        if depth == "tiny" or width is not None:
            inner = build_maskrcnn_ours(len(category_ids), size, depth, width or 64,
                                        backbone_checkpoint=checkpoint,
                                        freeze_backbone=freeze_backbone)
        else:
            inner = build_maskrcnn(len(category_ids), depth, size, checkpoint)
        loss = maskrcnn_loss
    else:
        raise ValueError(f"unknown peer {name!r}; choose one of {PEERS}")
    inner.to(device)
    loader = finetune_loader(train_set, batch_size, seed=seed, augment_config=augment,
                             category_map=category_ids)
    wrap = QueryOutputs if name == "hf_mask2former" else (lambda module: module)

    def validate(module: nn.Module, step: int) -> dict:
        metrics = score_peer(name, wrap(module), val_set, category_ids, eval_resize, device)
        return {k: v for k, v in flat_metrics(metrics, "val/").items()
                if isinstance(v, (int, float))}

    train(inner, lambda module, batch, step: loss(module, batch), loader.make_batches,
          train_cfg, run_dir, label=name, resume=resume,
          evaluate=validate if val_set is not None else None)
    return wrap(inner)


def score_peer(name: str, model: nn.Module, val_set, category_ids: list[int], resize,
               device: torch.device, agnostic: bool = False) -> dict:
    """pycocotools metrics of a trained peer on ``val_set`` (``resize``: the eval
    AugmentConfig): the query peer through our post-processing, Mask R-CNN through its own;
    with ``agnostic`` also ``segm_agnostic`` (``pipeline.evaluation.class_agnostic_segm``)."""
    from pipeline.coco_dataset import eval_loader
    from pipeline.evaluation import class_agnostic_segm, evaluate_predictions
    from pipeline.evaluation import evaluate_model

    batches = eval_loader(val_set, 4, resize=resize, category_map=category_ids).make_batches(0)
    if name == "maskrcnn":
        results = maskrcnn_results(model, batches, category_ids, device)
        metrics = evaluate_predictions(val_set.coco, results)
    else:
        metrics, results = evaluate_model(model, batches, val_set.coco, category_ids,
                                          device=device)
    if agnostic:
        metrics["segm_agnostic"] = class_agnostic_segm(val_set.coco, results)
    return metrics


class _OurBody(nn.Module):
    """One of our backbones (``uplvp_model.backbone``: tiny CNN, ResNet, EfficientNet-Lite0)
    returning torchvision's ``OrderedDict`` of its four levels (strides 4, 8, 16, 32) through an
    FPN of ``width`` channels."""

    def __init__(self, name: str, channels: tuple[int, int, int, int], width: int) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
        )

        from uplvp_model.backbone import build_backbone

        self.body = build_backbone(name, channels)
        self.fpn = FeaturePyramidNetwork(list(self.body.out_channels), width,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = width

    def forward(self, images: Tensor):
        from collections import OrderedDict

        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(images))))


def build_maskrcnn_ours(num_classes: int, size: int, backbone: str = "tiny", width: int = 64,
                        channels: tuple[int, int, int, int] = (16, 32, 64, 128),
                        box_batch_size_per_image: int = 128,
                        backbone_checkpoint: Path | None = None,
                        freeze_backbone: bool = False):
    """torchvision Mask R-CNN at our models' size: one of our backbones (``backbone``: the
    preset's, the one our decoders sit on) under an FPN of ``width`` channels, box head of 4 x
    ``width`` and mask head of ``width`` channels (torchvision's layouts, narrowed as our
    decoders are narrowed to their hidden width), trained BatchNorm, no resize of its own. RPN
    settings are torchvision's; the box head samples ``box_batch_size_per_image`` proposals per
    image (torchvision: 512; 128, detectron2's ``BATCH_SIZE_PER_IMAGE`` of its fast schedules,
    is plenty for a few objects per small image and makes a CPU step ~4x cheaper). With
    ``backbone_checkpoint`` the backbone's weights come from it and its BatchNorm is frozen
    (FrozenBatchNorm2d, as torchvision freezes a loaded ResNet's); ``freeze_backbone`` also
    stops its gradients (the FPN and heads train)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    classes = num_classes + 1
    body = _OurBody(backbone, channels, width)
    if backbone_checkpoint:
        from uplvp_model.backbone import freeze_batch_norm

        load_peer_backbone(body.body.body, backbone_checkpoint)
        freeze_batch_norm(body.body)
    if freeze_backbone:
        body.body.freeze()
    model = MaskRCNN(
        body, num_classes=None,
        box_head=TwoMLPHead(width * 7 * 7, 4 * width),
        box_predictor=FastRCNNPredictor(4 * width, classes),
        mask_head=MaskRCNNHeads(width, [width] * 4, 1),
        mask_predictor=MaskRCNNPredictor(width, width, classes),
        box_batch_size_per_image=box_batch_size_per_image,
        box_score_thresh=0.0, box_detections_per_img=100)
    model.transform = _no_resize_transform(size)
    return model


def build_maskrcnn_tiny(num_classes: int, size: int, width: int = 64,
                        channels: tuple[int, int, int, int] = (16, 32, 64, 128),
                        box_batch_size_per_image: int = 128,
                        backbone_checkpoint: Path | None = None):
    """:func:`build_maskrcnn_ours` on the tiny CNN (the study's Mask R-CNN since phase 9)."""
    return build_maskrcnn_ours(num_classes, size, "tiny", width, channels,
                               box_batch_size_per_image, backbone_checkpoint)
