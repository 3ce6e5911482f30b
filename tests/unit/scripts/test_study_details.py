"""experiments/study_details.py on a hand-made study folder with known values."""
import json
from pathlib import Path

import importlib


details = importlib.import_module("experiments.study_details")


def write_run(folder: Path, dice: float, aps: list[float]) -> None:
    folder.mkdir(parents=True)
    lines = [{"kind": "train", "step": s, "loss_dice": dice * k, "loss_ce": 1.0, "loss_bce": 0.5}
             for k, s in enumerate((50, 200, 300), start=1)]
    lines += [{"kind": "eval", "step": 100 * (i + 1), "val/segm_AP": ap}
              for i, ap in enumerate(aps)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_details_prints_per_seed_differences_curves_losses_and_pretraining(tmp_path):
    cells = [("full", 0, 0.05, 1.0, [0.02, 0.04]), ("full", 1, 0.03, 3.0, [0.04, 0.06]),
             ("no_inject", 0, 0.04, 2.0, [0.01, 0.03]), ("no_inject", 1, 0.04, 2.0, [0.03, 0.03])]
    with open(tmp_path / "results.jsonl", "w") as fh:
        for arm, seed, ap, dice, aps in cells:
            run = f"finetune/knet-5pct-seed{seed}-{arm}"
            write_run(tmp_path / run, dice, aps)
            fh.write(json.dumps({"decoder": "knet", "regime": 5.0, "seed": seed, "arm": arm,
                                 "AP": ap, "run": run}) + "\n")
    pre = tmp_path / "pretrain" / "knet-full"
    pre.mkdir(parents=True)
    (pre / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": s, "loss": float(s), "loss_dice": 1.0,
                    "loss_focal": 0.5, "loss_bce": 0.25}) + "\n" for s in (1, 2, 3, 4, 5)))
    text = details.details(tmp_path)
    lines = text.splitlines()
    no_inject = next(line for line in lines if "knet 5% no_inject" in line and "vs full" in line)
    assert no_inject.split("vs full: ")[1] == "-1.0 +1.0 = +0.0 ± 1.4 (1/2 below)"
    assert "knet 5% full                 100:3.0  200:5.0" in text
    assert "knet 5% no_inject            100:2.0  200:3.0" in text
    full_losses = next(line for line in lines if "knet 5% full" in line and "step 50:" in line)
    assert "step 50: 2.00 / 1.00 / 0.50" in full_losses
    assert "step 200: 4.00 / 1.00 / 0.50" in full_losses
    assert "step 300: 6.00 / 1.00 / 0.50" in full_losses
    assert "knet-full                steps 2-5: loss 3.50  loss_dice 1.00" in text


def test_main_refuses_a_folder_without_results(tmp_path, capsys):
    assert details.main(["--out", str(tmp_path)]) == 2
    assert "no results.jsonl" in capsys.readouterr().err


def test_clip_text_is_compared_with_full_and_clip_and_maskrcnn_with_our_decoders(tmp_path):
    cells = [("knet", "full", 0, 0.02), ("knet", "full", 1, 0.04),
             ("knet", "clip", 0, 0.03), ("knet", "clip", 1, 0.03),
             ("knet", "clip_text", 0, 0.05), ("knet", "clip_text", 1, 0.06),
             ("knet", "scratch", 0, 0.01), ("mask2former", "full", 1, 0.10),
             ("maskrcnn", "scratch", 0, 0.04), ("maskrcnn", "scratch", 1, 0.02)]
    with open(tmp_path / "results.jsonl", "w") as fh:
        for decoder, arm, seed, ap in cells:
            run = f"finetune/{decoder}-1pct-seed{seed}-{arm}"
            write_run(tmp_path / run, 1.0, [ap])
            fh.write(json.dumps({"decoder": decoder, "regime": 1.0, "seed": seed, "arm": arm,
                                 "AP": ap, "run": run}) + "\n")
    lines = details.details(tmp_path).splitlines()

    def row(name: str) -> str:
        return next(line for line in lines if line.startswith(f"  {name} "))

    assert row("knet 1% clip_text").split("   vs ")[1:] == [
        "full: +3.0 +2.0 = +2.5 ± 0.7 (0/2 below)", "clip: +2.0 +3.0 = +2.5 ± 0.7 (0/2 below)"]
    assert row("knet 1% clip").split("   vs ")[1:] == ["full: +1.0 -1.0 = +0.0 ± 1.4 (1/2 below)"]
    assert row("knet 1% full").split("   vs ")[1:] == []
    # Mask R-CNN minus each of our cells of the same regime and seed (one shared seed: no std)
    assert row("maskrcnn 1% scratch").split("   vs ")[1:] == [
        "knet scratch: +3.0 = +3.0 (0/1 below)", "knet full: +2.0 -2.0 = +0.0 ± 2.8 (1/2 below)",
        "knet clip_text: -1.0 -4.0 = -2.5 ± 2.1 (2/2 below)",
        "mask2former full: -8.0 = -8.0 (1/1 below)"]
