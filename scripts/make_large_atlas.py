"""Write a synthetic atlas of realistic shape, without running a model.

1M images, zfnet's 1376 conv channels, k = 9, the activations table for one
layer: for measuring the query side (see scripts/bench_scale.py). Values are
drawn so that they look like post-ReLU spatial maxima (a third of them zero,
the rest gamma-distributed, per-class shifts so selectivity queries find
something). Switches are written for channel 0 of every layer, so that those
channels can be projected from the atlas alone.

    python scripts/make_large_atlas.py --out /tmp/large-atlas              # 1M images
    python scripts/make_large_atlas.py --out /tmp/small --images 20000    # quick
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas import FORMAT_VERSION, __version__  # noqa: E402
from atlas.build import ACT_ROW_GROUP  # noqa: E402
from atlas.fsutil import atomic_write_json, publish_dir  # noqa: E402
from atlas.layers import LayerMap  # noqa: E402
from atlas.models import load_model, preprocessing_for  # noqa: E402
from atlas.switches import regions_below  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--layer", default="conv5", help="the layer whose activations table is written")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n, k = args.images, args.k
    model = load_model("zfnet")
    lmap = LayerMap(model, 224)
    convs = lmap.conv_layers
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    labels = np.arange(n) % args.classes
    pq.write_table(pa.table({
        "image_id": pa.array(np.arange(n, dtype=np.int32)),
        "path": pa.array([f"n{c:05d}/img_{i:08d}.JPEG" for i, c in enumerate(labels)]),
        "label": pa.array([f"class_{c:04d}" for c in labels]),
        "label_index": pa.array(labels.astype(np.int32)),
        "status": pa.array(["ok"] * n),
        "error": pa.nulls(n, pa.string()),
    }), staging / "images.parquet", compression="zstd")
    pq.write_table(pa.Table.from_pylist([la.to_row() for la in convs]), staging / "layers.parquet")

    ch = {c: [] for c in ("layer", "channel", "mean", "std", "max", "fire_rate")}
    top = {c: [] for c in ("layer", "channel", "rank", "image_id", "value", "y", "x", "x0", "y0", "x1", "y1")}
    for la in convs:
        C = la.channels
        ch["layer"] += [la.name] * C
        ch["channel"] += list(range(C))
        ch["mean"] += list(rng.gamma(2, 0.5, C))
        ch["std"] += list(rng.gamma(2, 0.3, C))
        ch["max"] += list(rng.gamma(9, 1.0, C))
        ch["fire_rate"] += list(rng.uniform(0.2, 1.0, C))
        for c in range(C):
            vals = np.sort(rng.gamma(9, 1.0, k))[::-1]
            ids = rng.choice(n, k, replace=False)
            for r in range(k):
                y, x = int(rng.integers(la.height)), int(rng.integers(la.width))
                x0, y0, x1, y1 = la.box(y, x, 224)
                for key, v in zip(top, (la.name, c, r, int(ids[r]), float(vals[r]), y, x, x0, y0, x1, y1)):
                    top[key].append(v)
    pq.write_table(pa.table(ch), staging / "channels.parquet")
    pq.write_table(pa.table(top), staging / "top_activations.parquet", compression="zstd")

    # Switches for channel 0 of every layer: random but valid window offsets.
    sw = {c: [] for c in ("layer", "channel", "rank", "pool", "y0", "x0", "h", "w", "data")}
    for i in range(len(top["layer"])):
        if top["channel"][i] != 0:
            continue
        la = lmap.by_name[top["layer"][i]]
        for reg in regions_below(lmap, la, top["y"][i], top["x"][i]):
            pool = lmap.pool_by_name[reg.pool]
            codes = rng.integers(0, pool.geometry.kernel ** 2, pool.channels * reg.h * reg.w).astype(np.uint8)
            if codes.size % 2:
                codes = np.append(codes, np.uint8(0))
            for key, v in zip(sw, (la.name, 0, top["rank"][i], reg.pool, reg.y0, reg.x0, reg.h, reg.w,
                                   (codes[0::2] | (codes[1::2] << 4)).tobytes())):
                sw[key].append(v)
    pq.write_table(pa.table(sw), staging / "switches.parquet", compression="zstd")

    la = lmap.by_name[args.layer]
    folder = staging / "activations" / f"layer={args.layer}"
    folder.mkdir(parents=True)
    writer = None
    step = max(1, (4 * ACT_ROW_GROUP) // la.channels)
    class_shift = rng.gamma(1.0, 0.3, (args.classes, la.channels)).astype(np.float32)
    for lo in range(0, n, step):
        m = min(step, n - lo)
        v = rng.gamma(2.0, 0.6, (m, la.channels)).astype(np.float32) + class_shift[labels[lo:lo + m]]
        v[rng.random((m, la.channels)) < 0.33] = 0
        table = pa.table({
            "image_id": pa.array(np.repeat(np.arange(lo, lo + m, dtype=np.int32), la.channels)),
            "channel": pa.array(np.tile(np.arange(la.channels, dtype=np.int16), m)),
            "value": pa.array(v.reshape(-1)),
        })
        if writer is None:
            writer = pq.ParquetWriter(folder / "part-0.parquet", table.schema, compression="zstd")
        writer.write_table(table, row_group_size=ACT_ROW_GROUP)
        print(f"activations: {lo + m}/{n} images", end="\r", file=sys.stderr)
    writer.close()
    print(file=sys.stderr)

    (staging / "model").mkdir()
    buf = io.BytesIO()
    torch.save(model.features.state_dict(), buf)
    (staging / "model" / "features.pt").write_bytes(buf.getvalue())
    atomic_write_json(staging / "manifest.json", {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "atlas", "version": __version__, "torch": torch.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": "zfnet", "weights": None, "weights_sha256": None, "random_init": True, "seed": 0,
                  "num_classes": 1000, "classes": None},
        "dataset": {"spec": "synthetic", "kind": "synthetic", "root": "/nonexistent/synthetic", "count": n,
                    "ok": n, "errors": 0, "classes": [f"class_{c:04d}" for c in range(args.classes)]},
        "preprocessing": preprocessing_for("zfnet"),
        "k": k,
        "layers": [{**la.to_row(), "pools_below": la.pools_below} for la in convs],
        "geometry": lmap.describe(),
        "switches": {"stored": True, "encoding": "synthetic: channel 0 of every layer only"},
        "activations": True,
        "options": {"batch_size": 0, "chunk_size": 0, "device": "none", "precision": "fp32", "ranks": 1},
        "timings": {"mining_s": 0, "switches_s": 0, "write_s": round(time.perf_counter() - t0, 1), "total_s": 0,
                    "images_per_s": None},
        "synthetic": True,
    })
    publish_dir(staging, args.out, overwrite=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    act_size = sum(f.stat().st_size for f in (args.out / "activations").rglob("*") if f.is_file())
    print(f"wrote {args.out}: {n} images in {time.perf_counter() - t0:.0f} s; {size / 1e9:.2f} GB on disk, "
          f"of which activations ({args.layer}, {la.channels} channels) {act_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
