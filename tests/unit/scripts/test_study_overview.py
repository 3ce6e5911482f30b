"""experiments/study_overview.py: one table over study folders, Mask R-CNN cells taken from
another folder, seeds at or above Mask R-CNN counted per seed."""
import json

import pytest

import importlib


def folder(path, records):
    path.mkdir()
    for r in records:
        (path / r["run"]).mkdir(parents=True, exist_ok=True)
        (path / r["run"] / "metrics.jsonl").write_text(
            json.dumps({"kind": "eval", "step": 100, "val/segm_AP": r["AP"]}) + "\n")
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cell(decoder, arm, seed, ap):
    return {"decoder": decoder, "regime": 5, "seed": seed, "arm": arm, "AP": ap, "AP50": ap,
            "AP75": ap, "run": f"{decoder}-{arm}-{seed}"}


def test_overview_rows_ratios_and_seeds_at_or_above_mask_rcnn(tmp_path):
    overview = importlib.import_module("experiments.study_overview")
    ours = folder(tmp_path / "ours", [cell("knet", "scratch", 0, 0.02), cell("knet", "scratch", 1, 0.04),
                                      cell("knet", "full", 0, 0.06), cell("knet", "full", 1, 0.03)])
    peer = folder(tmp_path / "peer", [cell("maskrcnn", "scratch", 0, 0.05),
                                      cell("maskrcnn", "scratch", 1, 0.05),
                                      cell("knet", "scratch", 0, 0.5)])  # not taken
    text = overview.overview([("setting A", ours, peer)])
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert [r[3] for r in rows] == ["scratch", "full", "scratch"]
    scratch, full, maskrcnn = rows
    assert full[5:10] == ["4.5 ± 2.1", "-", "1.50x", "0.90x", "1/2 |"]  # 0.06 >= 0.05, 0.03 < 0.05
    assert scratch[9] == "0/2 |" and maskrcnn[1] == "maskrcnn" and maskrcnn[9] == "- |"
    kept = [line.split(" | ")[1:4] for line in overview.overview(
        [("setting A", ours, peer)], arms=["full"]).splitlines()[2:]]
    assert kept == [["knet", "5%", "full"], ["maskrcnn", "5%", "scratch"]]  # the peer stays
    with pytest.raises(SystemExit, match="recorded twice"):
        overview.setting_records(folder(tmp_path / "dup", [cell("knet", "scratch", 0, 0.1)] * 2))
