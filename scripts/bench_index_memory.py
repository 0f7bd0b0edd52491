"""Benchmark: peak memory of building an fc7 image index from a build's chunk files, streamed vs held whole.

A build keeps fc7's vectors (4096 float16 per image) in its chunk files; the index is built from them
before the atlas is published. Above 100k images the index is IVF,SQfp16, itself 2 bytes per dimension
and image, so holding the source vectors whole as well doubles the memory. Each variant runs in its own
process over the same chunk files; the figure is that process's peak RSS.

    python scripts/bench_index_memory.py                 # 120k images x 4096 (about 1 GB of vectors)
    python scripts/bench_index_memory.py --images 20000  # quicker, exact index
    python scripts/bench_index_memory.py --smoke         # seconds: 3000 images x 256 in 3 chunks, IVF index forced
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 1024


def write_chunks(work: Path, n: int, dim: int) -> int:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in range(nchunks):
        ids = np.arange(c * CHUNK, min(n, (c + 1) * CHUNK), dtype=np.int64)
        x = np.maximum(centres[rng.integers(0, 64, len(ids))] + rng.normal(size=(len(ids), dim)), 0)
        np.savez(work / f"vec-{c:05d}.npz", **{"images.fc7.ids": ids, "images.fc7.x": x.astype(np.float16)})
    return nchunks


def child(work: Path, nchunks: int, variant: str, exact_max: int | None = None) -> None:
    from atlas.search.faiss_index import build_index, choose_index
    from atlas.search.indexing import ChunkVectors

    chunks = ChunkVectors(work, nchunks)
    ids = chunks.ids("images.fc7")
    rows = chunks.rows("images.fc7")
    x = rows if variant == "streamed" else rows[:]  # "whole": what the build did before ChunkRows
    t = time.perf_counter()
    spec = choose_index(*rows.shape) if exact_max is None else choose_index(*rows.shape, exact_max=exact_max)
    index = build_index(x, ids, spec)
    print(json.dumps({"variant": variant, "seconds": time.perf_counter() - t, "count": index.ntotal,
                      "factory": spec["factory"],
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=120_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--exact-max", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: 3000 images x 256, the approximate (IVF) index forced as above 100k")
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), args.child[2], args.exact_max)
        return
    extra = []
    if args.smoke:
        args.images, args.dim, extra = 3000, 256, ["--exact-max", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nchunks = write_chunks(work, args.images, args.dim)
        vec_mb = args.images * args.dim * 2 / 2**20
        print(f"{args.images} images x {args.dim} float16 in {nchunks} chunk files ({vec_mb:.0f} MB of vectors)")
        res = {}
        for variant in ("whole", "streamed"):
            out = subprocess.run([sys.executable, __file__, "--child", str(work), str(nchunks), variant, *extra],
                                 capture_output=True, text=True, check=True).stdout
            res[variant] = json.loads(out.strip().splitlines()[-1])
            r = res[variant]
            shown = f" ({r['factory']})" if args.smoke else ""
            print(f"{variant:<9} peak RSS {r['peak_mb']:7.0f} MB, index build {r['seconds']:.1f} s, "
                  f"{r['count']} vectors{shown}")
    print(f"streamed / whole peak memory: {res['streamed']['peak_mb'] / res['whole']['peak_mb']:.2f}; "
          f"time {res['streamed']['seconds'] / res['whole']['seconds']:.2f}")


if __name__ == "__main__":
    main()
