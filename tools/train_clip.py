"""Train a small CLIP on this machine: open_clip's own model, loss and tokenizer, synthetic scenes.

    .venv/bin/python -m tools.train_clip                      # defaults, see below
    .venv/bin/python -m tools.train_clip --out runs/clip_quick --steps 20 --train-images 256
    .venv/bin/python -m tools.train_clip --steps 3000 --resume   # a long run, across sessions

Long runs: ``OUT/train_state.pt`` is written every ``--checkpoint-every`` steps (weights,
optimizer, both sampling generators, the order queue, the history); ``--resume`` continues from
it and ends with the weights an uninterrupted run ends with (tests/unit/scripts/test_train_clip.py), and
refuses a state written with other training settings; ``--stop-after N`` stops after step N.

No CLIP weights can be downloaded here, so the ``clip`` proposer had only ever run on random
weights. This command trains one from scratch, contrastively, on the synthetic scenes of
``pipeline.synth`` with captions generated from their annotations, and writes what
``uplvp stage propose --proposer clip`` loads exactly like a downloaded checkpoint:

    OUT/<config stem>.pt      the model's state_dict (``open_clip.create_model(name,
                              pretrained=FILE)`` loads it; so does ``load_clip(CONFIG.json, FILE)``)
    OUT/<config stem>.json    a copy of the open_clip model config it was trained with
    OUT/vocabulary.txt        the 8 category names, one per line (``--vocabulary``)
    OUT/metrics.json          settings, timings, loss curve, held-out metrics (random init and
                              trained)

    uplvp stage propose --images M.yaml --out P --proposer clip \\
        --clip-model OUT/uplvp-synth-vit.json --clip-checkpoint OUT/uplvp-synth-vit.pt \\
        --vocabulary OUT/vocabulary.txt

Model (``tools/clip/uplvp-synth-vit.json``, an open_clip model config, built with
``open_clip.create_model``, 7.6 M parameters of which 6.3 M are the token embedding of
open_clip's 49408-token BPE vocabulary): a ViT image tower at 96 px with 8 px patches (a 12 x 12
grid, so the dense features the proposer reads have 12 x 12 cells at the model's own size),
width 128, 4 layers, 4 heads; a 2-layer causal text tower of width 128 with context 40 (the
longest captions, 8 objects of different categories, are ~40 tokens; at 32, 5 % of held-out
captions were cut); a 128-d joint space. Tried at the same number of steps (batch 64, 200-300
steps, 300 held-out images; pilots are not kept): 128 px with 16 px patches at width 128 was
behind at step 100 (mAP 0.47 vs 0.51); the time budget, not the model size, is what limits
it (see "What it learns" below).

Data: scenes from ``pipeline.synth.synth_example(seed, "clip-train", i)``, the generator of the
demo data (base size 128, so ~96-160 px images, 1-8 objects), seeded per image and made into a
pool up front by ``--workers`` forked processes (one image is ~16 ms on a quiet core); each
sample is a pool image, with probability ``--crop-fraction`` (0.5) replaced by a square crop
around one of its objects (:func:`crop_scene`: 1.5-3.5 x the object's extent, objects cut to
under half their visible area are left out of the caption and out of the dense term), under one
of the 8 rotations/flips of the square (the scenes' statistics and captions do not change under
them), letterboxed exactly as the proposer does it (``letterbox_batch``, with the model's
mean/std). Crops show few objects, large: with them the held-out mAP at step 200 was 0.52 vs
0.45 without. Held-out images come from another split name, ``"clip-heldout"``, so they are
never trained on.

Captions are generated from each image's annotations (its visible instances):
  - category: the category name, exactly as the propose vocabulary spells it;
  - colour: ``pipeline.synth`` does not return an object's colour (and is left unchanged), so
    it is derived from the pixels: the saturation-weighted circular mean hue of the (eroded)
    visible mask, binned into 8 colour words (red, orange, yellow, green, cyan, blue, purple,
    pink). An object's two colours share one hue and shading and illumination only scale it;
    checked against the hue the generator drew (recorded by wrapping its colour function, 1275
    objects of 300 images): median error 0.23 degrees, the same colour word for 98.5 %;
  - size: from the visible mask's extent, half the longer side of its bounding box over the
    shorter image side, with the generator's own size boundaries: < 0.09 "small", >= 0.16
    "large", otherwise no size word; crops drop size words (they rescale);
  - objects of one category are counted ("two small blue disks"); colour or size words are used
    for a group only when all its members share them; groups in a random order, joined
    "a, b and c"; one of ``CAPTION_TEMPLATES``; the colour and the size words are each dropped
    with probability 0.3 per caption. Held-out captions are canonical: drawing order, every
    attribute, the first template, e.g. "a photo of a red star and two small blue disks."

Objective: open_clip's ``ClipLoss`` on (image, caption) pairs, plus ``--dense-weight`` (1.0) x
the same ``ClipLoss`` on a dense term, because the proposer does not use the image embedding: it
compares per-patch features from the last block's value path (MaskCLIP,
``clip_dense.dense_clip_features``) with the text embeddings of the category names (and of
background words), and a plain CLIP never trains that path. The dense term pools those
per-patch features (the same ``value_path``, ``ln_post`` and ``proj``, taken from the one
forward pass by a hook on the last block) over the visible masks of up to ``--dense-objects``
(4) objects per image and over the image's background, and pairs them with a text per object
(with probability 0.7 one of the proposer's own ``PROMPT_TEMPLATES`` with the bare category
name, "a photo of a star.", else a one-object caption, "a picture of a small red disk.") and a
proposer prompt of the word "background" for the background. Identical texts in a batch are
false negatives for each other: for that term ClipLoss then acts as a classifier over the
distinct texts (plus a constant), pulling each pooled feature to its text and away from the
other categories'. Each distinct text goes through the text tower once per step.

Training: AdamW (lr 2e-3, betas 0.9/0.98, eps 1e-6, weight decay 0.1 on matrices only), 30
warm-up steps then cosine decay, batch 64, 350 steps, gradient norm clipped at 1, the logit
scale clamped at 100 as open_clip's trainer does. lr 3e-3 was no better (mAP 0.51 vs 0.52 at
step 200). Seeded (``--seed``: model init, data, captions, crops, batch order), so a rerun with
the same settings and ``--threads`` gives the same checkpoint (tested at toy size); float
reductions depend on the thread count. ``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set)
before torch loads: with another busy process on this 2-core machine, spin-waiting OpenMP
threads made a 2-thread step 3x slower (7.8 s vs 2.6 s).

What it learns in this budget: mostly colour. Each category has its own hue range (+-40
degrees, overlapping its neighbours'), so colour alone names the category of roughly half the
objects (nearest hue centre: 57 % of single-object crops), and that is about what the dense
patch accuracy reaches; in a pilot that turned the hues of 30 % of the training samples by a
random angle (colour words following, ``--recolour-fraction 0.3``) so that colour stopped
predicting the category, held-out mAP fell back to chance (0.42) after 300 steps: shape and
texture are not learned in a few hundred steps of a ViT from scratch. So the checkpoint is a
real, loadable, aligned CLIP for the pipeline, but a weak one; more steps (hours here, minutes
on a GPU) are what it needs.

Kept run (``tools/results/train_clip.txt``, defaults, 2 threads, quiet machine): 11.8 min
(40 s data, 652 s training); on 500 held-out images mAP 0.510 (random init 0.413, chance
~0.415), R@1 0.018 (chance 0.0023), R@5 0.100 (chance 0.0116), dense patch accuracy on
objects 0.559 (majority 0.207).

Evaluation on ``--eval-images`` held-out images, before training (random init) and after:
  - zero-shot multi-label category retrieval: per category name, held-out images ranked by
    cosine(image, text embedding of the name averaged over the proposer's ``PROMPT_TEMPLATES``,
    ``uplvp_model.proposal.text.encode_vocabulary``), average precision against "the image
    holds an annotated instance of that category"; mAP = the mean over the 8 names. Chance
    (random ranking) is about the mean prevalence.
  - image-to-caption recall@1 (and @5): each image's canonical caption among all held-out
    captions; a hit when the top caption's text equals the image's own (scenes with identical
    captions are indistinguishable, so chance is the mean share of images sharing one's caption,
    ~1/N).
  - dense patch accuracy (what the proposer uses): per patch of ``dense_clip_features`` at the
    model's input size, argmax over the 8 category names, on patches at least half covered by
    one object; and over names + ``BACKGROUND_WORDS`` on all patches (background patches are
    right when any background word wins), with the majority-class rate as chance.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Sleeping, not spinning, OpenMP workers: on this shared 2-core machine another busy process
# made a 2-thread step 3x slower with the default spin-waiting (7.8 s vs 2.6 s). Read when
# torch loads, so it only acts when this file is run as a script.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from pipeline.synth import CATEGORIES, SIZE_RANGES, synth_example  # noqa: E402
from uplvp_model.proposal.base import letterbox_batch, mask_to_canvas  # noqa: E402
from uplvp_model.proposal.clip_dense import (  # noqa: E402
    check_dense_support,
    dense_clip_features,
    register_model_config,
    value_path,
)
from uplvp_model.proposal.text import encode_vocabulary  # noqa: E402
from uplvp_model.proposal.vocabulary import BACKGROUND_WORDS, PROMPT_TEMPLATES  # noqa: E402

DEFAULT_CONFIG = ROOT / "tools" / "clip" / "uplvp-synth-vit.json"
TRAIN_SPLIT = "clip-train"
HELDOUT_SPLIT = "clip-heldout"
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
PLURALS: dict[str, str] = {"cross": "crosses"}  # every other name takes an "s"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
# (upper hue bound in degrees, word): hue h gets the first word whose bound exceeds h
COLOUR_BINS: tuple[tuple[float, str], ...] = (
    (15.0, "red"), (45.0, "orange"), (70.0, "yellow"), (155.0, "green"), (200.0, "cyan"),
    (255.0, "blue"), (290.0, "purple"), (340.0, "pink"), (360.0, "red"),
)
COLOUR_WORDS: tuple[str, ...] = tuple(dict.fromkeys(word for _, word in COLOUR_BINS))
# the generator's size boundaries (radius over the shorter image side): small < 0.09 <= medium
# < 0.16 <= large
SMALL_BELOW, LARGE_FROM = SIZE_RANGES[0][1], SIZE_RANGES[2][0]
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "a rendering of {}.",
    "{} on a cluttered background.",
    "the scene shows {}.",
    "a scene with {}.",
    "a synthetic image showing {}.",
)
ATTRIBUTE_DROP_P = 0.3  # chance that a training caption leaves out colour (size) words
BARE_PROMPT_P = 0.7  # chance that an object's dense-term caption is a bare proposer prompt
BACKGROUND_NAME = BACKGROUND_WORDS[0]


# --------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class SceneObject:
    """What a caption says about one annotated instance: category name, colour word, size
    (``"small"``, ``"medium"`` or ``"large"``; medium gets no word)."""

    name: str
    colour: str
    size: str


def colour_word(hue: float) -> str:
    """Colour word of a hue in degrees (any real number; taken mod 360)."""
    hue = float(hue) % 360.0
    for bound, word in COLOUR_BINS:
        if hue < bound:
            return word
    return COLOUR_BINS[-1][1]


def object_hue(image: np.ndarray, mask: np.ndarray) -> float:
    """Saturation-weighted circular mean hue (degrees in [0, 360)) of the RGB uint8 ``image``
    over the bool ``mask``, eroded by one pixel when that leaves at least 10 pixels (edge
    pixels are blurred into the background)."""
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if eroded.sum() >= 10:
        mask = eroded
    hsv = cv2.cvtColor(image[mask][None].astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)[0]
    angle = np.deg2rad(hsv[:, 0])
    weight = hsv[:, 1] + 1e-6
    mean = math.degrees(math.atan2(float((weight * np.sin(angle)).sum()),
                                   float((weight * np.cos(angle)).sum())))
    return mean % 360.0


def size_class(mask: np.ndarray) -> str:
    """``"small"``/``"medium"``/``"large"`` of a visible mask (bool (H, W)): half the longer
    side of its bounding box over the shorter image side, against the generator's size
    boundaries."""
    ys, xs = np.nonzero(mask)
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 2.0
    relative = extent / min(mask.shape)
    if relative < SMALL_BELOW:
        return "small"
    return "large" if relative >= LARGE_FROM else "medium"


def scene_objects(image: np.ndarray, instances: Sequence[tuple[int, np.ndarray]]) -> list[SceneObject]:
    """The caption facts of ``synth_example``'s instances (drawing order kept)."""
    names = {c.id: c.name for c in CATEGORIES}
    return [
        SceneObject(names[cid], colour_word(object_hue(image, mask)), size_class(mask))
        for cid, mask in instances
    ]


def _plural(name: str) -> str:
    return PLURALS.get(name, name + "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(
    name: str, count: int, colour: str | None = None, size: str | None = None
) -> str:
    """``"a red star"``, ``"two small blue disks"``, ``"an orange hexagon"``; ``size`` medium
    or None and ``colour`` None are left out."""
    words = [w for w in ((size if size in ("small", "large") else None), colour) if w]
    noun = name if count == 1 else _plural(name)
    phrase = " ".join([*words, noun])
    count_word = _article(phrase) if count == 1 else NUMBER_WORDS[count]
    return f"{count_word} {phrase}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(objects: Sequence[SceneObject], colour: bool = True, size: bool = True) -> str:
    """The objects as one phrase list: grouped by category in order of first appearance,
    counted; a group's colour (size) word only when all its members share it."""
    groups: dict[str, list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault(obj.name, []).append(obj)
    parts = []
    for name, members in groups.items():
        colours = {m.colour for m in members}
        sizes = {m.size for m in members}
        parts.append(object_phrase(
            name, len(members),
            colour=next(iter(colours)) if colour and len(colours) == 1 else None,
            size=next(iter(sizes)) if size and len(sizes) == 1 else None,
        ))
    return _join(parts)


def caption(objects: Sequence[SceneObject], template: str = CAPTION_TEMPLATES[0],
            colour: bool = True, size: bool = True) -> str:
    """One caption: ``template`` filled with :func:`describe` (objects in the given order); a
    scene without annotated objects is "an empty background"."""
    text = describe(objects, colour, size) if objects else "an empty background"
    return template.format(text)


def random_caption(objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
    """A training caption: objects shuffled, a random template, colour and size words each
    dropped with probability ``ATTRIBUTE_DROP_P``."""
    order = [objects[i] for i in rng.permutation(len(objects))]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    keep_colour = rng.random() >= ATTRIBUTE_DROP_P
    keep_size = rng.random() >= ATTRIBUTE_DROP_P
    return caption(order, template, keep_colour, keep_size)


def object_caption(obj: SceneObject, rng: np.random.Generator,
                   bare_prompt_p: float = BARE_PROMPT_P) -> str:
    """Text of one object for the dense term: with probability ``bare_prompt_p`` one of the
    proposer's ``PROMPT_TEMPLATES`` with the bare category name, else a one-object caption."""
    if rng.random() < bare_prompt_p:
        return PROMPT_TEMPLATES[int(rng.integers(len(PROMPT_TEMPLATES)))].format(obj.name)
    return random_caption([obj], rng)


def background_caption(rng: np.random.Generator) -> str:
    return PROMPT_TEMPLATES[int(rng.integers(len(PROMPT_TEMPLATES)))].format(BACKGROUND_NAME)


# --------------------------------------------------------------------------- data


@dataclass
class Scene:
    """One synthetic image: ``image`` uint8 (H, W, 3) RGB; ``labels`` uint8 (H, W), 0 for
    background and k for ``objects[k - 1]``; ``category`` int64 [n] indices into
    ``CATEGORY_NAMES``; ``hue`` float64 [n] the objects' hues (degrees, :func:`object_hue`)."""

    image: np.ndarray
    labels: np.ndarray
    objects: list[SceneObject]
    category: np.ndarray
    hue: np.ndarray


def make_scene(image: np.ndarray, instances: Sequence[tuple[int, np.ndarray]]) -> Scene:
    labels = np.zeros(image.shape[:2], np.uint8)
    for k, (_, mask) in enumerate(instances, start=1):
        labels[mask] = k  # visible masks never overlap
    names = {c.id: c.name for c in CATEGORIES}
    hue = np.array([object_hue(image, mask) for _, mask in instances], dtype=np.float64)
    objects = [SceneObject(names[cid], colour_word(h), size_class(mask))
               for (cid, mask), h in zip(instances, hue)]
    return Scene(image, labels, objects,
                 np.array([cid - 1 for cid, _ in instances], dtype=np.int64), hue)


def make_scenes(seed: int, split: str, count: int, base_size: int = 128,
                workers: int = 0) -> list[Scene]:
    """``count`` scenes ``synth_example(seed, split, i, base_size)``, i = 0..count-1, generated
    by ``workers`` forked processes (0: in this process); the result does not depend on it.
    Forked, not spawned: a spawned child re-imports torch and open_clip (~10 s); the children
    only run numpy/OpenCV code, and :func:`train` forks before its first torch computation."""
    jobs = [(seed, split, index, base_size) for index in range(count)]
    if workers > 0 and count > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            examples = pool.starmap(synth_example, jobs, chunksize=max(1, min(64, count // (4 * workers))))
    else:
        examples = [synth_example(*job) for job in jobs]
    return [make_scene(image, instances) for image, instances in examples]


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square on the first two axes: k % 4 quarter turns, then a
    left-right flip when k >= 4."""
    out = np.rot90(array, k % 4)
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


IGNORE_LABEL = 255  # labels of a crop's objects that are cut too much to be captioned


def crop_scene(scene: Scene, rng: np.random.Generator, min_fraction: float = 0.5,
               min_area: int = 30) -> Scene:
    """A square crop around one random object of ``scene`` (side 1.5-3.5 x the object's extent,
    at least 24 px, at most the shorter image side; centre jittered by up to 0.2 x the side).
    Objects keep their caption facts if the crop holds at least ``min_fraction`` of their
    visible pixels and ``min_area`` pixels, with no size word (the crop changes their scale);
    the others get ``IGNORE_LABEL`` (neither object nor background)."""
    height, width = scene.labels.shape
    j = int(rng.integers(len(scene.objects)))
    ys, xs = np.nonzero(scene.labels == j + 1)
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    side = int(round(min(min(height, width), max(24.0, extent * rng.uniform(1.5, 3.5)))))
    cx = (xs.min() + xs.max()) / 2 + rng.uniform(-0.2, 0.2) * side
    cy = (ys.min() + ys.max()) / 2 + rng.uniform(-0.2, 0.2) * side
    x0 = int(np.clip(round(cx - side / 2), 0, width - side))
    y0 = int(np.clip(round(cy - side / 2), 0, height - side))
    labels = scene.labels[y0 : y0 + side, x0 : x0 + side]
    n = len(scene.objects)
    full = np.bincount(scene.labels.ravel(), minlength=n + 1)
    inside = np.bincount(labels.ravel(), minlength=n + 1)
    lookup = np.full(256, IGNORE_LABEL, np.uint8)
    lookup[0] = 0
    objects, kept = [], []
    for k in range(1, n + 1):
        if inside[k] >= min_area and inside[k] >= min_fraction * full[k]:
            objects.append(SceneObject(scene.objects[k - 1].name, scene.objects[k - 1].colour, "medium"))
            kept.append(k - 1)
            lookup[k] = len(objects)
    return Scene(np.ascontiguousarray(scene.image[y0 : y0 + side, x0 : x0 + side]), lookup[labels],
                 objects, scene.category[kept], scene.hue[kept])


def hue_rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """The RGB uint8 image with every hue turned by ``degrees`` (saturation, value kept)."""
    hsv = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + degrees) % 360.0
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def recolour_scene(scene: Scene, degrees: float) -> Scene:
    """``scene`` with all hues turned by ``degrees`` and the colour words recomputed, so that a
    caption's colours stay true while colour no longer hints at the category."""
    hue = (scene.hue + degrees) % 360.0
    objects = [SceneObject(o.name, colour_word(h), o.size) for o, h in zip(scene.objects, hue)]
    return Scene(hue_rotate(scene.image, degrees), scene.labels, objects, scene.category, hue)


def patch_coverage(mask: np.ndarray, box, size: int, patch: int) -> np.ndarray:
    """Share of each model-input patch (row-major, [(size / patch)^2] float32) covered by the
    bool image mask after letterboxing (``mask_to_canvas``)."""
    grid = size // patch
    canvas = mask_to_canvas(mask, box, (size, size))
    return canvas.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1)


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, S, S], letterboxed + normalised
    captions: list[str]  # B
    dense_weights: torch.Tensor  # float32 [D, T]: patch weights of the pooled dense features
    dense_image: torch.Tensor  # int64 [D]: the image each pooled feature comes from
    dense_captions: list[str]  # D


def make_batch(scenes: Sequence[Scene], ks: Sequence[int], rng: np.random.Generator, size: int,
               patch: int, mean: Sequence[float], std: Sequence[float],
               crop_fraction: float = 0.0, recolour_fraction: float = 0.0,
               dense_objects: int = 1, bare_prompt_p: float = BARE_PROMPT_P) -> Batch:
    """Scenes (each replaced by :func:`crop_scene` with probability ``crop_fraction``, then
    hue-turned by :func:`recolour_scene` with probability ``recolour_fraction``) under the
    symmetries ``ks``, letterboxed; captions; dense-term targets (up to ``dense_objects``
    random objects and the background of each image)."""
    images, labels, views = [], [], []
    for scene, k in zip(scenes, ks):
        if crop_fraction > 0 and scene.objects and rng.random() < crop_fraction:
            scene = crop_scene(scene, rng)
        if recolour_fraction > 0 and rng.random() < recolour_fraction:
            scene = recolour_scene(scene, rng.uniform(0.0, 360.0))
        views.append(scene)
        images.append(dihedral(scene.image, k))
        labels.append(dihedral(scene.labels, k))
    scenes = views
    canvas, boxes = letterbox_batch(images, size, tuple(mean), tuple(std))
    captions, weights, owners, dense_captions = [], [], [], []
    for index, (scene, label, box) in enumerate(zip(scenes, labels, boxes)):
        captions.append(random_caption(scene.objects, rng))
        chosen = rng.permutation(len(scene.objects))[:dense_objects] if scene.objects else []
        for j in chosen:
            cover = patch_coverage(label == j + 1, box, size, patch)
            if cover.sum() > 0:
                weights.append(cover)
                owners.append(index)
                dense_captions.append(object_caption(scene.objects[j], rng, bare_prompt_p))
        background = label == 0
        if background.any():
            weights.append(patch_coverage(background, box, size, patch))
            owners.append(index)
            dense_captions.append(background_caption(rng))
    return Batch(torch.from_numpy(canvas), captions, torch.from_numpy(np.stack(weights)),
                 torch.tensor(owners, dtype=torch.int64), dense_captions)


# --------------------------------------------------------------------------- model


def build_model(config: Path | str, seed: int):
    """(model, tokenizer, registered name, mean, std) of an open_clip model config JSON,
    weights initialised under ``torch.manual_seed(seed)``; mean/std as ``load_clip`` reads
    them."""
    name = register_model_config(str(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, pretrained_image=False,
                                   pretrained_text=False)
    check_dense_support(model)
    preprocess = getattr(model.visual, "preprocess_cfg", {})
    mean = tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    return model, open_clip.get_tokenizer(name), name, mean, std


def dense_tokens(visual, block_input: torch.Tensor) -> torch.Tensor:
    """Per-patch joint-space features ``[B, T, E]`` (L2-normalised, class token dropped) from the
    last block's input, exactly as ``dense_clip_features`` computes them."""
    x = block_input if visual.transformer.batch_first else block_input.transpose(0, 1)
    x = value_path(visual.transformer.resblocks[-1], x)
    return F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)


def training_losses(model, tokenizer, batch: Batch, loss_fn: ClipLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """(global ClipLoss, dense ClipLoss) of one batch. The image tower runs once: a forward
    pre-hook on the last block keeps its input for the value path; each distinct text goes
    through the text tower once."""
    visual = model.visual
    kept: dict[str, torch.Tensor] = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(
        lambda module, args: kept.__setitem__("x", args[0]))
    try:
        image_features = model.encode_image(batch.images, normalize=True)
    finally:
        hook.remove()
    texts = batch.captions + batch.dense_captions
    unique = list(dict.fromkeys(texts))  # identical texts share one forward (and its gradient)
    position = {text: i for i, text in enumerate(unique)}
    unique_features = model.encode_text(tokenizer(unique), normalize=True)
    text_features = unique_features[torch.tensor([position[t] for t in texts])]
    scale = model.logit_scale.exp()
    n = len(batch.captions)
    global_loss = loss_fn(image_features, text_features[:n], scale)
    dense = dense_tokens(visual, kept["x"])  # [B, T, E]
    weights = batch.dense_weights
    pooled = torch.einsum("dt,dte->de", weights, dense[batch.dense_image])
    pooled = F.normalize(pooled / weights.sum(dim=1, keepdim=True), dim=-1)
    dense_loss = loss_fn(pooled, text_features[n:], scale)
    return global_loss, dense_loss


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (not on gains, biases, embeddings of one vector,
    the logit scale), as open_clip's trainer does."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )


def learning_rate(step: int, steps: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- metrics


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of ranking by ``scores`` (descending; ties broken by index, stably)
    against bool ``positive``: the mean over positives of the precision at their ranks. NaN
    without positives."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = positive[order]
    ranks = np.nonzero(hits)[0] + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def mean_average_precision(scores: np.ndarray, positive: np.ndarray) -> tuple[float, list[float]]:
    """(mean over classes with positives, per-class AP) of scores / positives ``[N, K]``: each
    class (column) ranks the N items."""
    per_class = [average_precision(scores[:, k], positive[:, k]) for k in range(scores.shape[1])]
    return float(np.nanmean(per_class)), per_class


def recall_at_k(similarity: np.ndarray, captions: Sequence[str], k: int = 1) -> float:
    """Image-to-caption recall@k: row i (image i) ranks the columns (caption j of image j);
    a hit when one of its k best columns (ties by index) has the same text as ``captions[i]``."""
    captions = list(captions)
    hits = 0
    for i, row in enumerate(np.asarray(similarity)):
        top = np.argsort(-row, kind="stable")[:k]
        hits += any(captions[j] == captions[i] for j in top)
    return hits / len(captions)


def recall_chance(captions: Sequence[str], k: int = 1) -> float:
    """Expected recall@k of a random ranking: an image whose text m images share (itself
    included) hits with probability 1 - C(N - m, k) / C(N, k)."""
    n = len(captions)
    if k >= n:  # every caption is within the top k
        return 1.0
    counts: dict[str, int] = {}
    for text in captions:
        counts[text] = counts.get(text, 0) + 1
    return float(np.mean([1 - math.comb(n - counts[t], k) / math.comb(n, k) for t in captions]))


@torch.inference_mode()
def evaluate(model, tokenizer, scenes: Sequence[Scene], size: int, patch: int,
             mean: Sequence[float], std: Sequence[float], batch_size: int = 64) -> dict:
    """Held-out metrics (see the module docstring) of ``model`` on ``scenes``."""
    model.eval()
    class_text = encode_vocabulary(model, tokenizer, CATEGORY_NAMES, PROMPT_TEMPLATES)  # [8, E]
    words = list(CATEGORY_NAMES) + [w for w in BACKGROUND_WORDS if w not in CATEGORY_NAMES]
    word_text = encode_vocabulary(model, tokenizer, words, PROMPT_TEMPLATES)
    image_features, patch_pred, patch_pred_bg, patch_true = [], [], [], []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        canvas, boxes = letterbox_batch([s.image for s in chunk], size, tuple(mean), tuple(std))
        images = torch.from_numpy(canvas)
        image_features.append(model.encode_image(images, normalize=True))
        dense = dense_clip_features(model, images).flatten(2)  # [b, E, T]
        by_class = torch.einsum("ke,bet->bkt", class_text, dense).argmax(dim=1)
        by_word = torch.einsum("ke,bet->bkt", word_text, dense).argmax(dim=1)
        for scene, box, pred, pred_bg in zip(chunk, boxes, by_class, by_word):
            cover = np.stack([patch_coverage(scene.labels == k, box, size, patch)
                              for k in range(len(scene.objects) + 1)])  # [1 + n, T]
            objects = cover[1:]
            truth = np.full(cover.shape[1], -2)  # -2: ignored
            if len(objects):
                best = objects.argmax(axis=0)
                strong = objects.max(axis=0) >= 0.5
                truth[strong] = scene.category[best[strong]]
            truth[cover[0] >= 0.9] = -1  # background
            patch_true.append(truth)
            patch_pred.append(pred.numpy())
            patch_pred_bg.append(pred_bg.numpy())
    image_features = torch.cat(image_features)
    positive = np.zeros((len(scenes), len(CATEGORY_NAMES)), dtype=bool)
    for i, scene in enumerate(scenes):
        positive[i, scene.category] = True
    scores = (image_features @ class_text.T).numpy()
    m_ap, per_class = mean_average_precision(scores, positive)
    captions = [caption(s.objects) for s in scenes]
    caption_features = torch.cat([
        model.encode_text(tokenizer(captions[i : i + 256]), normalize=True)
        for i in range(0, len(captions), 256)
    ])
    similarity = (image_features @ caption_features.T).numpy()
    truth = np.concatenate(patch_true)
    pred = np.concatenate(patch_pred)
    pred_bg = np.concatenate(patch_pred_bg)
    on_object = truth >= 0
    labelled = truth >= -1
    bg_right = np.where(truth == -1, pred_bg >= len(CATEGORY_NAMES), pred_bg == truth)
    object_counts = np.bincount(truth[on_object], minlength=len(CATEGORY_NAMES))
    return {
        "images": len(scenes),
        "mAP": m_ap,
        "AP_per_category": dict(zip(CATEGORY_NAMES, per_class)),
        "mAP_chance": float(positive.mean(axis=0).mean()),
        "prevalence": dict(zip(CATEGORY_NAMES, positive.mean(axis=0).tolist())),
        "R@1": recall_at_k(similarity, captions, 1),
        "R@5": recall_at_k(similarity, captions, 5),
        "R@1_chance": recall_chance(captions, 1),
        "R@5_chance": recall_chance(captions, 5),
        "distinct_captions": len(set(captions)),
        "patch_acc_objects": float((pred[on_object] == truth[on_object]).mean()),
        "patch_acc_objects_chance": float(object_counts.max() / max(1, object_counts.sum())),
        "patch_acc_with_background": float(bg_right[labelled].mean()),
        "patch_acc_with_background_chance": float(max(
            (truth[labelled] == -1).mean(), object_counts.max() / max(1, labelled.sum()))),
        "object_patches": int(on_object.sum()),
        "background_patches": int((truth == -1).sum()),
    }


def format_metrics(title: str, m: dict) -> str:
    lines = [
        f"{title}: {m['images']} held-out images",
        f"  zero-shot category retrieval mAP {m['mAP']:.3f} (chance ~{m['mAP_chance']:.3f}); AP "
        + ", ".join(f"{n} {ap:.2f}" for n, ap in m["AP_per_category"].items()),
        f"  image->caption R@1 {m['R@1']:.3f} (chance {m['R@1_chance']:.4f}), R@5 {m['R@5']:.3f}"
        f" (chance {m['R@5_chance']:.4f}); {m['distinct_captions']} distinct captions",
        f"  dense patch accuracy: objects, 8 names {m['patch_acc_objects']:.3f} (majority "
        f"{m['patch_acc_objects_chance']:.3f}, {m['object_patches']} patches); all, names + "
        f"background words {m['patch_acc_with_background']:.3f} (majority "
        f"{m['patch_acc_with_background_chance']:.3f}, {m['background_patches']} background)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- training


def save_outputs(out: Path, config: Path, name: str, model, metrics: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "checkpoint": out / f"{name}.pt",
        "config": out / f"{name}.json",
        "vocabulary": out / "vocabulary.txt",
        "metrics": out / "metrics.json",
    }
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tmp = paths["checkpoint"].with_name(paths["checkpoint"].name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(paths["checkpoint"])
    if config.resolve() != paths["config"].resolve():
        shutil.copyfile(config, paths["config"])
    paths["vocabulary"].write_text(
        "# the synthetic shape categories (pipeline.synth.CATEGORIES), for --vocabulary\n"
        + "".join(f"{n}\n" for n in CATEGORY_NAMES), encoding="utf-8")
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return paths


TRAIN_STATE_FILE = "train_state.pt"
# settings a resumed run must share with the run that wrote its state (the rest, e.g. threads,
# logging or where to stop, may change between sessions)
RESUME_KEYS = ("config", "seed", "train_images", "base_size", "steps", "batch_size", "lr",
               "warmup", "weight_decay", "clip_grad", "dense_weight", "crop_fraction",
               "recolour_fraction", "dense_objects", "bare_prompt_p")


def _resume_settings(args: argparse.Namespace) -> dict:
    return {k: str(getattr(args, k)) if isinstance(getattr(args, k), Path) else getattr(args, k)
            for k in RESUME_KEYS}


def save_train_state(path: Path, args, step: int, model, optimizer, order_rng, caption_rng,
                     queue: list[int], history: list[dict]) -> None:
    """Everything the loop needs to continue exactly: weights, optimizer, both generators, the
    order queue, the history so far; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": 1, "step": step, "settings": _resume_settings(args),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "order_rng": order_rng.bit_generator.state,
             "caption_rng": caption_rng.bit_generator.state, "queue": list(queue),
             "history": json.dumps(history), "torch_rng": torch.get_rng_state()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_train_state(path: Path, args, model, optimizer, order_rng, caption_rng):
    """Restore a state of ``save_train_state``; refuses one written with other settings."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format_version") != 1:
        raise SystemExit(f"error: {path}: format_version {state.get('format_version')!r} is not 1")
    ours = _resume_settings(args)
    changed = [k for k in RESUME_KEYS if state["settings"].get(k) != ours[k]]
    if changed:
        raise SystemExit(f"error: {path} was written with other settings ({', '.join(changed)}); "
                         "use the same ones to resume, or another --out")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    order_rng.bit_generator.state = state["order_rng"]
    caption_rng.bit_generator.state = state["caption_rng"]
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), list(state["queue"]), json.loads(state["history"])


def train(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    t0 = time.perf_counter()  # data first: the generator processes fork before torch computes
    train_scenes = make_scenes(args.seed, TRAIN_SPLIT, args.train_images, args.base_size, args.workers)
    heldout = make_scenes(args.seed, HELDOUT_SPLIT, args.eval_images, args.base_size, args.workers)
    data_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    config = Path(args.config)
    model, tokenizer, name, mean, std = build_model(config, args.seed)
    visual = model.visual
    size = int(visual.image_size[0])
    patch = int(visual.patch_size[0])
    params = sum(p.numel() for p in model.parameters())
    print(f"model {name} ({config}): {params / 1e6:.2f} M parameters, image {size} px, patch "
          f"{patch} ({size // patch}x{size // patch} grid), embed {visual.output_dim}, text "
          f"context {tokenizer.context_length}; threads {torch.get_num_threads()}", flush=True)

    n_obj = sum(len(s.objects) for s in train_scenes)
    print(f"data: {len(train_scenes)} training scenes ({TRAIN_SPLIT!r}, {n_obj / max(1, len(train_scenes)):.2f} "
          f"objects/image), {len(heldout)} held-out ({HELDOUT_SPLIT!r}), seed {args.seed}, base size "
          f"{args.base_size}, {args.workers} workers: {data_s:.1f} s", flush=True)
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 1]))
    example = [random_caption(train_scenes[i].objects, rng) for i in range(3)]
    print("example captions: " + " | ".join(example), flush=True)

    t0 = time.perf_counter()
    before = evaluate(model, tokenizer, heldout, size, patch, mean, std) if args.eval_images else {}
    if before:
        print(format_metrics(f"random init (eval {time.perf_counter() - t0:.1f} s)", before), flush=True)

    model.train()
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    loss_fn = ClipLoss()
    order_rng = np.random.default_rng(np.random.SeedSequence([args.seed, 2]))
    caption_rng = np.random.default_rng(np.random.SeedSequence([args.seed, 3]))
    queue: list[int] = []
    history = []
    start = 0
    state_path = Path(args.out) / TRAIN_STATE_FILE
    if args.resume and state_path.is_file():
        start, queue, history = load_train_state(state_path, args, model, optimizer, order_rng,
                                                 caption_rng)
        print(f"resumed from {state_path} at step {start}/{args.steps}", flush=True)
    stop = min(args.steps, args.stop_after) if args.stop_after else args.steps
    t_train = time.perf_counter()
    t_window, window_loss, window_steps = t_train, [], 0
    for step in range(start, stop):
        while len(queue) < args.batch_size:
            queue.extend(order_rng.permutation(len(train_scenes)).tolist())
        picked, queue = queue[: args.batch_size], queue[args.batch_size :]
        ks = order_rng.integers(0, 8, len(picked)).tolist()
        batch = make_batch([train_scenes[i] for i in picked], ks, caption_rng, size, patch, mean, std,
                           args.crop_fraction, args.recolour_fraction, args.dense_objects,
                           args.bare_prompt_p)
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        global_loss, dense_loss = training_losses(model, tokenizer, batch, loss_fn)
        loss = global_loss + args.dense_weight * dense_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        window_loss.append((loss.item(), global_loss.item(), dense_loss.item()))
        window_steps += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            now = time.perf_counter()
            total, g, d = np.mean(window_loss, axis=0)
            history.append({"step": step + 1, "loss": total, "global": g, "dense": d,
                            "lr": lr, "logit_scale": model.logit_scale.exp().item()})
            print(f"step {step + 1}/{args.steps} loss {total:.3f} (global {g:.3f}, dense {d:.3f}) "
                  f"lr {lr:.2e} scale {model.logit_scale.exp().item():.1f} "
                  f"{(now - t_window) / window_steps:.2f} s/step elapsed {now - t_start:.0f} s",
                  flush=True)
            t_window, window_loss, window_steps = now, [], 0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps and heldout:
            t_eval = time.perf_counter()
            middle = evaluate(model, tokenizer, heldout, size, patch, mean, std)
            model.train()
            if not history or history[-1]["step"] != step + 1:
                history.append({"step": step + 1})
            history[-1]["eval"] = middle
            print(format_metrics(f"step {step + 1} (eval {time.perf_counter() - t_eval:.1f} s)", middle),
                  flush=True)
            t_window += time.perf_counter() - t_eval  # s/step counts training only
        if args.checkpoint_every and ((step + 1) % args.checkpoint_every == 0 or step + 1 == stop):
            save_train_state(state_path, args, step + 1, model, optimizer, order_rng, caption_rng,
                             queue, history)
    train_s = time.perf_counter() - t_train
    if stop < args.steps:
        print(f"stopped after step {stop}/{args.steps} (--stop-after); rerun with --resume to "
              "continue", flush=True)
        return {"paths": {"state": state_path}, "metrics": {"history": history}, "model": model}

    t0 = time.perf_counter()
    model.eval()
    after = evaluate(model, tokenizer, heldout, size, patch, mean, std) if args.eval_images else {}
    if after:
        print(format_metrics(f"trained (eval {time.perf_counter() - t0:.1f} s)", after), flush=True)
    metrics = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"name": name, "parameters": params, "image_size": size, "patch_size": patch},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "open_clip": open_clip.__version__},
        "seconds": {"data": round(data_s, 1), "train": round(train_s, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "history": history,
        "random_init": before,
        "trained": after,
    }
    paths = save_outputs(Path(args.out), config, name, model, metrics)
    total_s = time.perf_counter() - t_start
    print(f"wrote {paths['checkpoint']}, {paths['config']}, {paths['vocabulary']}, "
          f"{paths['metrics']}; total {total_s:.0f} s ({total_s / 60:.1f} min; data {data_s:.0f} s, "
          f"training {train_s:.0f} s = {train_s / max(1, args.steps):.2f} s/step)", flush=True)
    return {"paths": paths, "metrics": metrics, "model": model}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "clip_synth",
                        help="output folder (default runs/clip_synth, ignored by git)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="open_clip model config JSON (default tools/clip/uplvp-synth-vit.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=4000, help="training scene pool")
    parser.add_argument("--eval-images", type=int, default=500, help="held-out scenes (0: no eval)")
    parser.add_argument("--base-size", type=int, default=128, help="synthetic base image size")
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--dense-weight", type=float, default=1.0,
                        help="weight of the dense (mask-pooled value-path) ClipLoss term")
    parser.add_argument("--crop-fraction", type=float, default=0.5,
                        help="share of training samples that are crops around one object")
    parser.add_argument("--recolour-fraction", type=float, default=0.0,
                        help="share of training samples whose hues are turned by a random angle "
                             "(colour words follow), so colour stops predicting the category")
    parser.add_argument("--dense-objects", type=int, default=4,
                        help="objects per image in the dense term (at most)")
    parser.add_argument("--bare-prompt-p", type=float, default=BARE_PROMPT_P,
                        help="share of dense-term object texts that are bare proposer prompts")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="data generation processes")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also evaluate every N steps (0: only before and after training)")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="write OUT/train_state.pt every N steps (0: never), for --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/train_state.pt exactly (same settings required)")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="stop after this step, state saved (split a long run); 0: run all")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
