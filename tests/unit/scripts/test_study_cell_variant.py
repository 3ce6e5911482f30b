"""experiments/study_cell_variant.py: option checks, final AP reading and the paired report."""
from __future__ import annotations

import json

import pytest

import importlib

variant = importlib.import_module("experiments.study_cell_variant")


def _metrics(run_dir, points):
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 1.0}) for s, _ in points]
    lines += [json.dumps({"step": s, "val/segm_AP": ap}) for s, ap in points]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_sets_are_parsed_as_yaml_and_must_be_finetune_options():
    assert variant.parse_sets(["bce_weight=5.0", "stage_assignment=own"]) == {
        "bce_weight": 5.0, "stage_assignment": "own"}
    with pytest.raises(variant.VariantError, match="not a fine-tuning option"):
        variant.parse_sets(["bce_wieght=5"])
    with pytest.raises(variant.VariantError, match="not a fine-tuning option"):
        variant.parse_sets(["out=elsewhere"])
    with pytest.raises(variant.VariantError, match="KEY=VALUE"):
        variant.parse_sets(["bce_weight"])


def test_variant_config_keeps_the_cell_and_changes_only_the_options(tmp_path):
    original = {"train_data": "a.yaml", "init": "pre", "bce_weight": None, "out": "old",
                "resume": True, "train": {"seed": 2}}
    cfg = variant.variant_config(original, {"bce_weight": 5.0}, tmp_path / "new")
    assert cfg == {"train_data": "a.yaml", "init": "pre", "bce_weight": 5.0,
                   "out": str(tmp_path / "new"), "resume": True, "train": {"seed": 2}}
    assert original["out"] == "old"


def test_final_ap_is_the_last_validation(tmp_path):
    _metrics(tmp_path / "run", [(100, 0.01), (200, 0.03), (300, 0.02)])
    assert variant.final_ap(tmp_path / "run") == (300, 0.02)
    assert variant.final_ap(tmp_path / "missing") is None


def test_report_pairs_by_seed_and_leaves_running_cells_out_of_the_means():
    rows = [("knet-1pct-seed0-full", (1000, 0.020), (1000, 0.030)),
            ("knet-1pct-seed1-full", (1000, 0.040), (1000, 0.030)),
            ("knet-1pct-seed2-full", (1000, 0.010), (400, 0.050))]
    lines = variant.report(rows, "v")
    assert lines[1].split() == ["knet-1pct-seed0-full", "2.0", "3.0", "+1.0"]
    assert lines[2].split() == ["knet-1pct-seed1-full", "4.0", "3.0", "-1.0"]
    assert "running" in lines[3] and "step 400" in lines[3]
    # seeds 0 and 1 only: means 3.0 and 3.0, differences +1.0 and -1.0 (std 1.41)
    assert lines[4] == "knet-1pct-full: original 3.0, v 3.0, paired +0.0 ± 1.4 (1/2 seeds up)"


def test_a_cell_that_did_not_run_is_one_error_line(tmp_path, capsys):
    code = variant.main(["--study", str(tmp_path), "--out", str(tmp_path / "o"), "--tag", "t",
                         "--set", "bce_weight=5", "--cells", "knet-1pct-seed0-full"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cell knet-1pct-seed0-full: no ")
