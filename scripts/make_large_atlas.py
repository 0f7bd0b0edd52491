"""Write a synthetic atlas of realistic shape, without running a model.

1M images, zfnet's 1376 conv channels at 224 px, k = 9, the activations table for one
layer (conv5, 256 channels): for measuring the query side (scripts/bench_scale.py).

The tables are written by the build's own writers (atlas.build.tables: `write_tables`,
`write_activations`, `top_rows`, `write_switches`), so file names, schemas, sort order and
row groups are what `atlas build` writes; only the numbers are made up:
  activations  look like post-ReLU spatial maxima: a third zero, the rest gamma-distributed,
               shifted per class so that selectivity queries find something; the layer's
               channel statistics and top-k are computed from these very numbers
  other layers statistics and top-k drawn at random (no activations table, as if built
               with activations for one layer only)
  switches     valid but random window offsets for every top-k image of the activations
               layer and channel 0 of every other layer, so those project from the atlas
               alone (`atlas show`, `atlas export`); images are not on disk, so patches are
               placeholders
  manifest     the build's keys; no similarity indexes (as `atlas build --no-index`)

    python scripts/make_large_atlas.py --out /tmp/large-atlas              # 1M images, ~2 min
    python scripts/make_large_atlas.py --out /tmp/small --images 20000    # quick
    python scripts/make_large_atlas.py --smoke      # seconds: 3000 images into a temp folder (or --out), then removed
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas import FORMAT_VERSION, __version__  # noqa: E402
from atlas.build.tables import switch_regions, top_rows, write_activations, write_switches, write_tables  # noqa: E402
from atlas.data import Record  # noqa: E402
from atlas.util.files import atomic_write_bytes, atomic_write_json, publish_dir  # noqa: E402
from atlas.net import LayerMap  # noqa: E402
from atlas.mining import Moments, TopK  # noqa: E402
from atlas.models import load_model, preprocessing_for  # noqa: E402
from atlas.models.registry import model_record  # noqa: E402

IMAGES_PER_BLOCK = 16384  # activation rows are generated (and top-k merged) this many images at a time
SWITCH_BATCH = 64         # images per switches row group: the build's default batch size


def synthetic_layer(rng, la, n: int, k: int) -> tuple[Moments, TopK]:
    """Statistics and top-k of a layer without an activations table: plausible, not derived."""
    C = la.channels
    mean, std = rng.gamma(2, 0.5, C), rng.gamma(2, 0.3, C)
    mom = Moments.from_state({"count": np.full(C, float(n)), "sum": mean * n, "sumsq": (std ** 2 + mean ** 2) * n,
                              "fires": np.floor(rng.uniform(0.2, 1.0, C) * n), "max": rng.gamma(9, 1.0, (C,)) + 9})
    ids = np.stack([rng.choice(n, k, replace=False) for _ in range(C)])
    top = TopK.from_state({"values": -np.sort(-rng.gamma(9, 1.0, (C, k)), axis=1).astype(np.float32),
                           "ids": ids.astype(np.int64),
                           "pos": rng.integers(0, la.height * la.width, (C, k), dtype=np.int64)})
    return mom, top


def activation_tables(rng, la, labels: np.ndarray, classes: int, mom: Moments, top: TopK):
    """(image_id, channel, value) tables in image order, as the build's chunk parts are; the layer's
    moments and top-k are accumulated from the same numbers on the way."""
    n, C = len(labels), la.channels
    shift = rng.gamma(1.0, 0.3, (classes, C)).astype(np.float32)
    for lo in range(0, n, IMAGES_PER_BLOCK):
        m = min(IMAGES_PER_BLOCK, n - lo)
        v = rng.standard_gamma(2.0, (m, C), dtype=np.float32) * np.float32(0.6) + shift[labels[lo:lo + m]]
        v[rng.random((m, C), dtype=np.float32) < 0.33] = 0
        vt = torch.from_numpy(v)
        mom.update(vt)
        best = torch.topk(vt.t(), min(top.k, m), dim=1)  # per channel: the block's candidates only
        top.merge(TopK.from_state({"values": best.values.numpy(), "ids": (best.indices + lo).numpy(),
                                   "pos": rng.integers(0, la.height * la.width, best.indices.shape)}))
        yield pa.table({"image_id": pa.array(np.repeat(np.arange(lo, lo + m, dtype=np.int32), C), pa.int32()),
                        "channel": pa.array(np.tile(np.arange(C, dtype=np.int16), m), pa.int16()),
                        "value": pa.array(v.reshape(-1), pa.float32())})
        print(f"activations ({la.name}): {lo + m}/{n} images", end="\r", file=sys.stderr)
    print(file=sys.stderr)


def random_codes(rng, geom, reg) -> np.ndarray:
    """Window offsets dy * k + dx (C, h, w) that stay inside the pool's input, as real switches do."""
    k, s, p = geom.kernel, geom.stride, geom.padding

    def axis(start: int, size: int) -> np.ndarray:
        o = (np.arange(start, start + size) * s - p)[None, :]
        lo, hi = np.maximum(0, -o), np.minimum(k, geom.in_size - o)
        return lo, hi - lo

    (ly, ny), (lx, nx) = axis(reg.y0, reg.h), axis(reg.x0, reg.w)
    shape = (geom.channels, reg.h, reg.w)
    dy = ly.reshape(1, -1, 1) + np.floor(rng.random(shape) * ny.reshape(1, -1, 1)).astype(int)
    dx = lx.reshape(1, 1, -1) + np.floor(rng.random(shape) * nx.reshape(1, 1, -1)).astype(int)
    return (dy * k + dx).astype(np.uint8)


def synthetic_switches(path: Path, rng, lmap: LayerMap, top_rows, layer: str) -> int:
    """switches.parquet through the build's own writer, random window codes, for the rows of `layer` and
    channel 0 of every layer."""
    regions = switch_regions(lmap, [r for r in top_rows if r["layer"] == layer or r["channel"] == 0])

    def codes(chunk: list[int]) -> dict[tuple[int, str], np.ndarray]:
        out = {}
        for i in chunk:
            for pool, reg in regions[i].items():
                p = lmap.pool_by_name[pool]
                out[(i, pool)] = random_codes(rng, SimpleNamespace(**vars(p.geometry), channels=p.channels), reg)
        return out

    write_switches(path, lmap, regions, codes, SWITCH_BATCH)
    return len(regions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="the atlas to write (required, but for --smoke)")
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--layer", default="conv5", help="the layer whose activations table is written")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: 3000 images, into a temp folder that is removed after (unless --out is given)")
    args = ap.parse_args()
    if args.out is None and not args.smoke:
        ap.error("the following arguments are required: --out")
    if not args.smoke:
        write(args)
        return
    args.images = 3000
    if args.out is not None:
        write(args)
        return
    with tempfile.TemporaryDirectory(prefix="make-large-atlas-") as tmp:
        args.out = Path(tmp) / "atlas"
        write(args)


def write(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n, k = args.images, args.k
    model = load_model("zfnet")
    lmap = LayerMap(model, 224)
    convs = lmap.conv_layers
    if args.layer not in lmap.by_name or lmap.by_name[args.layer].kind != "conv":
        sys.exit(f"Error: --layer must be one of {', '.join(la.name for la in convs)}")
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    labels = np.arange(n) % args.classes
    moms, tops = {}, {}
    for la in convs:
        moms[la.name], tops[la.name] = synthetic_layer(rng, la, n, k)
    la = lmap.by_name[args.layer]
    moms[la.name], tops[la.name] = Moments(la.channels), TopK(la.channels, k)
    write_activations(staging / "activations" / f"layer={la.name}" / "part-0.parquet",
                      activation_tables(rng, la, labels, args.classes, moms[la.name], tops[la.name]))
    t_act = time.perf_counter() - t0

    source = SimpleNamespace(records=[Record(i, f"n{c:05d}/img_{i:08d}.JPEG", f"class_{c:04d}", int(c))
                                      for i, c in enumerate(labels.tolist())])
    rows = top_rows(lmap, convs, tops)
    write_tables(staging, source, {}, lmap, convs, moms, rows)
    del source
    n_sw = synthetic_switches(staging / "switches.parquet", rng, lmap, rows, la.name)

    buf = io.BytesIO()
    torch.save(model.features.state_dict(), buf)
    atomic_write_bytes(staging / "model" / "features.pt", buf.getvalue())
    atomic_write_json(staging / "manifest.json", {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "atlas", "version": __version__, "torch": torch.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**model_record(model), "weights": None, "weights_sha256": None, "random_init": True, "seed": 0,
                  "num_classes": lmap.classes(), "classes": None},
        "dataset": {"spec": "synthetic", "kind": "flat", "count": n, "root": "/nonexistent/synthetic",
                    "ok": n, "errors": 0, "classes": [f"class_{c:04d}" for c in range(args.classes)]},
        "preprocessing": preprocessing_for("zfnet"),
        "k": k,
        "layers": [{**la_.to_row(), "pools_below": la_.pools_below} for la_ in convs],
        "geometry": lmap.describe(),
        "switches": {"stored": True, "encoding": f"synthetic: random window offsets for every top-k image of "
                                                 f"{la.name} and channel 0 of the other layers"},
        "activations": True,
        "options": {"batch_size": SWITCH_BATCH, "chunk_size": 1024, "device": "none", "precision": "fp32", "decode": "cpu",
                    "ranks": 1},
        "timings": {"mining_s": 0, "switches_s": 0, "write_s": round(time.perf_counter() - t0, 1),
                    "total_s": round(time.perf_counter() - t0, 1), "images_per_s": None},
        "synthetic": {"seed": args.seed, "activations_layer": la.name, "classes": args.classes},
    })
    publish_dir(staging, args.out, overwrite=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    act_size = sum(f.stat().st_size for f in (args.out / "activations").rglob("*") if f.is_file())
    print(f"wrote {args.out}: {n} images in {time.perf_counter() - t0:.0f} s (activations {t_act:.0f} s); "
          f"{size / 1e9:.2f} GB on disk, of which activations ({la.name}, {la.channels} channels) "
          f"{act_size / 1e9:.2f} GB; switches for {n_sw} images")


if __name__ == "__main__":
    main()
