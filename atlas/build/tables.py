"""The atlas's tables as the build writes them: schemas, row order, row groups, encodings.

One writer per table, shared by `atlas.build` and scripts/make_large_atlas.py (which writes synthetic
atlases of realistic size), so both lay the files out alike. `atlas.store` reads them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..util.files import atomic_write, atomic_write_parquet
from ..net import LayerMap
from ..mining import NO_IMAGE, TopK
from ..deconv.switches import pack, regions_below, union

# Row groups (scripts/bench_scale.py measures both on a 1M-image atlas):
# images.parquet: a channel's top-k joins its k images, and DuckDB pushes their ids into the scan, skipping
# every row group whose image_id range holds none; small groups keep that lookup flat in the number of images.
IMAGE_ROW_GROUP = 1 << 14
# activations: whole-layer scans (class selectivity, the export's histograms) want big groups (fewer, better
# compressed pages); a lookup of a few images still skips by the image_id statistics.
ACT_ROW_GROUP = 1 << 20


def top_rows(lmap: LayerMap, chosen, tops: dict[str, TopK]) -> list[dict[str, Any]]:
    rows = []
    size = lmap.image_size
    for la in chosen:
        st = tops[la.name].state()
        for ch in range(la.channels):
            for rank in range(st["values"].shape[1]):
                image_id = int(st["ids"][ch, rank])
                if image_id == NO_IMAGE:
                    break
                y, x = divmod(int(st["pos"][ch, rank]), la.width)
                x0, y0, x1, y1 = la.box(y, x, size)
                rows.append({"layer": la.name, "channel": ch, "rank": rank, "image_id": image_id,
                             "value": float(st["values"][ch, rank]), "y": y, "x": x,
                             "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    return rows


SWITCH_SCHEMA = pa.schema([("image_id", pa.int32()), ("pool", pa.string()), ("y0", pa.int32()), ("x0", pa.int32()),
                           ("h", pa.int32()), ("w", pa.int32()), ("data", pa.binary())])


def switch_regions(lmap: LayerMap, top_rows) -> dict[int, dict[str, Any]]:
    """image id -> pool -> the box of the pool's output that the image's top-k units reach (the union of
    their receptive fields there), in image order: what the switches pass records."""
    needed: dict[int, dict[str, list]] = {}
    for r in top_rows:
        for reg in regions_below(lmap, lmap.by_name[r["layer"]], r["y"], r["x"]):
            needed.setdefault(r["image_id"], {}).setdefault(reg.pool, []).append(reg)
    return {i: {pool: union(regs) for pool, regs in sorted(needed[i].items())} for i in sorted(needed)}


def write_switches(path: Path, lmap: LayerMap, regions: dict[int, dict[str, Any]],
                   codes: Callable[[list[int]], dict[tuple[int, str], np.ndarray]], batch_size: int,
                   compress_aside: bool = False) -> None:
    """switches.parquet from `regions` (see switch_regions), `codes(image_ids)` giving a batch's window
    codes per (image id, pool) inside its region.

    Streamed a batch of images at a time: an image's switches can take ~170 KB (zfnet's pool1 under a
    conv5 unit), and up to channels x k images have some, so holding them all would make memory grow
    with the dataset. One row group per batch, in image order, so that a reader asking for a few
    images skips the rest by the row groups' image_id statistics. scripts/make_large_atlas.py writes
    through this too.

    `compress_aside`: each row group is compressed (zstd, outside the GIL) in a thread while the next
    batch's codes are cut and packed, for a caller whose `codes` leaves a core idle (the captured
    switches, cut once mining is over: 2.35 -> 1.58 s at 4,096 zfnet images). Not for the second pass,
    whose forward pass keeps both cores busy: there the thread would stall it as a decoding worker does.
    """
    image_ids = list(regions)

    def write(tmp: Path) -> None:
        # one write at a time, in order; the executor is shut down (its last write done) before the
        # writer closes
        with pq.ParquetWriter(tmp, SWITCH_SCHEMA, compression="zstd") as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="switches") as compress:
            pending = None
            for b in range(0, len(image_ids), batch_size):
                chunk = image_ids[b:b + batch_size]
                got = codes(chunk)
                cols: dict[str, list] = {c: [] for c in SWITCH_SCHEMA.names}
                for image_id in chunk:
                    for pool, reg in regions[image_id].items():
                        data = pack(got[(image_id, pool)], lmap.pool_by_name[pool].geometry.kernel)
                        for key, v in (("image_id", image_id), ("pool", pool), ("y0", reg.y0), ("x0", reg.x0),
                                       ("h", reg.h), ("w", reg.w), ("data", data)):
                            cols[key].append(v)
                if pending is not None:
                    pending.result()
                table = pa.table(cols, schema=SWITCH_SCHEMA)
                pending = compress.submit(writer.write_table, table) if compress_aside else None
                if not compress_aside:
                    writer.write_table(table)
            if pending is not None:
                pending.result()

    atomic_write(path, write)


def write_tables(staging: Path, source, errors: dict[int, str], lmap, chosen, moms, top_rows,
                 digests: dict[int, str] | None = None) -> None:
    digests = digests or {}
    recs = source.records
    atomic_write_parquet(staging / "images.parquet", pa.table({
        "image_id": pa.array([r.image_id for r in recs], pa.int32()),
        "path": pa.array([r.path for r in recs], pa.string()),
        "label": pa.array([r.label for r in recs], pa.string()),
        "label_index": pa.array([r.label_index for r in recs], pa.int32()),
        "status": pa.array(["error" if r.image_id in errors else "ok" for r in recs], pa.string()),
        "error": pa.array([errors.get(r.image_id) for r in recs], pa.string()),
        # the bytes each image had when it was mined: pictures draw it only while it still has them
        "content_hash": pa.array([digests.get(r.image_id) for r in recs], pa.string()),
    }), row_group_size=IMAGE_ROW_GROUP)
    layer_rows = [la.to_row() for la in chosen]
    atomic_write_parquet(staging / "layers.parquet", pa.Table.from_pylist(layer_rows, schema=pa.schema([
        ("layer", pa.string()), ("kind", pa.string()), ("channels", pa.int32()), ("height", pa.int32()),
        ("width", pa.int32()), ("kernel", pa.int32()), ("stride", pa.int32()), ("padding", pa.int32()),
        ("rf_size", pa.int32()), ("jump", pa.int32()), ("offset", pa.int32())])))
    ch_cols: dict[str, list] = {c: [] for c in ("layer", "channel", "mean", "std", "max", "fire_rate")}
    for la in chosen:
        s = moms[la.name].summary()
        ch_cols["layer"] += [la.name] * la.channels
        ch_cols["channel"] += list(range(la.channels))
        for f in ("mean", "std", "max", "fire_rate"):
            ch_cols[f] += [float(v) if np.isfinite(v) else None for v in s[f]]
    atomic_write_parquet(staging / "channels.parquet", pa.table(ch_cols, schema=pa.schema([
        ("layer", pa.string()), ("channel", pa.int32()), ("mean", pa.float64()), ("std", pa.float64()),
        ("max", pa.float64()), ("fire_rate", pa.float64())])))
    atomic_write_parquet(staging / "top_activations.parquet", pa.Table.from_pylist(top_rows, schema=pa.schema([
        ("layer", pa.string()), ("channel", pa.int32()), ("rank", pa.int32()), ("image_id", pa.int32()),
        ("value", pa.float32()), ("y", pa.int32()), ("x", pa.int32()), ("x0", pa.int32()), ("y0", pa.int32()),
        ("x1", pa.int32()), ("y1", pa.int32())])))


def write_activations(target: Path, tables) -> None:
    """A layer's activations file from tables of (image_id, channel, value) rows in image order, in row
    groups of ACT_ROW_GROUP rows whatever size the tables come in (a build's chunk parts hold 1024 images),
    streamed and published atomically. scripts/make_large_atlas.py writes through this too."""

    def write(tmp: Path) -> None:
        writer, pending, n = None, [], 0
        try:
            for table in tables:
                if writer is None:
                    # value: split into byte streams, the exponents of similar floats compress (zstd) ~17 %
                    # smaller and scan faster than a dictionary that overflows into plain pages
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd",
                                              use_dictionary=["image_id", "channel"],
                                              column_encoding={"value": "BYTE_STREAM_SPLIT"})
                pending.append(table)
                n += table.num_rows
                while n >= ACT_ROW_GROUP:
                    buf = pa.concat_tables(pending)
                    writer.write_table(buf.slice(0, ACT_ROW_GROUP), row_group_size=ACT_ROW_GROUP)
                    pending, n = [buf.slice(ACT_ROW_GROUP)], n - ACT_ROW_GROUP
            if writer is not None and n:
                writer.write_table(pa.concat_tables(pending), row_group_size=ACT_ROW_GROUP)
        finally:
            if writer is not None:
                writer.close()

    atomic_write(target, write)
