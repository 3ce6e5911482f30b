"""benchmarks/low_data_study.py with toy budgets: runs every cell, resumes, re-reports."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "low_data_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("low_data_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["low_data_study"] = module  # pydantic resolves the module's annotations there
    spec.loader.exec_module(module)
    return module


def test_study_runs_resumes_and_reports(study, tmp_path):
    cfg = study.StudyConfig(
        num_unlabeled=6, num_labeled_pool=10, num_val=3, image_size=64, regimes=[10, 100],
        seeds=[0], arms=["scratch", "full"], model={"preset": "tiny"}, batch_size=2,
        short_side=(64, 64), eval_short_side=64, max_long_side=96, propose_workers=0,
        pretrain_steps=2, finetune_steps=2, eval_every=1, min_score=0.0,
    )
    out = tmp_path / "study"
    study.run_study(cfg, out)
    records = study.read_results(out)
    assert sorted((r["regime"], r["arm"]) for r in records) == [
        (10, "full"), (10, "scratch"), (100, "full"), (100, "scratch")]
    split = json.loads((out / "data" / "splits" / "train.0@10.json").read_text())
    assert len(split["images"]) == 1  # 10 % of the 10-image pool: smaller than a batch of 2
    run = json.loads((out / "finetune" / "knet-10pct-seed0-scratch" / "stage.json").read_text())
    assert run["config"]["data"]["batch_size"] == 1  # capped at the subset's size
    assert len(list((out / "pretrain").iterdir())) == 1  # one pre-training run, shared by regimes

    study.run_study(cfg, out)  # resume: nothing left to do
    assert len(study.read_results(out)) == 4

    md = tmp_path / "results.md"
    text = study.report(out, md)
    assert "| knet | 10% | scratch | 1 |" in text and "| knet | 100% | full | 1 |" in text
    assert (out / "plots" / "ap_knet_10pct.png").stat().st_size > 1000
    assert md.read_text().startswith("# Low-data study results")
    assert (tmp_path / "results_plots" / "ap_knet_100pct.png").is_file()
