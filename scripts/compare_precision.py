"""How much does `atlas build --precision bf16` change the atlas? Build both, compare the rankings.

bf16 autocast makes the forward pass faster on a GPU but rounds activations to 8 bits of mantissa,
so near-ties among a channel's strongest images can swap. This prints, per layer: the share of
each channel's fp32 top-k images that the bf16 top-k also holds, the share of channels whose
strongest image is the same, and the largest relative difference of a channel's maximum.

    python scripts/compare_precision.py --model zfnet-mini --data atlas-demo/data/shapes-8000 \\
        --weights atlas-demo/run/final.pt            # after `atlas demo`
    python scripts/compare_precision.py --model zfnet --data imgs/ --device cuda

On a CPU, bf16 autocast is emulated (same rounding, no speed-up): the agreement figures hold,
the timings do not.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas.build import build  # noqa: E402

AGREEMENT = """
WITH a AS (SELECT * FROM read_parquet('{a}/top_activations.parquet')),
     b AS (SELECT * FROM read_parquet('{b}/top_activations.parquet')),
     first_a AS (SELECT layer, channel, image_id FROM a WHERE rank = 0),
     first_b AS (SELECT layer, channel, image_id FROM b WHERE rank = 0),
     kept AS (SELECT a.layer, avg((b.image_id IS NOT NULL)::INT) AS topk_overlap
              FROM a LEFT JOIN b USING (layer, channel, image_id) GROUP BY a.layer),
     same AS (SELECT fa.layer, avg((fa.image_id = fb.image_id)::INT) AS strongest_same
              FROM first_a fa JOIN first_b fb USING (layer, channel) GROUP BY fa.layer),
     maxima AS (SELECT layer, max(abs(ca.max - cb.max) / nullif(abs(ca.max), 0)) AS max_rel_diff
                FROM read_parquet('{a}/channels.parquet') ca JOIN read_parquet('{b}/channels.parquet') cb
                USING (layer, channel) GROUP BY layer)
SELECT layer, round(topk_overlap, 4), round(strongest_same, 4), round(max_rel_diff, 4)
FROM kept JOIN same USING (layer) JOIN maxima USING (layer) ORDER BY layer
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    import duckdb

    with tempfile.TemporaryDirectory() as tmp:
        out, seconds = {}, {}
        for precision in ("fp32", "bf16"):
            t = time.perf_counter()
            out[precision] = build(args.model, args.data, Path(tmp) / precision, weights=args.weights, k=args.k,
                                   device=args.device, batch_size=args.batch_size, precision=precision,
                                   index=False, progress=False)
            seconds[precision] = time.perf_counter() - t
        rows = duckdb.sql(AGREEMENT.format(a=out["fp32"], b=out["bf16"])).fetchall()
    print(f"{args.model} over {args.data}, k = {args.k}: fp32 build {seconds['fp32']:.1f} s, "
          f"bf16 build {seconds['bf16']:.1f} s")
    print(f"{'layer':<8} {'top-k kept':>10} {'same strongest':>15} {'max rel. diff of maxima':>24}")
    for layer, overlap, same, diff in rows:
        print(f"{layer:<8} {overlap:>10.1%} {same:>15.1%} {diff:>24.2%}")


if __name__ == "__main__":
    main()
