#!/usr/bin/env bash
# The real-scale path on one GPU, one table (benchmarks/gpu_check.py has the rows' meaning):
# base preset (ResNet-50, D=256, 100 kernels), both decoders, batch 8 at 800x1088:
# pretrain and finetune s/step, images/s and peak GPU memory with AMP off and bf16; evaluation
# images/s; propose with ViT-B-16 (random weights: speed only) at batch 32.
#
#   bash benchmarks/gpu_check.sh [OUT_FILE]     # <= 8 minutes on one GPU; prints the table
#
# Made for a short lent GPU session: install, then one run; the table also goes to OUT_FILE
# (default benchmarks/results/gpu_check.txt) so it can be kept in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_FILE="${1:-benchmarks/results/gpu_check.txt}"
PY=.venv/bin/python
[ -x "$PY" ] || bash .ci/install
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
mkdir -p "$(dirname "$OUT_FILE")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 460 "$PY" -m benchmarks.gpu_check --preset base --batch 8 --short-side 800 \
    --long-side 1088 --steps 5 --amp off bf16 --clip-model ViT-B-16 --clip-batch 32 \
    | tee "$OUT_FILE"
