"""What padding short batches costs a build (README, "Determinism").

Every forward pass whose numbers an atlas stores runs at the full batch size: a short batch (the last
of a chunk, the last of the dataset) is padded with zeros, so an image's numbers do not depend on the
batch it came in. This builds the same dataset with and without the padding, interleaved, and prints
the time ratio and the share of padded images.

    python scripts/bench_padding.py --data atlas-demo/data/shapes-8000 --weights atlas-demo/run/final.pt
    python scripts/bench_padding.py --smoke   # seconds: 200 generated shapes, one round, chunks of 64 and 50
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import atlas.net  # noqa: E402
from atlas.build import build  # noqa: E402


def padded_images(n: int, chunk_size: int, batch_size: int) -> int:
    from atlas.data.inputs import chunk_batches

    return sum(batch_size - len(ids) for _, ids in chunk_batches(n, chunk_size, batch_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zfnet-mini")
    ap.add_argument("--data", default="shapes")
    ap.add_argument("--weights")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-sizes", default="1024,1000", help="default chunk (a multiple of the batch size) "
                    "and one that leaves a short batch in every chunk")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a few seconds: 200 shapes, one round")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.chunk_sizes = 1, "64,50"
    real = atlas.net.LayerMap.extract

    def unpadded(self, x, names, pool_indices=False, batch_size=None):
        return real(self, x, names, pool_indices)

    print(f"load average {os.getloadavg()[0]:.1f}; {args.model} over {args.data}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if args.smoke:
            from atlas.data.shapes import generate

            data = str(generate(Path(tmp) / "shapes", n=200, size=64, seed=0))
        for chunk in [int(c) for c in args.chunk_sizes.split(",")]:
            times = {"padded": [], "unpadded": []}
            n = None
            for r in range(args.rounds):
                for mode in ("padded", "unpadded") if r % 2 == 0 else ("unpadded", "padded"):
                    atlas.net.LayerMap.extract = real if mode == "padded" else unpadded
                    t = time.perf_counter()
                    out = build(args.model, data, Path(tmp) / f"{mode}-{chunk}-{r}", weights=args.weights,
                                batch_size=args.batch_size, chunk_size=chunk, index=False, progress=False,
                                workers=0)
                    times[mode].append(time.perf_counter() - t)
                    atlas.net.LayerMap.extract = real
                    import json

                    n = json.loads((out / "manifest.json").read_text())["dataset"]["count"]
            pad = padded_images(n, chunk, args.batch_size)
            best = {m: min(v) for m, v in times.items()}
            print(f"chunk {chunk}: {n} images, {pad} padded ({pad / n:.2%}); build padded {best['padded']:.2f} s, "
                  f"unpadded {best['unpadded']:.2f} s: ratio {best['padded'] / best['unpadded']:.3f} (best of "
                  f"{args.rounds})")


if __name__ == "__main__":
    main()
