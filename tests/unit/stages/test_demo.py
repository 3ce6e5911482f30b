"""`uplvp demo` end to end with toy budgets (the real budgets are the defaults)."""
import json
import re

import pytest

from typer.testing import CliRunner

from stages.cli import app
from stages.demo import DemoConfig, demo_data_section, format_timings
from tests.helpers import REPO

# what may differ between the two fine-tuning arms: where they start and where they write
ARM_FIELDS = {"init", "out"}


def test_demo_runs_every_stage_and_reports_both_arms(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text(
        "num_unlabeled: 6\nnum_train: 4\nnum_val: 3\nimage_size: 64\npretrain_steps: 3\n"
        "finetune_steps: 4\neval_every: 2\nbatch_size: 2\npropose_workers: 0\n"
    )
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--config", str(config),
                                      "--seed", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["seed"] == 3
    assert set(summary["arms"]) == {"pretrained", "scratch"}
    printed = {m.group(1): [float(x) for x in m.groups()[1:]] for m in re.finditer(
        r"│\s+(pretrained|scratch) │\s+([\d.]+) │\s+([\d.]+) │\s+([\d.]+) │", result.output)}
    assert set(printed) == {"pretrained", "scratch"}, result.output
    configs = {}
    for arm, row in summary["arms"].items():
        assert row["final_step"] == 4
        report = json.loads((out / f"evaluate_{arm}" / "metrics.json").read_text())
        # the summary and the printed table are the evaluation reports' numbers
        assert [row[k] for k in ("AP", "AP50", "AP75")] == [
            report["segm"][k] for k in ("AP", "AP50", "AP75")]
        assert printed[arm] == [round(100 * (report["segm"][k] or 0), 1)
                                for k in ("AP", "AP50", "AP75")]
        assert list((out / f"predict_{arm}" / "overlays").glob("*.png"))
        configs[arm] = json.loads((out / f"finetune_{arm}" / "stage.json").read_text())["config"]
    ratio = summary["AP_ratio_pretrained_over_scratch"]
    scratch_ap = summary["arms"]["scratch"]["AP"]
    assert ratio == (summary["arms"]["pretrained"]["AP"] / scratch_ap if scratch_ap else None)
    # identical fine-tuning settings: only the init and the output folder differ
    pre, scratch = configs["pretrained"], configs["scratch"]
    assert pre.keys() == scratch.keys()
    assert {k for k in pre if pre[k] != scratch[k]} == ARM_FIELDS
    assert scratch["init"] == "none" and pre["init"] == str(out / "pretrain")
    assert pre["train"]["seed"] == 3 and pre["data"]["seed"] == 3
    assert (out / "ap_curves.png").stat().st_size > 1000
    # the pseudo masks' quality against what the generator drew, printed and kept, is what
    # pipeline.proposal_quality computes from the shards
    from pipeline.proposal_quality import quality_against
    from pipeline.shard_dataset import MaskFilter
    import pandas as pd
    truth = json.loads((out / "data" / "unlabeled" / "generator_annotations.json").read_text())
    assert len(truth["images"]) == 6 and truth["annotations"]
    expected = quality_against(pd.read_parquet(out / "propose" / "masks"),
                               pd.read_parquet(out / "propose" / "images"), truth, MaskFilter())
    assert summary["pseudo_masks"] == pytest.approx(expected, nan_ok=True)
    assert expected["instances"] == len(truth["annotations"]) and 0 < expected["recall"] <= 1
    assert (f"pseudo masks vs the generator's {expected['instances']} objects in 6 unlabeled "
            f"images (IoU >= 0.5): {expected['masks_per_image']:.2f} masks/image, recall "
            f"{100 * expected['recall']:.1f} %") in " ".join(result.output.split())
    # the seconds of each stage are printed, as the summary keeps them
    timings = summary["timings_seconds"]
    assert list(timings) == ["synthetic data", "propose", "pretrain", "finetune (pretrained)",
                             "finetune (scratch)"]
    line = " ".join(result.output.split())
    assert (f"seconds per stage: synthetic data {timings['synthetic data']:.1f} s, propose "
            f"{timings['propose']:.1f} s") in line
    assert f"finetune (scratch) {timings['finetune (scratch)']:.1f} s; total {summary['seconds']:.1f} s" in line
    # the method ran: the shipped CLIP through the clip proposer, prompt injection, text loss
    propose_stage = json.loads((out / "propose" / "stage.json").read_text())
    assert propose_stage["config"]["proposer"] == "clip"
    assert propose_stage["config"]["clip_model"] == "uplvp-synth-vit"
    assert propose_stage["config"]["clip_checkpoint"] is None
    assert propose_stage["inputs"]["weights"]["kind"] == "shipped"
    pretrain_cfg = json.loads((out / "pretrain" / "stage.json").read_text())["config"]
    assert pretrain_cfg["prompt"]["inject"] is True and pretrain_cfg["loss"]["text"] == 1.0
    assert "propose (clip proposer: shipped CLIP uplvp-synth-vit)" in line
    assert "pretrain (UPLVP: prompt injection on, text loss weight 1)" in line
    assert f"label accuracy {100 * expected['kept_label_accuracy']:.1f} %" in line
    # rerunning resumes: every stage finds its outputs complete
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--config", str(config),
                                     "--seed", "3", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "running 0 shard(s)" in " ".join(again.output.split())


def test_demo_image_sizes_follow_the_image_size():
    data = demo_data_section(DemoConfig(image_size=160, seed=4))
    assert data.short_side == (140, 180) and data.eval_short_side == 160
    assert data.max_long_side == 240 and data.seed == 4
    assert demo_data_section(DemoConfig(image_size=128)).short_side == (112, 144)


def test_demo_help_states_the_config_defaults():
    # the help (and docs/cli.md, generated from it) quotes DemoConfig's budgets

    cli_md = (REPO / "docs" / "cli.md").read_text()
    section = cli_md.split("## `uplvp demo`")[1].split("\n## ")[0]
    defaults = DemoConfig()
    assert f"`--pretrain-steps <int>`: Pre-training steps (default {defaults.pretrain_steps})." \
        in section
    assert (f"`--finetune-steps <int>`: Fine-tuning steps of each arm "
            f"(default {defaults.finetune_steps}).") in section


def test_stage_seconds_line():
    line = format_timings({"synthetic data": 1.04, "propose (classical proposer)": 20.0,
                           "pretrain": 300.25, "finetune (scratch)": 99.9}, 421.2)
    assert line == ("seconds per stage: synthetic data 1.0 s, propose 20.0 s, pretrain 300.2 s, "
                    "finetune (scratch) 99.9 s; total 421.2 s")


def test_quality_line_says_n_a_for_a_proposer_without_names():
    from stages.demo import format_quality

    q = {"instances": 10, "images": 2, "masks_per_image": 3.0, "recall": 0.5,
         "precision": 0.25, "kept_masks_per_image": 1.5, "kept_recall": 0.4,
         "kept_precision": 0.5, "kept_label_accuracy": 0.0}
    assert format_quality(q, labelled=False).endswith("label accuracy n/a (no category names)")
    assert format_quality(q).endswith("label accuracy 0.0 %")
