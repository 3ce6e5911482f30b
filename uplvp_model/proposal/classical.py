"""The ``classical`` proposer: weight-free colour/texture segmentation with OpenCV.

Pipeline for one RGB image (working copy shrunk so its longer side is at most ``max_side``):

1. Pixel features in CIE Lab (OpenCV 8-bit scale): two clustering spaces, (a) box-blurred
   colour (averages out fine stripes/checkers) with a local texture-energy channel (standard
   deviation of L in a ``texture_window`` box), and (b) median-filtered colour
   (``cv2.medianBlur``: removes pixel noise, keeps edges and two-tone textures). (Mean-shift
   filtering was tried in place of (b): lower recall on the synthetic data and slower.)
2. Per space, seeded k-means (numpy Lloyd iterations on a pixel subsample, k-means++ init from
   ``np.random.default_rng(seed)``) into ``k_max`` clusters, then Ward linkage of the cluster
   centres (scipy) gives one label map per level in ``levels`` (coarse to fine).
3. Candidates = 4-connected regions of equal label at every level (computed once on the finest
   level, then merged per level with scipy's graph connected components), holes filled,
   duplicates removed. Regions smaller than ``min_area``, larger than ``max_area_fraction`` of
   the image, or whose outline lies mostly on the image border (``max_border_fraction``) are
   background-like and dropped.
4. Score (in (0, 1)) = logistic function of seven cues (:data:`CUE_NAMES`): colour/texture
   contrast between the region and a 3-pixel ring around it, mean colour-gradient strength on
   its outline, internal feature spread, compactness ``4 pi area / perimeter^2``, solidity
   (area / convex hull area), relative area, and the share of its outline on the image border;
   weights in :data:`CUE_WEIGHTS` (fitted once by logistic regression on synthetic train
   images, see docs/proposers.md). Then mask NMS and top-K.

Label: the vocabulary is the single entry ``"object"``. Embedding: a 64-d appearance + shape
descriptor (see :func:`region_descriptor`), NOT a CLIP embedding. Deterministic: the only
randomness is the k-means++ initialisation, drawn from its own seeded generator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .base import ProposedMask, check_rgb_image
from .registry import PROPOSERS
from .ingredients import l2_normalise
from .masks import mask_nms

EMBEDDING_DIM = 64
_KERNEL3 = np.ones((3, 3), np.uint8)
_KERNEL7 = np.ones((7, 7), np.uint8)

CUE_NAMES = ("contrast", "edge", "spread", "compactness", "solidity", "area", "border")
CUE_WEIGHTS = np.array([1.3, 1.9, -1.2, 1.6, -1.6, 0.9, -4.3])
"""Weights of the log-cues (``border`` enters linearly), see :func:`score_from_cues`."""
CUE_BIAS = 0.7


@dataclass(frozen=True)
class ClassicalSettings:
    """Every option of the classical proposer (all change the output)."""

    max_side: int = 256
    blur_window: int = 5
    median_window: int = 3
    texture_window: int = 5
    k_max: int = 16
    levels: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16)
    kmeans_iterations: int = 12
    kmeans_stride: int = 2
    seed: int = 0
    min_area: int = 32
    max_area_fraction: float = 0.5
    max_border_fraction: float = 0.15
    nms_iou: float = 0.5
    top_k: int | None = 20  # at most this many masks (best score first); None: no cap
    min_score: float = 0.0  # masks scoring under this are dropped


@dataclass
class PixelFeatures:
    """Per-pixel features of the working image (H x W)."""

    lab: np.ndarray  # float32 [H, W, 3], OpenCV 8-bit Lab of the image
    spaces: list[np.ndarray]  # clustering spaces, float32 [H, W, D] each
    cue_features: np.ndarray  # float32 [H, W, 4]: blurred Lab + texture energy
    gradient: np.ndarray  # float32 [H, W]: colour gradient magnitude
    orientation: np.ndarray  # float32 [H, W]: luminance gradient direction in [0, pi)
    orientation_weight: np.ndarray  # float32 [H, W]: luminance gradient magnitude


@dataclass
class Region:
    """A candidate region: ``crop`` is bool ``[h, w]`` at ``(x, y)`` of the working image."""

    crop: np.ndarray
    x: int
    y: int

    def full(self, height: int, width: int) -> np.ndarray:
        """The region as a bool ``[height, width]`` mask."""
        mask = np.zeros((height, width), dtype=bool)
        h, w = self.crop.shape
        mask[self.y : self.y + h, self.x : self.x + w] = self.crop
        return mask


def _texture_energy(luminance: np.ndarray, window: int) -> np.ndarray:
    """Local standard deviation of ``luminance`` (float32 [H, W]) in a ``window`` box."""
    mean = cv2.blur(luminance, (window, window))
    mean_sq = cv2.blur(luminance * luminance, (window, window))
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


def pixel_features(image: np.ndarray, settings: ClassicalSettings) -> PixelFeatures:
    """Features of an RGB uint8 ``[H, W, 3]`` image (see module docstring, step 1)."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB).astype(np.float32)
    texture = _texture_energy(lab[..., 0], settings.texture_window)[..., None]
    median = cv2.medianBlur(bgr, settings.median_window)
    median_lab = cv2.cvtColor(median, cv2.COLOR_BGR2LAB).astype(np.float32)
    blurred_lab = cv2.blur(lab, (settings.blur_window, settings.blur_window))
    smooth = cv2.GaussianBlur(lab, (0, 0), 1.0)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    blurred_features = np.concatenate([blurred_lab, texture], axis=-1)
    lx = cv2.Sobel(lab[..., 0], cv2.CV_32F, 1, 0)
    ly = cv2.Sobel(lab[..., 0], cv2.CV_32F, 0, 1)
    return PixelFeatures(
        lab=lab,
        spaces=[blurred_features, median_lab],
        cue_features=blurred_features,
        gradient=np.sqrt((gx * gx + gy * gy).sum(axis=-1)),
        orientation=np.mod(np.arctan2(ly, lx), np.pi).astype(np.float32),
        orientation_weight=np.hypot(lx, ly),
    )


def seeded_kmeans(points: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """k-means centres (float32 ``[k', D]``, ``k' <= k``) of ``points`` (float32 ``[N, D]``).

    k-means++ initialisation with ``np.random.default_rng(seed)``, then Lloyd iterations; a
    cluster that empties keeps its previous centre. Deterministic for a given input and seed.
    """
    rng = np.random.default_rng(seed)
    points = points.astype(np.float32)
    centres = [points[rng.integers(len(points))]]
    min_dist = ((points - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, min(k, len(points))):
        total = float(min_dist.sum())
        if total <= 0:
            break  # fewer distinct points than k
        centre = points[rng.choice(len(points), p=min_dist / total)]
        centres.append(centre)
        min_dist = np.minimum(min_dist, ((points - centre) ** 2).sum(axis=1))
    centres_arr = np.stack(centres)
    for _ in range(iterations):
        assignment = _nearest(points, centres_arr)
        counts = np.bincount(assignment, minlength=len(centres_arr))
        filled = counts > 0
        for dim in range(points.shape[1]):
            sums = np.bincount(assignment, weights=points[:, dim], minlength=len(centres_arr))
            centres_arr[filled, dim] = sums[filled] / counts[filled]
    return centres_arr


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (int64 ``[N]``) for each point."""
    d = (centres * centres).sum(axis=1)[None, :] - 2.0 * points @ centres.T
    return d.argmin(axis=1)


def label_hierarchy(
    features: np.ndarray, settings: ClassicalSettings
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Finest label map and the cluster merges per level.

    features: float32 ``[H, W, D]``. Returns (fine int64 ``[H, W]`` cluster index,
    ``[level_map int64 [k] per level]`` mapping a fine cluster to its cluster at that level).
    """
    height, width, depth = features.shape
    stride = settings.kmeans_stride
    sample = features[::stride, ::stride].reshape(-1, depth)
    centres = seeded_kmeans(sample, settings.k_max, settings.kmeans_iterations, settings.seed)
    fine = _nearest(features.reshape(-1, depth), centres).reshape(height, width)
    k = len(centres)
    if k < 2:
        return fine, [np.zeros(k, dtype=np.int64)]
    tree = linkage(centres.astype(np.float64), method="ward")
    maps = []
    for level in settings.levels:
        if level >= k:
            maps.append(np.arange(k))
        else:
            maps.append(fcluster(tree, level, criterion="maxclust").astype(np.int64) - 1)
    return fine, maps


def _fine_components(fine: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """4-connected regions of equal fine label: (component id int32 ``[H, W]``, label of each
    component int64 ``[n]``)."""
    components = np.zeros(fine.shape, dtype=np.int32)
    labels: list[np.ndarray] = []
    offset = 0
    for label in range(k):
        count, cc = cv2.connectedComponents((fine == label).astype(np.uint8), connectivity=4)
        if count > 1:
            inside = cc > 0
            components[inside] = cc[inside] + offset - 1
            labels.append(np.full(count - 1, label))
            offset += count - 1
    return components, np.concatenate(labels)


def _adjacent_pairs(components: np.ndarray) -> np.ndarray:
    """Pairs of 4-adjacent component ids, int64 ``[P, 2]`` (unique, unordered)."""
    n = int(components.max()) + 1
    codes = []
    for a, b in ((components[:, :-1], components[:, 1:]), (components[:-1, :], components[1:, :])):
        differ = a != b
        low = np.minimum(a[differ], b[differ]).astype(np.int64)
        high = np.maximum(a[differ], b[differ]).astype(np.int64)
        codes.append(low * n + high)
    unique = np.unique(np.concatenate(codes))
    return np.stack([unique // n, unique % n], axis=1)


def _fill_holes(crop: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """A bool crop with its enclosed holes filled, and its outer contours."""
    filled = crop.astype(np.uint8)
    contours, _ = cv2.findContours(filled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(bool), list(contours)


def candidate_regions(
    pixels: PixelFeatures, settings: ClassicalSettings
) -> list[tuple[Region, list[np.ndarray]]]:
    """Distinct candidate regions of all levels of all clustering spaces, with their outer
    contours (crop coordinates); see module docstring, step 3."""
    height, width = pixels.lab.shape[:2]
    min_area = settings.min_area
    max_area = settings.max_area_fraction * height * width
    seen: set[tuple[int, int, int, int, bytes]] = set()
    regions: list[tuple[Region, list[np.ndarray]]] = []
    for space in pixels.spaces:
        fine, level_maps = label_hierarchy(space, settings)
        components, component_label = _fine_components(fine, int(fine.max()) + 1)
        n = len(component_label)
        component_area = np.bincount(components.ravel(), minlength=n)
        pairs = _adjacent_pairs(components)
        # Levels come from one Ward tree, so regions of a coarser level are unions of regions of
        # a finer one: (smallest component id, component count) identifies a region exactly.
        seen_groups: set[tuple[int, int]] = set()
        for level_map in level_maps:
            coarse = level_map[component_label]
            same = pairs[coarse[pairs[:, 0]] == coarse[pairs[:, 1]]]
            graph = coo_matrix((np.ones(len(same)), (same[:, 0], same[:, 1])), shape=(n, n))
            _, group = connected_components(graph, directed=False)
            group_area = np.bincount(group, weights=component_area)
            group_size = np.bincount(group)
            first = np.full(len(group_size), n)
            np.minimum.at(first, group, np.arange(n))
            region_map = group[components]
            for index, box in enumerate(ndimage.find_objects(region_map + 1)):
                if box is None or not min_area <= group_area[index] <= max_area:
                    continue
                signature = (int(first[index]), int(group_size[index]))
                if signature in seen_groups:
                    continue
                seen_groups.add(signature)
                crop, contours = _fill_holes(region_map[box] == index)
                key = (box[0].start, box[1].start, *crop.shape, crop.tobytes())
                if key in seen:
                    continue
                seen.add(key)
                region = Region(crop, box[1].start, box[0].start)
                if _border_fraction(region, height, width) <= settings.max_border_fraction:
                    regions.append((region, contours))
    return regions


def _border_fraction(region: Region, height: int, width: int) -> float:
    """Fraction of the image's border pixels that the region covers."""
    crop, x, y = region.crop, region.x, region.y
    h, w = crop.shape
    on_border = 0
    on_border += int(crop[0].sum()) if y == 0 else 0
    on_border += int(crop[-1].sum()) if y + h == height else 0
    on_border += int(crop[:, 0].sum()) if x == 0 else 0
    on_border += int(crop[:, -1].sum()) if x + w == width else 0
    return on_border / (2 * (height + width))


def region_cues(
    region: Region, contours: list[np.ndarray], pixels: PixelFeatures, scales: tuple[float, float]
) -> np.ndarray:
    """Cues of one region, float64 ``[7]`` in the order of :data:`CUE_NAMES`.

    scales: (mean per-channel std of the cue features, mean gradient) over the image, so the
    contrast/spread and edge cues are relative to the image's own variation.
    """
    height, width = pixels.lab.shape[:2]
    crop = region.crop
    h, w = crop.shape
    x0, y0 = max(region.x - 3, 0), max(region.y - 3, 0)
    x1, y1 = min(region.x + w + 3, width), min(region.y + h + 3, height)
    padded = np.zeros((y1 - y0, x1 - x0), np.uint8)
    padded[region.y - y0 : region.y - y0 + h, region.x - x0 : region.x - x0 + w] = crop
    ring = cv2.dilate(padded, _KERNEL7) - padded
    outline = padded - cv2.erode(padded, _KERNEL3, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    features = np.ascontiguousarray(pixels.cue_features[y0:y1, x0:x1])
    feature_scale, gradient_scale = scales
    inner_mean, inner_std = cv2.meanStdDev(features, mask=padded)
    outer_mean = np.asarray(cv2.mean(features, mask=ring)) if ring.any() else inner_mean.ravel()
    contrast = float(np.linalg.norm(inner_mean.ravel() - outer_mean[:4])) / feature_scale
    spread = float(np.linalg.norm(inner_std)) / feature_scale
    gradient = np.ascontiguousarray(pixels.gradient[y0:y1, x0:x1])
    edge = cv2.mean(gradient, mask=outline)[0] / gradient_scale
    area = float(crop.sum())
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    compactness = 4 * np.pi * area / max(perimeter**2, 1.0)
    hull_area = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
    solidity = area / max(hull_area, 1.0)
    border_pixels = _border_fraction(region, height, width) * 2 * (height + width)
    border = border_pixels / max(cv2.countNonZero(outline), 1)
    return np.array([contrast, edge, spread, compactness, solidity, area / (height * width), border])


def score_from_cues(cues: np.ndarray) -> np.ndarray:
    """Scores in (0, 1) for cue rows ``[N, 7]``: ``sigmoid(w . [log cues..., border] + b)``."""
    logs = np.log(np.maximum(cues[:, :6], 1e-3))
    design = np.concatenate([logs, cues[:, 6:7]], axis=1)
    return 1.0 / (1.0 + np.exp(-(design @ CUE_WEIGHTS + CUE_BIAS)))


def region_descriptor(
    mask: np.ndarray, pixels: PixelFeatures, contours: list[np.ndarray]
) -> np.ndarray:
    """64-d L2-normalised appearance + shape descriptor of a bool ``[H, W]`` working mask.

    Blocks (before the final normalisation): Lab mean / 255 (3), Lab std / 64 (3), a-b colour
    histogram 6x6 (36), L histogram (4), magnitude-weighted gradient orientation histogram (8),
    each histogram square-rooted after normalising to sum 1; signed log10 Hu moments / 10 (7);
    compactness, solidity, mean texture energy / 64 (3).
    """
    lab = pixels.lab[mask]
    ab_hist, _, _ = np.histogram2d(lab[:, 1], lab[:, 2], bins=6, range=[[0, 256], [0, 256]])
    l_hist, _ = np.histogram(lab[:, 0], bins=4, range=(0, 256))
    o_hist, _ = np.histogram(
        pixels.orientation[mask], bins=8, range=(0, np.pi), weights=pixels.orientation_weight[mask]
    )
    moments = cv2.HuMoments(cv2.moments(mask.astype(np.uint8), binaryImage=True)).ravel()
    hu = -np.sign(moments) * np.log10(np.abs(moments) + 1e-30) / 10.0
    area = float(mask.sum())
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    hull_area = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
    shape = [
        4 * np.pi * area / max(perimeter**2, 1.0),
        area / max(hull_area, 1.0),
        pixels.cue_features[..., 3][mask].mean() / 64.0,
    ]
    parts = [
        lab.mean(axis=0) / 255.0,
        lab.std(axis=0) / 64.0,
        _sqrt_hist(ab_hist.ravel()),
        _sqrt_hist(l_hist),
        _sqrt_hist(o_hist),
        hu,
        np.asarray(shape),
    ]
    return l2_normalise(np.concatenate(parts))


def _sqrt_hist(hist: np.ndarray) -> np.ndarray:
    total = float(hist.sum())
    return np.sqrt(hist / total) if total > 0 else np.zeros_like(hist, dtype=np.float64)


@PROPOSERS.register("classical")
class ClassicalProposer:
    """Weight-free proposer (no checkpoint): see the module docstring for the algorithm."""

    name = "classical"
    embedding_dim = EMBEDDING_DIM

    def __init__(self, **options: Any) -> None:
        if "levels" in options:
            options["levels"] = tuple(int(v) for v in options["levels"])
        try:
            self.settings = ClassicalSettings(**options)
        except TypeError as err:
            raise ValueError(f"classical proposer: {err}") from None
        s = self.settings
        if s.min_area < 1 or not 0 < s.max_area_fraction <= 1 or s.k_max < 2 or (
                s.top_k is not None and s.top_k < 1):
            raise ValueError(f"classical proposer: invalid settings {s}")
        self.vocabulary = ["object"]

    def config(self) -> dict[str, Any]:
        """Every setting that changes the output (JSON-serialisable)."""
        return {"proposer": self.name, **asdict(self.settings), "levels": list(self.settings.levels)}

    def propose(self, images: list[np.ndarray]) -> list[list[ProposedMask]]:
        """Masks per image (uint8 ``[H, W, 3]`` RGB in), sorted by score descending."""
        for index, image in enumerate(images):
            check_rgb_image(image, index)
        return [self._propose_one(image) for image in images]

    def _propose_one(self, image: np.ndarray) -> list[ProposedMask]:
        s = self.settings
        height, width = image.shape[:2]
        scale = min(1.0, s.max_side / max(height, width))
        work = image
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            work = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        work_settings = s if scale == 1.0 else _scaled(s, scale)
        pixels = pixel_features(work, work_settings)
        candidates = candidate_regions(pixels, work_settings)
        if not candidates:
            return []
        feature_scale = float(pixels.cue_features.reshape(-1, 4).std(axis=0).mean()) + 1e-6
        scales = (feature_scale, float(pixels.gradient.mean()) + 1e-6)
        cues = np.stack([region_cues(r, c, pixels, scales) for r, c in candidates])
        scores = score_from_cues(cues)
        work_h, work_w = pixels.lab.shape[:2]
        masks = np.stack([r.full(work_h, work_w) for r, _ in candidates])
        results = []
        passing = np.flatnonzero(scores >= s.min_score)  # threshold, then NMS and the cap
        for index in passing[mask_nms(masks[passing], scores[passing], s.nms_iou,
                                      max_keep=s.top_k)]:
            mask = masks[index]
            if scale < 1.0:
                full = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
                mask = full > 0
                if mask.sum() < s.min_area:
                    continue
            results.append(
                ProposedMask(
                    mask=mask,
                    score=float(scores[index]),
                    label="object",
                    label_index=0,
                    embedding=region_descriptor(masks[index], pixels, candidates[index][1]),
                )
            )
        return results


def _scaled(settings: ClassicalSettings, scale: float) -> ClassicalSettings:
    """Settings for a working image shrunk by ``scale``: the minimum area shrinks with it."""
    return replace(settings, min_area=max(1, int(settings.min_area * scale * scale)))
