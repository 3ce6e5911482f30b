#!/usr/bin/env bash
# The paper's COCO setting on ONE GPU, every stage in order (docs/recipes.md):
# propose -> pretrain -> split -> finetune on 1 %, 5 %, 10 % -> evaluate.
#
#   cd WORK && COCO_ROOT=/data/coco bash path/to/stages/recipes/launch/one_gpu.sh [knet|mask2former]
#
# Run it in the work folder (prepare.sh sets it up: datasets/coco, manifests/, recipes/,
# weights/); `uplvp` must be on PATH (activate its environment). Each optimizer step sees the
# recipes' 16 images as 8 batches of 2 (--batch-size 2 --accumulation-steps 8), so steps,
# epochs and learning rates are the 8-GPU recipe's. Every stage resumes: rerun the script
# after an interruption and it continues where it stopped.
set -euo pipefail

DECODER="${1:-knet}"
case "$DECODER" in
    knet | mask2former) ;;
    *) echo "error: decoder must be knet or mask2former, got '$DECODER'" >&2; exit 2 ;;
esac
command -v uplvp >/dev/null || { echo "error: uplvp is not on PATH (activate its environment)" >&2; exit 2; }
bash "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"

# 1. pseudo masks of the unlabeled train2017 images (skips finished shards on a rerun)
uplvp stage propose --config recipes/propose_clip.yaml

# 2. pre-training, 12 epochs
uplvp stage pretrain --config "recipes/pretrain_${DECODER}.yaml" --batch-size 2 --accumulation-steps 8 --resume

# 3. the 1 %, 5 %, 10 % labeled subsets
uplvp data split --config recipes/split.yaml

# 4. fine-tuning on each subset, then 5. evaluation on val2017
for PCT in 1 5 10; do
    uplvp stage finetune --config "recipes/finetune_${DECODER}_${PCT}pct.yaml" --batch-size 2 --accumulation-steps 8 --resume
    uplvp stage evaluate --config "recipes/evaluate_${DECODER}_${PCT}pct.yaml"
done
