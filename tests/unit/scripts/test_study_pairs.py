"""experiments/study_pairs.py: an ablation folder against its base, paired by seed."""
import json

import pytest

from experiments import study_pairs


def folder(path, cells):
    path.mkdir()
    (path / "results.jsonl").write_text("".join(
        json.dumps({"decoder": d, "regime": r, "seed": s, "arm": a, "AP": ap}) + "\n"
        for d, r, s, a, ap in cells))
    return path


def test_pairs_by_seed_with_differences_and_peer_ratio(tmp_path):
    base = folder(tmp_path / "base", [
        ("knet", 5.0, 0, "full", 0.025), ("knet", 5.0, 1, "full", 0.030),
        ("knet", 5.0, 2, "full", 0.040), ("knet", 5.0, 0, "scratch", 0.02),
        ("maskrcnn", 5.0, 0, "scratch", 0.04), ("maskrcnn", 5.0, 1, "scratch", 0.06)])
    variant = folder(tmp_path / "variant", [
        ("knet", 5.0, 0, "full", 0.035), ("knet", 5.0, 1, "full", 0.020),
        ("knet", 5.0, 3, "full", 0.090)])
    text = study_pairs.pairs_report(base, variant, peer=base)
    lines = text.splitlines()
    assert lines[lines.index("knet 5% full") + 2:] == [
        "   0    2.5      3.5        +1.0",
        "   1    3.0      2.0        -1.0",
        "   2  only in the base folder: left out",
        "   3  only in the variant folder: left out",
        # seeds 0 and 1: base mean 2.75 -> "2.8"; diffs +1.0 and -1.0: mean 0, sd 1.414;
        # variant mean 2.75 over Mask R-CNN's 5.0 -> 0.55x
        "mean over 2 paired seed(s): base 2.8, variant 2.8, difference +0.0 ± 1.4, 1/2 seeds up; "
        "variant / Mask R-CNN 0.55x (Mask R-CNN 5.0, 2 seed(s))"]
    assert "scratch" not in text  # only the groups both folders hold


def test_bad_folders_are_one_error_line(tmp_path, capsys):
    base = folder(tmp_path / "base", [("knet", 5.0, 0, "full", 0.02)])
    other = folder(tmp_path / "other", [("knet", 1.0, 0, "full", 0.02)])
    with pytest.raises(SystemExit, match="share no"):
        study_pairs.main(["--base", str(base), "--variant", str(other)])
    with pytest.raises(SystemExit, match="not a low-data study folder"):
        study_pairs.main(["--base", str(base), "--variant", str(tmp_path)])
