#!/usr/bin/env bash
# Two trainings of the demo model (zfnet-mini on `shapes`) that differ only in their seed, their atlases
# over the same images, and their comparison: the README's "Comparing two atlases" figures.
#   bash scripts/compare_seeds.sh [WORK_DIR] [IMAGES] [EPOCHS]    (default: compare-seeds/, 8000, 8: the demo's)
# The README's figures: IMAGES=2000 EPOCHS=3 (the shared 2-core machine could not fit the demo's recipe twice).
set -euo pipefail
W="${1:-compare-seeds}"
N="${2:-8000}"
E="${3:-8}"
mkdir -p "$W"
atlas make-shapes "$W/shapes-$N" --n "$N" --side 64 --no-progress
for seed in 1 2; do
    atlas train --model zfnet-mini --data "$W/shapes-$N" --out "$W/run-seed$seed" --epochs "$E" --seed "$seed" \
        --snapshot-epochs "0-$E" --overwrite --no-progress
    atlas build --model zfnet-mini --weights "$W/run-seed$seed/final.pt" --data "$W/shapes-$N" \
        --out "$W/atlas-seed$seed" --overwrite --no-progress
done
atlas compare "$W/atlas-seed1" "$W/atlas-seed2" --out "$W/seeds" --overwrite --no-progress
atlas sql "$W/seeds" -q match_quality
atlas sql "$W/seeds" -q best_pairs
# the same units across training: seed 1's run, followed by their matches
atlas evolution "$W/run-seed1" --layers conv1,conv3,conv5 --per-layer 3 --follow matched --no-progress \
    --out "$W/evolution-matched.png"
