"""Distributed evaluation: 2 gloo processes each predict their slice of the val set, rank 0
scores the gathered results: exactly the single-process results and metrics."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import free_port, spawn_and_wait

from pipeline.coco_dataset import eval_loader
from pipeline.manifest import load_manifest
from pipeline.transforms import eval_config
from pipeline.evaluation import evaluate_model
from tests.helpers.evaluation import STUB_PROBS, BrightRegionModel, write_labeled_set

WORLD = 2
TIMEOUT_S = 120
BATCH = 2  # 4 images: two global batches, one image of each per rank


def _evaluate(manifest: Path) -> tuple[dict, list[dict]]:
    model = BrightRegionModel(STUB_PROBS).eval()  # masks the bright rectangle of each image
    dataset = load_manifest(manifest)
    loader = eval_loader(dataset, BATCH, resize=eval_config(32, 64), category_map=[1, 2])
    return evaluate_model(model, loader.make_batches(0), dataset.coco, [1, 2], device="cpu")


def _worker(rank: int, port: int, manifest: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        metrics, results = _evaluate(Path(manifest))
        torch.save({"metrics": metrics, "results": results}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_two_rank_evaluation_equals_one_process(tmp_path):
    data = write_labeled_set(tmp_path)
    spawn_and_wait(_worker, (free_port(), str(data["manifest"]), str(tmp_path)), WORLD, TIMEOUT_S)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    torch.set_num_threads(1)
    metrics, results = _evaluate(data["manifest"])
    assert rank1 == {"metrics": {}, "results": []}
    assert {r["image_id"] for r in results} == {1, 2, 3, 4} and len(results) == 8
    key = lambda r: (r["image_id"], -r["score"], r["category_id"])  # noqa: E731
    gathered, single = sorted(rank0["results"], key=key), sorted(results, key=key)
    assert [(r["image_id"], r["category_id"], r["segmentation"]) for r in gathered] == [
        (r["image_id"], r["category_id"], r["segmentation"]) for r in single]
    for a, b in zip(gathered, single):
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
    assert rank0["metrics"]["num_images"] == metrics["num_images"] == 4
    assert 0 < metrics["segm"]["AP"] < 1  # both classes predicted per image: a non-trivial score
    for iou_type in ("segm", "bbox"):
        for name, value in metrics[iou_type].items():
            assert rank0["metrics"][iou_type][name] == pytest.approx(value, abs=1e-6), name
