#!/usr/bin/env bash
# The paper's COCO setting on one node with 8 GPUs, every stage in order (docs/recipes.md):
# propose (8 Ray actors, one GPU each) -> pretrain (torchrun, DDP) -> split -> finetune on
# 1 %, 5 %, 10 % (torchrun) -> evaluate (one process).
#
#   cd WORK && COCO_ROOT=/data/coco bash path/to/stages/recipes/launch/torchrun_8gpu.sh [knet|mask2former]
#
# Run it in the work folder (prepare.sh sets it up); `uplvp` and `torchrun` must be on PATH
# (activate the environment uplvp is installed in). The recipes' global batch of 16 is 2
# images per GPU. Every stage resumes: rerun the script after an interruption.
set -euo pipefail

DECODER="${1:-knet}"
case "$DECODER" in
    knet | mask2former) ;;
    *) echo "error: decoder must be knet or mask2former, got '$DECODER'" >&2; exit 2 ;;
esac
for tool in uplvp torchrun; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not on PATH (activate uplvp's environment)" >&2; exit 2; }
done
bash "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"
# CPU threads per training process (8 processes, each with 4 loader workers)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

# 1. pseudo masks of the unlabeled train2017 images: 8 Ray actors, one GPU each
uplvp stage propose --config recipes/propose_clip.yaml --num-workers 8

# 2. pre-training, 12 epochs, 8 processes (docs/training.md: torchrun runs the CLI module)
torchrun --standalone --nproc-per-node 8 -m stages.cli stage pretrain --config "recipes/pretrain_${DECODER}.yaml" --resume

# 3. the 1 %, 5 %, 10 % labeled subsets
uplvp data split --config recipes/split.yaml

# 4. fine-tuning on each subset (validation is split over the 8 GPUs), then 5. evaluation
for PCT in 1 5 10; do
    torchrun --standalone --nproc-per-node 8 -m stages.cli stage finetune --config "recipes/finetune_${DECODER}_${PCT}pct.yaml" --resume
    uplvp stage evaluate --config "recipes/evaluate_${DECODER}_${PCT}pct.yaml"
done
