"""benchmarks/demo_seeds.py: one line per seed from a demo summary, and the target verdict."""
import importlib

demo_seeds = importlib.import_module("benchmarks.demo_seeds")


def summary(pre_ap, scratch_ap, reach, seconds=300.0, final=500):
    return {"arms": {"pretrained": {"AP": pre_ap, "final_step": final,
                                    "steps_to_scratch_final_AP": reach},
                     "scratch": {"AP": scratch_ap, "final_step": final,
                                 "steps_to_scratch_final_AP": final}},
            "AP_ratio_pretrained_over_scratch": pre_ap / scratch_ap if scratch_ap else None,
            "seconds": seconds, "wall_seconds": seconds + 5}


def test_seed_line_prints_the_numbers_and_meets_the_targets():
    line, ok = demo_seeds.seed_line(4, summary(0.028, 0.016, 50))
    assert line.split() == ["4", "305.0", "2.8", "1.6", "1.75", "50", "of", "500", "(10%)", "yes"]
    assert ok


def test_each_target_can_fail():
    assert not demo_seeds.seed_line(0, summary(0.020, 0.016, 50))[1]       # ratio 1.25
    assert not demo_seeds.seed_line(0, summary(0.040, 0.016, 300))[1]      # reached at 60 %
    assert not demo_seeds.seed_line(0, summary(0.040, 0.016, None))[1]     # never reached
    assert not demo_seeds.seed_line(0, summary(0.040, 0.016, 50, 490.0))[1]  # 495 s
    line, ok = demo_seeds.seed_line(0, summary(0.040, 0.0, None))
    assert not ok and "never" in line and " - " in line  # no ratio without a scratch AP
