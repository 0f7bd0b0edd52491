"""Feature visualizations of an atlas, rendered on demand and cached like its projections:
`visualize` (the Python call and `atlas visualize`), `featurevis_png()` in SQL, and what the export
asks for (`cached`).

The algorithm is `atlas.pictures.featurevis`; this is the plumbing. Pictures go through the atlas's one
picture cache (`atlas.pictures.cache.PictureCache`: the atlas's own cache/, the per-user cache for a
read-only atlas, or --cache DIR; temp file and rename; the same bytes wherever they land):

    <cache root>/featurevis-v1/colour.json                                the colour statistics (below)
    <cache root>/featurevis-v1/s<steps>-seed<seed>[-d<D>]-<key8>/<layer>/<channel>.png            channel
                                                                  /<channel>-unit-<y>-<x>.png     unit

<cache root> is the projections' (`cache/projections-v1/<weights16>/`, so the weights are in the path),
key8 the start of the sha256 of everything else the image depends on: the recipe (steps, learning rate,
seed, padded batch size, transformations, diversity) and the colour matrix. Each PNG's text holds the
figures of `--format json` (the objective and the spatial maximum of the channel's map on the finished,
untransformed image), so a cache hit reads no model. With diversity D > 1 the picture is the D images
side by side.

Colour: the recipe decorrelates colour with the square root of the dataset's colour covariance. It is
estimated on the first visualization from a fixed sample of the atlas's own images (up to
COLOUR_SAMPLE, evenly spaced over the readable ones, as the model sees them: cropped, before
normalisation) and kept in colour.json beside the pictures (written once, atomically; it records the
sample). An atlas whose images are all unavailable and that has no colour.json yet uses Lucid's
ImageNet matrix, says so in the PNG text, and writes no colour.json (the next request with the
dataset back estimates it; the key then differs, so nothing drawn with the stand-in is served for it).

Cost: a render is `steps` forward and backward passes of a padded batch (`--batch-size`, default
BATCH_CPU images on the CPU, BATCH_GPU on a GPU), whatever the number of channels in it: one channel
alone costs as much as a full batch, so render a layer with --all (or the export) rather than channel
by channel. The figures for the demo's model are in `atlas help featurevis`.
"""
from __future__ import annotations

import hashlib
import json
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

from ..errors import AtlasError
from .cache import FEATUREVIS_VERSION, PictureCache, usable

SLIDE_SIDE = 320  # px: the least height of a titled copy's picture (--out)
FOLDER = "featurevis-v1"  # = featurevis.VERSION, repeated so that a cache hit imports no torch
DEFAULT_STEPS = 512
BATCH_CPU, BATCH_GPU = 8, 64
COLOUR_SAMPLE = 256
CELL = 128  # a picture smaller than this is enlarged (nearest) to about it, as patches are
SQL_FUNCTION = "atlas_featurevis_png"

_state: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _handle_state(atlas) -> dict:
    return _state.setdefault(atlas, {"lock": threading.RLock(), "caches": {}, "models": {}})


def picture_cache(atlas, cache=None) -> PictureCache:
    """The PictureCache of this atlas handle for `cache` (kept, so a read-only atlas probes once)."""
    st = _handle_state(atlas)
    key = None if cache is None else str(Path(cache).absolute())
    if key not in st["caches"]:
        st["caches"][key] = PictureCache(atlas, cache, FEATUREVIS_VERSION)
    return st["caches"][key]


def default_batch_size(device: str | None) -> int:
    """BATCH_GPU on a GPU, BATCH_CPU on the CPU (device as --device takes it)."""
    from ..util.device import check_device

    name = check_device(device)
    if name == "auto":
        import torch

        return BATCH_GPU if torch.cuda.is_available() else BATCH_CPU
    return BATCH_GPU if name.startswith("cuda") else BATCH_CPU


# ---------------------------------------------------------------------------------------------------
# colour statistics
# ---------------------------------------------------------------------------------------------------
def colour_stats(atlas, cache: PictureCache, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """{"matrix": 3x3, "source": ..., "images": n, ...}: the colour correlation the recipe uses: the
    manifest's (`colour`, estimated by the build), else, for an atlas built before the build wrote it,
    estimated on first use the same way and kept in the cache beside the pictures."""
    if atlas.manifest.get("colour"):
        return atlas.manifest["colour"]
    path = cache.find(f"{FOLDER}/colour.json")
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a file from elsewhere, or unreadable: estimate again and replace it
    ids = [r["image_id"] for r in atlas.rows("SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id")]

    def crop(i):
        try:
            return atlas.image(i)[1]
        except AtlasError:
            return None

    stats = estimate_colour(ids, crop, atlas.image_size)
    if stats["source"] != "atlas-images" and log is not None:
        log("Warning: none of the atlas's images can be read, so colour is decorrelated with Lucid's "
            "ImageNet matrix (estimated from the atlas's own images once they are back)")
    if stats["source"] == "atlas-images":
        _put_json(cache, path, stats)
    return stats


def estimate_colour(ids: list[int], crop: Callable[[int], Any], side: int) -> dict[str, Any]:
    """The colour statistics of a fixed sample of images: up to COLOUR_SAMPLE of `ids` (readable ones),
    evenly spaced, each `crop(id)` (the RGB image as the model sees it, or None when unreadable), every
    n-th pixel so that at most 64 x 64 of each count. What the build writes into the manifest."""
    import numpy as np
    import torch

    from .featurevis import IMAGENET_COLOUR, colour_correlation

    ids = sorted(ids)
    if len(ids) > COLOUR_SAMPLE:  # evenly spaced: the same sample every time
        ids = [ids[(i * len(ids)) // COLOUR_SAMPLE] for i in range(COLOUR_SAMPLE)]
    stride = max(1, side // 64)  # at most 64 x 64 pixels of an image: plenty for a 3x3 covariance
    parts, missing = [], 0
    for i in ids:
        im = crop(i)
        if im is None:
            missing += 1
            continue
        a = np.asarray(im.convert("RGB"), dtype=np.float32)[::stride, ::stride] / 255.0
        parts.append(torch.from_numpy(a.reshape(-1, 3).copy()))
    if not parts:
        return {"matrix": [list(r) for r in IMAGENET_COLOUR], "source": "lucid-imagenet", "images": 0,
                "why": "the atlas's images are unavailable"}
    pixels = torch.cat(parts)
    return {"matrix": colour_correlation(pixels), "source": "atlas-images", "images": len(parts),
            "unreadable": missing, "pixels": int(pixels.shape[0]),
            "mean": [round(float(v), 6) for v in pixels.double().mean(0)],
            "sample": f"up to {COLOUR_SAMPLE} readable images, evenly spaced by image id, cropped as the model "
                      f"sees them, every {stride}th pixel per axis"}


def _put_json(cache: PictureCache, path: Path, obj: dict) -> Path:
    """A small JSON file into the picture cache, written the way its pictures are (temp file and rename,
    the per-user cache where the atlas's cannot be written)."""
    from ..util.files import atomic_write_bytes

    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    return cache.put_with(path, lambda dest: atomic_write_bytes(dest, data, fsync=False))


# ---------------------------------------------------------------------------------------------------
# what a request names
# ---------------------------------------------------------------------------------------------------
def _key(recipe_key: dict, colour: list) -> str:
    text = json.dumps({"recipe": recipe_key, "colour": colour}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _recipe(steps: int, seed: int, diversity: int, batch_size: int):
    from .featurevis import Recipe

    r = Recipe(steps=int(steps), seed=int(seed), diversity=int(diversity), batch_size=int(batch_size))
    r.check()
    return r


def _file(layer: str, channel: int, unit) -> str:
    if unit is None:
        return f"{layer}/{channel}.png"
    if unit == "centre":
        return f"{layer}/{channel}-unit-centre.png"
    return f"{layer}/{channel}-unit-{unit[0]}-{unit[1]}.png"


def _folder(recipe, key) -> str:
    d = f"-d{recipe.diversity}" if recipe.diversity > 1 else ""
    return f"{FOLDER}/s{recipe.steps}-seed{recipe.seed}{d}-b{recipe.slots}-{key}"


def parse_unit(unit) -> tuple[int, int] | str | None:
    """None (the channel objective), "centre", or (y, x): from None, "centre"/"center" or "Y,X"."""
    if unit is None or isinstance(unit, tuple):
        return unit
    if isinstance(unit, list):
        return tuple(unit)
    text = str(unit).strip().lower()
    if text in ("centre", "center"):
        return "centre"
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise AtlasError(f"--unit '{unit}' is not a position: give centre or Y,X (the map's row and column)")
    return int(parts[0]), int(parts[1])


def _dataset_max(atlas, layer: str, channels: list[int]) -> dict[int, float | None]:
    rows = atlas.rows(f"SELECT channel, max FROM channels WHERE layer = ? AND channel IN "
                      f"({', '.join(str(int(c)) for c in channels)})", [layer]) if channels else []
    return {r["channel"]: (None if r["max"] is None else float(r["max"])) for r in rows}


def _record(layer, channel, unit, steps, seed, diversity, png, info, dataset_max) -> dict[str, Any]:
    vis_max = None if info is None else info.get("map_max")
    return {"layer": layer, "channel": channel, "objective": "channel" if unit is None else "unit",
            "unit_y": None if info is None else info.get("unit_y"),
            "unit_x": None if info is None else info.get("unit_x"),
            "steps": steps, "seed": seed, "diversity": diversity,
            "map_max": vis_max, "dataset_max": dataset_max,
            "ratio": (vis_max / dataset_max) if vis_max is not None and dataset_max else None,
            "reached": (vis_max > dataset_max) if vis_max is not None and dataset_max is not None else None,
            "png": None if png is None else str(png)}


def _info(path: Path) -> dict[str, Any]:
    """The figures a cached picture carries in its PNG text."""
    from .drawing import read_text

    text = read_text(path)
    out = {}
    for k in ("map_max", "objective", "unit_y", "unit_x"):
        v = text.get(f"featurevis.{k}")
        if v not in (None, "null"):
            out[k] = json.loads(v)
    return out


# ---------------------------------------------------------------------------------------------------
# the public call
# ---------------------------------------------------------------------------------------------------
def visualize(atlas, layer: str, channels: int | list[int] | None = None, *, steps: int | None = None,
              seed: int = 0, unit=None, diversity: int = 1, batch_size: int | None = None,
              device: str | None = "auto", cache=None, render: bool = True, progress: bool | None = False,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One record per channel (all of the layer's with channels=None): its picture ("png", rendered
    now where it is not cached, unless render=False: then None), "map_max" (the spatial maximum of
    the channel's map on the finished, untransformed image), "dataset_max" (the channels table's max),
    "reached" (map_max > dataset_max), and the request (objective, unit_y/unit_x, steps, seed).

    unit: None (the channel: the mean of its map), "centre", or (y, x) (one unit of the map).
    steps: None is DEFAULT_STEPS (512).
    """
    steps = DEFAULT_STEPS if steps is None else steps
    atlas.check_layer(layer)
    n_ch = next(la["channels"] for la in atlas.manifest["layers"] if la["layer"] == layer)
    if channels is None:
        channels = list(range(n_ch))
    elif isinstance(channels, int):
        channels = [channels]
    for c in channels:
        atlas.check_channel(layer, int(c))
    channels = [int(c) for c in dict.fromkeys(channels)]
    unit = parse_unit(unit)
    if isinstance(unit, tuple):  # checked before any work: the map's size is in the manifest
        la = next(la for la in atlas.manifest["layers"] if la["layer"] == layer)
        h, w = la.get("height") or 1, la.get("width") or 1
        if not (0 <= unit[0] < h and 0 <= unit[1] < w):
            raise AtlasError(f"unit ({unit[0]}, {unit[1]}) is outside {layer}'s {h}x{w} map")
    if batch_size is None:
        batch_size = default_batch_size(device)
    recipe = _recipe(steps, seed, diversity, batch_size)
    st = _handle_state(atlas)
    with st["lock"]:
        pc = picture_cache(atlas, cache)
        if not render and not pc.find(f"{FOLDER}/colour.json").is_file():
            # never visualized: nothing can be cached, and reading the colour sample would be work
            ds_max = _dataset_max(atlas, layer, channels)
            return [_record(layer, c, unit, steps, seed, diversity, None, None, ds_max.get(c)) for c in channels]
        colour = colour_stats(atlas, pc, log)
        folder = _folder(recipe, _key(recipe.key(), colour["matrix"]))
        paths = {c: pc.find(f"{folder}/{_file(layer, c, unit)}") for c in channels}
        todo = [c for c in channels if not usable(atlas, paths[c])]
        drawn: dict[int, tuple[Path, dict]] = {}
        if todo and render:
            drawn = _render(atlas, pc, layer, todo, unit, recipe, colour, paths, device, progress)
            pc.settle({p for p, _ in drawn.values()} | {paths[c] for c in channels if c not in drawn})
    ds_max = _dataset_max(atlas, layer, channels)
    out = []
    for c in channels:
        if c in drawn:
            png, info = drawn[c]
        elif paths[c].is_file():
            png, info = paths[c], _info(paths[c])
        else:
            png, info = None, None
        out.append(_record(layer, c, unit, steps, seed, diversity, png, info, ds_max.get(c)))
    return out


def visualize_one(atlas, layer: str, channel: int, *, out=None, **options) -> Path:
    """The picture of one channel (rendered on the first request); with `out`, also copied there, titled (a
    folder gets <layer>-<channel>-featurevis.png). `atlas.open(p).visualize("conv5", 17)`."""
    rec = visualize(atlas, layer, int(channel), **options)[0]
    png = Path(rec["png"])
    if out is None:
        return png
    return deliver(png, out, layer, channel, atlas=atlas, record=rec)


def deliver(png: Path, out, layer: str, channel: int, *, atlas=None, record: dict | None = None) -> Path:
    """A copy at `out` (a folder gets <layer>-<channel>-featurevis.png), as `show --out` makes its copies;
    given the atlas and the picture's record, the copy carries a title in its pixels (model, layer,
    channel, recipe, how far it got against the dataset's maximum) and the random-weights line. The cached
    picture stays bare: the site and the notebook caption it themselves."""
    from .projections import _deliver

    copy = _deliver(png, out, layer, channel, None, suffix="featurevis")
    if atlas is None or record is None:
        return copy
    from ..store.manifest import random_weights
    from .charts import fmt_num
    from .drawing import titled_copy

    m = atlas.manifest["model"]
    r = record
    what = "the channel" if r.get("objective") != "unit" else f"the unit at ({r.get('unit_y')}, {r.get('unit_x')})"
    reach = (f"its map reaches {fmt_num(r['map_max'], 3)}, the dataset's best {fmt_num(r['dataset_max'], 3)}"
             if r.get("map_max") is not None and r.get("dataset_max") is not None else "")
    title = (f"{m['name']}  ·  {layer}  ·  channel {channel}  ·  feature visualisation\n"
             f"the image that excites {what} most: {r.get('steps')} steps, seed {r.get('seed')}"
             + (f"; {reach}" if reach else ""))
    return titled_copy(copy, title, random_weights(m), SLIDE_SIDE)


def cached(atlas, layer: str, channels: list[int], cache=None, *, steps: int | None = None,
           seed: int = 0) -> dict[int, Path]:
    """The channels' pictures of the default recipe (these steps and seed, one image, the channel
    objective) that are already cached, whatever batch size drew them (a GPU's 64 or a CPU's 8: the
    same recipe, other low-order bits); nothing is drawn and no torch imported. What the export shows
    without --feature-vis. Where several batch sizes drew a channel, the first folder by name serves,
    so the choice does not depend on the file system's order."""
    steps = DEFAULT_STEPS if steps is None else steps
    pc = picture_cache(atlas, cache)
    pc.find(f"{FOLDER}/colour.json")  # on a miss, finds out whether the atlas's own cache can be written
    pattern = f"{FOLDER}/s{steps}-seed{seed}-b*-*"
    folders = sorted({q for i in range(pc.at + 1) if pc.tier(i).is_dir() for q in pc.tier(i).glob(pattern)
                      if q.is_dir()}, key=lambda q: (q.name, str(q)))
    out: dict[int, Path] = {}
    for c in channels:
        for q in folders:
            p = q / _file(layer, c, None)
            if usable(atlas, p):
                out[c] = p
                break
    return out


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------
def _model(atlas, device):
    """(LayerMap, device) of the atlas's model on `device` (a copy for a GPU: the handle's own model
    stays on the CPU, where the projections use it)."""
    import copy

    from ..util.device import resolve_device
    from ..net import LayerMap

    dev = resolve_device(device)
    st = _handle_state(atlas)
    if str(dev) not in st["models"]:
        if dev.type == "cpu":
            st["models"][str(dev)] = atlas.lmap
        else:
            st["models"][str(dev)] = LayerMap(copy.deepcopy(atlas.model).to(dev).eval(), atlas.image_size)
    return st["models"][str(dev)], dev


def _render(atlas, pc, layer, channels, unit, recipe, colour, paths, device, progress):
    from PIL import Image

    from . import featurevis as fv
    from .charts import beside
    from ..util.progress import Progress

    lmap, dev = _model(atlas, device)
    if layer not in lmap.by_name:
        raise AtlasError(f"layer '{layer}' of atlas '{atlas.path}' is not in its model")
    pre = atlas.manifest["preprocessing"]
    ds_max = _dataset_max(atlas, layer, channels)
    if unit is None:
        targets = [fv.Target(layer, c) for c in channels]
    else:
        targets = [fv.Target(layer, c, "unit", None if unit == "centre" else unit) for c in channels]
    # the diversity term is weighed in the channel's own units: its largest activation over the dataset
    scales = {(layer, c): max(ds_max.get(c) or 0.0, 1e-3) for c in channels}
    total = len(targets) * recipe.diversity * recipe.steps
    with Progress(total, f"visualize {layer}", unit="steps", enabled=bool(progress)) as bar:
        vis = fv.optimize(lmap, targets, recipe, mean=pre["mean"], std=pre["std"], colour=colour["matrix"],
                          device=dev, scales=scales, step_callback=bar.update)
    by_c: dict[int, list] = {}
    for v in vis:
        by_c.setdefault(v.target.channel, []).append(v)
    out = {}
    for c, vs in by_c.items():
        vs.sort(key=lambda v: v.image)
        arrays = [v.pixels.permute(1, 2, 0).numpy() for v in vs]
        side = arrays[0].shape[0]
        up = max(1, -(-CELL // side)) if side < CELL else 1
        ims = [Image.fromarray(a).resize((side * up, side * up), Image.NEAREST) for a in arrays]
        im = ims[0] if len(ims) == 1 else beside(*ims, pad=2)
        best = max(vs, key=lambda v: v.map_max)
        text = {"featurevis.recipe": recipe.key(), "featurevis.layer": layer, "featurevis.channel": c,
                "featurevis.objective": best.objective, "featurevis.map_max": best.map_max,
                "featurevis.maxima": [v.map_max for v in vs],
                "featurevis.unit_y": None if best.unit_yx is None else best.unit_yx[0],
                "featurevis.unit_x": None if best.unit_yx is None else best.unit_yx[1],
                "featurevis.objective_start": vs[0].objective_start,
                "featurevis.objective_end": vs[0].objective_end,
                "featurevis.colour": {k: colour.get(k) for k in ("matrix", "source", "images")},
                "featurevis.device": dev.type, "featurevis.upscale": up}  # no timing: the same bytes every time
        png = pc.put(paths[c], im, text=text)
        out[c] = (png, {"map_max": best.map_max, "objective": best.objective,
                        "unit_y": None if best.unit_yx is None else best.unit_yx[0],
                        "unit_x": None if best.unit_yx is None else best.unit_yx[1]})
    return out


# ---------------------------------------------------------------------------------------------------
# featurevis_png() in SQL
# ---------------------------------------------------------------------------------------------------
def register_sql(atlas) -> None:
    """Add featurevis_png(layer, channel [, steps := 512, seed := 0]) -> the picture's PNG path to the
    atlas's SQL. It renders what is not cached (all the rows of a vector of one layer as one batched
    job; see the module docstring for the cost) on a second handle of the atlas, as deconv_png does."""
    path, state, lock = atlas.path, {}, threading.Lock()

    def batch(layer, channel, steps, seed):
        with lock:
            if "handle" not in state:
                from ..store import AtlasReader

                state["handle"] = AtlasReader(path)
            return _sql_batch(state["handle"], layer, channel, steps, seed)

    con = atlas.con
    con.create_function(SQL_FUNCTION, batch, ["VARCHAR", "INTEGER", "INTEGER", "INTEGER"], "VARCHAR",
                        type="arrow", side_effects=True)
    con.execute(f"CREATE OR REPLACE MACRO featurevis_png(layer, channel, steps := {int(DEFAULT_STEPS)}, seed := 0) "
                f"AS {SQL_FUNCTION}(layer, channel, steps, seed)")


def _sql_batch(h, layer, channel, steps, seed):
    import pyarrow as pa

    rows = list(zip(layer.to_pylist(), channel.to_pylist(), steps.to_pylist(), seed.to_pylist()))
    groups: dict[tuple, list[int]] = {}
    for la, c, s, sd in rows:
        if None in (la, c, s, sd):
            continue
        h.check_channel(la, c)
        groups.setdefault((la, s, sd), []).append(c)
    paths: dict[tuple, str] = {}
    for (la, s, sd), chans in groups.items():
        for rec in visualize(h, la, chans, steps=s, seed=sd):
            paths[(la, rec["channel"], s, sd)] = rec["png"]
    return pa.array([paths.get(t) if None not in t else None for t in rows], type=pa.string())
