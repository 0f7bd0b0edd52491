"""Cosine similarity search over an atlas's vectors (FAISS), on numpy arrays and files.

Two kinds of vectors get indexed:

* images: one row per image, the spatial maxima of a layer's channels
  (`activations/layer=L`), ids = `image_id`: "images that excite this layer
  like that one";
* channels: one row per channel, its `channel_profiles` over the dataset,
  ids = `channel_keys(layer_index, channels)`: "channels, of any layer, that
  respond to the same images as this one".

Similarity is always cosine: vectors are L2-normalised on the way in (both at
build and at query time) and searched by inner product. Scores are therefore
in [-1, 1]; an all-zero vector (an image no channel fires on, a dead channel)
stays zero and scores 0 against everything.

    spec = choose_index(len(x), x.shape[1])        # a JSON-able dict
    index = build_index(x, image_ids, spec, seed=0)
    save_index(index, ATLAS / "index/conv5.faiss", {"spec": spec, "seed": 0, "ids": "image_id"})
    ...
    index, meta = load_index(ATLAS / "index/conv5.faiss")  # AtlasError if missing: run `atlas index ATLAS`
    scores, ids = search(index, queries, k=10)     # (q, k) float32, (q, k) int64

Index choice (`choose_index`): up to `EXACT_MAX` (100k) vectors an exact
`IndexIDMap(IndexFlatIP)`; above, `IndexIVFScalarQuantizer` with fp16 codes
("IVF{nlist},SQfp16", nlist ~ sqrt(n) rounded to a power of two, nprobe =
max(32, nlist/32), spherical k-means on 64 vectors per list). Why that one:
it meets the recall bar (0.95 at k = 10) at half Flat's bytes, where SQ8
comes too near the bar, PQ far below it, and HNSW builds too slowly on 2
cores and not reproducibly when multithreaded. The figures behind this
(recall, latency, size, build time of each alternative) are
scripts/bench_index.py's, in the README.

Everything is deterministic: the training sample is drawn from a seeded
generator, the k-means uses the same seed (`ClusteringParameters.seed`), and
vectors are added in input order, so the same inputs give byte-identical
index files (tests/test_search_faiss_index.py checks this, with 1 and 2 threads).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AtlasError
from ..util.files import atomic_write, atomic_write_json

EXACT_MAX = 100_000          # above this many vectors, choose_index picks the approximate index
INDEX_FORMAT = 1             # bumped when the sidecar's meaning changes
BUILD_HINT = "run `atlas index ATLAS` to build it"
_TRAIN_PER_LIST = 64         # k-means training points per inverted list
_KMEANS_ITERS = 20
_CHANNEL_BITS = 32           # channel_key: layer_index << 32 | channel
_ADD_BATCH = 65_536          # vectors normalised and added at a time, at most
_ADD_BYTES = 128 << 20       # and at most this much float32 per batch (fc7: 8,192 vectors of 4096)
SMALL_BATCH = 4              # search() runs batches up to this many queries on one thread


def _faiss():
    import faiss  # imported lazily: most atlas commands never need it

    return faiss


# -- choosing and building ---------------------------------------------------------------------------

def choose_index(n: int, dim: int, *, exact_max: int = EXACT_MAX) -> dict[str, Any]:
    """The index spec for `n` vectors of `dim` dimensions: a JSON-able dict for the manifest.

    `{"kind": "flat", ...}` (exact) when n <= exact_max, else
    `{"kind": "ivf", "nlist", "nprobe", "encoding": "SQfp16", "train_size", "niter", ...}`.
    Pass exact_max=0 to force the approximate index (tests, benchmarks).
    """
    if n < 0 or dim <= 0:
        raise ValueError(f"choose_index: need n >= 0 and dim > 0, got n={n}, dim={dim}")
    base = {"metric": "cosine", "dim": int(dim), "n": int(n)}
    if n <= exact_max:
        return {"kind": "flat", "factory": "IDMap,Flat", **base}
    nlist = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))
    nlist = int(min(max(nlist, 16), 65536, max(n // 39, 1)))  # faiss wants >= 39 training points a list
    nprobe = int(min(nlist, max(32, nlist // 32)))
    return {"kind": "ivf", "factory": f"IVF{nlist},SQfp16", **base, "nlist": nlist, "nprobe": nprobe,
            "encoding": "SQfp16", "train_size": int(min(n, _TRAIN_PER_LIST * nlist)), "niter": _KMEANS_ITERS}


def normalize(vectors: np.ndarray) -> np.ndarray:
    """A float32, C-contiguous, L2-normalised copy of `vectors` (n, d); zero rows stay zero."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array (n, d), got shape {x.shape}")
    if x.size:
        _faiss().normalize_L2(x)
    return x


def build_index(vectors: np.ndarray, ids: np.ndarray, spec: dict | None = None, seed: int = 0):
    """A faiss index over the L2-normalised `vectors` (n, d), searchable by cosine, returning `ids`.

    `vectors`: an array, or an array-like with `shape` whose `x[a:b]` and `x[rows]` give arrays.

    `ids` (n,) int64 are what `search` returns (image ids, channel keys, ...);
    they need not be contiguous but must be unique and >= 0. `spec` defaults to
    `choose_index(n, d)`. Training (IVF) uses a seeded sample and seeded
    k-means, so the same inputs and seed give the same index bytes.
    """
    faiss = _faiss()
    # an array-like (indexing.ChunkRows) reads rows when indexed: only the training sample and one
    # batch at a time are then in memory beside the index
    x = vectors if hasattr(vectors, "shape") and hasattr(vectors, "__getitem__") else np.asarray(vectors)
    if len(x.shape) != 2:
        raise ValueError(f"build_index: expected vectors of shape (n, d), got {x.shape}")
    n, d = x.shape
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != (n,):
        raise ValueError(f"build_index: {n} vectors but ids of shape {ids.shape}")
    if n and ids.min() < 0:
        raise ValueError("build_index: ids must be >= 0 (-1 means 'no result' in a search)")
    if len(np.unique(ids)) != n:
        raise ValueError("build_index: ids must be unique, or results could not be mapped back")
    spec = choose_index(n, d) if spec is None else spec
    if spec.get("dim", d) != d:
        raise ValueError(f"build_index: spec is for {spec['dim']} dimensions, vectors have {d}")
    kind = spec.get("kind")
    if kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(d))
    elif kind == "ivf":
        nlist = int(spec["nlist"])
        if n < nlist:
            raise AtlasError(f"cannot train {nlist} lists on {n} vectors; use an exact index for so few")
        if spec.get("encoding", "SQfp16") != "SQfp16":
            raise ValueError(f"build_index: unknown encoding {spec.get('encoding')!r}")
        index = faiss.index_factory(d, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
        cp = faiss.extract_index_ivf(index).cp
        cp.seed = int(seed)
        cp.niter = int(spec.get("niter", _KMEANS_ITERS))
        cp.spherical = True       # centroids on the unit sphere, like the data
        cp.max_points_per_centroid = 1 << 30  # we pass the sample ourselves; faiss must not resample
        cp.verbose = False
        train_size = int(min(n, spec.get("train_size", _TRAIN_PER_LIST * nlist)))
        rows = np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False)) if train_size < n \
            else np.arange(n)
        index.train(_finite(normalize(x[rows]), n))
    else:
        raise ValueError(f"build_index: unknown index kind {kind!r}")
    step = max(1, min(_ADD_BATCH, _ADD_BYTES // (4 * max(d, 1))))
    for s in range(0, n, step):  # normalised a batch at a time: no second copy of all the vectors
        index.add_with_ids(_finite(normalize(x[s:s + step]), n), ids[s:s + step])
    _apply_params(index, spec)
    return index


def _finite(x: np.ndarray, n: int) -> np.ndarray:
    if not np.isfinite(x).all():
        raise AtlasError(f"cannot index {n} vectors: some contain NaN or inf")
    return x


def _apply_params(index, spec: dict | None) -> None:
    """Set the spec's search-time parameters (nprobe, efSearch) on the index itself."""
    if not spec:
        return
    faiss = _faiss()
    for key in ("nprobe", "efSearch"):  # the sidecar may come from someone else: whole numbers in range
        value = spec.get(key)
        if key in spec and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20):
            raise AtlasError(f"similarity index spec has {key} = {value!r}, not a whole number from 1 to "
                             f"{1 << 20}; {BUILD_HINT} again")
    if "nprobe" in spec:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = int(spec["nprobe"])
    if "efSearch" in spec and hasattr(faiss.downcast_index(index), "hnsw"):
        faiss.downcast_index(index).hnsw.efSearch = int(spec["efSearch"])


# -- files ---------------------------------------------------------------------------------------------

def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the index file's JSON sidecar lives: `conv5.faiss` -> `conv5.faiss.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_index(index, path: str | os.PathLike, meta: dict) -> dict:
    """Write `index` to `path` and its sidecar `path.json`, each atomically; returns the sidecar dict.

    `meta` is the caller's part of the sidecar and must hold "spec" (what
    build_index was given) and "ids" (what the ids are: "image_id",
    "channel_key", ...); anything else JSON-able is kept (seed, layer, ...).
    The file's dim, count, metric, size, sha256 and the faiss version are
    added here. Each file goes to a temp file in the same folder, is fsynced,
    then renamed over the old one, so a reader never sees half a file; the
    index is replaced first, and `load_index` notices a sidecar that does not
    describe it (size/count/dim) should it run between the two renames.
    """
    faiss = _faiss()
    for key in ("spec", "ids"):
        if key not in meta:
            raise ValueError(f"save_index: meta needs {key!r}")
    path = Path(path)
    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
    side = {**meta, "format": INDEX_FORMAT, "file": path.name, "dim": int(index.d), "count": int(index.ntotal),
            "metric": "cosine", "bytes": path.stat().st_size, "sha256": _sha256(path),
            "faiss_version": faiss.__version__}
    json.dumps(side)  # fail here, before writing, on anything not JSON-able
    atomic_write_json(sidecar_path(path), side)
    return side


def load_index(path: str | os.PathLike):
    """(index, sidecar dict) for the index file `path`, with the spec's search parameters applied.

    Raises AtlasError naming `atlas index ATLAS` when the file or its sidecar
    is missing, unreadable or does not match.
    """
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise AtlasError(f"no similarity index at {path}; {BUILD_HINT}")
    if not side.is_file():
        raise AtlasError(f"similarity index {path} has no {side.name} beside it; {BUILD_HINT} again")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise AtlasError(f"cannot read {side} ({e}); {BUILD_HINT} again") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise AtlasError(f"{side} is index format {got!r}, this atlas reads {INDEX_FORMAT}; {BUILD_HINT} again")
    size = path.stat().st_size
    if meta.get("bytes") != size:
        raise AtlasError(f"{path} ({size} bytes) does not match {side.name} ({meta.get('bytes')} bytes); "
                         f"{BUILD_HINT} again")
    try:
        index = _faiss().read_index(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AtlasError(f"cannot read similarity index {path} ({first}); {BUILD_HINT} again") from None
    if index.d != meta.get("dim") or index.ntotal != meta.get("count"):
        raise AtlasError(f"{path} holds {index.ntotal} x {index.d} vectors but {side.name} says "
                         f"{meta.get('count')} x {meta.get('dim')}; {BUILD_HINT} again")
    _apply_params(index, meta.get("spec"))
    return index, meta


# -- searching -----------------------------------------------------------------------------------------

def search(index, queries: np.ndarray, k: int, spec: dict | None = None,
           threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar indexed vectors for each query: (scores (q, k) float32, ids (q, k) int64).

    `queries` is (q, d) or one vector (d,); it is L2-normalised like the
    indexed vectors, so scores are cosines, best first. k is capped at the
    index size. An approximate index can find fewer than k: those slots hold
    id -1 and score -inf. `spec` overrides the search parameters the index
    was built or loaded with (nprobe, efSearch) for this call only.

    `threads`: OpenMP threads for this call (this Python thread only). By
    default a batch of up to SMALL_BATCH queries runs on one thread and a
    larger one on faiss's setting: faiss splits a lone query's scan of a flat
    index over threads, which on a 2-core machine with anything else running
    makes it 10-20x slower (threads wait on each other at a barrier), and
    gains little when the cores are free (see scripts/bench_index.py).
    """
    faiss = _faiss()
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != index.d:
        got = q.shape[-1] if q.ndim else 0
        raise AtlasError(f"query vectors have {got} dimensions but the index has {index.d} "
                         "(query with vectors of the layer it was built on)")
    if k <= 0:
        raise ValueError(f"search: k must be >= 1, got {k}")
    q = normalize(q)
    if not np.isfinite(q).all():
        raise AtlasError("query vectors contain NaN or inf")
    k = int(min(k, max(index.ntotal, 1)))
    params = None
    if spec and "nprobe" in spec and faiss.try_extract_index_ivf(index) is not None:
        params = faiss.SearchParametersIVF(nprobe=int(spec["nprobe"]))
    elif spec and "efSearch" in spec and hasattr(faiss.downcast_index(index), "hnsw"):
        params = faiss.SearchParametersHNSW(efSearch=int(spec["efSearch"]))
    if threads is None and len(q) <= SMALL_BATCH:
        threads = 1
    with _omp_threads(threads):
        scores, ids = index.search(q, k, params=params)
    scores[ids < 0] = -np.inf
    return scores, ids


def reconstruct(index, ids) -> np.ndarray:
    """The indexed (L2-normalised) vectors of `ids`, (n, d) float32, in the order asked for.

    Lets a query by id ("images like image 42") run from the index alone, with
    no dataset and no forward pass. An exact index gives the vectors back as
    added; an IVF-SQfp16 one gives its fp16 codes decoded (a hashtable from id
    to list position is built on first use: ~8 bytes a vector). AtlasError
    names an id the index does not hold.
    """
    faiss = _faiss()
    want = np.atleast_1d(np.asarray(ids, dtype=np.int64))
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        stored = faiss.vector_to_array(index.id_map)
        # ids added in increasing order (image ids, channel keys) need no sort: one pass instead of n log n
        order = np.arange(len(stored)) if np.all(stored[1:] > stored[:-1]) else np.argsort(stored, kind="stable")
        at = np.searchsorted(stored, want, sorter=order)
        at = np.minimum(at, max(len(stored) - 1, 0))
        found = stored[order[at]] == want if len(stored) else np.zeros(len(want), bool)
        if not found.all():
            raise AtlasError(f"id {int(want[~found][0])} is not in the index")
        return np.stack([index.index.reconstruct(int(order[a])) for a in at]).astype(np.float32, copy=False)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(f"reconstruct: unsupported index type {type(index).__name__}")
    if ivf.direct_map.type != faiss.DirectMap.Hashtable:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    out = np.empty((len(want), index.d), np.float32)
    for j, i in enumerate(want):
        try:
            out[j] = index.reconstruct(int(i))
        except RuntimeError:
            raise AtlasError(f"id {int(i)} is not in the index") from None
    return out


@contextmanager
def _omp_threads(n: int | None):
    """Run the block with n OpenMP threads (the setting is per calling thread), then restore it."""
    if n is None:
        yield
        return
    faiss = _faiss()
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


# -- channel profiles ----------------------------------------------------------------------------------

def profile_rows(n_images: int, sample: int = 4096, seed: int = 0) -> np.ndarray:
    """The sorted row numbers (int64) `channel_profiles` reads out of n_images rows.

    A pure function of (n_images, sample, seed): every layer of one atlas
    gets the same rows, which is what makes profiles of different layers
    comparable. All rows when n_images <= sample. Lets a caller read only
    these rows from the activations tables.
    """
    if n_images <= sample:
        return np.arange(n_images, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_images, sample, replace=False)).astype(np.int64)


def channel_profiles(acts: np.ndarray, sample: int = 4096, seed: int = 0) -> np.ndarray:
    """A fixed-length profile per channel, so that cosine(profile_a, profile_b) = Pearson r(a, b).

    `acts` is (n_images, n_channels): each channel's spatial maximum on each
    image, rows in the same image order for every layer (e.g. by image_id).
    A channel's profile is its column over the images `profile_rows(n_images,
    sample, seed)` picks (a fixed, seeded sample, the same for every layer),
    centred and scaled to unit length, i.e. its z-scores / sqrt(m). The inner
    product of two profiles is then the Pearson correlation of the two
    channels over the sample: channels of any layer, any scale and any
    offset that fire on the same images score near 1 (a copy, or 3x a
    channel plus a constant, scores exactly 1), independent ones near 0.
    With m = 4096 images the correlation's standard error is ~1/sqrt(m) =
    0.016, enough to rank neighbours; each profile is m float32s.

    A channel constant over the sample (dead: never fires) gets an all-zero
    profile, never NaN: it scores 0 against every channel. Returns
    (n_channels, m) float32, C-contiguous, ready for build_index.
    """
    a = np.asarray(acts)
    if a.ndim != 2:
        raise ValueError(f"channel_profiles: expected (n_images, n_channels), got shape {a.shape}")
    rows = profile_rows(a.shape[0], sample, seed)
    x = np.asarray(a[rows], dtype=np.float64)
    if not np.isfinite(x).all():
        raise AtlasError("channel activations contain NaN or inf")
    m, c = x.shape
    out = np.zeros((c, m), dtype=np.float32)
    if m < 2:
        return out
    live = x.max(axis=0) > x.min(axis=0)  # exactly constant columns stay zero: no 0/0
    xc = x[:, live] - x[:, live].mean(axis=0)
    norm = np.sqrt((xc * xc).sum(axis=0))
    out[live] = (xc / norm).T.astype(np.float32)
    return out


def channel_keys(layer_index: int, channels: int | np.ndarray) -> np.ndarray:
    """int64 ids for channels of one layer: layer_index << 32 | channel (see `split_channel_keys`)."""
    ch = np.arange(channels, dtype=np.int64) if np.isscalar(channels) else np.asarray(channels, np.int64)
    return (np.int64(layer_index) << _CHANNEL_BITS) | ch


def split_channel_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(layer_index, channel) int64 arrays back from `channel_keys` ids."""
    keys = np.asarray(keys, dtype=np.int64)
    return keys >> _CHANNEL_BITS, keys & ((1 << _CHANNEL_BITS) - 1)
