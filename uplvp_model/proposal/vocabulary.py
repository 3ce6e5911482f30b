"""Default vocabulary (the 80 COCO thing classes), prompt templates and background words."""
from __future__ import annotations

from collections.abc import Sequence

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
"""COCO 2017 category names in category-id order (index i = i-th COCO category)."""

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "there is a {} in the scene.",
)
"""Templates whose text embeddings are averaged per class. ``("{}",)`` gives the bare class
names, which is what the UPLVP reference uses."""

BACKGROUND_WORDS: tuple[str, ...] = (
    "background", "sky", "wall", "floor", "ground", "grass", "road", "tree", "building",
    "water", "ceiling", "table surface",
)
"""Stuff words added to the softmax of the ``clip`` proposer so that background pixels have
somewhere to go; masks are never proposed for them."""


def check_vocabulary(names: Sequence[str]) -> list[str]:
    """Return ``names`` as a list after checking it is non-empty, has no blank and no duplicate
    entries; raise ``ValueError`` naming the offending entry otherwise."""
    names = [str(n) for n in names]
    if not names:
        raise ValueError("vocabulary is empty")
    seen: set[str] = set()
    for index, name in enumerate(names):
        if not name.strip():
            raise ValueError(f"vocabulary entry {index} is blank")
        if name in seen:
            raise ValueError(f"vocabulary entry {index} {name!r} is a duplicate")
        seen.add(name)
    return names


def check_templates(templates: Sequence[str]) -> list[str]:
    """Return ``templates`` as a list after checking each holds exactly one ``{}``."""
    templates = [str(t) for t in templates]
    if not templates:
        raise ValueError("prompt templates are empty")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}'")
    return templates
