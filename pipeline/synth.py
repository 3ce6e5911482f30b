"""Deterministic synthetic instance-segmentation dataset: the embedded demo data of uplvp.

Each image is a cluttered scene: a textured background (smooth low-frequency colour noise,
soft blotches, straight lines and curved distractor strokes, soft-edged texture patches that are
NOT instances) with 1-8 objects drawn on top. Every object belongs to one of eight shape
categories; shape is the main cue, each category also has its own texture (swapped for another
category's texture on ~25 % of instances) and a hue range that overlaps its neighbours', so
neither colour nor texture alone identifies the category. Objects are drawn in order, later ones
occluding earlier ones; annotations are the visible parts only. A mild illumination gradient, a
slight blur and pixel noise finish the image.

Conventions: images are ``uint8`` arrays of shape (H, W, 3) in RGB order; masks are ``bool``
arrays of shape (H, W); pixel (x, y) is column x, row y.

:func:`generate_image` is a pure function of its ``np.random.Generator``;
:func:`write_synth_dataset` writes the unlabeled pool and the labeled train/val splits (PNG
images, COCO instances JSON with polygon segmentations, dataset manifests). Every image's
generator is seeded from ``(seed, split name, index)`` so files never depend on the counts of
other splits. ``docs/synthetic_data.md`` describes the result.
"""
from __future__ import annotations

import colorsys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from rich.progress import Progress

from pipeline.atomic import write_bytes_atomic
from pipeline.coco import mask_bbox_xywh, mask_to_polygons, write_coco
from pipeline.errors import InputError
from pipeline.manifest import write_manifest


@dataclass(frozen=True)
class SynthCategory:
    """One object category: ``name`` selects the shape drawer, ``texture`` the default texture,
    ``hue`` the centre (degrees) of the category's colour range (+- ``HUE_SPREAD``)."""

    id: int
    name: str
    texture: str
    hue: float


CATEGORIES: tuple[SynthCategory, ...] = (
    SynthCategory(1, "disk", "noise", 0.0),
    SynthCategory(2, "rectangle", "stripes", 45.0),
    SynthCategory(3, "triangle", "checker", 90.0),
    SynthCategory(4, "star", "dots", 135.0),
    SynthCategory(5, "cross", "gradient", 180.0),
    SynthCategory(6, "crescent", "rings", 225.0),
    SynthCategory(7, "horseshoe", "waves", 270.0),
    SynthCategory(8, "hexagon", "hatch", 315.0),
)

HUE_SPREAD = 40.0  # +- degrees around a category's hue: neighbouring ranges overlap
TEXTURE_SWAP_P = 0.25  # chance that an instance wears another category's texture
MIN_VISIBLE_AREA = 30  # px: instances with fewer visible pixels are not annotated
MIN_VISIBLE_FRACTION = 0.35  # instances with less of their in-image area visible are dropped
MAX_OBJECTS = 8
# (height, width) of the images at base size 128; scaled by image_size / 128.
BASE_SHAPES: tuple[tuple[int, int], ...] = ((96, 128), (120, 160), (128, 128), (144, 112))
# object radius as a fraction of min(height, width): small / medium / large, with probabilities
SIZE_RANGES: tuple[tuple[float, float], ...] = ((0.05, 0.09), (0.09, 0.16), (0.16, 0.26))
SIZE_PROBS: tuple[float, ...] = (0.35, 0.4, 0.25)
SPLITS: tuple[str, ...] = ("unlabeled", "train", "val")
UNLABELED_TRUTH_FILE = "generator_annotations.json"  # unlabeled/: what the generator drew

Instance = tuple[int, np.ndarray]  # (category_id, visible mask bool (H, W))


# --------------------------------------------------------------------------- shapes
#
# A shape drawer fills a (H, W) uint8 canvas with 1 inside the object. (cx, cy) is the centre in
# pixels, r the object's radius in pixels, angle its rotation in radians.

_SHIFT = 4  # OpenCV fixed-point bits: vertices are drawn with 1/16 pixel precision


def _fill(canvas: np.ndarray, points: np.ndarray, value: int = 1) -> None:
    """Fill the polygon ``points`` (float (N, 2) x, y pixels) with sub-pixel precision."""
    pts = np.round(points * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(canvas, [pts], value, lineType=cv2.LINE_8, shift=_SHIFT)


def _place(local: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """Rotate (N, 2) local vertices by ``angle`` and move them to (cx, cy)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return local @ rot.T + np.array([cx, cy])


def _ring_points(radius: float, start: float, stop: float, n: int) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _draw_disk(canvas, rng, cx, cy, r, angle) -> None:
    _fill(canvas, _place(_ring_points(r, 0, 2 * np.pi, 48)[:-1], cx, cy, angle))


def _draw_rectangle(canvas, rng, cx, cy, r, angle) -> None:
    h = r * rng.uniform(0.45, 0.8)
    local = np.array([[-r, -h], [r, -h], [r, h], [-r, h]])
    _fill(canvas, _place(local, cx, cy, angle))


def _draw_triangle(canvas, rng, cx, cy, r, angle) -> None:
    t = np.deg2rad(-90 + np.arange(3) * 120 + rng.uniform(-15, 15, 3))
    radii = r * rng.uniform(0.9, 1.1, 3)
    local = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    _fill(canvas, _place(local, cx, cy, angle))


def _draw_star(canvas, rng, cx, cy, r, angle) -> None:
    inner = r * rng.uniform(0.4, 0.5)
    t = np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, inner)
    local = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    _fill(canvas, _place(local, cx, cy, angle))


def _draw_cross(canvas, rng, cx, cy, r, angle) -> None:
    w = r * rng.uniform(0.28, 0.38)
    local = np.array(
        [[-w, -r], [w, -r], [w, -w], [r, -w], [r, w], [w, w],
         [w, r], [-w, r], [-w, w], [-r, w], [-r, -w], [-w, -w]]
    )
    _fill(canvas, _place(local, cx, cy, angle))


def _draw_crescent(canvas, rng, cx, cy, r, angle) -> None:
    _fill(canvas, _place(_ring_points(r, 0, 2 * np.pi, 48)[:-1], cx, cy, angle))
    cut = _ring_points(r * rng.uniform(0.75, 0.9), 0, 2 * np.pi, 48)[:-1]
    cut[:, 0] += r * rng.uniform(0.45, 0.6)
    _fill(canvas, _place(cut, cx, cy, angle), value=0)


def _draw_horseshoe(canvas, rng, cx, cy, r, angle) -> None:
    half_gap = np.deg2rad(rng.uniform(25, 40))
    outer = _ring_points(r, half_gap, 2 * np.pi - half_gap, 40)
    inner = _ring_points(r * rng.uniform(0.5, 0.62), 2 * np.pi - half_gap, half_gap, 40)
    _fill(canvas, _place(np.concatenate([outer, inner]), cx, cy, angle))


def _draw_hexagon(canvas, rng, cx, cy, r, angle) -> None:
    _fill(canvas, _place(_ring_points(r, 0, 2 * np.pi, 7)[:-1], cx, cy, angle))


SHAPES: dict[str, Callable[..., None]] = {
    "disk": _draw_disk,
    "rectangle": _draw_rectangle,
    "triangle": _draw_triangle,
    "star": _draw_star,
    "cross": _draw_cross,
    "crescent": _draw_crescent,
    "horseshoe": _draw_horseshoe,
    "hexagon": _draw_hexagon,
}


# --------------------------------------------------------------------------- textures
#
# A texture maps object-frame coordinates (u, v: float32 (H, W) pixels, rotated with the object)
# and the object radius r to a mixing weight t in [0, 1] (float32 (H, W)) between the object's
# two colours.


def _tex_noise(rng, u, v, r) -> np.ndarray:
    return np.clip(0.5 + 0.35 * _smooth_noise(rng, u.shape, cells=6), 0, 1)


def _tex_stripes(rng, u, v, r) -> np.ndarray:
    period = rng.uniform(3.0, 6.0)
    return (np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)


def _tex_checker(rng, u, v, r) -> np.ndarray:
    cell = rng.uniform(2.5, 5.0)
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)


def _tex_dots(rng, u, v, r) -> np.ndarray:
    period = rng.uniform(4.0, 7.0)
    fu = (u / period) % 1.0 - 0.5
    fv = (v / period) % 1.0 - 0.5
    return (fu * fu + fv * fv < rng.uniform(0.06, 0.12)).astype(np.float32)


def _tex_gradient(rng, u, v, r) -> np.ndarray:
    return np.clip(0.5 + u / (2 * r), 0, 1)


def _tex_rings(rng, u, v, r) -> np.ndarray:
    period = rng.uniform(3.0, 6.0)
    return (np.sin(2 * np.pi * np.hypot(u, v) / period) > 0).astype(np.float32)


def _tex_waves(rng, u, v, r) -> np.ndarray:
    period = rng.uniform(4.0, 7.0)
    bend = np.sin(2 * np.pi * v / rng.uniform(8.0, 14.0)) * rng.uniform(1.0, 2.5)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (u + bend) / period)


def _tex_hatch(rng, u, v, r) -> np.ndarray:
    period = rng.uniform(4.0, 7.0)
    a = np.sin(2 * np.pi * (u + v) / period) > 0.6
    b = np.sin(2 * np.pi * (u - v) / period) > 0.6
    return (a | b).astype(np.float32)


TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    "noise": _tex_noise,
    "stripes": _tex_stripes,
    "checker": _tex_checker,
    "dots": _tex_dots,
    "gradient": _tex_gradient,
    "rings": _tex_rings,
    "waves": _tex_waves,
    "hatch": _tex_hatch,
}


# --------------------------------------------------------------------------- colours and noise


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    """RGB float32 (3,) in [0, 1] of a hue in degrees and saturation/value in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Low-frequency noise, float32 ``shape`` ((H, W) or (H, W, C)), roughly in [-1, 1]:
    a (cells x cells) grid of standard normals upsampled bicubically."""
    h, w = shape[:2]
    grid = rng.standard_normal((cells, cells, *shape[2:])).astype(np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return out.reshape(shape)


def _coords(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), float32 (H, W) each."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return x, y


# --------------------------------------------------------------------------- background


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Cluttered background, RGB float32 (H, W, 3) in about [0, 1]."""
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.45), rng.uniform(0.35, 0.8))
    cells = int(rng.integers(3, 7))
    img = base + 0.12 * _smooth_noise(rng, (height, width, 1), cells=cells)  # brightness
    img += 0.06 * _smooth_noise(rng, (height, width, 3), cells=cells)  # colour
    img += 0.04 * _smooth_noise(rng, (height, width, 3), cells=12)
    scale = min(height, width)

    for _ in range(int(rng.integers(3, 9))):  # soft blotches
        blob = np.zeros((height, width), np.float32)
        axes = (int(rng.uniform(0.05, 0.25) * scale), int(rng.uniform(0.05, 0.25) * scale))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), rng.uniform(2.0, 6.0))[..., None]
        colour = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.9))
        img = img * (1 - 0.6 * blob) + colour * 0.6 * blob

    x, y = _coords(height, width)
    for _ in range(int(rng.integers(0, 3))):  # soft-edged texture patches (not instances)
        name = list(TEXTURES)[int(rng.integers(len(TEXTURES)))]
        r = rng.uniform(0.1, 0.25) * scale
        cx, cy, ang = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)
        v = -(x - cx) * np.sin(ang) + (y - cy) * np.cos(ang)
        t = TEXTURES[name](rng, u, v, r)[..., None]
        blob = np.zeros((height, width), np.float32)
        cv2.circle(blob, (int(cx), int(cy)), int(r), 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), r / 3)[..., None] * rng.uniform(0.3, 0.6)
        c1, c2 = _random_colour(rng), _random_colour(rng)
        img = img * (1 - blob) + (c1 * (1 - t) + c2 * t) * blob

    canvas = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 7))):  # straight lines
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(canvas, p1, p2, _random_colour_u8(rng), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 4))):  # curved distractor strokes (random walks)
        steps = rng.normal(0, 1, (12, 2)).cumsum(axis=0) * rng.uniform(2.0, 5.0)
        start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        pts = np.round(start + steps).astype(np.int32)
        cv2.polylines(
            canvas, [pts], False, _random_colour_u8(rng), int(rng.integers(1, 4)), cv2.LINE_AA
        )
    return canvas.astype(np.float32) / 255.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.9), rng.uniform(0.2, 0.95))


def _random_colour_u8(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.round(_random_colour(rng) * 255))


# --------------------------------------------------------------------------- objects


def _object_pixels(
    rng: np.random.Generator,
    category: SynthCategory,
    categories: Sequence[SynthCategory],
    u: np.ndarray,
    v: np.ndarray,
    r: float,
) -> np.ndarray:
    """Colours of one object, RGB float32 (h, w, 3), at object-frame coordinates ``u``, ``v``
    (float32 (h, w), pixels, over the object's bounding box): the category's texture (or, with
    probability ``TEXTURE_SWAP_P``, another category's) mixing two colours from the category's
    hue range, with a soft shading across the object."""
    texture = category.texture
    if len(categories) > 1 and rng.random() < TEXTURE_SWAP_P:
        texture = categories[int(rng.integers(len(categories)))].texture
    c1 = _hsv(category.hue + rng.uniform(-HUE_SPREAD, HUE_SPREAD),
              rng.uniform(0.4, 0.95), rng.uniform(0.45, 0.95))
    if rng.random() < 0.5:
        c2 = c1 * rng.uniform(0.35, 0.65)
    else:
        c2 = c1 + (1 - c1) * rng.uniform(0.4, 0.7)
    t = TEXTURES[texture](rng, u, v, r)[..., None]
    shade = 1 + rng.uniform(-0.15, 0.15) * np.clip(v / r, -1, 1)[..., None]
    return (c1 * (1 - t) + c2 * t) * shade


def _has_hole(mask: np.ndarray) -> bool:
    """True if the bool (H, W) mask encloses background (a hole COCO polygons cannot keep)."""
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def _sample_shape(
    rng: np.random.Generator, category: SynthCategory, height: int, width: int
) -> tuple[np.ndarray, float, float, float, float]:
    """Draw one object's full mask: (bool (H, W), cx, cy, r, angle); centre inside the image."""
    size = SIZE_RANGES[int(rng.choice(len(SIZE_RANGES), p=SIZE_PROBS))]
    r = rng.uniform(*size) * min(height, width)
    cx = rng.uniform(0.1 * width, 0.9 * width)
    cy = rng.uniform(0.1 * height, 0.9 * height)
    angle = rng.uniform(0, 2 * np.pi)
    canvas = np.zeros((height, width), np.uint8)
    SHAPES[category.name](canvas, rng, cx, cy, r, angle)
    return canvas.astype(bool), cx, cy, r, angle


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Illumination gradient, slight blur and pixel noise; float RGB -> uint8 RGB (H, W, 3)."""
    height, width = img.shape[:2]
    x, y = _coords(height, width)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = ((x / width - 0.5) * np.cos(theta) + (y / height - 0.5) * np.sin(theta))
    img = img * (1 + rng.uniform(0.1, 0.3) * ramp)[..., None]
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.7))
    img = img + rng.normal(0, rng.uniform(0.01, 0.03), img.shape).astype(np.float32)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def generate_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    categories: Sequence[SynthCategory] = CATEGORIES,
) -> tuple[np.ndarray, list[Instance]]:
    """One synthetic scene, a pure function of the state of ``rng``.

    Returns the image (uint8 (height, width, 3), RGB) and its annotated instances in drawing
    order (back to front): ``(category_id, visible_mask)`` with ``visible_mask`` bool
    (height, width). Visible masks of one image never overlap and never have holes (an object
    placement that would punch a hole into an earlier object's visible part is re-drawn);
    instances whose visible part is below ``MIN_VISIBLE_AREA`` pixels or below
    ``MIN_VISIBLE_FRACTION`` of their in-image area stay in the picture but are not returned.
    """
    if height < 16 or width < 16:
        raise ValueError(f"image size must be at least 16x16, got {height}x{width}")
    if not categories:
        raise ValueError("categories is empty")
    for cat in categories:
        if cat.name not in SHAPES or cat.texture not in TEXTURES:
            raise ValueError(
                f"category {cat.name!r}: shape must be one of {sorted(SHAPES)} and texture one "
                f"of {sorted(TEXTURES)}, got texture {cat.texture!r}"
            )
    img = _background(rng, height, width)
    x, y = _coords(height, width)
    labels = np.zeros((height, width), np.int32)  # 0 background, k = k-th drawn object
    drawn: list[tuple[int, int]] = []  # (category_id, in-image full area)
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        category = categories[int(rng.integers(len(categories)))]
        for _attempt in range(10):
            full, cx, cy, r, angle = _sample_shape(rng, category, height, width)
            under = np.unique(labels[full])
            trial = np.where(full, len(drawn) + 1, labels)
            if not any(_has_hole(trial == k) for k in under if k > 0):
                break
        else:
            continue  # no hole-free placement found: skip this object
        bx, by, bw, bh = cv2.boundingRect(full.astype(np.uint8))
        box = (slice(by, by + bh), slice(bx, bx + bw))
        dx, dy = x[box] - cx, y[box] - cy
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        pixels = _object_pixels(rng, category, categories, u, v, r)
        img[box][full[box]] = pixels[full[box]]
        labels = trial
        drawn.append((category.id, int(full.sum())))

    instances: list[Instance] = []
    for k, (category_id, full_area) in enumerate(drawn, start=1):
        visible = labels == k
        area = int(visible.sum())
        if area >= MIN_VISIBLE_AREA and area >= MIN_VISIBLE_FRACTION * full_area:
            instances.append((category_id, visible))
    return _finish(rng, img), instances


# --------------------------------------------------------------------------- dataset writing


def image_shapes(image_size: int) -> list[tuple[int, int]]:
    """The (height, width) choices for base size ``image_size`` (``BASE_SHAPES`` scaled by
    image_size / 128, rounded to multiples of 4)."""
    scale = image_size / 128.0
    return [(4 * round(h * scale / 4), 4 * round(w * scale / 4)) for h, w in BASE_SHAPES]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: depends on nothing else."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]))


def synth_example(
    seed: int, split: str, index: int, image_size: int = 128
) -> tuple[np.ndarray, list[Instance]]:
    """Image ``index`` of ``split`` exactly as :func:`write_synth_dataset` writes it: its size
    drawn from :func:`image_shapes` and its scene from :func:`generate_image`, both with
    :func:`image_rng`. Returns (image uint8 (H, W, 3) RGB, [(category_id, mask bool (H, W))])."""
    rng = image_rng(seed, split, index)
    shapes = image_shapes(image_size)
    height, width = shapes[int(rng.integers(len(shapes)))]
    return generate_image(rng, height, width)


def _encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return buf.tobytes()


def _write_split(
    out_dir: Path,
    split: str,
    count: int,
    seed: int,
    image_size: int,
    on_image: Callable[[], None],
) -> dict:
    """Write ``count`` images of ``split``; returns the COCO dict (images + annotations)."""
    images_dir = out_dir / split / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    names = {f"{split}_{i:06d}.png" for i in range(count)}
    for stale in images_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        if stale.name not in names:  # left by an earlier, larger run into the same folder
            stale.unlink()
    images: list[dict] = []
    annotations: list[dict] = []
    for index in range(count):
        image, instances = synth_example(seed, split, index, image_size)
        height, width = image.shape[:2]
        file_name = f"{split}_{index:06d}.png"
        write_bytes_atomic(images_dir / file_name, _encode_png(image))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category_id, mask in instances:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": mask_to_polygons(mask),
                "area": int(mask.sum()),
                "bbox": mask_bbox_xywh(mask),
                "iscrowd": 0,
            })
        on_image()
    return {"images": images, "annotations": annotations}


def write_synth_dataset(
    out_dir: str | Path,
    seed: int = 0,
    num_unlabeled: int = 300,
    num_train: int = 60,
    num_val: int = 60,
    image_size: int = 128,
    progress: bool = True,
) -> dict:
    """Write the synthetic dataset under ``out_dir``; returns a summary dict.

    Writes ``{split}/images/{split}_{index:06d}.png`` for the splits ``unlabeled``, ``train``
    and ``val``; ``train/annotations.json`` and ``val/annotations.json`` (COCO instances,
    polygon segmentations, image ids 1..N, annotation ids 1..M per file); and the manifests
    ``unlabeled.yaml`` (images only), ``train.yaml``, ``val.yaml``; and
    ``unlabeled/generator_annotations.json``, the unlabeled images' instances as the generator
    drew them (named by no manifest: for measuring pseudo masks, never for training). Generated images of a split
    left over from an earlier, larger run in the same folder are removed.

    Summary: ``{"out_dir", "seed", "image_size", "categories": [names],
    "splits": {split: {"images": n, "instances": m, "manifest": path}}}`` (``instances`` is 0
    for the unlabeled pool, whose images still contain objects).
    """
    out = Path(out_dir)
    counts = {"unlabeled": num_unlabeled, "train": num_train, "val": num_val}
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}", out)
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(
                f"number of {split} images must be a non-negative integer, got {n!r}", out
            )
    if not 64 <= image_size <= 1024:
        raise InputError(f"image_size must be between 64 and 1024, got {image_size}", out)
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", out)

    categories = [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in CATEGORIES]
    summary: dict = {
        "out_dir": str(out),
        "seed": seed,
        "image_size": image_size,
        "categories": [c.name for c in CATEGORIES],
        "splits": {},
    }
    with Progress(disable=not progress, transient=False) as bar:
        for split in SPLITS:
            task = bar.add_task(f"synth {split}", total=counts[split])
            coco = _write_split(
                out, split, counts[split], seed, image_size, lambda: bar.advance(task)
            )
            manifest = out / f"{split}.yaml"
            if split == "unlabeled":
                write_manifest(manifest, f"synth-{split}", out / split / "images", glob="*.png")
                n_instances = 0
                # what the generator drew, for measuring pseudo masks; no manifest names it, so
                # nothing trains on it
                write_coco(out / split / UNLABELED_TRUTH_FILE, {
                    "info": {"description": f"uplvp synthetic shapes, split {split}, seed {seed}: "
                             "the generator's instances, for pseudo-mask quality only"},
                    "images": coco["images"], "annotations": coco["annotations"],
                    "categories": categories,
                })
            else:
                ann_path = out / split / "annotations.json"
                write_coco(ann_path, {
                    "info": {"description": f"uplvp synthetic shapes, split {split}, seed {seed}"},
                    "images": coco["images"],
                    "annotations": coco["annotations"],
                    "categories": categories,
                })
                write_manifest(
                    manifest, f"synth-{split}", out / split / "images",
                    glob="*.png", annotations=ann_path,
                )
                n_instances = len(coco["annotations"])
            summary["splits"][split] = {
                "images": counts[split], "instances": n_instances, "manifest": str(manifest),
            }
    return summary
