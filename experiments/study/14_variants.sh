#!/bin/bash
# Phase 14 (issue 32 step 4), the changes that keep the model: phase 13's pre-trained K-Net cells
# at 5 % (3 seeds; the setting with the widest gap to Mask R-CNN) fine-tuned again with one
# option changed, paired by seed with the kept originals (experiments/study_cell_variant.py):
#   steps2x  fine-tuning length x2 (1000 -> 2000 steps, the same cosine schedule stretched)
#   stride8  mask output at 1/8 of the input instead of 1/4 (no parameter changes)
#   frozen   the shared backbone frozen in fine-tuning too (instead of 0.25x the head's lr)
# The changes of the model itself (number of kernels, pixel encoder) need their own pre-training:
# 14_ablation_*.yaml. Run from the repository root after phase 13 (its pre-training runs must
# still be in runs/study_paper_synth/pretrain: the cells start from them); one core each:
#   bash experiments/study/14_variants.sh [steps2x|stride8|frozen ...]
set -euo pipefail
study=${STUDY:-runs/study_paper_synth}
cells=(knet-5pct-seed0-full knet-5pct-seed1-full knet-5pct-seed2-full)
declare -A change=([steps2x]="train.max_steps=2000" [stride8]="model.overrides.mask_stride=8"
                   [frozen]="model.freeze_backbone=true")
for tag in "${@:-steps2x stride8 frozen}"; do
    for t in $tag; do
        [ -n "${change[$t]:-}" ] || { echo "error: unknown variant $t (steps2x, stride8, frozen)" >&2; exit 2; }
        RAY_AUTH_MODE=disabled .venv/bin/python -m experiments.study_cell_variant --study "$study" \
            --out runs/study_paper_synth_variants --tag "$t" --set "${change[$t]}" --cells "${cells[@]}"
    done
done
