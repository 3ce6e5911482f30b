#!/usr/bin/env bash
# Prepare the current folder as a work folder for the COCO recipes (docs/recipes.md):
#
#   datasets/coco -> $COCO_ROOT     train2017/, val2017/, annotations/instances_{train,val}2017.json
#   manifests/*.yaml                the recipes' manifests (copied once; paths relative to them)
#   recipes/*.yaml                  the recipe configs (copied once: edit your copy freely)
#   weights/                        your CLIP and self-supervised R50 files (the configs' placeholders)
#
#   COCO_ROOT=/data/coco bash path/to/stages/recipes/launch/prepare.sh
#
# Safe to rerun: existing files are never overwritten. The other launch scripts run it first.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$(cd "$here/../coco" && pwd)"

# COCO, under the layout the manifests name
if [ ! -e datasets/coco ]; then
    if [ -z "${COCO_ROOT:-}" ]; then
        echo "error: no datasets/coco here; set COCO_ROOT to your COCO folder (train2017/, val2017/, annotations/)" >&2
        exit 2
    fi
    mkdir -p datasets
    ln -s "$COCO_ROOT" datasets/coco
    echo "linked datasets/coco -> $COCO_ROOT"
fi
for needed in datasets/coco/train2017 datasets/coco/val2017 \
    datasets/coco/annotations/instances_train2017.json \
    datasets/coco/annotations/instances_val2017.json; do
    if [ ! -e "$needed" ]; then
        echo "error: $needed not found (COCO 2017 layout: docs/recipes.md)" >&2
        exit 2
    fi
done

# the recipe configs and manifests: copied once, never overwritten (your edits stay)
mkdir -p recipes manifests weights runs/coco/slurm   # slurm/: the jobs' logs
for file in "$src"/*.yaml; do
    [ -e "recipes/$(basename "$file")" ] || cp "$file" recipes/
done
for file in "$src"/manifests/*.yaml; do
    [ -e "manifests/$(basename "$file")" ] || cp "$file" manifests/
done

# the weight files the configs name (placeholders until you put the files there)
missing=0
while read -r value; do
    value="${value//\"/}"; value="${value//\'/}"   # YAML quotes
    path="${value#local-dir:}"
    case "$path" in
        */* | *.*) ;;     # a file or folder path
        *) continue ;;    # an open_clip pretrained tag (read from its local cache)
    esac
    if [ ! -e "$path" ]; then
        echo "error: $path not found: put your weights there or change the path in recipes/ (docs/recipes.md)" >&2
        missing=1
    fi
done < <(sed -n -e 's/^ *clip_checkpoint: *\([^ #]*\).*/\1/p' \
    -e 's/^ *backbone_checkpoint: *\([^ #]*\).*/\1/p' recipes/*.yaml | grep -v '^null$' | sort -u)
if [ "$missing" -ne 0 ]; then
    exit 2
fi
echo "work folder ready: $(pwd)"
