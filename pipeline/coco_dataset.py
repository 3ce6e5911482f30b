"""Labeled samples from a dataset manifest (COCO instances) for fine-tuning and evaluation.

Per image: its non-crowd annotations decoded to bool masks (``pipeline.coco.annotation_to_mask``;
masks that decode empty are dropped) and labelled with contiguous class indices through the
category map: COCO category ids sorted ascending -> ``0..C-1`` (:func:`category_ids`; checkpoints
store that list so predictions map back). Samples go through the same transforms, batching,
determinism and distributed contract as pre-training (``pipeline.batching``).

- :func:`finetune_loader`: shuffled (a permutation of all images seeded by ``(seed, epoch)``),
  augmented, images without any instance skipped (counted), last incomplete batch dropped.
- :func:`eval_loader`: fixed order (the manifest's sorted order), a fixed resize, every image
  kept, the last batch kept; ``orig_sizes`` are the image files' sizes. Works on unlabeled
  manifests too (empty targets).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from pipeline.batching import BatchLoader, order_rng
from pipeline.coco import annotation_to_mask
from pipeline.errors import InputError, UnreadableImage
from pipeline.images import ImageReadError, read_image_rgb
from pipeline.manifest import Dataset
from pipeline.transforms import AugmentConfig, Sample, augment, eval_config


def category_ids(categories: Sequence[dict]) -> list[int]:
    """The category map: COCO category ids sorted ascending; class index c is ``ids[c]``."""
    return sorted(int(c["id"]) for c in categories)


class CocoDataset:
    """The images of a manifest with their instances, as a :class:`~pipeline.batching.SampleSource`.

    Args:
        dataset: a loaded manifest (``pipeline.manifest.load_manifest``).
        augment_config: resize / flip applied by :meth:`load`.
        category_map: class index -> COCO category id (default: :func:`category_ids` of the
            dataset's categories); an annotation of another category is an InputError.
        skip_empty: leave out images with no non-crowd instance (training).

    ``counts``: ``images`` (in the manifest), ``images_without_instances`` (skipped when
    ``skip_empty``), ``images_used``.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        augment_config: AugmentConfig,
        category_map: Sequence[int] | None = None,
        skip_empty: bool = False,
    ) -> None:
        self.dataset_name = dataset.name
        self.augment_config = augment_config
        self.category_map = list(category_map) if category_map is not None else category_ids(
            dataset.categories
        )
        where = dataset.annotations_path or dataset.manifest_path
        if skip_empty and not dataset.labeled:
            raise InputError("training needs a labeled dataset (the manifest gives no annotations)",
                             dataset.manifest_path)
        class_of = {cat: c for c, cat in enumerate(self.category_map)}
        self.annotations: dict[int, list[dict]] = defaultdict(list)
        for ann in (dataset.coco or {}).get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in class_of:
                raise InputError(
                    f"annotation {ann.get('id')}: category_id {ann['category_id']} is not in the "
                    f"category map {self.category_map}",
                    where,
                )
            self.annotations[ann["image_id"]].append(ann)
        self.class_of = class_of
        with_instances = [r for r in dataset.images if self.annotations.get(r.image_id)]
        self.records = with_instances if skip_empty else list(dataset.images)
        self.counts = {
            "images": len(dataset.images),
            "images_without_instances": len(dataset.images) - len(with_instances),
            "images_used": len(self.records),
        }

    def __len__(self) -> int:
        return len(self.records)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """A permutation of all sample indices seeded by ``(seed, epoch)``."""
        return order_rng(seed, epoch).permutation(len(self.records)).astype(np.int64)

    def load(self, index: int, rng: np.random.Generator) -> Sample:
        return augment(self.raw_sample(index), self.augment_config, rng)

    def raw_sample(self, index: int) -> Sample:
        """Image ``index`` at its file's size with its non-crowd, non-empty instance masks
        (annotation order) and contiguous labels."""
        record = self.records[index]
        try:
            image = read_image_rgb(record.path)
        except ImageReadError as err:
            raise UnreadableImage(str(err), record.path, record.image_id,
                                  record.file_name) from None
        h, w = image.shape[:2]
        if record.height is not None and (record.height, record.width) != (h, w):
            raise InputError(
                f"image is {h}x{w} but its annotations say {record.height}x{record.width} "
                f"(height x width, image id {record.image_id})",
                record.path,
            )
        anns = self.annotations.get(record.image_id, [])
        masks = np.zeros((len(anns), h, w), dtype=bool)
        for i, ann in enumerate(anns):
            masks[i] = annotation_to_mask(ann, h, w)
        labels = np.asarray([self.class_of[a["category_id"]] for a in anns], dtype=np.int64)
        keep = masks.any(axis=(1, 2))
        return Sample(record.image_id, image, masks[keep], labels[keep], (h, w))


def finetune_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    augment_config: AugmentConfig = AugmentConfig(),
    category_map: Sequence[int] | None = None,
    num_workers: int = 0,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> BatchLoader:
    """The fine-tuning loader (see module docstring); ``loader.source.counts`` reports skips."""
    source = CocoDataset(
        dataset, augment_config=augment_config, category_map=category_map, skip_empty=True
    )
    return BatchLoader(
        source, batch_size, seed=seed, shuffle=True, drop_last=True,
        num_workers=num_workers, persistent_workers=persistent_workers, pin_memory=pin_memory,
        rank=rank, world_size=world_size,
    )


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    resize: AugmentConfig = eval_config(),
    category_map: Sequence[int] | None = None,
    num_workers: int = 0,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    skip_unreadable: bool = False,
) -> BatchLoader:
    """The evaluation loader: every image in manifest order, ``resize`` (use a config without
    jitter or flip), last partial batch kept; with W ranks each global batch is split in W
    slices and a rank's empty slice at the end is not yielded. ``skip_unreadable``: an image
    that cannot be decoded is left out of its batch and listed in ``batch["unreadable"]``
    (``pipeline.batching``) instead of stopping the loop."""
    if resize.short_side[0] != resize.short_side[1] or resize.flip_prob != 0.0:
        raise InputError(f"evaluation needs a fixed resize without flip, got {resize}")
    source = CocoDataset(dataset, augment_config=resize, category_map=category_map)
    return BatchLoader(
        source, batch_size, seed=0, shuffle=False, drop_last=False,
        num_workers=num_workers, persistent_workers=persistent_workers, pin_memory=pin_memory,
        rank=rank, world_size=world_size, skip_unreadable=skip_unreadable,
    )
