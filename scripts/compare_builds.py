"""How much does a faster build option change the atlas? Build both ways, compare the rankings.

  --vary precision   fp32 vs `--precision bf16`: bf16 autocast makes the forward pass faster on a
                     GPU but rounds activations to 8 bits of mantissa.
  --vary decode      `--decode cpu` (PIL) vs `--decode device` (torchvision's JPEG decoder, on
                     --device: nvjpeg on a GPU; its resize rounds in floating point, not in PIL's
                     fixed point, so pixels differ by up to one grey level).
  --vary batch-size  --batch-size B vs 3B/4 (or --other-batch-size): CPU kernels are chosen by batch shape and round
                     differently, so an image's numbers move by a few ulps with the batch size
                     (the same batch size always gives the same bytes: README, "Determinism").

Near-ties among a channel's strongest images can swap. This prints, per layer: the share of each
channel's reference top-k images (fp32, cpu) that the other build's top-k also holds, the share of
channels whose strongest image is the same, and the largest relative difference of a channel's
maximum.

    python scripts/compare_builds.py --model zfnet-mini --data atlas-demo/data/shapes-8000 \\
        --weights atlas-demo/run/final.pt            # after `atlas demo`
    python scripts/compare_builds.py --vary decode --model zfnet --data jpegs/ --device cuda
    python scripts/compare_builds.py --vary batch-size --model zfnet-mini --data atlas-demo/data/shapes-8000 \
        --weights atlas-demo/run/final.pt
    python scripts/compare_builds.py --smoke   # seconds: each --vary, zfnet-mini at 32 px over 192 shapes (JPEG)

On a CPU, bf16 autocast is emulated (same rounding, no speed-up): the agreement figures hold,
the timings do not. The decoders only differ where images are resized (the demo's 64 px shapes
are not): compare them on photos.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas.build import build  # noqa: E402

VARIANTS = {"precision": [("fp32", {"precision": "fp32"}), ("bf16", {"precision": "bf16"})],
            "decode": [("cpu", {"decode": "cpu"}), ("device", {"decode": "device"})],
            "batch-size": None}  # from --batch-size: see variants()


def variants(vary: str, batch_size: int, other: int | None = None) -> list[tuple[str, dict]]:
    if vary == "batch-size":
        other = other or max(1, batch_size * 3 // 4)
        return [(f"batch {batch_size}", {"batch_size": batch_size}), (f"batch {other}", {"batch_size": other})]
    return VARIANTS[vary]

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
SELECT layer, round(topk_overlap, 4), round(strongest_same, 4), max_rel_diff
FROM kept JOIN same USING (layer) JOIN maxima USING (layer) ORDER BY layer
"""


def smoke_data(folder: Path, n: int = 192) -> Path:
    """A tiny ImageFolder: `n` generated 64 px shapes, saved as JPEGs (so that --vary decode has JPEGs to decode)."""
    from PIL import Image

    from atlas.data.shapes import generate

    pngs = generate(folder / "png", n=n, size=64, seed=0)
    out = folder / "jpeg"
    for p in sorted(pngs.rglob("*.png")):
        d = out / p.parent.name
        d.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            im.convert("RGB").save(d / (p.stem + ".jpg"), quality=90)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="required, but for --smoke")
    ap.add_argument("--data", help="required, but for --smoke")
    ap.add_argument("--weights")
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, help="input size (default: the model's)")
    ap.add_argument("--vary", choices=list(VARIANTS), help="default precision (--smoke: each in turn)")
    ap.add_argument("--other-batch-size", type=int, help="--vary batch-size: the other build's (default 3/4)")
    ap.add_argument("--smoke", action="store_true", help="seconds: zfnet-mini at 32 px over 192 generated shapes "
                    "(JPEGs), k = 4, batch 32, every --vary in turn unless one is given")
    args = ap.parse_args()
    if not args.smoke:
        missing = [f"--{a}" for a in ("model", "data") if getattr(args, a) is None]
        if missing:
            ap.error(f"the following arguments are required: {', '.join(missing)}")
        compare(args, args.vary or "precision")
        return
    with tempfile.TemporaryDirectory(prefix="compare-builds-smoke-") as tmp:
        args.model, args.image_size, args.k, args.batch_size = "zfnet-mini", 32, 4, 32
        args.data = str(smoke_data(Path(tmp)))
        for vary in [args.vary] if args.vary else list(VARIANTS):
            compare(args, vary)


def compare(args: argparse.Namespace, vary: str) -> None:
    import duckdb

    with tempfile.TemporaryDirectory() as tmp:
        out, seconds = {}, {}
        runs = variants(vary, args.batch_size, args.other_batch_size)
        (ref, _), (other, _) = runs
        for name, option in runs:
            t = time.perf_counter()
            kw = dict(weights=args.weights, k=args.k, device=args.device, batch_size=args.batch_size, index=False,
                      progress=False, image_size=args.image_size)
            out[name] = build(args.model, args.data, Path(tmp) / name.replace(" ", "-"), **{**kw, **option})
            seconds[name] = time.perf_counter() - t
        rows = duckdb.sql(AGREEMENT.format(a=out[ref], b=out[other])).fetchall()
    print(f"{args.model} over {args.data}, k = {args.k}: {ref} build {seconds[ref]:.1f} s, "
          f"{other} build {seconds[other]:.1f} s")
    print(f"{'layer':<8} {'top-k kept':>10} {'same strongest':>15} {'max rel. diff of maxima':>24}")
    for layer, overlap, same, diff in rows:
        shown = f"{diff:.2%}" if diff >= 1e-4 else f"{diff:.1e}"  # batch sizes move values by ulps
        print(f"{layer:<8} {overlap:>10.1%} {same:>15.1%} {shown:>24}")


if __name__ == "__main__":
    main()
