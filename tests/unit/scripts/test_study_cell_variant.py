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
    assert variant.parse_sets(["bce_weight=5.0", "stage_assignment=own", "train.max_steps=2000",
                               "model.freeze_backbone=true"]) == {
        "bce_weight": 5.0, "stage_assignment": "own", "train.max_steps": 2000,
        "model.freeze_backbone": True}
    with pytest.raises(variant.VariantError, match="not a fine-tuning option"):
        variant.parse_sets(["bce_wieght=5"])
    with pytest.raises(variant.VariantError, match="not a fine-tuning option"):
        variant.parse_sets(["out=elsewhere"])
    with pytest.raises(variant.VariantError, match="not a fine-tuning option"):
        variant.parse_sets(["trian.max_steps=5"])
    with pytest.raises(variant.VariantError, match="not a fine-tuning option"):
        variant.parse_sets(["train..max_steps=5"])
    with pytest.raises(variant.VariantError, match="KEY=VALUE"):
        variant.parse_sets(["bce_weight"])


def _resolved(tmp_path):
    from stages.finetune import FinetuneConfig

    return FinetuneConfig(train_data=tmp_path / "a.yaml", out=tmp_path / "old", init="pre",
                          train={"max_steps": 10, "seed": 2, "lr": 0.5}).model_dump(mode="json")


def test_variant_config_keeps_the_cell_and_changes_only_the_options(tmp_path):
    original = _resolved(tmp_path)
    cfg = variant.variant_config(original, {"bce_weight": 5.0}, tmp_path / "new")
    assert cfg == {**original, "bce_weight": 5.0, "out": str(tmp_path / "new"), "resume": True}
    assert original["out"] == str(tmp_path / "old") and original["bce_weight"] is None


def test_a_dotted_option_changes_one_value_of_a_section(tmp_path):
    original = _resolved(tmp_path)
    cfg = variant.variant_config(original, {"train.max_steps": 20, "model.freeze_backbone": True,
                                            "model.overrides.mask_stride": 8}, tmp_path / "new")
    assert cfg["train"] == {**original["train"], "max_steps": 20}
    assert cfg["model"] == {**original["model"], "freeze_backbone": True,
                            "overrides": {"mask_stride": 8}}
    assert original["train"]["max_steps"] == 10 and original["model"]["overrides"] == {}
    with pytest.raises(variant.VariantError, match=r"train.max_stepz: Extra inputs"):
        variant.variant_config(original, {"train.max_stepz": 20}, tmp_path / "new")
    with pytest.raises(variant.VariantError, match="init is not a section"):
        variant.variant_config(original, {"init.path": "x"}, tmp_path / "new")


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
