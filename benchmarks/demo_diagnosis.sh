#!/usr/bin/env bash
# Why `uplvp demo` at its former settings (until 2026-12-02) gave the pre-trained arm less AP than
# scratch (docs/demo.md): that demo once more; fine-tuning runs that keep only parts of the
# pre-trained model (init_skip re-initialises the rest); the same pre-training without prompt
# injection and its fine-tuning; then both probes on all of them.
#
#   bash benchmarks/demo_diagnosis.sh runs/demo_diagnosis    # ~20 min on 2 cores; resumes
#
# Prints the probes' tables (kept in benchmarks/results/demo_diagnosis.txt); the runs' logs
# are in the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/demo_diagnosis}"
UPLVP=.venv/bin/uplvp
PY=.venv/bin/python
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
mkdir -p "$OUT"

# the demo's former defaults, written out (the current defaults are in stages/demo.py)
cat > "$OUT/former_demo.yaml" <<'EOF'
num_unlabeled: 300
num_train: 60
num_val: 60
image_size: 128
pretrain_steps: 1000
finetune_steps: 600
eval_every: 50
batch_size: 8
pretrain_lr: 0.0005
finetune_lr: 0.0005
prompt: {inject: true}
EOF
echo "former demo (seed 0) -> $OUT/demo" >&2
"$UPLVP" demo --config "$OUT/former_demo.yaml" --seed 0 --out "$OUT/demo" --no-progress \
    > "$OUT/demo.log" 2>&1

# the pre-trained arm's exact fine-tuning settings, with parts of the pre-trained model dropped
variants=("keep-decoder:backbone.,pixel_decoder." "keep-features:decoder." "fresh-cls-fcs:cls_fcs")
runs=()
for variant in "${variants[@]}"; do
    name="${variant%%:*}"
    skip="${variant#*:}"
    "$PY" - "$OUT" "$name" "$skip" <<'EOF'
import json, sys, yaml
out, name, skip = sys.argv[1:]
config = json.load(open(f"{out}/demo/finetune_pretrained/stage.json"))["config"]
config.update(out=f"{out}/{name}", init_skip=skip.split(","), resume=True)
yaml.safe_dump(config, open(f"{out}/{name}.yaml", "w"))
EOF
    echo "fine-tune $name (init_skip: $skip)" >&2
    "$UPLVP" stage finetune --config "$OUT/$name.yaml" --no-progress > "$OUT/$name.log" 2>&1
    runs+=("$OUT/$name")
done

# the former demo's pre-training with prompt injection off, fine-tuned as the pre-trained arm
"$PY" - "$OUT" <<'EOF'
import json, sys, yaml
out = sys.argv[1]
pretrain = json.load(open(f"{out}/demo/pretrain/stage.json"))["config"]
pretrain.update(out=f"{out}/pretrain-no-inject", resume=True)
pretrain["prompt"]["inject"] = False
yaml.safe_dump(pretrain, open(f"{out}/pretrain-no-inject.yaml", "w"))
finetune = json.load(open(f"{out}/demo/finetune_pretrained/stage.json"))["config"]
finetune.update(out=f"{out}/no-inject", init=f"{out}/pretrain-no-inject", resume=True)
yaml.safe_dump(finetune, open(f"{out}/no-inject.yaml", "w"))
EOF
echo "pre-train without prompt injection, fine-tune from it" >&2
"$UPLVP" stage pretrain --config "$OUT/pretrain-no-inject.yaml" --no-progress \
    > "$OUT/pretrain-no-inject.log" 2>&1
"$UPLVP" stage finetune --config "$OUT/no-inject.yaml" --no-progress > "$OUT/no-inject.log" 2>&1
runs+=("$OUT/no-inject")

echo "# bash benchmarks/demo_diagnosis.sh $OUT   ($(date -u +%F), commit $(git rev-parse --short HEAD))"
"$PY" benchmarks/pretrain_probe.py "$OUT/demo/pretrain" "$OUT/pretrain-no-inject" \
    --data "$OUT/demo/data/val.yaml" --train "$OUT/demo/data/train.yaml" \
    --short-side 128 --max-long-side 192 --threads 2
echo
"$PY" benchmarks/finetune_probe.py "$OUT/demo/finetune_pretrained" "$OUT/demo/finetune_scratch" \
    "${runs[@]}" --data "$OUT/demo/data/val.yaml" --short-side 128 --threads 2
