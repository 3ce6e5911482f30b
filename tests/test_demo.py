"""`uplvp demo` end to end with toy budgets (the real budgets are the defaults)."""
import json

from typer.testing import CliRunner

from stages.cli import app


def test_demo_runs_every_stage_and_reports_both_arms(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text(
        "num_unlabeled: 6\nnum_train: 4\nnum_val: 3\nimage_size: 64\npretrain_steps: 3\n"
        "finetune_steps: 4\neval_every: 2\nbatch_size: 2\npropose_workers: 0\n"
    )
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--config", str(config),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["arms"]) == {"pretrained", "scratch"}
    for arm, row in summary["arms"].items():
        assert row["final_step"] == 4
        assert (out / f"evaluate_{arm}" / "metrics.json").is_file()
        assert list((out / f"predict_{arm}" / "overlays").glob("*.png"))
    assert (out / "ap_curves.png").stat().st_size > 1000
    assert "pretrained" in result.output and "scratch" in result.output
    # rerunning resumes: every stage finds its outputs complete
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--config", str(config),
                                     "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "running 0 shard(s)" in " ".join(again.output.split())
