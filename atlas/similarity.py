"""Similarity search wired into an atlas: building its indexes, and querying them from Python, the CLI and SQL.

    ATLAS/index/images-conv5.faiss (+ .json)  one vector per readable image: conv5's per-channel spatial maxima
    ATLAS/index/images-fc7.faiss   (+ .json)  the same with fc7's output (kept as float16)
    ATLAS/index/channels.faiss     (+ .json)  one vector per channel of every recorded conv layer: its profile
    manifest.json "index"                     what was built: layers, where the vectors came from, specs, dims

The algorithms (index choice, cosine search, channel profiles) are in
`atlas.index`; this module is the plumbing around them.

Where vectors come from, cheapest first:
* `ChunkVectors`: what a running build's ChunkMiner kept per chunk (fc layers,
  which the build records nowhere else; conv layers of a --no-activations build);
* the activations table (conv layers): no forward pass;
* a forward pass over the dataset (`atlas index` on fc layers, or on an atlas
  built with --no-activations): it needs the dataset where the build found it.

Channel profiles are read on one fixed sample of image ids,
`profile_rows(images, PROFILE_SAMPLE, PROFILE_SEED)` less the unreadable ones:
the same images for every layer, so that channels of different layers compare.

    a = atlas.open("my-atlas")
    a.similar_images(image_id=42)                  # rows: rank, image_id, path, label, score
    a.similar_images(image="query.jpg", layer="fc7")
    a.similar_channels("conv5:17")                 # rows: rank, layer, channel, score
    a.sql("SELECT * FROM similar_images(42, 10) JOIN images USING (image_id)")

Indexes load on the first query that needs one and stay loaded with their
`Atlas` object. Ranks count from 0, as top_activations' do. An image query
keeps the image itself (rank 0, score 1: a check that the index is sound); a
channel query leaves the channel itself out. A query vector that is all zero (an
image no channel fires on, a dead channel) has no direction to compare: it gets
no rows.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import AtlasError
from .fsutil import atomic_write_json, remove_temp_files
from .index import (EXACT_MAX, INDEX_FORMAT, build_index, channel_keys, channel_profiles, choose_index, load_index,
                    profile_rows, reconstruct, save_index, search, split_channel_keys)
from .store import AtlasReader

INDEX_DIR = "index"
CHANNELS_FILE = "channels.faiss"
PROFILE_SAMPLE = 4096   # images a channel profile is read on (correlation standard error ~0.016)
PROFILE_SEED = 0
FC_DTYPE = "float16"    # fc vectors are kept at half the bytes, whichever of the build or `atlas index` computes them

_STATE: "weakref.WeakKeyDictionary[AtlasReader, dict]" = weakref.WeakKeyDictionary()  # per handle: loaded indexes, SQL


def _open(atlas) -> AtlasReader:
    return atlas if isinstance(atlas, AtlasReader) else AtlasReader(atlas)


def _hint(a: AtlasReader) -> str:
    return f"run `atlas index {a.path}`"


# -- which layers ----------------------------------------------------------------------------------------

def index_layers(geometry: list[dict], recorded: list[str], requested: str | list[str] | None = None) -> list[str]:
    """The layers to build image indexes for, in model order.

    `geometry`: the model's layers as rows with "layer" and "kind" (the
    manifest's geometry, `LayerMap.describe()`); `recorded`: the atlas's conv
    layers. `requested` (comma string or list) is checked against them; by
    default: the deepest recorded conv layer, and the paper's fc7 (the fc
    layer below the logits) when the model has one.
    """
    order = [g["layer"] for g in geometry]
    fcs = [g["layer"] for g in geometry if g["kind"] == "fc"]
    names = [n.strip() for n in requested.split(",")] if isinstance(requested, str) else list(requested or [])
    names = [n for n in names if n]
    if not names:
        names = recorded[-1:] + fcs[-2:-1]
    indexable = list(recorded) + fcs
    for n in names:
        if n not in order:
            raise AtlasError(f"unknown layer '{n}': layers that can be indexed are {', '.join(indexable)}")
        if n not in indexable:
            raise AtlasError(f"layer '{n}' is not recorded in this atlas, so it has no activations to index "
                             f"(recorded: {', '.join(recorded)}; fully connected: {', '.join(fcs) or 'none'})")
    return sorted(set(names), key=order.index)


@dataclass
class MinerPlan:
    """What the build's ChunkMiner keeps for the indexes besides its statistics (see `plan_for_build`)."""

    layers: list[str]               # the image-index layers
    vectors: list[str]              # layers whose per-image vectors it keeps: fc always, conv without activations
    sample: np.ndarray | None       # image ids whose conv maxima it keeps for channel profiles (no activations)

    def config(self) -> dict[str, Any]:
        """For the build's resume check: chunk files hold what this plan asked for."""
        return {"layers": self.layers, "vectors": self.vectors,
                "sample": None if self.sample is None else int(len(self.sample))}


def plan_for_build(lmap, recorded: list[str], requested, activations: bool, n_images: int) -> MinerPlan:
    """The build's index plan; checks `requested` (--index-layers) before any image is read."""
    geometry = [la.to_row() for la in lmap.layers]
    layers = index_layers(geometry, recorded, requested)
    vectors = [n for n in layers if lmap.by_name[n].kind == "fc" or not activations]
    sample = None if activations else profile_rows(n_images, PROFILE_SAMPLE, PROFILE_SEED)
    return MinerPlan(layers, vectors, sample)


def layer_vectors(kind: str, act):
    """A batch's per-image vectors of one layer's output: a conv map's spatial maxima, an fc layer as FC_DTYPE."""
    import torch

    from .mining import spatial_max

    return spatial_max(act.float())[0] if kind == "conv" else act.to(getattr(torch, FC_DTYPE))


def vector_arrays(kept: dict[str, list]) -> dict[str, np.ndarray]:
    """{KEY.ids, KEY.x} arrays for a chunk's vec file from {KEY: [(ids, vectors), ...]} (tensors or arrays)."""
    out = {}
    for key, parts in kept.items():
        parts = [(np.asarray(i, np.int64), np.asarray(x)) for i, x in parts if len(i)]
        out[f"{key}.ids"] = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int64)
        out[f"{key}.x"] = np.concatenate([x for _, x in parts]) if parts else np.zeros((0, 0), np.float32)
    return out


class ChunkVectors:
    """What a build's ChunkMiner kept in WORK/vec-CCCCC.npz, in chunk order.

    Keys: "images.LAYER" (every readable image) and "sample.LAYER" (the
    profile sample). Chunk order is image order, whatever order the chunks
    were mined in (resumed, or by several ranks).
    """

    def __init__(self, work: Path, nchunks: int):
        self.files = [Path(work) / f"vec-{c:05d}.npz" for c in range(nchunks)]
        self.keys: set[str] = set()
        if self.files and self.files[0].is_file():
            with np.load(self.files[0]) as z:
                self.keys = {f.rsplit(".", 1)[0] for f in z.files}

    def has(self, key: str) -> bool:
        return key in self.keys

    def ids(self, key: str) -> np.ndarray:
        parts = []
        for f in self.files:
            with np.load(f) as z:
                parts.append(z[f"{key}.ids"])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def rows(self, key: str) -> "ChunkRows":
        """The key's vectors as a (n, d) array-like that reads chunk files only when rows are asked for."""
        return ChunkRows(self.files, key)


class ChunkRows:
    """Rows of one key across chunk files, read on indexing (`x[a:b]`, `x[int array]`).

    At a million images fc7's vectors are 8 GB (float16): the index build reads them a batch at a
    time instead of holding them all beside the index it fills.
    """

    def __init__(self, files: list[Path], key: str):
        self.files, self.key = [], f"{key}.x"
        counts, d, self.dtype = [], 0, np.dtype(np.float32)
        for f in files:
            with np.load(f) as z:
                n = len(z[f"{key}.ids"])
                if n:
                    self.files.append(f)
                    counts.append(n)
                    x = z[self.key]
                    d, self.dtype = x.shape[1], x.dtype
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), d)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for c in np.unique(which):
            sel = which == c
            with np.load(self.files[c]) as z:
                out[sel] = z[self.key][rows[sel] - self.starts[c]]
        return out


# -- vectors out of an atlas -----------------------------------------------------------------------------

def _geometry(a: AtlasReader, layer: str) -> dict[str, Any]:
    """The model layer's row of the manifest's geometry (kind, channels, ...)."""
    return next(g for g in a.manifest["geometry"]["layers"] if g["layer"] == layer)


def _channels_of(a: AtlasReader, layer: str) -> int:
    return int(_geometry(a, layer)["channels"])


def _table_vectors(a: AtlasReader, layer: str, image_ids: np.ndarray) -> np.ndarray:
    """(len(image_ids), C) float32: these images' rows of the layer's activations table, in image_ids order."""
    import pyarrow.parquet as pq

    count, C = int(a.manifest["dataset"]["count"]), _channels_of(a, layer)
    pos = np.full(count, -1, np.int64)
    pos[image_ids] = np.arange(len(image_ids))
    x = np.zeros((len(image_ids), C), np.float32)
    seen = np.zeros(len(image_ids), np.int64)
    for f in sorted((a.path / "activations" / f"layer={layer}").glob("*.parquet")):
        pf = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering keeps every row group read until close
        for batch in pf.iter_batches(batch_size=1 << 20, columns=["image_id", "channel", "value"]):
            ids, ch, v = (batch.column(i).to_numpy(zero_copy_only=False) for i in range(3))
            if not len(ids):
                continue
            if ids.min() < 0 or ids.max() >= count or ch.min() < 0 or ch.max() >= C:
                raise AtlasError(f"activations table {f} holds image ids or channels outside the atlas "
                                 f"(0..{count - 1}, 0..{C - 1})")
            p = pos[ids]
            sel = p >= 0
            x[p[sel], ch[sel]] = v[sel]
            seen += np.bincount(p[sel], minlength=len(image_ids))
    if len(seen) and (seen != C).any():
        bad = int(image_ids[np.flatnonzero(seen != C)[0]])
        raise AtlasError(f"the activations table of {layer} in atlas '{a.path}' lacks channels of image {bad}; "
                         "rebuild the atlas")
    return x


def _images_table(a: AtlasReader):
    """images.parquet's image_id, path, label and status (an Arrow table by image_id), read once per handle.

    Read directly, not through SQL: a query's paths are then a `take` (microseconds) instead of a scan of
    the images table (~5 ms at 200k images); and building needs no SQL connection.
    """
    import pyarrow.parquet as pq

    state = _STATE.setdefault(a, {})
    if "images" not in state:
        state["images"] = pq.read_table(a.path / "images.parquet",
                                        columns=["image_id", "path", "label", "status"]).sort_by("image_id")
    return state["images"]


def _dataset(a: AtlasReader, what: str):
    """The atlas's dataset, checked unchanged, for a forward pass that `what` needs."""
    root = a.manifest["dataset"]["root"]
    src = a.source
    if src is None:
        raise AtlasError(f"{what} needs a forward pass over the dataset, and the dataset at '{root}' is gone")
    if [r.path for r in src.records] != _images_table(a).column("path").to_pylist():
        raise AtlasError(f"{what} needs a forward pass over the dataset, and the dataset at '{root}' has "
                         "changed since the atlas was built")
    return src


def _forward_vectors(a: AtlasReader, src, names: list[str], image_ids: np.ndarray, *, keep: dict[str, np.ndarray],
                     device: str, workers: int | None, progress: bool | None) -> dict[str, np.ndarray]:
    """{layer: (len(keep[layer]), C)} per-image vectors of `names` for the images `keep[layer]` (sorted, a
    subset of `image_ids`), by one forward pass over `image_ids`.

    The images go through the build's own batches (`inputs.chunk_batches` at the atlas's recorded batch
    and chunk size, an image the build could not read as the build's zeros), each padded to the full
    batch size: then this pass computes the numbers the build computed, bit for bit on the same machine.
    Each layer keeps only its own images (a layer wanted for channel profiles only keeps the 4,096-image
    sample, not a vector per image), written in place into one array per layer: no list of parts and
    no concatenated copy of them (fc7 at 1M images is 8 GB).
    """
    import torch

    from .runner import Runner
    from .device import default_workers, resolve_device
    from .inputs import InputBatches, chunk_batches
    from .progress import Progress

    # The build's memory layout (channels-last on a GPU only) and its decoder, as well as its batches.
    runner = Runner(a, device, channels_last=resolve_device(device).type == "cuda")
    kinds = {n: runner.lmap.by_name[n].kind for n in names}
    options = a.manifest["options"]
    batch_size, chunk_size = int(options["batch_size"]), int(options["chunk_size"])
    inputs = InputBatches(src, a.preprocess, runner.device, options.get("decode", "cpu"),
                          workers if workers is not None else default_workers(runner.device))
    status = _images_table(a).column("status").to_numpy(zero_copy_only=False)
    unread = set(np.flatnonzero(status != "ok").tolist())  # zeros in the build's batches
    wanted = set(int(i) for i in image_ids)
    batches = []
    for _, ids in chunk_batches(len(status), chunk_size, batch_size):
        if wanted.intersection(ids):
            batches.append([i for i in ids if i in wanted or i in unread])
    out: dict[str, np.ndarray] = {}
    with Progress(len(image_ids), "index", "images", enabled=progress) as bar, torch.inference_mode():
        for x, ids, errs in inputs(batches):
            bad = [(int(i), e) for i, e in zip(ids, errs) if e and int(i) not in unread]
            if bad:
                raise AtlasError(f"image {bad[0][0]} ('{src.records[bad[0][0]].path}') cannot be read now "
                                 f"({bad[0][1]}), though it could when the atlas was built")
            ids = ids.numpy()
            zero = torch.from_numpy(np.isin(ids, list(unread)))
            if zero.any():
                x = torch.where(zero.to(x.device).view(-1, 1, 1, 1), 0.0, x)
            feats = runner.lmap.extract(runner.prepare(x), names, batch_size=batch_size)
            for n in names:
                mine = np.isin(ids, keep[n])
                if not mine.any():
                    continue
                v = layer_vectors(kinds[n], feats[n][torch.from_numpy(mine)]).cpu().numpy()
                if n not in out:
                    out[n] = np.zeros((len(keep[n]), v.shape[1]), v.dtype)
                out[n][np.searchsorted(keep[n], ids[mine])] = v
            bar.update(int(np.isin(ids, image_ids).sum()))
    return out


# -- building --------------------------------------------------------------------------------------------

def build_indexes(atlas, layers: str | list[str] | None = None, *, device: str = "auto",
                  workers: int | None = None, progress: bool | None = None, exact_max: int = EXACT_MAX,
                  chunks: ChunkVectors | None = None, locked: bool = False,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the atlas's similarity indexes under its writer lock (atlas/lock.py; `locked`: the caller,
    the build, holds it already): see _build_indexes."""
    from .lock import writer_lock

    path = atlas.path if isinstance(atlas, AtlasReader) else Path(atlas)
    with writer_lock(path, "an index build", enabled=not locked):
        if not locked:
            remove_temp_files(path / INDEX_DIR)  # what a killed `atlas index` was writing
        return _build_indexes(atlas, layers, device=device, workers=workers, progress=progress,
                              exact_max=exact_max, chunks=chunks, log=log)


def _build_indexes(atlas, layers: str | list[str] | None = None, *, device: str = "auto",
                   workers: int | None = None, progress: bool | None = None, exact_max: int = EXACT_MAX,
                   chunks: ChunkVectors | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the atlas's similarity indexes (replacing any) and record them in its manifest; returns that record.

    `layers`: the image-index layers (default: the deepest recorded conv layer
    and fc7 when the model has it); the channels index always covers every
    recorded conv layer. `exact_max`: above this many vectors the index is
    approximate (`atlas.index.choose_index`). `chunks`: the build's own
    vectors (see ChunkVectors). Each file is written atomically, the
    manifest last; index files of layers no longer indexed are removed.
    """
    t0 = time.perf_counter()
    log = log or (lambda s: None)
    a = _open(atlas)
    geometry = a.manifest["geometry"]["layers"]
    kinds = {g["layer"]: g["kind"] for g in geometry}
    order = [g["layer"] for g in geometry]
    recorded = a.layer_names
    names = index_layers(geometry, recorded, layers)
    fcs = [n for n in names if kinds[n] == "fc"]
    if fcs and not a.has_classifier:
        w = a.manifest["model"].get("weights")
        raise AtlasError(f"indexing {', '.join(fcs)} needs the model's classifier, and its weights file '{w}' is "
                         f"gone; index conv layers only (--layers {recorded[-1]})")
    images = _images_table(a)
    ok_ids = images.column("image_id").to_numpy()[images.column("status").to_numpy(zero_copy_only=False) == "ok"]
    ok_ids = ok_ids.astype(np.int64)
    if not len(ok_ids):
        raise AtlasError(f"atlas '{a.path}' has no readable images to index")
    sample_ids = np.intersect1d(profile_rows(int(a.manifest["dataset"]["count"]), PROFILE_SAMPLE, PROFILE_SEED),
                                ok_ids)
    if not len(sample_ids):
        raise AtlasError(f"no readable image among the {PROFILE_SAMPLE} sampled for channel profiles")

    def source(key: str, layer: str) -> str:
        if chunks is not None and chunks.has(f"{key}.{layer}"):
            return "build"
        return "activations" if kinds[layer] == "conv" and a.has_activations(layer) else "forward"

    src_images = {n: source("images", n) for n in names}
    src_sample = {n: source("sample", n) for n in recorded}
    fwd = list(dict.fromkeys([n for n in names if src_images[n] == "forward"] +
                             [n for n in recorded if src_sample[n] == "forward"]))
    forward: dict[str, np.ndarray] = {}
    fwd_ids = ok_ids if any(src_images[n] == "forward" for n in names) else sample_ids
    # the images each layer's forward vectors are kept for: all of them for an image index, else the sample
    fwd_keep = {n: ok_ids if n in names and src_images[n] == "forward" else sample_ids for n in fwd}
    if fwd:
        what = f"indexing {', '.join(fwd)}"
        src = _dataset(a, what)
        log(f"{what}: a forward pass over {len(fwd_ids)} images")
        forward = _forward_vectors(a, src, fwd, fwd_ids, keep=fwd_keep, device=device, workers=workers,
                                   progress=progress)

    def vectors(key: str, layer: str, ids: np.ndarray) -> np.ndarray:
        src = src_images[layer] if key == "images" else src_sample[layer]
        if src == "activations":
            return _table_vectors(a, layer, ids)
        if src == "forward":
            return forward[layer][np.searchsorted(fwd_keep[layer], ids)]
        if not np.array_equal(chunks.ids(f"{key}.{layer}"), ids):
            raise AtlasError(f"the build's {key} vectors of {layer} do not cover its readable images; "
                             f"{_hint(a)} afterwards")
        rows = chunks.rows(f"{key}.{layer}")
        return rows if key == "images" else rows[:]  # a profile sample is small: read it whole

    folder = a.path / INDEX_DIR
    record: dict[str, Any] = {"format": INDEX_FORMAT, "layers": names, "images": {}, "metric": "cosine"}
    sampled: dict[str, np.ndarray] = {}  # profile rows taken from vectors already read, not read twice
    for n in names:
        x = vectors("images", n, ok_ids)
        if n in recorded and src_sample[n] == src_images[n] and isinstance(x, np.ndarray):
            # (from a build's chunks the small "sample" key is cheaper than picking rows out of every chunk)
            sampled[n] = x[np.searchsorted(ok_ids, sample_ids)]
        spec = choose_index(len(ok_ids), x.shape[1], exact_max=exact_max)
        side = save_index(build_index(x, ok_ids, spec, seed=PROFILE_SEED), folder / f"images-{n}.faiss",
                          {"spec": spec, "seed": PROFILE_SEED, "ids": "image_id", "layer": n, "dtype": str(x.dtype)})
        record["images"][n] = {"file": f"{INDEX_DIR}/images-{n}.faiss", "layer": n, "source": src_images[n],
                               **{k: side[k] for k in ("dtype", "count", "dim", "spec", "bytes", "sha256")}}
        log(f"indexed {n}: {side['count']} images x {side['dim']} ({spec['factory']}, from {src_images[n]})")
    profiles, keys, layer_ids = [], [], {}
    for n in recorded:
        v = sampled.pop(n) if n in sampled else vectors("sample", n, sample_ids)
        p = channel_profiles(v, sample=len(sample_ids), seed=PROFILE_SEED)
        layer_ids[n] = order.index(n)
        profiles.append(p)
        keys.append(channel_keys(layer_ids[n], len(p)))
    prof, keys = np.concatenate(profiles), np.concatenate(keys)
    spec = choose_index(len(prof), prof.shape[1], exact_max=exact_max)
    side = save_index(build_index(prof, keys, spec, seed=PROFILE_SEED), folder / CHANNELS_FILE,
                      {"spec": spec, "seed": PROFILE_SEED, "ids": "channel_key", "layers": layer_ids,
                       "sample": {"images": int(len(sample_ids)), "of": PROFILE_SAMPLE, "seed": PROFILE_SEED}})
    record["channels"] = {"file": f"{INDEX_DIR}/{CHANNELS_FILE}", "layers": layer_ids, "sources": src_sample,
                          "sample": side["sample"], **{k: side[k] for k in ("count", "dim", "spec", "bytes", "sha256")}}
    log(f"indexed {side['count']} channels of {', '.join(recorded)} (profiles over {len(sample_ids)} images)")
    manifest = dict(a.manifest)
    manifest["index"] = record
    manifest["timings"] = {**manifest.get("timings", {}), "index_s": round(time.perf_counter() - t0, 3)}
    atomic_write_json(a.path / "manifest.json", manifest)
    a.manifest = manifest
    _STATE.setdefault(a, {}).pop("indexes", None)
    keep = {Path(r["file"]).name for r in record["images"].values()} | {CHANNELS_FILE}
    for f in folder.glob("*.faiss"):
        if f.name not in keep:  # a layer no longer indexed: its files would only mislead
            f.unlink(missing_ok=True)
            f.with_name(f.name + ".json").unlink(missing_ok=True)
    return record


def index_summary(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per index file of a manifest's "index" record: what `atlas index` prints."""
    rows = [{"index": "images", "layer": r["layer"], "vectors": r["count"], "dim": r["dim"],
             "type": r["spec"]["factory"], "source": r["source"], "file": r["file"]}
            for r in record["images"].values()]
    ch = record["channels"]
    rows.append({"index": "channels", "layer": ",".join(ch["layers"]), "vectors": ch["count"], "dim": ch["dim"],
                 "type": ch["spec"]["factory"], "source": ",".join(sorted(set(ch["sources"].values()))),
                 "file": ch["file"]})
    return rows


# -- loading ---------------------------------------------------------------------------------------------

def _record(a: AtlasReader) -> dict[str, Any]:
    rec = a.manifest.get("index")
    if not rec:
        raise AtlasError(f"atlas '{a.path}' has no similarity indexes; {_hint(a)} to build them")
    return rec


def _load(a: AtlasReader, info: dict[str, Any], what: str, dim: int):
    """(index, sidecar) of a manifest index entry, loaded once per handle and checked against the model."""
    cache = _STATE.setdefault(a, {}).setdefault("indexes", {})
    key = (info["file"], info["sha256"])
    if key not in cache:
        index, meta = load_index(a.path / info["file"])
        if index.d != dim:
            raise AtlasError(f"similarity index {info['file']} holds {index.d}-dimensional vectors but {what} has "
                             f"{dim}: it was not built for this atlas's model; {_hint(a)} to rebuild it")
        if meta.get("sha256") != info["sha256"]:
            raise AtlasError(f"similarity index {info['file']} is not the one the manifest describes; "
                             f"{_hint(a)} to rebuild it")
        cache[key] = (index, meta)
    return cache[key]


def _image_index(a: AtlasReader, layer: str | None):
    rec = _record(a)
    if layer is None:
        convs = [n for n in rec["images"] if _kind(a, n) == "conv"]
        layer = convs[-1] if convs else next(iter(rec["images"]))
    if layer not in rec["images"]:
        known = [g["layer"] for g in a.manifest["geometry"]["layers"]]
        indexed = ", ".join(rec["images"])
        if layer not in known:
            raise AtlasError(f"unknown layer '{layer}': indexed layers are {indexed}")
        raise AtlasError(f"layer {layer} has no image index in atlas '{a.path}' (indexed: {indexed}); "
                         f"run `atlas index {a.path} --layers {','.join([*rec['images'], layer])}`")
    index, _ = _load(a, rec["images"][layer], f"layer {layer} of {a.manifest['model']['name']}",
                     _channels_of(a, layer))
    return index, layer


def _kind(a: AtlasReader, layer: str) -> str:
    return _geometry(a, layer)["kind"]


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise AtlasError(f"k must be a whole number of at least 1 (got {k!r})")
    return int(k)


def _ranked(index, q: np.ndarray, k: int, drop: int | None = None, keep=None) -> list[tuple[float, int]]:
    """(score, id) best first, without `drop` and ids that `keep` (an array predicate) rejects."""
    if not np.any(q):
        return []
    n = index.ntotal if keep is not None else k + (drop is not None)
    scores, ids = search(index, q, n)
    s, i = scores[0], ids[0]
    ok = (i >= 0) & (i != (-1 if drop is None else drop))
    if keep is not None:
        ok &= keep(i)
    return [(float(a), int(b)) for a, b in zip(s[ok], i[ok])][:k]


# -- queries ---------------------------------------------------------------------------------------------

def _image_pairs(a: AtlasReader, image_id=None, image=None, layer: str | None = None, k: int = 10):
    if (image_id is None) == (image is None):
        raise AtlasError("give exactly one of an image id (an image of the atlas) and an image file")
    k = _check_k(k)
    index, layer = _image_index(a, layer)
    if image_id is not None:
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise AtlasError(f"image id {image_id!r} is not a whole number")
        try:
            q = reconstruct(index, [int(image_id)])
        except AtlasError:
            n = int(a.manifest["dataset"]["count"])
            why = "it is unreadable, and unreadable images are not indexed" if 0 <= image_id < n else \
                f"the atlas's image ids are 0..{n - 1}"
            raise AtlasError(f"image id {image_id} is not in the {layer} index of atlas '{a.path}': {why}") from None
    else:
        q = _embed(a, image, layer)
    return _ranked(index, q, k), layer


def _embed(a: AtlasReader, image, layer: str) -> np.ndarray:
    """The query vector of any image file at `layer`: the atlas's preprocessing, then its model."""
    import torch

    from .data import read_image_file

    x = a.preprocess.to_tensor(a.preprocess.crop_image(read_image_file(image)))  # AtlasError: missing, unreadable
    kind = _kind(a, layer)
    if kind == "fc" and not a.has_classifier:
        raise AtlasError(f"a query at {layer} needs the model's classifier, and its weights file "
                         f"'{a.manifest['model'].get('weights')}' is gone; query a conv layer (--layer)")
    with torch.inference_mode():
        act = a.lmap.extract(x[None], [layer])[layer]
    return layer_vectors(kind, act).float().numpy()


def similar_images(atlas, image_id: int | None = None, image: str | Path | None = None, layer: str | None = None,
                   k: int = 10) -> list[dict[str, Any]]:
    """The k images most like one image of the atlas (`image_id`) or any image file (`image`), at `layer`.

    Cosine similarity of the layer's image vectors (default: the deepest
    indexed conv layer). A file is cropped and normalised the atlas's way and
    run through its model. Rows: rank (from 0), image_id, path, label, score.
    """
    a = _open(atlas)
    pairs, _ = _image_pairs(a, image_id, image, layer, k)
    table = _images_table(a)
    at = np.searchsorted(table.column("image_id").to_numpy(), [i for _, i in pairs]).astype(np.int64)
    info = table.take(at).select(["path", "label"]).to_pylist()
    return [{"rank": r, "image_id": i, **info[r], "score": s} for r, (s, i) in enumerate(pairs)]


def parse_channel(channel) -> tuple[str, int]:
    """("conv5", 17) from "conv5:17" or ("conv5", 17)."""
    if isinstance(channel, (tuple, list)) and len(channel) == 2:
        layer, c = channel
    else:
        layer, _, c = str(channel).rpartition(":")
    try:
        c = int(c)
    except (TypeError, ValueError):
        c = None
    if not layer or c is None:
        raise AtlasError(f"channel '{channel}' is not LAYER:CHANNEL (e.g. conv5:17)")
    return str(layer), c


def _channel_pairs(a: AtlasReader, channel, k: int = 10, layer: str | None = None):
    name, c = parse_channel(channel)
    k = _check_k(k)
    a.check_channel(name, c)
    if layer is not None:
        a.check_layer(layer)
    rec = _record(a)["channels"]
    index, _ = _load(a, rec, "the channel profiles", int(rec["dim"]))
    if name not in rec["layers"] or (layer is not None and layer not in rec["layers"]):
        raise AtlasError(f"the channels index of atlas '{a.path}' lacks a recorded layer; {_hint(a)} to rebuild it")
    key = int(channel_keys(rec["layers"][name], [c])[0])
    keep = None if layer is None else (lambda ids: split_channel_keys(ids)[0] == rec["layers"][layer])
    pairs = _ranked(index, reconstruct(index, [key]), k, drop=key, keep=keep)
    names = {v: n for n, v in rec["layers"].items()}
    li, ch = split_channel_keys(np.array([i for _, i in pairs], np.int64))
    return [(s, names[int(la)], int(cc)) for (s, _), la, cc in zip(pairs, li, ch)]


def similar_channels(atlas, channel, k: int = 10, layer: str | None = None) -> list[dict[str, Any]]:
    """The k channels whose responses over the dataset are most like `channel` ("conv5:17" or (layer, channel)).

    Channels of every recorded conv layer, or of `layer` only; the channel
    itself is left out. The score is the Pearson correlation of the two
    channels' per-image maxima over the profile sample (see
    atlas.index.channel_profiles). Rows: rank (from 0), layer, channel, score.
    """
    a = _open(atlas)
    return [{"rank": r, "layer": la, "channel": c, "score": s}
            for r, (s, la, c) in enumerate(_channel_pairs(a, channel, k, layer))]


# -- SQL -------------------------------------------------------------------------------------------------

SQL_MACROS = """
CREATE OR REPLACE MACRO similar_images(image_id, k := 10, layer := NULL) AS TABLE
SELECT unnest(_atlas_similar_images(image_id, k, layer), recursive := true);
CREATE OR REPLACE MACRO similar_channels(layer, channel, k := 10, of_layer := NULL) AS TABLE
SELECT unnest(_atlas_similar_channels(layer, channel, k, of_layer), recursive := true);
"""


def register_sql(atlas) -> None:
    """Give the atlas's DuckDB connection the table macros similar_images and similar_channels.

        SELECT * FROM similar_images(42, 10) JOIN images USING (image_id)      -- rank, image_id, score
        SELECT * FROM similar_images(42, layer := 'fc7')
        SELECT * FROM similar_channels('conv5', 17, 10) JOIN channels USING (layer, channel)

    AtlasReader.sql registers them (once) on the first query that calls them: a Python
    UDF's registration imports numpy (~60 ms), which plain SQL need not pay.
    The UDFs read the indexes only (no SQL of their own), loaded on first call.
    """
    a = _open(atlas)
    _record(a)  # no indexes: say so now, in one line, rather than from inside a query
    # A weak reference: the connection is the atlas's, and DuckDB's C++ side hides a cycle from the collector.
    ref, path, spare = weakref.ref(a), a.path, []

    def current() -> AtlasReader:  # a relation can outlive its AtlasReader (`atlas sql`): then a fresh reader of the folder
        got = ref()
        if got is None:
            spare[:] = spare or [AtlasReader(path)]
            got = spare[0]
        return got

    def images(image_id, k, layer):
        if image_id is None:
            return []
        pairs, _ = _image_pairs(current(), int(image_id), None, layer, 10 if k is None else k)
        return [{"rank": r, "image_id": i, "score": s} for r, (s, i) in enumerate(pairs)]

    def channels(layer, channel, k, of_layer):
        if layer is None or channel is None:
            return []
        pairs = _channel_pairs(current(), (layer, channel), 10 if k is None else k, of_layer)
        return [{"rank": r, "layer": la, "channel": c, "score": s} for r, (s, la, c) in enumerate(pairs)]

    con = a.con
    con.create_function("_atlas_similar_images", images, ["BIGINT", "BIGINT", "VARCHAR"],
                        "STRUCT(rank INTEGER, image_id INTEGER, score FLOAT)[]", null_handling="special",
                        side_effects=True)
    con.create_function("_atlas_similar_channels", channels, ["VARCHAR", "BIGINT", "BIGINT", "VARCHAR"],
                        "STRUCT(rank INTEGER, layer VARCHAR, channel INTEGER, score FLOAT)[]",
                        null_handling="special", side_effects=True)
    con.execute(SQL_MACROS)
