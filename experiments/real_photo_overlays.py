"""Overlays of real photos: the ground truth beside each proposer's pseudo masks, one PNG per
photo, for the docs.

    .venv/bin/python -m experiments.real_photo_overlays --data ../shared/data/coco_small/val.yaml \\
        --image-ids 99053 370208 --out docs/real_photos \\
        --run classical='{"proposer": "classical"}' \\
        --run maskcut='{"proposer": "maskcut", "backbone_checkpoint": "runs/backbone_r18_densecl"}'

Only photos whose COCO ``license`` lets them be shared with changes (CC BY 2.0 or CC BY-SA 2.0,
"no known copyright restrictions", US Government work) are drawn; others are refused. Each
panel is scaled to ``--width`` px; the printed lines name each photo's licence and Flickr
source for the attribution the licence asks for. Panels: ``ground truth`` (non-crowd
instances), then per run the masks pre-training keeps (``MaskFilter``: score >= 0.5, area >= 32,
best 20) over the photo.

``--masks-only`` draws the same masks on a plain grey canvas instead of the photo: what the docs
keep (the data's README asks that its images not be redistributed with the project; COCO's
annotations are CC BY 4.0), while the photo overlays stay on the machine that made them. Any
photo may be drawn that way.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml
from pycocotools import mask as mask_utils

from pipeline.coco import ground_truth_rles
from pipeline.images import read_image_rgb
from pipeline.manifest import load_manifest
from pipeline.shard_dataset import MaskFilter, kept_rows
from pipeline.overlays import render_overlay
from stages.propose import ProposeConfig, run_propose

SHAREABLE_LICENSES = {4, 5, 7, 8}  # CC BY 2.0, CC BY-SA 2.0, no known restrictions, US Gov.


def panel(image: np.ndarray, masks: np.ndarray, title: str, width: int) -> np.ndarray:
    boxes = np.asarray([mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
                        for m in masks], dtype=np.float32).reshape(-1, 4)
    canvas = render_overlay(image, masks, boxes, [""] * len(masks))
    scale = width / canvas.shape[1]
    canvas = cv2.resize(canvas, (width, round(canvas.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    cv2.rectangle(canvas, (0, 0), (width, 22), (0, 0, 0), -1)
    cv2.putText(canvas, f"{title} ({len(masks)})", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="labeled manifest")
    parser.add_argument("--image-ids", type=int, nargs="+", required=True)
    parser.add_argument("--run", action="append", required=True,
                        help="NAME=JSON of ProposeConfig fields (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--masks-only", action="store_true",
                        help="draw the masks on a grey canvas, not on the photo")
    args = parser.parse_args()

    dataset = load_manifest(args.data)
    records = {img["id"]: img for img in dataset.coco["images"]}
    licenses = {lic["id"]: lic for lic in dataset.coco.get("licenses", [])}
    for image_id in args.image_ids:
        if image_id not in records:
            raise SystemExit(f"error: image id {image_id} is not in {args.data}")
        if not args.masks_only and records[image_id].get("license") not in SHAREABLE_LICENSES:
            raise SystemExit(f"error: image {image_id}'s licence ({records[image_id].get('license')})"
                             " does not allow sharing a changed copy; choose another photo")
    runs = []
    for item in args.run:
        name, _, fields = item.partition("=")
        runs.append((name, json.loads(fields)))
    gt = ground_truth_rles(dataset.coco)
    chosen = [r for r in dataset.images if r.image_id in set(args.image_ids)]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="uplvp-overlays-") as tmp:
        manifest = Path(tmp) / "photos.yaml"
        manifest.write_text(yaml.safe_dump({
            "format_version": 1, "name": "overlay photos",
            "images": {"root": str(dataset.root), "list": [r.file_name for r in chosen]}}))
        masks_by_run = {}
        for name, fields in runs:
            run_propose(ProposeConfig(images=manifest, out=Path(tmp) / name, num_workers=0,
                                      device="cpu", **fields), progress=False)
            masks = pd.read_parquet(Path(tmp) / name / "masks")
            images = pd.read_parquet(Path(tmp) / name / "images")
            ids = dict(zip(images["image_id"], images["image_path"]))
            # the propose run numbers images 1..N in file order: map back to COCO ids
            by_path = {str(r.path): r.image_id for r in chosen}
            masks["coco_id"] = [by_path[str(ids[i])] for i in masks["image_id"]]
            keep = np.zeros(len(masks), bool)
            for rows in kept_rows(masks["image_id"].to_numpy(), masks["score"].to_numpy(),
                                  masks["area"].to_numpy(), masks["mask_index"].to_numpy(),
                                  MaskFilter()).values():
                keep[rows] = True
            masks_by_run[name] = masks[keep]
        for record in chosen:
            image = read_image_rgb(record.path)
            if args.masks_only:  # the geometry only, not the photo's pixels
                image = np.full_like(image, 96)
            h, w = image.shape[:2]
            truth = np.stack([mask_utils.decode(rle).astype(bool) for _, _, rle in gt[record.image_id]]
                             ) if gt[record.image_id] else np.zeros((0, h, w), bool)
            panels = [panel(image, truth, "ground truth", args.width)]
            for name, masks in masks_by_run.items():
                rows = masks[masks["coco_id"] == record.image_id]
                decoded = (np.stack([mask_utils.decode({"size": [h, w], "counts": c}).astype(bool)
                                     for c in rows["rle_counts"]])
                           if len(rows) else np.zeros((0, h, w), bool))
                panels.append(panel(image, decoded, name, args.width))
            height = max(p.shape[0] for p in panels)
            panels = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0)), constant_values=255)
                      for p in panels]
            path = args.out / f"overlay_{record.image_id}.png"
            cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(panels, axis=1), cv2.COLOR_RGB2BGR))
            info = records[record.image_id]
            lic = licenses.get(info["license"], {})
            print(f"{path}: COCO {record.image_id}, {lic.get('name', info['license'])} "
                  f"({lic.get('url', '')}), photo {info.get('flickr_url', info.get('coco_url'))}")


if __name__ == "__main__":
    main()
