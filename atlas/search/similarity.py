"""Similarity queries over an atlas's indexes: from Python (`Atlas.similar_images`, `.similar_channels`),
the CLI (`atlas similar`) and SQL (the table macros similar_images and similar_channels).

The indexes are built by `atlas.search.indexing`, which sits below this module so that a build loads none of
the querying. Indexes load on the first query that needs one and stay loaded with their handle
(`AtlasReader`). Ranks count from 0, as top_activations' do. An image query keeps the image itself
(rank 0, score 1: a check that the index is sound); a channel query leaves the channel itself out. A
query vector that is all zero (an image no channel fires on, a dead channel) has no direction to
compare: it gets no rows.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AtlasError
from .faiss_index import channel_keys, load_index, reconstruct, search, split_channel_keys
from .indexing import (_STATE, images_table, layer_channels, layer_geometry, layer_vectors, reader,
                       rebuild_hint)
from ..store import AtlasReader


# -- loading ---------------------------------------------------------------------------------------------

def _record(a: AtlasReader) -> dict[str, Any]:
    rec = a.manifest.get("index")
    if not rec:
        raise AtlasError(f"atlas '{a.path}' has no similarity indexes; {rebuild_hint(a)} to build them")
    return rec


def _load(a: AtlasReader, info: dict[str, Any], what: str, dim: int):
    """(index, sidecar) of a manifest index entry, loaded once per handle and checked against the model."""
    cache = _STATE.setdefault(a, {}).setdefault("indexes", {})
    key = (info["file"], info["sha256"])
    if key not in cache:
        index, meta = load_index(a.path / info["file"])
        if index.d != dim:
            raise AtlasError(f"similarity index {info['file']} holds {index.d}-dimensional vectors but {what} has "
                             f"{dim}: it was not built for this atlas's model; {rebuild_hint(a)} to rebuild it")
        if meta.get("sha256") != info["sha256"]:
            raise AtlasError(f"similarity index {info['file']} is not the one the manifest describes; "
                             f"{rebuild_hint(a)} to rebuild it")
        cache[key] = (index, meta)
    return cache[key]


def _image_index(a: AtlasReader, layer: str | None):
    rec = _record(a)
    if not rec.get("images"):
        raise AtlasError(f"atlas '{a.path}' has no image similarity index; {rebuild_hint(a)} to build one")
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
                     layer_channels(a, layer))
    return index, layer


def _kind(a: AtlasReader, layer: str) -> str:
    return layer_geometry(a, layer)["kind"]


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

    from ..data import read_image_file

    x = a.preprocess.to_tensor(a.preprocess.crop_image(read_image_file(image)))  # AtlasError: missing, unreadable
    kind = _kind(a, layer)
    if kind == "fc" and not a.has_classifier:
        raise AtlasError(f"a query at {layer} needs the model's classifier, and its weights file "
                         f"'{a.manifest['model'].get('weights')}' is gone or changed since the build; query a conv layer (--layer)")
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
    a = reader(atlas)
    pairs, _ = _image_pairs(a, image_id, image, layer, k)
    table = images_table(a)
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
        raise AtlasError(f"the channels index of atlas '{a.path}' lacks a recorded layer; "
                         f"{rebuild_hint(a)} to rebuild it")
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
    atlas.search.faiss_index.channel_profiles). Rows: rank (from 0), layer, channel, score.
    """
    a = reader(atlas)
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
    """Give the atlas's DuckDB connection the table macros similar_images(image_id, k := 10, layer := NULL)
    (rows: rank, image_id, score) and similar_channels(layer, channel, k := 10, of_layer := NULL) (rows:
    rank, layer, channel, score).

    `atlas.facade.Atlas` registers them once, on the first query that calls them: registering a Python
    UDF imports numpy, which plain SQL need not pay. The UDFs read the indexes only (no SQL of their
    own), loaded on first call.
    """
    a = reader(atlas)
    _record(a)  # no indexes: say so now, in one line, rather than from inside a query
    # A weak reference: the connection is the atlas's, and DuckDB's C++ side hides a cycle from the collector.
    ref, path, spare = weakref.ref(a), a.path, []

    # A relation can outlive its AtlasReader (`atlas sql`): then a fresh reader of the folder answers.
    def current() -> AtlasReader:
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


SHEET_CELL = 160  # px: the longest side of a result's picture on a contact sheet


def contact_sheet(atlas, rows: list[dict[str, Any]], out: str | Path, *, query: str,
                  layer: str | None = None, scale: float = 1.0) -> Path:
    """The results of `similar_images` or `similar_channels` as a titled, labelled PNG at `out`: each image,
    or each channel shown by the image that excites it most, with its rank and score; `query` says what
    was asked ("image 42", "conv5:17"), `layer` where images were compared."""
    from PIL import Image

    from ..store.manifest import random_weights
    from ..pictures.drawing import contact_sheet as sheet, placeholder, write_png

    a = reader(atlas)
    m = a.manifest["model"]
    side = round(SHEET_CELL * scale)

    def picture(image_id: int):
        try:
            im = a.image(int(image_id))[1].convert("RGB")
        except AtlasError:
            return placeholder(side, side)
        im.thumbnail((side, side), Image.LANCZOS)
        return im

    channels = bool(rows) and "channel" in rows[0]
    if not channels and layer is None:
        layer = _image_index(a, None)[1]  # the default the query used
    cells, labels = [], []
    for r in rows:
        if channels:
            best = a.top(r["layer"], r["channel"])[:1]
            cells.append(picture(best[0]["image_id"]) if best else placeholder(side, side, "never fires"))
            labels.append(f"{r['rank']}: {r['layer']}:{r['channel']}  {r['score']:.3f}")
        else:
            cells.append(picture(r["image_id"]))
            labels.append(f"{r['rank']}: {r['score']:.3f}  {Path(str(r['path'])).name}")
    if channels:
        title = (f"{m['name']}  ·  the {len(rows)} channels most like {query}\nby their responses over the "
                 "dataset's images; each shown by the image that excites it most; under it: rank, channel, "
                 "cosine similarity")
    else:
        title = (f"{m['name']}  ·  the {len(rows)} images most like {query}" + (f" at {layer}" if layer else "")
                 + "\nunder each: rank, cosine similarity, image (rank 0: the query itself when it is an atlas image)")
    return write_png(out, sheet(cells, labels, title=title, alert=random_weights(m), scale=scale))
