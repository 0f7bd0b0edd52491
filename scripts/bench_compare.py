"""How long `atlas compare` takes, and how much memory, on generated per-image statistics.

Two synthetic atlases over the same N images, one layer of C channels each, hold only what a comparison
reads (the images table, the activations table written by the build's own writer, atlas.build.tables.
write_activations, and the small tables SQL needs). B's units are A's, permuted, mixed with noise, so the
matching has something to find. The comparison runs in a fresh process, timed end to end (reading both
tables, the float64 correlations, the assignment, writing the folder), and reports that process's peak
resident memory.

    python scripts/bench_compare.py --images 50000 --channels 512
    python scripts/bench_compare.py --images 50000 --channels 2048
    python scripts/bench_compare.py --smoke          # seconds: 2000 images, 64 channels
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas import FORMAT_VERSION  # noqa: E402
from atlas.util.files import atomic_write_json, atomic_write_parquet  # noqa: E402

BLOCK = 4096  # images generated at a time


def write_atlas(root: Path, n: int, channels: int, values) -> None:
    """A minimal atlas: what `atlas compare` and its SQL read."""
    from atlas.build.tables import write_activations  # imports torch: not in the measuring process

    root.mkdir(parents=True)
    atomic_write_parquet(root / "images.parquet", pa.table({
        "image_id": pa.array(np.arange(n, dtype=np.int32)), "path": pa.array([f"img/{i:07d}.png" for i in range(n)]),
        "label": pa.array([None] * n, pa.string()), "label_index": pa.array([None] * n, pa.int32()),
        "status": pa.array(["ok"] * n), "error": pa.array([None] * n, pa.string())}))
    atomic_write_parquet(root / "layers.parquet", pa.table({
        "layer": ["conv"], "kind": ["conv"], "channels": pa.array([channels], pa.int32()),
        **{k: pa.array([1], pa.int32()) for k in ("height", "width", "kernel", "stride", "padding", "rf_size",
                                                   "jump", "offset")}}))
    atomic_write_parquet(root / "channels.parquet", pa.table({
        "layer": ["conv"] * channels, "channel": pa.array(np.arange(channels, dtype=np.int32)),
        **{k: pa.array(np.zeros(channels)) for k in ("mean", "std", "max", "fire_rate")}}))
    atomic_write_parquet(root / "top_activations.parquet", pa.table({
        "layer": pa.array([], pa.string()), **{k: pa.array([], pa.int32()) for k in ("channel", "rank", "image_id")},
        "value": pa.array([], pa.float32()),
        **{k: pa.array([], pa.int32()) for k in ("y", "x", "x0", "y0", "x1", "y1")}}))

    def tables():
        for lo in range(0, n, BLOCK):
            v = values(lo, min(n, lo + BLOCK))
            m = len(v)
            yield pa.table({"image_id": pa.array(np.repeat(np.arange(lo, lo + m, dtype=np.int32), channels)),
                            "channel": pa.array(np.tile(np.arange(channels, dtype=np.int16), m)),
                            "value": pa.array(v.reshape(-1))})

    write_activations(root / "activations" / "layer=conv" / "part-0.parquet", tables())
    atomic_write_json(root / "manifest.json", {
        "format_version": FORMAT_VERSION, "model": {"name": "synthetic"}, "k": 9,
        "dataset": {"root": "/synthetic", "kind": "flat", "spec": "/synthetic", "count": n},
        "preprocessing": {"resize": 64, "crop": 64, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "layers": [{"layer": "conv", "kind": "conv", "channels": channels}],
        "geometry": {"layers": [{"layer": "conv", "kind": "conv", "channels": channels}], "pools": []}})


def generate(where: Path, n: int, channels: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    latent = max(8, channels // 4)
    mix = rng.normal(size=(latent, channels)).astype(np.float32)
    perm = rng.permutation(channels)

    def a_values(lo, hi):
        z = np.random.default_rng([seed, lo]).normal(size=(hi - lo, latent)).astype(np.float32)
        return np.maximum(z @ mix, 0)

    def b_values(lo, hi):
        noise = np.random.default_rng([seed + 1, lo]).normal(scale=0.5, size=(hi - lo, channels)).astype(np.float32)
        return np.maximum(a_values(lo, hi) + noise, 0)[:, perm]

    write_atlas(where / "A", n, channels, a_values)
    write_atlas(where / "B", n, channels, b_values)
    return where / "A", where / "B"


def measure(a: str, b: str, out: str) -> None:
    """In a fresh process: time the comparison; print JSON with the seconds and the peak memory."""
    from atlas.compare import compare

    t0 = time.perf_counter()
    c = compare(a, b, out, progress=False)
    dt = time.perf_counter() - t0
    peak_mb = _peak_rss_mb()
    print(json.dumps({"seconds": round(dt, 2), "peak_rss_mb": round(peak_mb), "timings": c.record["timings"],
                      "mean_one_to_one": c.rows("SELECT mean_one_to_one FROM layer_pairs")[0]["mean_one_to_one"]}))


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM belongs to the address space exec made, where ru_maxrss
    would also count the generating parent's (Linux keeps it across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--keep", type=Path, help="Write the atlases here and keep them (default: a temp folder).")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--measure", nargs=3, metavar=("A", "B", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    if args.smoke:
        args.images, args.channels = 2000, 64
    where = args.keep or Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        t0 = time.perf_counter()
        a, b = generate(where, args.images, args.channels)
        print(f"generated 2 atlases of {args.images} images x {args.channels} channels in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        res = subprocess.run([sys.executable, __file__, "--measure", str(a), str(b), str(where / "cmp")],
                             check=True, capture_output=True, text=True)
        got = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps({"images": args.images, "channels": args.channels, **got}))
    finally:
        if args.keep is None:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
