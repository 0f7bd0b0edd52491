"""What an atlas's stored max-pool switches cost on disk, per model at its default layers.

Switches are written for the top-k images only (a record per image and pool: the union of its top-k
units' fields at that pool), so their size is bounded by channels x k images, not by the dataset. This
builds a small atlas (random weights, generated 256 px images), reads switches.parquet, and prints the
bytes per image with switches, per pool, and the bound for any dataset size:

    min(N, channels x k) x bytes per image

    python scripts/switch_disk.py --model resnet50 --images 32
    python scripts/switch_disk.py --model googlenet --images 32
    python scripts/switch_disk.py --smoke          # seconds: zfnet-mini, 8 images
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.images, args.k, args.size = "zfnet-mini", 8, 4, 64
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_export import make_images

    from atlas import open as open_atlas
    from atlas.build import build

    work = Path(tempfile.mkdtemp(prefix="switch-disk-"))
    try:
        make_images(work / "data", args.images, size=(256, 256))
        build(args.model, str(work / "data"), work / "atlas", k=args.k, batch_size=8, device="cpu",
              progress=False, image_size=args.size, index=False)
        a = open_atlas(work / "atlas")
        table = pq.read_table(work / "atlas" / "switches.parquet")
        size = (work / "atlas" / "switches.parquet").stat().st_size
        images = len(set(table.column("image_id").to_pylist()))
        channels = sum(la["channels"] for la in a.manifest["layers"])
        per_image = size / max(images, 1)
        print(f"{args.model} @{a.image_size}, layers {', '.join(a.layer_names)} ({channels} channels), k = {args.k}")
        print(f"switches.parquet: {size / 1e6:.2f} MB for {images} images with switches: "
              f"{per_image / 1e3:.1f} KB per image (zstd)")
        by_pool: dict[str, list[int]] = {}
        for pool, data in zip(table.column("pool").to_pylist(), table.column("data").to_pylist()):
            by_pool.setdefault(pool, []).append(len(data))
        for pool, sizes in by_pool.items():
            print(f"  {pool:<28} {sum(sizes) / len(sizes) / 1e3:8.1f} KB per image before compression")
        bound = channels * args.k
        for n in (10_000, 1_000_000):
            print(f"N = {n:>9,}: at most {min(n, bound):,} images with switches -> "
                  f"{min(n, bound) * per_image / 1e9:.2f} GB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
