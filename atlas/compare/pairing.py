"""Which images two atlases share, and their per-image statistics streamed in pairs.

Images pair by content when both atlases record it (`images.content_hash`, a hash of the file's bytes:
the same picture under another name or in another folder), else by identity in one dataset (the same
dataset root and the same path inside it). Only images both builds read pair; an image that appears
twice in an atlas (the same bytes under two names) pairs once, its smallest image id.

The statistics are the activations table (`activations/layer=L/*.parquet`: image_id, channel, value,
written image by image, channels in order, ascending image ids: atlas.build.tables.write_activations), read a
row group at a time. When the pairs do not come in the same order in both atlases (content pairing
across differently ordered datasets), B's rows are first put in A's order by DuckDB into a temporary
Parquet file, spilling to disk rather than holding them.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import AtlasError
from ..store import AtlasReader

HASH = "content_hash"
BLOCK_BYTES = 64 << 20       # a block of paired images, both sides in float64
SORT_MEMORY = "1GB"          # DuckDB's memory while it reorders B's rows (it spills beyond)


@dataclass
class Pairs:
    """The shared images: A's and B's image ids, row k of both the same image, A's ids ascending."""

    a: np.ndarray
    b: np.ndarray
    how: str                 # "content_hash" or "path"

    def __len__(self) -> int:
        return len(self.a)

    @property
    def in_order(self) -> bool:
        """B's ids ascend with A's: both atlases' files can be streamed side by side as they are."""
        return bool(np.all(np.diff(self.b) > 0))


def _images(a: AtlasReader) -> pa.Table:
    with a.reading("images.parquet"):
        schema = pq.read_schema(a.path / "images.parquet")
        cols = ["image_id", "path", "status"] + ([HASH] if HASH in schema.names else [])
        t = pq.read_table(a.path / "images.parquet", columns=cols)
    return t.filter(pc.equal(t["status"], "ok")).drop_columns(["status"])


def _dataset(a: AtlasReader) -> tuple[str, str]:
    ds = a.manifest.get("dataset", {})
    root = ds.get("root") or ""
    try:
        root = str(Path(root).resolve())
    except OSError:
        pass
    return ds.get("kind") or "", root


def shared_images(a: AtlasReader, b: AtlasReader) -> Pairs:
    """The images both atlases read, paired (by content hash when both have one, else by path in the same
    dataset); AtlasError in one line when they share none."""
    ta, tb = _images(a), _images(b)
    if HASH in ta.column_names and HASH in tb.column_names:
        key, how = HASH, "content_hash"
    else:
        if _dataset(a) != _dataset(b):
            only = [str(x.path) for x, t in ((a, ta), (b, tb)) if HASH in t.column_names]
            why = (f"only '{only[0]}' records content hashes" if only else "neither records content hashes")
            raise AtlasError(f"atlases '{a.path}' and '{b.path}' share no images: they were built over different "
                             f"datasets ('{_dataset(a)[1]}' and '{_dataset(b)[1]}') and {why} to match images by")
        key, how = "path", "path"
    ta = _first_per_key(ta, key)
    tb = _first_per_key(tb, key)
    joined = ta.select(["image_id", key]).join(tb.select(["image_id", key]).rename_columns(["image_id_b", key]),
                                               key, join_type="inner")
    if joined.num_rows == 0:
        raise AtlasError(f"atlases '{a.path}' and '{b.path}' share no images (matched by {how}: none of "
                         f"{ta.num_rows} readable images of one is among the {tb.num_rows} of the other)")
    joined = joined.sort_by("image_id")
    return Pairs(joined["image_id"].to_numpy().astype(np.int64), joined["image_id_b"].to_numpy().astype(np.int64),
                 how)


def _first_per_key(t: pa.Table, key: str) -> pa.Table:
    t = t.filter(pc.is_valid(t[key])).sort_by("image_id")
    first = t.group_by(key, use_threads=False).aggregate([("image_id", "min")])
    return first.rename_columns([key, "image_id"]) if first.column_names[0] == key else \
        first.rename_columns(["image_id", key])


# ---------------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------------
def activation_files(a: AtlasReader, layer: str) -> list[Path]:
    return sorted((a.path / "activations" / f"layer={layer}").glob("*.parquet"))


def _rows(a: AtlasReader, files: list[Path], layer: str, channels: int, wanted: np.ndarray,
          label: str) -> Iterator[np.ndarray]:
    """Blocks (images x channels, float32) of the wanted image ids (ascending), in that order."""
    left: list[pa.RecordBatch] = []
    got = 0
    last = -1
    for f in files:
        rel = str(f.relative_to(a.path)) if f.is_relative_to(a.path) else f.name
        with a.reading(rel):
            pf = pq.ParquetFile(f)
            # a row group at a time: iterating the file's batches pre-buffers every row group it will read,
            # which made memory grow with the number of images
            for group in range(pf.num_row_groups):
                batch = pf.read_row_group(group, columns=["image_id", "channel", "value"])
                t = pa.concat_tables([pa.Table.from_batches(left, schema=batch.schema), batch]) if left else batch
                whole = t.num_rows // channels * channels
                left = t.slice(whole).to_batches()
                if whole == 0:
                    continue
                ids = t["image_id"].to_numpy()[:whole].reshape(-1, channels)
                ch = t["channel"].to_numpy()[:whole].reshape(-1, channels)
                if (ch[:, 0] != 0).any() or (ch[:, -1] != channels - 1).any() or (ids[:, 0] != ids[:, -1]).any() \
                        or ids[0, 0] <= last or (np.diff(ids[:, 0]) <= 0).any():
                    raise a._damaged(rel, f"does not hold {layer}'s {channels} channels image by image in image "
                                          f"order, as atlas build writes it")
                img = ids[:, 0]
                last = int(img[-1])
                pos = np.searchsorted(wanted, img)
                keep = (pos < len(wanted)) & (wanted[np.minimum(pos, len(wanted) - 1)] == img)
                if keep.any():
                    vals = t["value"].to_numpy()[:whole].reshape(-1, channels)[keep]
                    got += len(vals)
                    yield vals
    if got != len(wanted):
        raise AtlasError(f"{label}: the activations of {layer} lack {len(wanted) - got} of the images the "
                         f"images table lists as read; rebuild the atlas with `atlas build`")


def _reordered(b: AtlasReader, layer: str, pairs: Pairs, tmp: Path) -> Path:
    """B's rows of the pairs, as a Parquet file in pair order (image_id = the pair's number)."""
    import duckdb

    out = tmp / f"b-{layer}.parquet"
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{SORT_MEMORY}'")
        con.execute("SET temp_directory = ?", [str(tmp / "spill")])
        con.execute("SET preserve_insertion_order = false")
        order = pa.table({"k": np.arange(len(pairs), dtype=np.int64), "ib": pairs.b})
        con.register("pair_order", order)
        files = [str(f) for f in activation_files(b, layer)]
        con.execute("COPY (SELECT p.k::INTEGER AS image_id, a.channel, a.value FROM read_parquet(?) a "
                    "JOIN pair_order p ON a.image_id = p.ib ORDER BY p.k, a.channel) TO '"
                    + str(out).replace("'", "''") + "' (FORMAT parquet)", [files])
    finally:
        con.close()
    return out


def paired_blocks(a: AtlasReader, b: AtlasReader, layer_a: str, layer_b: str, ca: int, cb: int,
                  pairs: Pairs, block_images: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(A's values, B's values) for blocks of the shared images, rows paired, in float32."""
    block = block_images or max(64, BLOCK_BYTES // (8 * (ca + cb)))
    with tempfile.TemporaryDirectory(prefix="atlas-compare-") as tmp:
        ra = _rows(a, activation_files(a, layer_a), layer_a, ca, pairs.a, f"atlas '{a.path}'")
        if pairs.in_order:
            rb = _rows(b, activation_files(b, layer_b), layer_b, cb, pairs.b, f"atlas '{b.path}'")
        else:
            f = _reordered(b, layer_b, pairs, Path(tmp))
            rb = _rows(b, [f], layer_b, cb, np.arange(len(pairs)), f"atlas '{b.path}'")
        yield from _aligned(ra, rb, block)


def _aligned(ra: Iterator[np.ndarray], rb: Iterator[np.ndarray], block: int):
    """Re-cut two streams of paired rows (the same count in all) into blocks of equal length."""
    queues: list[list[np.ndarray]] = [[], []]
    counts = [0, 0]
    open_ = [True, True]
    while True:
        for side, stream in enumerate((ra, rb)):
            while open_[side] and counts[side] < block:
                x = next(stream, None)
                if x is None:
                    open_[side] = False
                else:
                    queues[side].append(x)
                    counts[side] += len(x)
        n = min(counts[0], counts[1], block)
        if n == 0:
            return
        x, y = (np.concatenate(q) for q in queues)
        yield x[:n], y[:n]
        queues = [[x[n:]], [y[n:]]]
        counts = [counts[0] - n, counts[1] - n]
