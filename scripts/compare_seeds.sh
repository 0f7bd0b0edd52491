#!/usr/bin/env bash
# Two trainings of the demo model (zfnet-mini on 8,000 `shapes` images, the demo's 8 epochs) that differ
# only in their seed, their atlases over the same images, and their comparison: the README's "Comparing
# two atlases" figures. About 3 minutes on 2 cores.
#   bash scripts/compare_seeds.sh [WORK_DIR]      (default: compare-seeds/)
set -euo pipefail
W="${1:-compare-seeds}"
mkdir -p "$W"
atlas make-shapes "$W/shapes-8000" --n 8000 --side 64 --no-progress
for seed in 1 2; do
    atlas train --model zfnet-mini --data "$W/shapes-8000" --out "$W/run-seed$seed" --epochs 8 --seed "$seed" \
        --snapshot-epochs 0,1,2,4,8 --overwrite --no-progress
    atlas build --model zfnet-mini --weights "$W/run-seed$seed/final.pt" --data "$W/shapes-8000" \
        --out "$W/atlas-seed$seed" --overwrite --no-progress
done
atlas compare "$W/atlas-seed1" "$W/atlas-seed2" --out "$W/seeds" --overwrite --no-progress
atlas sql "$W/seeds" -q match_quality
atlas sql "$W/seeds" -q best_pairs
# the same units across training: seed 1's run, followed by their matches
atlas evolution "$W/run-seed1" --layers conv1,conv3,conv5 --per-layer 3 --follow matched --no-progress \
    --out "$W/evolution-matched.png"
