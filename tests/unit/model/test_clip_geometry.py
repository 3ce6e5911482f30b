"""Where the clip proposer's masks land, with a planted signal: non-square images, letterbox
padding and the stage's ``max_side`` downscale.

A stand-in for the dense CLIP features looks at each patch of the letterboxed canvas the
proposer feeds it: a red patch gets exactly the text embedding of "star", a green one that of
"disk", anything else (grey image, the canvas padding) that of the background word. Text
embeddings are one-hot vectors, so the only thing under test is the geometry: downscale,
letterbox, the crop of the valid patches, the two upsamplings back to the image and the
mask-pooled embedding. The planted rectangles are aligned with the patch grid, so a correct
pipeline returns them up to the bilinear edges (IoU 0.98 and 0.97 measured); a one-patch
shift, a missed padding crop (a stretch by 160 / 96: both cases then fail, tried) or a
transposed size would each cost far more than the 0.1 of IoU allowed.
"""
from __future__ import annotations


import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.manifest import write_manifest
from stages.propose import ProposeConfig, run_propose
from uplvp_model.proposal import clip_dense
from tests.helpers import ASSETS

VOCABULARY = ["star", "disk"]
BACKGROUND = ["background"]
PATCH, INPUT_SIZE, MAX_SIDE = 16, 160, 320  # tiny-clip-vit.json has 16 px patches
RED, GREEN, GREY = (220, 30, 30), (30, 200, 40), (128, 128, 128)

# (file, original width x height, colour, label, rectangle x0, y0, x1, y1 in original pixels).
# Original -> proposal resolution (max_side 320) halves both; letterboxing to 160 halves again,
# so a rectangle on multiples of 64 original px lies on the 16 px patch grid of the canvas.
IMAGES = [
    ("wide.png", (640, 384), RED, "star", (128, 64, 448, 320)),      # canvas 160 x 96: rows pad
    ("tall.png", (384, 640), GREEN, "disk", (64, 192, 256, 512)),    # canvas 96 x 160: cols pad
]


def _one_hot_texts(self, model, tokenizer, model_key, names, templates, cache_file=None):
    assert list(names) == VOCABULARY + BACKGROUND
    return torch.eye(len(names), 32)  # tiny-clip-vit embeds in 32 dimensions


def _planted_features(model, images: torch.Tensor, recipe: str = "value") -> torch.Tensor:
    """[B, 32, g, g]: per canvas patch the one-hot of star (red), disk (green) or background."""
    mean = torch.tensor(clip_dense.open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_dense.open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    rgb = torch.nn.functional.avg_pool2d(images * std + mean, PATCH)  # [B, 3, g, g] in [0, 1]
    red = (rgb[:, 0] > 0.6) & (rgb[:, 1] < 0.3)
    green = (rgb[:, 1] > 0.6) & (rgb[:, 0] < 0.3)
    index = torch.full(red.shape, 2, dtype=torch.long)
    index[red], index[green] = 0, 1
    return torch.nn.functional.one_hot(index, 32).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def proposed(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry")
    folder = root / "images"
    folder.mkdir()
    for name, (w, h), colour, _, (x0, y0, x1, y1) in IMAGES:
        image = np.full((h, w, 3), GREY, dtype=np.uint8)
        image[y0:y1, x0:x1] = colour
        cv2.imwrite(str(folder / name), image[:, :, ::-1])
    write_manifest(root / "images.yaml", "geometry", folder, glob="*.png")
    (root / "vocabulary.txt").write_text("\n".join(VOCABULARY) + "\n")
    cfg = ProposeConfig(
        images=root / "images.yaml", out=root / "out", proposer="clip",
        clip_model=str(ASSETS / "tiny-clip-vit.json"), random_weights=True,
        vocabulary=root / "vocabulary.txt", max_side=MAX_SIDE, num_workers=0, device="cpu",
        options={"input_size": INPUT_SIZE, "background_words": BACKGROUND},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clip_dense, "dense_clip_features", _planted_features)
        patch.setattr(clip_dense.TEXT_EMBEDDING_CACHE, "get",
                      _one_hot_texts.__get__(clip_dense.TEXT_EMBEDDING_CACHE))
        assert run_propose(cfg, progress=False) == 0
    masks = pd.read_parquet(root / "out" / "masks")
    images = pd.read_parquet(root / "out" / "images")
    return masks.merge(images[["image_id", "image_path"]], on=["image_id", "image_path"])


@pytest.mark.parametrize("name, size, colour, label, box", IMAGES)
def test_mask_covers_the_planted_region_with_its_label(proposed, name, size, colour, label, box):
    rows = proposed[proposed.image_path.str.endswith(name)]
    assert len(rows) == 1  # one region, one mask: nothing on the padding or the grey image
    row = rows.iloc[0]
    w, h = size
    assert (row.height, row.width) == (h * MAX_SIDE // max(w, h), w * MAX_SIDE // max(w, h))
    mask = mask_utils.decode({"size": [int(row.height), int(row.width)],
                              "counts": row.rle_counts}).astype(bool)
    expected = np.zeros_like(mask)
    x0, y0, x1, y1 = (v // 2 for v in box)  # the proposal resolution is half the original
    expected[y0:y1, x0:x1] = True
    iou = (mask & expected).sum() / (mask | expected).sum()
    assert iou >= 0.9, f"{name}: mask IoU {iou:.3f} with the planted region"
    assert row.label == label and row.label_index == VOCABULARY.index(label)
    # mask pooling over the same geometry: the embedding is the label's one-hot text vector
    embedding = np.asarray(row.clip_embedding, dtype=np.float32)
    assert int(np.argmax(embedding)) == VOCABULARY.index(label)
    assert embedding[VOCABULARY.index(label)] > 0.95
