"""A labeled set of bright rectangles on dark images, and a stand-in model whose predictions are
known (kernel 0: the bright pixels, kernel 1: empty), loaded by evaluate and predict instead of a
checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import stages.evaluate as evaluate_stage
import stages.predict as predict_stage
from pipeline.coco import mask_to_rle
from pipeline.evaluation import InferenceModel
from stages.evaluate import EvaluateConfig


def square_mask(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


BRIGHT, DARK = 220, 40
RECTS = [(2, 3, 12, 15), (8, 10, 20, 30), (0, 0, 24, 9), (5, 20, 11, 31)]  # y0, x0, y1, x1


def write_labeled_set(folder, category_ids=(1, 2)) -> dict:
    """Four 24x32 dark images, each with one bright rectangle annotated (categories
    alternating), COCO JSON with area/iscrowd and a manifest."""
    images, anns = [], []
    for i, (y0, x0, y1, x1) in enumerate(RECTS, start=1):
        pixels = np.full((24, 32, 3), DARK, dtype=np.uint8)
        pixels[y0:y1, x0:x1] = BRIGHT
        (folder / "images").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "images" / f"{i}.png"), pixels)
        images.append({"id": i, "file_name": f"{i}.png", "height": 24, "width": 32})
        mask = square_mask(24, 32, y0, x0, y1, x1)
        anns.append({"id": i, "image_id": i, "category_id": category_ids[i % 2],
                     "segmentation": mask_to_rle(mask), "area": float(mask.sum()),
                     "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                     "iscrowd": 0})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"cat{c}"} for c in category_ids]}
    (folder / "ann.json").write_text(json.dumps(coco))
    (folder / "set.yaml").write_text("name: bright\nimages: {root: images}\n"
                                     "annotations: ann.json\n")
    return {"manifest": folder / "set.yaml", "annotations": folder / "ann.json", "coco": coco}


class BrightRegionModel(nn.Module):
    """A stand-in for a trained model: kernel 0's mask is the bright pixels (normalised mean
    > 1), kernel 1's mask is empty; class probabilities are the fixed ``probs`` [2, C+1]."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(probs).log())

    def forward(self, images: torch.Tensor) -> dict:
        bright = (images.mean(1, keepdim=True) > 1.0).float()
        kernel0 = (F.avg_pool2d(bright, 4) > 0.5).float() * 20 - 10
        masks = torch.cat([kernel0, torch.full_like(kernel0, -10.0)], dim=1)
        return {"pred_logits": self.logits.expand(images.shape[0], -1, -1), "pred_masks": masks}


def use_model(monkeypatch, model: nn.Module, category_ids: list[int], step: int = 5) -> None:
    """Make both stages load ``model`` instead of reading a checkpoint."""
    def load(checkpoint, device):
        return InferenceModel(model, category_ids, Path(checkpoint), step)

    for module in (evaluate_stage, predict_stage):
        monkeypatch.setattr(module, "load_inference_model", load)


STUB_PROBS = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]


def eval_cfg(data, tmp_path, **kw) -> EvaluateConfig:
    return EvaluateConfig(checkpoint=tmp_path / "model.pt", data=data["manifest"],
                          out=tmp_path / "eval", short_side=32, max_long_side=64, **kw)
