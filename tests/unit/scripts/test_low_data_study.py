"""experiments/low_data_study.py with toy budgets: runs every cell, resumes, re-reports."""
import json
import subprocess
import sys

import pytest
import yaml

import importlib
from tests.helpers import ASSETS, REPO

SCRIPT = ["-m", "experiments.low_data_study"]  # run from the repository root


@pytest.fixture(scope="module")
def study():
    return importlib.import_module("experiments.low_data_study")


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
    reading = tmp_path / "reading.md"
    reading.write_text("## Reading\n\nPre-training helped.\n")
    note = study.compose_note("First paragraph.", reading)
    assert note == "First paragraph.\n\n## Reading\n\nPre-training helped."
    with pytest.raises(study.InputError, match="does not exist"):
        study.compose_note("", tmp_path / "missing.md")
    lead = tmp_path / "lead.md"
    lead.write_text("## At one look\n\n| a |\n")
    assert study.compose_note("", [lead, reading]) == (
        "## At one look\n\n| a |\n\n## Reading\n\nPre-training helped.")  # in the given order
    text = study.report(out, md, note)
    assert "First paragraph.\n\n## Reading" in md.read_text()
    assert "| knet | 10% | scratch | 1 |" in text and "| knet | 100% | full | 1 |" in text
    assert (out / "plots" / "ap_knet_10pct.png").stat().st_size > 1000
    assert md.read_text().startswith("# Low-data study results")
    assert (tmp_path / "results_plots" / "ap_knet_100pct.png").is_file()

    kept = tmp_path / "kept"  # the small folder committed with the results
    assert len(study.export(out, kept)) == 2 + 2 * 4
    table = text.split("\nPlots:")[0]
    assert study.report(kept, None).split("\nPlots:")[0] == table  # same tables from it


def toy_config(study, **changes):
    values = dict(
        num_unlabeled=6, num_labeled_pool=10, num_val=3, image_size=64, regimes=[10, 100],
        seeds=[0], arms=["scratch", "full"], model={"preset": "tiny"}, batch_size=2,
        short_side=(64, 64), eval_short_side=64, max_long_side=96, propose_workers=0,
        pretrain_steps=2, finetune_steps=2, eval_every=1, min_score=0.0,
    )
    values.update(changes)
    return study.StudyConfig(**values)


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "study").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_phase_file_is_a_valid_study(study, path):
    values = yaml.safe_load(path.read_text())
    cfg = study.StudyConfig(**values)  # unknown or mistyped fields raise
    assert set(cfg.arms) <= set(study.ARMS) and set(cfg.decoders) <= set(study.DECODERS)
    assert set(values) <= set(study.StudyConfig.model_fields)


def test_try_lock_refuses_a_held_lock_and_frees_it_on_exit(study, tmp_path):
    path = tmp_path / "locks" / "a.lock"
    with study.try_lock(path) as first:
        assert first is True
        with study.try_lock(path) as second:  # a second open file description: refused
            assert second is False
    with study.try_lock(path) as again:
        assert again is True


def test_a_folder_of_another_benchmark_is_refused_but_selections_merge(study, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    study.record_config(toy_config(study, regimes=[10], arms=["scratch"]), out)
    study.record_config(toy_config(study, regimes=[100, 10], arms=["full"]), out)
    recorded = yaml.safe_load((out / "study.yaml").read_text())
    assert recorded["regimes"] == [10, 100] and recorded["arms"] == ["scratch", "full"]
    with pytest.raises(study.InputError, match=r"other settings \(finetune_steps\)"):
        study.record_config(toy_config(study, finetune_steps=3), out)


def test_a_folder_recorded_before_stage_assignment_was_trained_with_own(study, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    study.record_config(toy_config(study), out)
    recorded = yaml.safe_load((out / "study.yaml").read_text())
    assert recorded["stage_assignment"] == "previous"
    del recorded["stage_assignment"]  # as written before the field existed
    (out / "study.yaml").write_text(yaml.safe_dump(recorded))
    with pytest.raises(study.InputError, match=r"other settings \(stage_assignment\)"):
        study.record_config(toy_config(study), out)
    study.record_config(toy_config(study, stage_assignment="own"), out)  # resumes as made


def test_a_folder_that_recorded_a_moved_path_resumes_under_the_new_one(study, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    cfg = toy_config(study, clip_model="tools/clip/uplvp-synth-vit.json")
    study.record_config(cfg, out)
    recorded = yaml.safe_load((out / "study.yaml").read_text())
    recorded["clip_model"] = "benchmarks/clip/uplvp-synth-vit.json"  # as written before the move
    (out / "study.yaml").write_text(yaml.safe_dump(recorded))
    study.record_config(cfg, out)  # resumes
    assert yaml.safe_load((out / "study.yaml").read_text())["clip_model"] == \
        "tools/clip/uplvp-synth-vit.json"
    recorded["clip_model"] = "benchmarks/other/uplvp-synth-vit.json"  # not a moved folder
    (out / "study.yaml").write_text(yaml.safe_dump(recorded))
    with pytest.raises(study.InputError, match=r"other settings \(clip_model\)"):
        study.record_config(cfg, out)


def test_a_cell_whose_pretraining_runs_elsewhere_is_deferred(study, tmp_path):
    cfg = toy_config(study, regimes=[100], arms=["full"])
    out = tmp_path / "study"
    out.mkdir()
    data = study.prepare_data(cfg, out)
    cell = {"decoder": "knet", "regime": 100, "seed": 0, "arm": "full"}
    with study.try_lock(out / "locks" / "pretrain-knet-full.lock") as held:
        assert held
        assert study.run_cell(cfg, out, data, cell) is None
    assert not (out / "finetune").exists() and not (out / "pretrain").exists()
    result = study.run_cell(cfg, out, data, cell)
    assert result["arm"] == "full" and (out / "pretrain" / "knet-full").is_dir()


def test_two_processes_share_one_study_without_duplicates(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(dict(
        num_unlabeled=6, num_labeled_pool=10, num_val=3, image_size=64, regimes=[10, 50, 100],
        seeds=[0, 1], arms=["scratch", "full"], model={"preset": "tiny"}, batch_size=2,
        short_side=[64, 64], eval_short_side=64, max_long_side=96, propose_workers=0,
        pretrain_steps=2, finetune_steps=2, eval_every=1, min_score=0.0)))
    out = tmp_path / "study"
    command = [sys.executable, *SCRIPT, "--out", str(out), "--config", str(config),
               "--threads", "1"]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    lines = (out / "results.jsonl").read_text().splitlines()
    keys = sorted((json.loads(x)["regime"], json.loads(x)["seed"], json.loads(x)["arm"])
                  for x in lines)
    assert keys == sorted((r, s, a) for r in (10, 50, 100) for s in (0, 1)
                          for a in ("scratch", "full"))  # each cell exactly once
    assert all(json.loads(x)["threads"] == 1 for x in lines)


def test_summary_ratio_paired_gain_and_steps_to_reach(study, tmp_path):
    from stages.demo import AP_KEY

    def run(name, curve):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "eval", "step": step, AP_KEY: ap}) + "\n" for step, ap in curve))
        return name

    records = [
        {"decoder": "knet", "regime": 5, "seed": 0, "arm": "scratch", "AP": 0.01, "AP50": 0.02,
         "AP75": 0.0, "run": run("s0", [(50, 0.005), (100, 0.01)])},
        {"decoder": "knet", "regime": 5, "seed": 1, "arm": "scratch", "AP": 0.02, "AP50": 0.04,
         "AP75": 0.0, "run": run("s1", [(50, 0.02), (100, 0.02)])},
        {"decoder": "knet", "regime": 5, "seed": 0, "arm": "full", "AP": 0.03, "AP50": 0.06,
         "AP75": 0.01, "run": run("f0", [(50, 0.03), (100, 0.03)])},
        {"decoder": "knet", "regime": 5, "seed": 1, "arm": "full", "AP": 0.05, "AP50": 0.08,
         "AP75": 0.02, "run": run("f1", [(50, 0.01), (100, 0.05)])},
    ]
    scratch, full = study.summarise(tmp_path, records)
    assert (scratch["arm"], scratch["AP"], scratch["ratio"], scratch["gain"]) == (
        "scratch", "1.5 ± 0.7", "1.00x", "-")
    assert scratch["reach"] == "100%, 50%"
    assert (full["AP"], full["ratio"]) == ("4.0 ± 1.4", "2.67x")
    assert full["gain"] == "+2.5 ± 0.7 (2/2 seeds > 0)"  # per seed: +2.0 and +3.0 points
    assert full["reach"] == "50%, 100%"  # seed 1 reaches scratch's 2.0 only at step 100
    assert full["vs_peer"] == "-" and "Mask R-CNN" not in study.markdown_table([scratch, full])

    records.append({"decoder": "maskrcnn", "regime": 5, "seed": 0, "arm": "scratch",
                    "AP": 0.08, "AP50": 0.1, "AP75": 0.05, "run": run("m0", [(100, 0.08)])})
    rows = study.summarise(tmp_path, records)
    assert [(r["decoder"], r["arm"], r["vs_peer"]) for r in rows] == [
        ("knet", "scratch", "0.19x"), ("knet", "full", "0.50x"), ("maskrcnn", "scratch", "1.00x")]
    table = study.markdown_table(rows).splitlines()
    assert table[0].split(" | ")[8] == "AP / Mask R-CNN" and len(table[1].split("|")) == 14
    assert table[3].startswith("| knet | 5% | full | 2 | 4.0 ± 1.4 | 7.0 ± 1.4 | 1.5 ± 0.7 | "
                               "2.67x | 0.50x | +2.5 ± 0.7")
    # the step each seed passes Mask R-CNN's final val AP (8.0, seed 0 only): never for knet,
    # at its own last evaluation for Mask R-CNN
    assert table[0].endswith("| step passing Mask R-CNN's final AP (per seed) |")
    assert [r["peer_reach"] for r in rows] == ["never", "never", "100"]

    # real photos: class-agnostic AP columns, ratios to scratch and to Mask R-CNN
    for record, value in zip(records, (0.02, 0.04, 0.06, 0.06, 0.05)):
        record.update(AP_agnostic=value, AP50_agnostic=2 * value)
    scratch, full, peer = study.summarise(tmp_path, records)
    assert (full["AP_agnostic"], full["ratio_agnostic"], full["vs_peer_agnostic"]) == (
        "6.0 ± 0.0", "2.00x", "1.20x")  # vs scratch's mean 3.0 and Mask R-CNN's 5.0
    header = study.markdown_table([scratch, full, peer]).splitlines()[0]
    assert "| class-agnostic AP | agnostic AP50 | agnostic / scratch | agnostic / Mask R-CNN |" in header

    # the validation AP at a chosen step: mean ± std over seeds, counted where a curve lacks it
    scratch, full, peer = study.summarise(tmp_path, records, ap_at_steps=(50, 100))
    assert scratch["ap_at"] == {50: "1.2 ± 1.1", 100: "1.5 ± 0.7"}  # (0.5, 2.0) and (1.0, 2.0)
    assert full["ap_at"] == {50: "2.0 ± 1.4", 100: "4.0 ± 1.4"}  # (3.0, 1.0) and (3.0, 5.0)
    assert peer["ap_at"] == {50: "-", 100: "8.0"}  # Mask R-CNN is evaluated at step 100 only
    table = study.markdown_table([scratch, full, peer]).splitlines()
    columns = table[0].split(" | ")
    at_50 = columns.index("val AP at step 50")
    assert columns[at_50 + 1] == "val AP at step 100"
    assert table[3].split(" | ")[at_50:at_50 + 2] == ["2.0 ± 1.4", "4.0 ± 1.4"]
    records[0]["run"] = run("s0_short", [(50, 0.005)])  # seed 0 of scratch stopped at step 50
    scratch = study.summarise(tmp_path, records, ap_at_steps=(100,))[0]
    assert scratch["ap_at"] == {100: "2.0 (1/2 seeds)"}


def test_clip_arms_pretrain_on_the_clip_proposers_shards_with_the_text_loss(study, tmp_path):
    import open_clip
    import torch

    from pipeline.shards import read_metadata, shard_file

    config = ASSETS / "tiny-clip-vit.json"
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = tmp_path / "tiny-clip.pt"  # stands in for a trained CLIP: only the plumbing counts
    torch.save(open_clip.create_model("tiny-clip-vit").state_dict(), weights)
    cfg = toy_config(study, regimes=[100], arms=["clip_text"], clip_model=str(config),
                     clip_checkpoint=str(weights),
                     clip_options={"temperature": 0.001, "min_peak": 0.01, "threshold": 0.01,
                                   "max_area_fraction": 1.0, "input_size": 64})
    out = tmp_path / "study"
    study.run_study(cfg, out)
    (record,) = study.read_results(out)
    assert record["arm"] == "clip_text" and 0 <= record["AP"] <= 1
    meta = read_metadata(shard_file(out / "propose_clip", "masks", 0))
    assert meta["weights"] == {"kind": "checkpoint", "source": f"clip {config}: {weights}"}
    pretrain = json.loads((out / "pretrain" / "knet-clip_text" / "stage.json").read_text())
    assert pretrain["config"]["shards"] == str(out / "propose_clip")
    assert pretrain["config"]["loss"]["text"] == 1.0
    vocabulary = (out / "propose_clip_vocabulary.txt").read_text().split()
    assert vocabulary == ["disk", "rectangle", "triangle", "star", "cross", "crescent",
                          "horseshoe", "hexagon"]
    with pytest.raises(study.InputError, match="the clip arms need clip_checkpoint"):
        study.clip_shards(toy_config(study), out, out / "data")


def test_maskrcnn_cells_are_scratch_only_and_train_evaluate_and_report(study, tmp_path):
    cfg = toy_config(study, regimes=[100], decoders=["knet", "maskrcnn"])
    assert [(c["decoder"], c["arm"]) for c in study.study_cells(cfg)] == [
        ("knet", "scratch"), ("knet", "full"), ("maskrcnn", "scratch")]
    out = tmp_path / "study"
    out.mkdir()
    data = study.prepare_data(cfg, out)
    cell = {"decoder": "maskrcnn", "regime": 100, "seed": 0, "arm": "scratch"}
    result = study.run_cell(cfg, out, data, cell)
    run = out / result["run"]
    assert result["run"] == "finetune/maskrcnn-100pct-seed0-scratch"
    assert not (out / "propose").exists()  # no pre-training: the unlabeled pool is never proposed
    evaluated = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert result["AP"] == evaluated["segm"]["AP"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val/segm_AP" in r] == [1, 2]  # eval_every=1, 2 steps
    with open(out / "results.jsonl", "w") as fh:
        fh.write(json.dumps(result) + "\n")
    assert "| maskrcnn | 100% | scratch | 1 |" in study.report(out, None)


def test_an_unknown_decoder_is_one_error_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("decoders: [knet, yolo]\n")
    proc = subprocess.run([sys.executable, *SCRIPT, "--out", str(tmp_path / "s"),
                           "--config", str(config)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown decoder(s) ['yolo']; choose from ['knet', 'mask2former', 'maskrcnn']")
    assert not (tmp_path / "s").exists()


def test_real_data_cells_sit_on_one_frozen_backbone_and_report_class_agnostic_ap(study, tmp_path):
    """The paper's setting on a benchmark given as manifests: every arm and the Mask R-CNN
    peer load the same backbone checkpoint, frozen in pre-training and (finetune_backbone
    frozen) in fine-tuning, so each run ends with exactly the planted backbone weights."""
    pytest.importorskip("lightly")
    import torch

    from pipeline.synth import write_synth_dataset
    from stages.backbone import export_backbone
    from pipeline.engine.checkpoint import latest_checkpoint, load_training_checkpoint
    from uplvp_model.backbone import build_backbone
    from uplvp_model.self_supervised import SelfSupervisedModel

    photos = tmp_path / "photos"
    write_synth_dataset(photos, seed=4, num_unlabeled=6, num_train=10, num_val=3,
                        image_size=64, progress=False)
    torch.manual_seed(5)
    backbone = build_backbone("tiny")
    with torch.no_grad():  # weights no initialisation of the study (seeds 0..) gives
        for p in backbone.parameters():
            p.mul_(0.9)
    planted = {k: v.clone() for k, v in backbone.body.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    checkpoint = tmp_path / "backbone.pt"
    export_backbone(checkpoint, SelfSupervisedModel(backbone, projection_dim=8, hidden_dim=8,
                                                    queue_size=4), "tiny", (16, 32, 64, 128))
    cfg = toy_config(study, data="real", train_manifest=str(photos / "train.yaml"),
                     val_manifest=str(photos / "val.yaml"),
                     unlabeled_manifest=str(photos / "unlabeled.yaml"),
                     backbone_checkpoint=str(checkpoint), finetune_backbone="frozen",
                     regimes=[100], decoders=["knet", "maskrcnn"])
    out = tmp_path / "study"
    study.run_study(cfg, out)
    records = {(r["decoder"], r["arm"]): r for r in study.read_results(out)}
    assert sorted(records) == [("knet", "full"), ("knet", "scratch"), ("maskrcnn", "scratch")]
    assert all(0 <= r["AP_agnostic"] <= 1 and "AP50_agnostic" in r for r in records.values())
    assert not (out / "data").exists() and (out / "splits" / "train.0@100.yaml").is_file()
    pretrain = json.loads((out / "pretrain" / "knet-full" / "stage.json").read_text())
    assert pretrain["config"]["model"]["backbone_checkpoint"] == str(checkpoint)
    assert pretrain["config"]["model"]["freeze_backbone"] is True
    for decoder, arm, prefix in (("knet", "scratch", "backbone.body."),
                                 ("knet", "full", "backbone.body."),
                                 ("maskrcnn", "scratch", "backbone.body.body.")):
        run = out / records[(decoder, arm)]["run"]
        state = load_training_checkpoint(latest_checkpoint(run))["model"]
        for key, value in planted.items():
            assert torch.equal(state[prefix + key], value), (decoder, arm, key)
    text = study.report(out, None)
    assert "class-agnostic AP" in text and "step passing Mask R-CNN's final AP" in text
