"""Building an atlas's similarity indexes, by the build (`atlas.build`) or afterwards (`atlas index`).

    ATLAS/index/images-LAYER.faiss (+ .json)  one vector per readable image: a conv layer's per-channel
                                              spatial maxima, or an fc layer's output (kept as float16)
    ATLAS/index/channels.faiss     (+ .json)  one vector per channel of every recorded conv layer: its profile
    manifest.json "index"                     what was built: layers, where the vectors came from, specs, dims

The algorithms (index choice, cosine search, channel profiles) are in `atlas.search.faiss_index`; this module is the
plumbing around them. It sits below the queries (`atlas.search.similarity`), so that the build imports it
without them; the queries take from it the few readers both sides share and the per-handle state,
which lives here because a build replaces the indexes a handle may have loaded.

Where vectors come from, cheapest first:
* `ChunkVectors`: what a running build's ChunkMiner kept per chunk (fc layers,
  which the build records nowhere else; conv layers of a --no-activations build);
* the activations table (conv layers): no forward pass;
* a forward pass over the dataset (`atlas index` on fc layers, or on an atlas
  built with --no-activations): it needs the dataset where the build found it.

Channel profiles are read on one fixed sample of image ids,
`profile_rows(images, PROFILE_SAMPLE, PROFILE_SEED)` less the unreadable ones:
the same images for every layer, so that channels of different layers compare.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import AtlasError
from ..util.files import atomic_write_json, remove_temp_files
from .faiss_index import EXACT_MAX, INDEX_FORMAT, build_index, channel_keys, channel_profiles, choose_index, profile_rows, save_index
from ..store import AtlasReader

INDEX_DIR = "index"
CHANNELS_FILE = "channels.faiss"
PROFILE_SAMPLE = 4096   # images a channel profile is read on (correlation standard error ~0.016)
PROFILE_SEED = 0
FC_DTYPE = "float16"    # fc vectors are kept at half the bytes, whichever of the build or `atlas index` computes them

# Per handle: its images table, and the indexes its queries loaded (atlas.search.similarity), which a build drops.
_STATE: "weakref.WeakKeyDictionary[AtlasReader, dict]" = weakref.WeakKeyDictionary()


def reader(atlas) -> AtlasReader:
    """The AtlasReader of a folder, or the handle itself."""
    return atlas if isinstance(atlas, AtlasReader) else AtlasReader(atlas)


def rebuild_hint(a: AtlasReader) -> str:
    return f"run `atlas index {a.path}`"


def layer_geometry(a: AtlasReader, layer: str) -> dict[str, Any]:
    """The model layer's row of the manifest's geometry (kind, channels, ...)."""
    return next(g for g in a.manifest["geometry"]["layers"] if g["layer"] == layer)


def layer_channels(a: AtlasReader, layer: str) -> int:
    return int(layer_geometry(a, layer)["channels"])


def images_table(a: AtlasReader):
    """images.parquet's image_id, path, label, status and content_hash where the build recorded it (an Arrow
    table by image_id), read once per handle.

    Read directly, not through SQL: a query's paths are then a `take` (microseconds) instead of a scan of
    the images table; and building needs no SQL connection.
    """
    import pyarrow.parquet as pq

    state = _STATE.setdefault(a, {})
    if "images" not in state:
        with a.reading("images.parquet"):
            names = pq.read_schema(a._inside("images.parquet")).names
            columns = ["image_id", "path", "label", "status"] + [c for c in ("content_hash",) if c in names]
            state["images"] = pq.read_table(a._inside("images.parquet"), columns=columns).sort_by("image_id")
    return state["images"]


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

    from ..mining import spatial_max

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

def _batches_of(f: Path):
    """An activations file's record batches of (image_id, channel, value), about 1M rows each."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering keeps every row group read until close
    yield from pf.iter_batches(batch_size=1 << 20, columns=["image_id", "channel", "value"])


def _table_vectors(a: AtlasReader, layer: str, image_ids: np.ndarray) -> np.ndarray:
    """(len(image_ids), C) float32: these images' rows of the layer's activations table, in image_ids order."""
    count, C = int(a.manifest["dataset"]["count"]), layer_channels(a, layer)
    pos = np.full(count, -1, np.int64)
    pos[image_ids] = np.arange(len(image_ids))
    x = np.zeros((len(image_ids), C), np.float32)
    seen = np.zeros(len(image_ids), np.int64)
    for f in sorted((a.path / "activations" / f"layer={layer}").glob("*.parquet")):
        with a.reading(str(f.relative_to(a.path))):
            for batch in _batches_of(f):
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


def _dataset(a: AtlasReader, what: str):
    """The atlas's dataset, checked unchanged, for a forward pass that `what` needs."""
    root = a.manifest["dataset"]["root"]
    src = a.source
    if src is None:
        raise AtlasError(f"{what} needs a forward pass over the dataset, and the dataset at '{root}' is gone")
    if [r.path for r in src.records] != images_table(a).column("path").to_pylist():
        raise AtlasError(f"{what} needs a forward pass over the dataset, and the dataset at '{root}' has "
                         "changed since the atlas was built")
    return src


def _forward_vectors(a: AtlasReader, src, names: list[str], image_ids: np.ndarray, *, keep: dict[str, np.ndarray],
                     device: str, workers: int | None, progress: bool | None) -> dict[str, np.ndarray]:
    """{layer: (len(keep[layer]), C)} per-image vectors of `names` for the images `keep[layer]` (sorted, a
    subset of `image_ids`), by one forward pass over `image_ids`.

    The images go through the build's own batches (`inputs.chunk_batches` at the atlas's recorded batch
    and chunk size and precision, an image the build could not read as the build's zeros), each padded to
    the full batch size: then this pass computes the numbers the build computed, bit for bit on the same
    machine. A pass over a sample only keeps the sampled images of each batch (same shape, other rows:
    tests/test_build_determinism.py checks that this too gives the build's files).
    Each layer keeps only its own images (a layer wanted for channel profiles only keeps the 4,096-image
    sample, not a vector per image), written in place into one array per layer: no list of parts and
    no concatenated copy of them (fc7 at 1M images is 8 GB).
    """
    import torch

    from ..net.runner import Runner
    from ..util.device import input_workers, recorded_memory_format
    from ..data.inputs import InputBatches, chunk_batches
    from ..util.progress import Progress

    # The build's memory layout and its decoder, as well as its batches.
    options = a.manifest["options"]
    runner = Runner(a, device, channels_last=recorded_memory_format(options) == "channels_last")
    kinds = {n: runner.lmap.by_name[n].kind for n in names}
    batch_size, chunk_size = int(options["batch_size"]), int(options["chunk_size"])
    bf16 = options.get("precision") == "bf16"
    inputs = InputBatches(src, a.preprocess, runner.device, options.get("decode", "cpu"),
                          workers if workers is not None else input_workers(runner.device),
                          channels_last=runner.channels_last)
    table = images_table(a)
    status = table.column("status").to_numpy(zero_copy_only=False)
    hashes = table.column("content_hash").to_pylist() if "content_hash" in table.column_names else None
    # per image id, looked up per batch in O(batch) (np.isin against a million ids would sort them each time)
    unread = status != "ok"  # zeros in the build's batches
    wanted = np.zeros(len(status), bool)
    wanted[image_ids] = True
    kept = {}
    for n in names:
        kept[n] = np.zeros(len(status), bool)
        kept[n][keep[n]] = True
    batches = []
    for _, ids in chunk_batches(len(status), chunk_size, batch_size):
        if wanted[ids].any():
            batches.append([i for i in ids if wanted[i] or unread[i]])
    out: dict[str, np.ndarray] = {}
    with Progress(len(image_ids), "index", "images", enabled=progress) as bar, torch.inference_mode():
        for x, ids, errs, digests in inputs(batches):
            bad = [(int(i), e) for i, e in zip(ids, errs) if e and not unread[int(i)]]
            if bad:
                raise AtlasError(f"image {bad[0][0]} ('{src.records[bad[0][0]].path}') cannot be read now "
                                 f"({bad[0][1]}), though it could when the atlas was built")
            changed = [int(i) for i, d in zip(ids, digests) if hashes and hashes[int(i)] and d != hashes[int(i)]]
            if changed:
                raise AtlasError(f"image {changed[0]} ('{src.records[changed[0]].path}') has changed since the atlas "
                                 "was built (its content hash differs): rebuild the atlas")
            ids = ids.numpy()
            zero = torch.from_numpy(unread[ids])
            if zero.any():
                x = torch.where(zero.to(x.device).view(-1, 1, 1, 1), 0.0, x)
            with inputs.computing(), torch.autocast(runner.device.type, torch.bfloat16, enabled=bf16):  # as built
                feats = runner.lmap.extract(runner.prepare(x), names, batch_size=batch_size)
            for n in names:
                mine = kept[n][ids]
                if not mine.any():
                    continue
                v = layer_vectors(kinds[n], feats[n][torch.from_numpy(mine)]).cpu().numpy()
                if n not in out:
                    out[n] = np.zeros((len(keep[n]), v.shape[1]), v.dtype)
                out[n][np.searchsorted(keep[n], ids[mine])] = v
            bar.update(int(wanted[ids].sum()))
    return out


# -- building --------------------------------------------------------------------------------------------

def build_indexes(atlas, layers: str | list[str] | None = None, *, device: str = "auto",
                  workers: int | None = None, progress: bool | None = None, exact_max: int = EXACT_MAX,
                  chunks: ChunkVectors | None = None, locked: bool = False,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the atlas's similarity indexes under its writer lock (atlas/util/lock.py; `locked`: the caller,
    the build, holds it already): see _build_indexes."""
    from ..util.lock import writer_lock

    path = atlas.path if isinstance(atlas, AtlasReader) else Path(atlas)
    with writer_lock(path, "an index build", enabled=not locked):
        if not locked:
            # what a killed `atlas index` was writing: its index files, and the manifest it rewrites last
            remove_temp_files(path / INDEX_DIR)
            remove_temp_files(path, names={"manifest.json"}, recursive=False)
        return _build_indexes(atlas, layers, device=device, workers=workers, progress=progress,
                              exact_max=exact_max, chunks=chunks, log=log)


def _build_indexes(atlas, layers: str | list[str] | None = None, *, device: str = "auto",
                   workers: int | None = None, progress: bool | None = None, exact_max: int = EXACT_MAX,
                   chunks: ChunkVectors | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the atlas's similarity indexes (replacing any) and record them in its manifest; returns that record.

    `layers`: the image-index layers (default: the deepest recorded conv layer
    and fc7 when the model has it); the channels index always covers every
    recorded conv layer. `exact_max`: above this many vectors the index is
    approximate (`atlas.search.faiss_index.choose_index`). `chunks`: the build's own
    vectors (see ChunkVectors). Each file is written atomically, the
    manifest last; index files of layers no longer indexed are removed.
    """
    t0 = time.perf_counter()
    log = log or (lambda s: None)
    a = reader(atlas)
    # the build's own vectors (chunks) came from the classifier it ran: nothing to check, no model to load
    names = _layers_to_index(a, layers, check_classifier=chunks is None)
    ok_ids, sample_ids = _readable_images(a)
    vectors = _Vectors.plan(a, names, chunks)
    vectors.run_forward_pass(ok_ids, sample_ids, device=device, workers=workers, progress=progress, log=log)
    images, sampled = _write_image_indexes(a, vectors, ok_ids, sample_ids, exact_max, log)
    record: dict[str, Any] = {"format": INDEX_FORMAT, "layers": names, "images": images, "metric": "cosine",
                              "channels": _write_channels_index(a, vectors, sampled, sample_ids, exact_max, log)}
    _publish(a, record, time.perf_counter() - t0)
    return record


def _layers_to_index(a: AtlasReader, requested, check_classifier: bool = True) -> list[str]:
    """The image-index layers (`index_layers`), refused when an fc layer among them has no classifier to run."""
    names = index_layers(a.manifest["geometry"]["layers"], a.layer_names, requested)
    fcs = [n for n in names if layer_geometry(a, n)["kind"] == "fc"]
    if fcs and check_classifier and not a.has_classifier:
        w = a.manifest["model"].get("weights")
        raise AtlasError(f"indexing {', '.join(fcs)} needs the model's classifier, and its weights file '{w}' is "
                         f"gone or changed since the build; index conv layers only (--layers {a.layer_names[-1]})")
    return names


def _readable_images(a: AtlasReader) -> tuple[np.ndarray, np.ndarray]:
    """(the readable images' ids, those of them in the channel-profile sample), both sorted."""
    images = images_table(a)
    ok_ids = images.column("image_id").to_numpy()[images.column("status").to_numpy(zero_copy_only=False) == "ok"]
    ok_ids = ok_ids.astype(np.int64)
    if not len(ok_ids):
        raise AtlasError(f"atlas '{a.path}' has no readable images to index")
    sample_ids = np.intersect1d(profile_rows(int(a.manifest["dataset"]["count"]), PROFILE_SAMPLE, PROFILE_SEED),
                                ok_ids)
    if not len(sample_ids):
        raise AtlasError(f"no readable image among the {PROFILE_SAMPLE} sampled for channel profiles")
    return ok_ids, sample_ids


@dataclass
class _Vectors:
    """Where one index build reads each layer's vectors ("build", "activations" or "forward"), and the
    forward pass's vectors once it has run: one pass for every layer that needs one."""

    a: AtlasReader
    chunks: ChunkVectors | None
    images: dict[str, str]      # image-index layer -> the source of its vectors
    sample: dict[str, str]      # recorded conv layer -> the source of its profile sample's vectors
    forward: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> its forward-pass vectors
    kept: dict[str, np.ndarray] = field(default_factory=dict)     # layer -> the image ids of those rows

    @classmethod
    def plan(cls, a: AtlasReader, names: list[str], chunks: ChunkVectors | None) -> "_Vectors":
        def source(key: str, layer: str) -> str:
            if chunks is not None and chunks.has(f"{key}.{layer}"):
                return "build"
            return "activations" if layer_geometry(a, layer)["kind"] == "conv" and a.has_activations(layer) \
                else "forward"

        return cls(a, chunks, {n: source("images", n) for n in names},
                   {n: source("sample", n) for n in a.layer_names})

    def run_forward_pass(self, ok_ids: np.ndarray, sample_ids: np.ndarray, *, device: str, workers: int | None,
                         progress: bool | None, log: Callable[[str], None]) -> None:
        fwd = list(dict.fromkeys([n for n, s in self.images.items() if s == "forward"] +
                                 [n for n, s in self.sample.items() if s == "forward"]))
        fwd_ids = ok_ids if "forward" in self.images.values() else sample_ids
        # the images each layer's forward vectors are kept for: all of them for an image index, else the sample
        self.kept = {n: ok_ids if self.images.get(n) == "forward" else sample_ids for n in fwd}
        if fwd:
            what = f"indexing {', '.join(fwd)}"
            src = _dataset(self.a, what)
            log(f"{what}: a forward pass over {len(fwd_ids)} images")
            self.forward = _forward_vectors(self.a, src, fwd, fwd_ids, keep=self.kept, device=device,
                                            workers=workers, progress=progress)

    def read(self, key: str, layer: str, ids: np.ndarray) -> np.ndarray:
        """The vectors of `ids` ("images": every readable image; "sample": the profile sample) at `layer`."""
        src = self.images[layer] if key == "images" else self.sample[layer]
        if src == "activations":
            return _table_vectors(self.a, layer, ids)
        if src == "forward":
            return self.forward[layer][np.searchsorted(self.kept[layer], ids)]
        if not np.array_equal(self.chunks.ids(f"{key}.{layer}"), ids):
            raise AtlasError(f"the build's {key} vectors of {layer} do not cover its readable images; "
                             f"{rebuild_hint(self.a)} afterwards")
        rows = self.chunks.rows(f"{key}.{layer}")
        return rows if key == "images" else rows[:]  # a profile sample is small: read it whole


def _write_image_indexes(a: AtlasReader, vectors: _Vectors, ok_ids: np.ndarray, sample_ids: np.ndarray,
                         exact_max: int, log: Callable[[str], None]) -> tuple[dict, dict[str, np.ndarray]]:
    """Write each image index; returns ({layer: its manifest entry}, {layer: the profile sample's rows of
    the vectors it read}): profile rows taken from vectors already read are not read twice."""
    entries, sampled = {}, {}
    for n in vectors.images:
        x = vectors.read("images", n, ok_ids)
        if n in vectors.sample and vectors.sample[n] == vectors.images[n] and isinstance(x, np.ndarray):
            # (from a build's chunks the small "sample" key is cheaper than picking rows out of every chunk)
            sampled[n] = x[np.searchsorted(ok_ids, sample_ids)]
        spec, file = choose_index(len(ok_ids), x.shape[1], exact_max=exact_max), f"{INDEX_DIR}/images-{n}.faiss"
        side = save_index(build_index(x, ok_ids, spec, seed=PROFILE_SEED), a.path / file,
                          {"spec": spec, "seed": PROFILE_SEED, "ids": "image_id", "layer": n, "dtype": str(x.dtype)})
        entries[n] = {"file": file, "layer": n, "source": vectors.images[n],
                      **{k: side[k] for k in ("dtype", "count", "dim", "spec", "bytes", "sha256")}}
        log(f"indexed {n}: {side['count']} images x {side['dim']} ({spec['factory']}, from {vectors.images[n]})")
    return entries, sampled


def _write_channels_index(a: AtlasReader, vectors: _Vectors, sampled: dict[str, np.ndarray],
                          sample_ids: np.ndarray, exact_max: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Write the channels index over every recorded conv layer's profiles; returns its manifest entry."""
    order = [g["layer"] for g in a.manifest["geometry"]["layers"]]
    profiles, keys, layer_ids = [], [], {}
    for n in vectors.sample:
        v = sampled.pop(n) if n in sampled else vectors.read("sample", n, sample_ids)
        p = channel_profiles(v, sample=len(sample_ids), seed=PROFILE_SEED)
        layer_ids[n] = order.index(n)
        profiles.append(p)
        keys.append(channel_keys(layer_ids[n], len(p)))
    prof, keys = np.concatenate(profiles), np.concatenate(keys)
    spec = choose_index(len(prof), prof.shape[1], exact_max=exact_max)
    side = save_index(build_index(prof, keys, spec, seed=PROFILE_SEED), a.path / INDEX_DIR / CHANNELS_FILE,
                      {"spec": spec, "seed": PROFILE_SEED, "ids": "channel_key", "layers": layer_ids,
                       "sample": {"images": int(len(sample_ids)), "of": PROFILE_SAMPLE, "seed": PROFILE_SEED}})
    log(f"indexed {side['count']} channels of {', '.join(vectors.sample)} (profiles over {len(sample_ids)} images)")
    return {"file": f"{INDEX_DIR}/{CHANNELS_FILE}", "layers": layer_ids, "sources": vectors.sample,
            "sample": side["sample"], **{k: side[k] for k in ("count", "dim", "spec", "bytes", "sha256")}}


def _publish(a: AtlasReader, record: dict[str, Any], seconds: float) -> None:
    """Record the indexes in the manifest (written last), drop the handle's loaded ones, and remove the
    files of layers no longer indexed: they would only mislead."""
    manifest = dict(a.manifest)
    manifest["index"] = record
    manifest["timings"] = {**manifest.get("timings", {}), "index_s": round(seconds, 3)}
    atomic_write_json(a.path / "manifest.json", manifest)
    a.manifest = manifest
    _STATE.setdefault(a, {}).pop("indexes", None)
    keep = {Path(r["file"]).name for r in record["images"].values()} | {CHANNELS_FILE}
    for f in (a.path / INDEX_DIR).glob("*.faiss"):
        if f.name not in keep:
            f.unlink(missing_ok=True)
            f.with_name(f.name + ".json").unlink(missing_ok=True)


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
