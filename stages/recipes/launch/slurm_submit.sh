#!/usr/bin/env bash
# Submit the paper's COCO setting to Slurm as a chain of dependent jobs (docs/recipes.md):
#
#   propose (array, 16 x 1 GPU) -> pretrain (8 GPUs) -> finetune 1 %, 5 %, 10 % (8 GPUs each)
#   split (CPU) ----------------------------------------^      -> evaluate each (1 GPU)
#
#   cd WORK && COCO_ROOT=/data/coco bash path/to/stages/recipes/launch/slurm_submit.sh [knet|mask2former]
#
# Run it on a login node, in the work folder, with uplvp's environment active (the jobs inherit
# it). Partition, account and the like: sbatch's own environment variables (SBATCH_PARTITION,
# SBATCH_ACCOUNT, ...) apply to every job. A job whose dependency failed never starts
# (`squeue` says DependencyNeverSatisfied): fix the cause, `scancel` the rest and rerun this
# script; every stage resumes where it stopped.
set -euo pipefail

DECODER="${1:-knet}"
case "$DECODER" in
    knet | mask2former) ;;
    *) echo "error: decoder must be knet or mask2former, got '$DECODER'" >&2; exit 2 ;;
esac
command -v sbatch >/dev/null || { echo "error: sbatch not found (run this on a Slurm login node)" >&2; exit 2; }
command -v uplvp >/dev/null || { echo "error: uplvp is not on PATH (activate its environment)" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/prepare.sh"

# sbatch --parsable prints "JOBID" or "JOBID;CLUSTER"
submit() {
    local out
    out=$(sbatch --parsable "$@")
    echo "${out%%;*}"
}

propose=$(submit "$here/slurm_propose.sbatch")
split=$(submit "$here/slurm_split.sbatch")
pretrain=$(submit --dependency="afterok:$propose" "$here/slurm_pretrain.sbatch" "recipes/pretrain_${DECODER}.yaml")
echo "propose $propose (array), split $split, pretrain $pretrain"
for PCT in 1 5 10; do
    finetune=$(submit --dependency="afterok:$pretrain:$split" "$here/slurm_finetune.sbatch" "recipes/finetune_${DECODER}_${PCT}pct.yaml")
    evaluate=$(submit --dependency="afterok:$finetune" "$here/slurm_evaluate.sbatch" "recipes/evaluate_${DECODER}_${PCT}pct.yaml")
    echo "$PCT %: finetune $finetune, evaluate $evaluate"
done
echo "logs: runs/coco/slurm/; results: runs/coco/eval_${DECODER}_*pct/metrics.json"
