"""The per-shard work of `uplvp stage propose`: read images, propose masks, write one shard.

Built once per process / Ray actor (it holds the proposer and its model), then called with shard
indices. Pure glue: image decoding (``pipeline.images``), proposing (``uplvp_model.proposal``),
row building and the atomic shard write (``pipeline.shards``).
"""
from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.faults import fault_point
from pipeline.images import ImageReadError, read_image_rgb
from pipeline.shards import plan_shards, remove_partial_files, write_shard
from uplvp_model.proposal.base import ProposedMask
from uplvp_model.proposal.factory import build_proposer
from uplvp_model.proposal.ingredients import mask_box_xywh, pack_bits, shape_grid


class ProposeShardWorker:
    """``worker(shard_index) -> summary dict``; writes ``masks/`` and ``images/`` of the shard.

    ``images`` is the stage's sorted image list as ``(image_id, path)`` pairs; the shard plan is
    recomputed from it and ``shard_size`` so every process agrees on shard boundaries.
    """

    def __init__(
        self,
        *,
        images: list[tuple[int, str]],
        out_dir: str,
        config_hash: str,
        proposer: str,
        proposer_options: dict[str, Any],
        shard_size: int,
        batch_size: int,
        max_side: int,
        grid_size: int,
        weights: dict[str, str] | None = None,
    ):
        self.images = images
        self.out_dir = out_dir
        self.config_hash = config_hash
        self.shards = plan_shards(len(images), shard_size)
        self.batch_size = batch_size
        self.max_side = max_side
        self.grid_size = grid_size
        self.weights = weights
        self.setup_error: str | None = None
        try:
            self.proposer = build_proposer(proposer, **proposer_options)
        except ValueError as err:  # bad proposer options: reported per shard, as setup errors
            self.setup_error = str(err)

    def __call__(self, shard_index: int) -> dict:
        t0 = time.perf_counter()
        if self.setup_error is not None:
            return {"shard": shard_index, "status": "failed", "setup_error": self.setup_error,
                    "error": self.setup_error, "seconds": 0.0}
        try:
            summary = self._run(shard_index)
        except Exception as err:  # a failed shard is reported; the run goes on
            return {
                "shard": shard_index,
                "status": "failed",
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=5),
                "seconds": time.perf_counter() - t0,
            }
        summary["seconds"] = time.perf_counter() - t0
        return summary

    def _run(self, shard_index: int) -> dict:
        remove_partial_files(self.out_dir, shard_index)  # left by a killed earlier attempt
        shard = self.shards[shard_index]
        members = self.images[shard.start : shard.stop]
        image_rows: list[dict] = []
        mask_rows: list[dict] = []
        model_seconds = 0.0
        for b in range(0, len(members), self.batch_size):
            batch = members[b : b + self.batch_size]
            decoded: list[tuple[int, str, np.ndarray]] = []
            for image_id, path in batch:
                try:
                    decoded.append((image_id, path, read_image_rgb(path, self.max_side)))
                except ImageReadError as err:
                    image_rows.append(_image_row(image_id, path, None, "error", str(err), 0))
            if not decoded:
                continue
            t_model = time.perf_counter()
            results = self.proposer.propose([img for _, _, img in decoded])
            model_seconds += time.perf_counter() - t_model
            for (image_id, path, image), masks in zip(decoded, results):
                h, w = image.shape[:2]
                for k, proposed in enumerate(masks):
                    mask_rows.append(self._mask_row(image_id, path, h, w, k, proposed))
                image_rows.append(_image_row(image_id, path, (h, w), "ok", "", len(masks)))
        image_rows.sort(key=lambda r: r["image_id"])
        fault_point("before-write", shard_index)
        write_shard(self.out_dir, shard_index, mask_rows, image_rows, self.config_hash,
                    self.weights)
        return {
            "shard": shard_index,
            "status": "ok",
            "images": len(members),
            "images_ok": sum(r["status"] == "ok" for r in image_rows),
            "images_error": sum(r["status"] == "error" for r in image_rows),
            "masks": len(mask_rows),
            "errors": [
                {"image_path": r["image_path"], "error": r["error"]}
                for r in image_rows
                if r["status"] == "error"
            ],
            "model_seconds": model_seconds,
        }

    def _mask_row(
        self, image_id: int, path: str, h: int, w: int, k: int, proposed: ProposedMask
    ) -> dict:
        mask = proposed.mask
        rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        return {
            "image_id": image_id,
            "image_path": path,
            "height": h,
            "width": w,
            "mask_index": k,
            "rle_counts": rle["counts"],
            "bbox": [float(v) for v in mask_box_xywh(mask)],
            "area": int(mask.sum()),
            "score": float(proposed.score),
            "label": proposed.label,
            "label_index": int(proposed.label_index),
            "clip_embedding": np.asarray(proposed.embedding, dtype=np.float16),
            "shape_grid": pack_bits(shape_grid(mask, self.grid_size)),
        }


def _image_row(image_id, path, hw, status, error, num_masks) -> dict:
    return {
        "image_id": image_id,
        "image_path": path,
        "height": None if hw is None else hw[0],
        "width": None if hw is None else hw[1],
        "status": status,
        "error": error,
        "num_masks": num_masks,
    }
