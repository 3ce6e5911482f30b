#!/usr/bin/env bash
# Real photos, part 1 (issue 31): what the backbones trained here without labels learned, and the
# pseudo masks the proposers find on the small COCO sets of ../shared/data.
#
#   bash experiments/real_photos.sh runs/real_photos    # after the two backbone runs below
#
# Needs: the backbone runs (experiments/backbone/coco_r18_{mocov2,densecl}.yaml, ~2 h each on one
# core; coco_lite_imagenet_densecl.yaml, ~45 min) in runs/backbone_r18_{mocov2,densecl} and
# runs/backbone_lite_imagenet_densecl; ../shared/data (the COCO sets). Steps whose output
# file exists are skipped (delete it to redo). Outputs, kept in experiments/results/ (the probe)
# and tools/results/ (the proposer tables):
#   backbone_probe_coco.txt      k-NN / linear probes on instance crops, random vs trained
#   propose_grid_coco.txt        options of freemask / maskcut chosen per backbone by COCO AR@20
#                                on a 100-photo subset of the *train* photos (never on val)
#   propose_quality_coco.txt     every proposer on the 151 val and 294 train photos
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/real_photos}"
DATA=../shared/data/coco_small
PY=.venv/bin/python
UPLVP=.venv/bin/uplvp
RESULTS=experiments/results
TOOL_RESULTS=tools/results
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$OUT"
[ -d "$DATA" ] || { echo "error: $DATA not found (the COCO sets of ../shared/data)"; exit 2; }

MOCO=runs/backbone_r18_mocov2
DENSE=runs/backbone_r18_densecl
LITE="$OUT/lite0_imagenet.pt"                 # EfficientNet-Lite0, ImageNet weights as installed
LITESSL=runs/backbone_lite_imagenet_densecl    # the same, then DenseCL on the unlabeled photos
[ -f "$LITE" ] || $PY -m tools.imagenet_backbone --out "$LITE"

if [ ! -f "$RESULTS/backbone_probe_coco.txt" ]; then
    $PY -m experiments.backbone_probe --data "$DATA" --preset small \
        --checkpoints random "$MOCO" "$DENSE" "$LITE" "$LITESSL" | tee "$OUT/probe.txt"
    cp "$OUT/probe.txt" "$RESULTS/backbone_probe_coco.txt"
fi

# the tuning subset: 100 of the 294 train photos (seeded), a manifest named tune.yaml
if [ ! -f "$OUT/tune/tune.yaml" ]; then
    $UPLVP data split --manifest "$DATA/train.yaml" --percent 34 --seed 1 --out "$OUT/tune"
    cp "$OUT/tune/instances_train.1@34.yaml" "$OUT/tune/tune.yaml"
fi
GRID='{"freemask": {"threshold": [0.3, 0.5], "min_score": [0.3, 0.5]},
       "maskcut": {"tau": [0.0, 0.2, 0.4], "num_cuts": [4], "crop_grid": [1, 2]}}'
for backbone in "$MOCO" "$DENSE" "$LITE" "$LITESSL"; do
    tag=$(basename "$backbone" .pt)
    if [ "$(grep -c '^best on tune: ' "$OUT/grid_$tag.log" 2>/dev/null)" != 2 ]; then
        $PY -m tools.propose_quality --data "$OUT/tune" --splits tune --tune-split tune \
            --proposers freemask maskcut --backbone-checkpoint "$backbone" --brief \
            --grid "$GRID" > "$OUT/grid_$tag.log"
        { echo "## $backbone"; grep -A 100 "^Grid for" "$OUT/grid_$tag.log" | grep -v "^propose"; } \
            > "$OUT/grid_$tag.txt"
    fi
done
cat "$OUT"/grid_*.txt | grep -v "^\['" > "$TOOL_RESULTS/propose_grid_coco.txt"  # the tables

best() {  # the options chosen for proposer $2 on backbone $1's grid
    grep "^best on tune: " "$OUT/grid_$1.log" | sed -n "$2p" | sed 's/^best on tune: //; s/ (AR@20.*$//'
}
done_file() { grep -q "^COCO class-agnostic" "$1" 2>/dev/null; }  # a finished report
if [ ! -f "$OUT/quality.txt" ]; then
    done_file "$OUT/quality_classical.txt" || \
        $PY -m tools.propose_quality --data "$DATA" --splits val train \
            --proposers classical --brief > "$OUT/quality_classical.txt"
    for backbone in "$MOCO" "$DENSE" "$LITE" "$LITESSL"; do
        tag=$(basename "$backbone" .pt)
        done_file "$OUT/quality_$tag.txt" && continue
        options="{\"freemask\": $(best "$tag" 1), \"maskcut\": $(best "$tag" 2)}"
        $PY -m tools.propose_quality --data "$DATA" --splits val train \
            --proposers freemask maskcut --backbone-checkpoint "$backbone" \
            --proposer-options "$options" --brief > "$OUT/quality_$tag.txt"
    done
    cat "$OUT"/quality_classical.txt "$OUT"/quality_backbone_r18_*.txt "$OUT"/quality_lite0*.txt \
        "$OUT"/quality_backbone_lite*.txt \
        | grep -v "^propose: \|already complete\|^images ok\|^propose done" > "$OUT/quality.txt"
    cp "$OUT/quality.txt" "$TOOL_RESULTS/propose_quality_coco.txt"
fi
echo "done: $RESULTS/backbone_probe_coco.txt, $TOOL_RESULTS/propose_grid_coco.txt, propose_quality_coco.txt"
