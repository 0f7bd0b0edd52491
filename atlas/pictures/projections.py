"""Projections rendered on demand and cached (the lazy path): `show` (the figure 2 panel, or one
projection), `filters` (the first layer's filters as a grid), and `deconv_png()` in SQL.

Every picture of `atlas show`, of deconv_png() and of `atlas export` comes from
the one `Renderer` here, so whichever asks first renders and the others read
the file. Cache layout (the atlas is immutable once built, so these keys are
all a picture depends on):

    ATLAS/cache/projections-v3/<weights16>/<mode>-<norm>-<display>/<layer>/<channel>-<rank>.png   projection
                                                                           <channel>-<rank>-patch.png  patch
                                                                           <channel>-panel.png  figure 2 panel
    ATLAS/cache/projections-v3/<weights16>/filters/<layer>.png

weights16 is the start of the weights file's sha256 (random-seed<N> for a
randomly initialised model), mode is unit|map, norm how local response
normalisation is undone (identity: the paper; gradient: its true gradient),
display how values become grey levels (atlas.pictures.drawing.DISPLAYS: percentile, the
default, or max), v3 the drawing's version (v1 drew every projection by max|v|
and hatched the outside in magenta, v2 drew fields far larger than the image as
mostly border, unlabelled: their pictures are never served now). The display rule is written into each PNG's text as well.

Switches: "stored" decodes switches.parquet (enough for unit mode with
norm=identity); "recompute" runs the images through the model again (needs the
dataset; the only way for map mode or norm=gradient on a model with LRN);
"auto" picks stored where it suffices. Both give the same projection (tested),
so the cache does not tell them apart.

Concurrency and crashes: a PNG is drawn into a temp file with a unique name
(mkstemp: unique per process and thread) beside its final path and renamed
into place, so two processes asking for the same picture both get a whole
file, and a crash leaves at most a temp file, never a truncated PNG. A picture
drawn while its image was missing carries `atlas.unavailable` in its PNG text
and a marker file beside it (`NAME.png.unavailable`, the reason inside): while
the dataset folder exists, the next request (`show` or `export`) draws it again,
since the image may be back; with the whole dataset gone it is served as it is,
and the caller is told the picture is incomplete.

Where pictures live (the atlas's own cache, or a per-user one when the atlas cannot be written) and
how they are written: `atlas.pictures.cache`.

Speed: a channel's top-k is one batched engine call; switches are decoded once
per image into a slab kept between calls; images are read once. Nothing here
imports torch until a picture has to be drawn: a cache hit is two stats (the
picture and its incomplete-marker).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from ..errors import AtlasError
from .cache import VERSION, PictureCache, cache_root, incomplete, usable
from ..choices import DEFAULT_DISPLAY, DISPLAYS, METHODS, MODES, NORMS, SWITCHES  # noqa: F401 - re-exported

SWITCH_CACHE_BYTES = 1 << 30
ANNOUNCE_AFTER_S = 2.0  # a picture not drawn by then is announced on the log (a deep net's can take a minute)





# ---------------------------------------------------------------------------
# the public calls
# ---------------------------------------------------------------------------
def show(atlas, layer: str, channel: int, rank: int | None = None, *, mode: str = "unit", norm: str = "identity",
         switches: str = "auto", out: str | os.PathLike | None = None,
         log: Callable[[str], None] | None = None, cache: str | os.PathLike | None = None,
         display: str = DEFAULT_DISPLAY, method: str = "deconvnet", scale: float = 1.0,
         progress: bool | None = None) -> Path:
    """The figure 2 panel of a channel (rank=None) or one projection (rank=R) as a PNG; returns its path.

    Rendered on the first request, read from the cache after that (the atlas's, or the per-user one
    when the atlas cannot be written; `cache`: a folder of your choice instead, see `PictureCache`).
    `display`: how values become grey levels, percentile (the default) or max (atlas.pictures.drawing.DISPLAYS).
    With `out` the PNG is also copied there (a folder gets <layer>-<channel>[-<rank>].png). A missing
    image file is no error: its patch is a placeholder and `log` gets one line saying so. `scale`: the panel's
    cells and text this many times larger (a separate cache entry), for a slide or a poster. A picture
    not in the cache takes seconds to a minute (a deep net's model and switches load first): when one
    takes over ANNOUNCE_AFTER_S, `log` is told what is being drawn, then how long it took (progress
    None: on a terminal only; True: always; False: never).

        >>> a = atlas.open("my-atlas")
        >>> show(a, "conv5", 17)  # .../cache/projections-v3/<w>/unit-identity-percentile/conv5/17-panel.png
    """
    _check_options(mode, norm, switches, display, method)
    atlas.check_channel(layer, channel)
    k = int(atlas.manifest["k"])
    if rank is not None and not 0 <= rank < k:
        raise AtlasError(f"rank {rank} is out of range for {layer} channel {channel} (0..{k - 1})")
    r = renderer(atlas, mode, norm, cache, display, method, scale)
    target = r.cache.find(f"{r.folder}/{layer}/" + (r.panel_file(channel) if rank is None
                                                     else f"{channel}-{rank}.png"))
    if usable(atlas, target):
        return _titled(atlas, _deliver(target, out, layer, channel, rank, suffix="guided" if method == "guided"
                                       else ""), layer, channel, rank, r, out)
    rows = atlas.top(layer, channel)
    if rank is not None and rank not in {t["rank"] for t in rows}:
        have = f"0..{len(rows) - 1}" if rows else "none"
        raise AtlasError(f"rank {rank} is out of range for {layer} channel {channel} (ranks: {have})")
    if not rows:
        raise AtlasError(f"{layer} channel {channel} has no top activations to project")
    asked = rows if rank is None else [t for t in rows if t["rank"] == rank]
    said = threading.Event()

    def announce():  # only a draw that takes a while is announced: a quick one (or a quick refusal) says nothing
        said.set()
        log(f"show: drawing {layer} channel {channel} (not in the picture cache): projecting {len(asked)} top "
            f"activation{'s' if len(asked) != 1 else ''}" + ("; the model loads first" if cold else ""))

    cold = "lmap" not in vars(atlas)
    # by default only where someone watches (a terminal): in a log or a pipe, a draw that fails after the
    # announcement would leave two lines where a refusal is one
    wanted = progress if progress is not None else sys.stderr.isatty()
    timer = threading.Timer(ANNOUNCE_AFTER_S, announce) if wanted and log is not None else None
    t0 = time.perf_counter()
    if timer is not None and ANNOUNCE_AFTER_S <= 0:
        timer = None
        announce()
    elif timer is not None:
        timer.daemon = True
        timer.start()
    try:
        with r.lock:
            res = r.channels(layer, [channel], {channel: asked}, panel=rank is None, switches=switches)[channel]
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()  # an announcement under way finishes before "drawn in"
    if said.is_set():
        log(f"show: drawn in {time.perf_counter() - t0:.1f} s")
    path = res["panel"] if rank is None else res["proj"][0]
    if path is None:
        raise AtlasError(res["error"] or f"could not render {layer} channel {channel}")
    if res["error"] and log is not None and rank is None:
        log(f"Warning: {res['error']}; its patch in the panel is a placeholder")
    return _titled(atlas, _deliver(path, out, layer, channel, rank, suffix="guided" if method == "guided" else ""),
                   layer, channel, rank, r, out)


def _titled(atlas, copy: Path, layer: str, channel: int, rank: int | None, r: "Renderer", out) -> Path:
    """A single projection copied out (--rank R --out) titled and enlarged for a slide (a panel is titled
    already); the cached picture stays bare, the site's cell."""
    if out is None or rank is None:
        return copy
    from ..store.manifest import random_weights
    from .charts import fmt_num
    from .drawing import read_text, titled_copy

    t = read_text(copy)
    m = atlas.manifest["model"]
    row = next((x for x in atlas.top(layer, channel) if x["rank"] == rank), {})
    how = "guided backpropagation" if r.method == "guided" else "DeconvNet"
    value = f", activation {fmt_num(float(t['value']), 3)}" if t.get("value") else ""
    title = (f"{m['name']}  ·  {layer}  ·  channel {channel}  ·  rank {rank}  ·  {how}\n"
             f"image {row.get('path', t.get('image_id'))}{value}")
    return titled_copy(copy, title, random_weights(m))


def filters(atlas, layer: str | None = None, out: str | os.PathLike | None = None,
            cache: str | os.PathLike | None = None, scale: float = 1.0) -> Path:
    """The first conv layer's learned filters as a grid (the paper's figure 6 view), titled; returns the
    PNG path. `scale`: cells and text this many times larger.

        >>> filters(atlas.open("my-atlas"))   # .../cache/projections-v3/<w>/filters/conv1.png
    """
    geometry = [la["layer"] for la in atlas.manifest.get("geometry", {}).get("layers", []) if la["kind"] == "conv"]
    r = renderer(atlas, cache=cache, scale=scale)
    hit = r.cache.find(r.filters_file(layer or (geometry or ['-'])[0]))
    if hit.is_file():  # without loading the model
        return _deliver(hit, out, hit.stem, None, None, suffix="filters")
    lm = atlas.lmap
    convs = [la.name for la in lm.conv_layers]
    name = layer or convs[0]
    la = lm.by_name.get(name)
    if la is None or la.kind != "conv":
        raise AtlasError(f"unknown conv layer '{name}' in atlas '{atlas.path}': conv layers are {', '.join(convs)}")
    with r.lock:
        path = r.filter_grid(name)
    if path is None:
        w = lm.conv_weight(la)
        cin = w.shape[1] if w is not None else "its"
        raise AtlasError(f"only the first layer's filters are pictures ({convs[0]}): the filters of {name} "
                         f"act on {cin} feature maps, not on pixels")
    return _deliver(path, out, name, None, None, suffix="filters")


def project(atlas, layer: str, channel: int, ranks: list[int] | None = None, *, mode: str = "unit",
            norm: str = "identity", switches: str = "auto", method: str = "deconvnet"):
    """The projections (a `deconv.Projections`, tensors, not cached) of a channel's top-k entries."""
    _check_options(mode, norm, switches, method=method)
    rows = atlas.top(layer, channel)
    if ranks is not None:
        bad = sorted(set(ranks) - {t["rank"] for t in rows})
        if bad:
            raise AtlasError(f"rank {bad[0]} is out of range for {layer} channel {channel} (0..{len(rows) - 1})")
        rows = [t for t in rows if t["rank"] in set(ranks)]
    items = [(channel, t) for t in rows]
    r = renderer(atlas, mode, norm, method=method)
    with r.lock:
        P, done, errors = r.project(layer, items, switches)
    if errors:
        raise AtlasError(next(iter(errors.values())))
    return P


_renderers: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def renderer(atlas, mode: str = "unit", norm: str = "identity",
             cache: str | os.PathLike | None = None, display: str = DEFAULT_DISPLAY,
             method: str = "deconvnet", scale: float = 1.0) -> "Renderer":
    """The renderer of this atlas handle for these settings (kept with the handle, so its slab is reused)."""
    per = _renderers.setdefault(atlas, {})
    key = (mode, norm, display, method, None if cache is None else str(Path(cache).absolute()), float(scale))
    if key not in per:
        per[key] = Renderer(atlas, mode, norm, cache, display=display, method=method, scale=scale)
    return per[key]


def _check_options(mode: str, norm: str, switches: str, display: str = DEFAULT_DISPLAY,
                   method: str = "deconvnet") -> None:
    for what, v, ok in (("projection mode", mode, MODES), ("norm handling", norm, NORMS),
                        ("switches", switches, SWITCHES), ("display", display, DISPLAYS),
                        ("projection method", method, METHODS)):
        if v not in ok:
            raise AtlasError(f"unknown {what} '{v}': choose one of {', '.join(ok)}")
    if mode == "map" and switches == "stored":
        raise AtlasError("map mode needs switches over the whole image: use switches='recompute' "
                         "(--switches recompute), which reads the images")
    if method == "guided" and switches == "stored":
        raise AtlasError("guided backpropagation needs each ReLU's forward pattern: use switches='recompute' "
                         "(--switches recompute), which reads the images")


def _deliver(path: Path, out, layer: str, channel: int | None, rank: int | None, suffix: str = "") -> Path:
    if out is None:
        return path
    from ..util.files import atomic_write_bytes

    out = Path(out)
    if out.is_dir():
        out = out / ("-".join(str(p) for p in (layer, channel, rank, suffix) if p not in (None, "")) + ".png")
    return atomic_write_bytes(out, path.read_bytes())


# ---------------------------------------------------------------------------
# the renderer and its cache
# ---------------------------------------------------------------------------
class Renderer:
    """Draws and caches the pictures of one atlas handle for one (mode, norm, display). Not thread-safe:
    hold `lock`."""

    version = VERSION

    def __init__(self, atlas, mode: str = "unit", norm: str = "identity", cache: str | os.PathLike | None = None,
                 *, display: str = DEFAULT_DISPLAY, method: str = "deconvnet", scale: float = 1.0):
        _check_options(mode, norm, "auto", display, method)
        if not 0.25 <= float(scale) <= 8:
            raise AtlasError(f"scale {scale:g} is out of range (0.25 to 8)")
        self.a, self.mode, self.norm, self.display, self.method = atlas, mode, norm, display, method
        self.scale = float(scale)
        # the cache key's settings part (guided backpropagation's pictures apart from DeconvNet's)
        self.folder = f"{mode}-{norm}-{display}" + ("-guided" if method == "guided" else "")
        self.cache = PictureCache(atlas, cache)
        self.lock = threading.RLock()
        self.rendered = 0  # pictures drawn (not found in the cache)
        # where picture time goes: stored switches read + decoded, images read, the engine (with the
        # forward pass when recomputing), drawing + PNG
        self.split = {"switches_s": 0.0, "images_s": 0.0, "projection_s": 0.0, "drawing_s": 0.0}
        self._crops: OrderedDict[int, Any] = OrderedDict()
        self._slab: dict[str, Any] | None = None       # pool -> (slots, C, H, W) decoded switches
        self._slots: OrderedDict[int, int] = OrderedDict()  # image id -> slot, least recently used first
        self._free: list[int] = []
        self._have: dict[int, set] = {}  # image id -> the pools whose switches are stored for it
        self.base = cache_root(atlas)  # the atlas's own cache (pictures may be elsewhere: self.cache)
        self.root = self.base / self.folder

    def panel_file(self, channel: int) -> str:
        return f"{channel}-panel.png" if self.scale == 1 else f"{channel}-panel-x{self.scale:g}.png"

    def _labels(self, layer: str, channel: int, meta: list[dict]) -> dict[str, Any]:
        """What a panel says in its pixels: its title, the random-weights line, each patch's image name."""
        from ..store.manifest import random_weights

        m = self.a.manifest["model"]
        ids = sorted({int(r["image_id"]) for r in meta})
        paths = {r["image_id"]: r["path"] for r in self.a.rows(
            f"SELECT image_id, path FROM images WHERE image_id IN ({', '.join(map(str, ids))})")}
        how = "guided backpropagation" if self.method == "guided" else "DeconvNet"
        title = (f"{m['name']}  ·  {layer}  ·  channel {channel}  ·  {how}\n"
                 f"its top {len(meta)} activations, strongest first: projections ({self.mode} mode, {self.display} "
                 "display) beside their image patches")
        return {"title": title, "alert": random_weights(m),
                "names": [str(paths.get(r["image_id"], f"image {r['image_id']}")) for r in meta]}

    # -- what the export and show ask for ------------------------------------------
    def channels(self, layer: str, channels: list[int], tops: dict[int, list[dict[str, Any]]], *,
                 panel: bool = True, switches: str = "auto") -> dict[int, dict[str, Any]]:
        """For each channel: {"panel": Path|None, "proj": [Path|None per row], "patch": [...], "error": str|None}.

        `tops[c]` holds the rows (rank, image_id, value, y, x) of the channel's top-k to draw: all of
        them for a panel, or any subset. What is missing or was drawn incomplete (`usable`) is made.
        What could not be made (no switches, an image gone for recompute) is None, the reason in "error".
        """
        out, items, panels = {}, [], set()
        find, d = self.cache.find, f"{self.folder}/{layer}"
        for c in channels:
            rows = tops.get(c, [])
            res = {"panel": find(f"{d}/{self.panel_file(c)}") if rows else None,
                   "proj": [find(f"{d}/{c}-{r['rank']}.png") for r in rows],
                   "patch": [find(f"{d}/{c}-{r['rank']}-patch.png") for r in rows], "error": None,
                   "at": {r["rank"]: i for i, r in enumerate(rows)}}  # rank -> index: rows may be a subset
            out[c] = res
            if not rows:
                continue
            if panel and not usable(self.a, res["panel"]):
                panels.add(c)
                items += [(c, r) for r in rows]  # the panel needs every projection of the channel
                continue
            items += [(c, r) for i, r in enumerate(rows)
                      if not (usable(self.a, res["proj"][i]) and usable(self.a, res["patch"][i]))]
        if items:
            self._render(layer, items, panels, out, switches)
        for o in out.values():  # what could not be made is not offered; what is incomplete says so
            o["proj"] = [p if p.is_file() else None for p in o["proj"]]
            o["patch"] = [p if p.is_file() else None for p in o["patch"]]
            if o["panel"] is not None and not (panel and o["panel"].is_file()):
                o["panel"] = None
            shown = [q for q in [o["panel"], *o["patch"]] if q is not None]
            o["error"] = o["error"] or next((why for why in map(incomplete, shown) if why), None)
        if items:
            self.cache.settle({q for o in out.values() for q in [o["panel"], *o["proj"], *o["patch"]]})
        return out

    def filters_file(self, layer: str) -> str:
        return f"filters/{layer}.png" if self.scale == 1 else f"filters/{layer}-x{self.scale:g}.png"

    def filter_grid(self, layer: str) -> Path | None:
        """The layer's filters as a grid, if they are pictures (a first conv layer on RGB or grey)."""
        p = self.cache.find(self.filters_file(layer))
        if p.is_file():
            return p
        from . import drawing as R

        lm = self.a.lmap
        la = lm.by_name.get(layer)
        if la is None or la.kind != "conv" or la.pools_below:
            return None
        w = lm.conv_weight(la)
        if w is None or w.shape[1] not in (1, 3) or any(m.kind == "conv" and m.index < la.index
                                                         for m in lm.conv_layers):
            return None
        from ..store.manifest import random_weights

        m = self.a.manifest["model"]
        n, cin, kh, kw = w.shape
        title = (f"{m['name']}  ·  {layer}  ·  its {n} learned filters ({kh}x{kw}, "
                 f"{'RGB' if cin == 3 else 'grey'})\neach filter scaled on its own: 0 is mid-grey")
        p = self.cache.put(p, R.filter_grid(w, title=title, alert=random_weights(m), scale=self.scale))
        self.rendered += 1
        self.cache.settle({p})
        return p

    # -- projections -------------------------------------------------------------
    def _source(self, switches: str) -> str:
        if switches != "auto":
            return switches
        if self.mode == "map" or self.method == "guided":
            return "recompute"  # stored switches hold only the receptive fields of the top-k units
        if self.norm == "gradient" and any(op.kind == "lrn" for op in self.a.lmap.graph.ops.values()):
            return "recompute"  # the contrast normalisations' true gradient needs their forward inputs
        return "stored"

    def project(self, layer: str, items: list[tuple[int, dict]], switches: str = "auto"):
        """(deconv.Projections of the items that could be projected, their indices in `items`,
        {index: why not} for the others)."""
        from .. import deconv as D

        lm = self.a.lmap
        la = lm.by_name[layer]
        ids = sorted({r["image_id"] for _, r in items})
        source = self._source(switches)
        errors: dict[int, str] = {}
        t = time.perf_counter()
        if source == "stored":
            _check_options(self.mode, self.norm, source)
            slot, missing = {i: n for n, i in enumerate(ids)}, set()
            if la.pools_below:
                slot, missing = self._load_switches(ids, la.pools_below)
            for n, (_, r) in enumerate(items):
                if r["image_id"] in missing:
                    errors[n] = f"no switches stored for image {r['image_id']}"
            x = None
        else:
            import torch

            slot, xs = {}, []
            for i in ids:
                crop = self._crop(i)
                if isinstance(crop, Exception):
                    errors.update({n: f"{crop} (recomputing switches needs the image)"
                                   for n, (_, r) in enumerate(items) if r["image_id"] == i})
                    continue
                slot[i] = len(xs)
                xs.append(self.a.preprocess.to_tensor(crop))
            x = torch.stack(xs) if xs else None
        self.split["switches_s" if source == "stored" else "images_s"] += time.perf_counter() - t
        done = [n for n in range(len(items)) if n not in errors]
        reqs = [D.Request(slot[items[n][1]["image_id"]], layer, items[n][0], items[n][1]["y"], items[n][1]["x"],
                          value=items[n][1]["value"] if source == "stored" else None) for n in done]
        t = time.perf_counter()
        if not reqs:
            P = D.Projections(self.mode, self.norm, lm.image_size, [], [], [])
        elif source == "stored":
            sw = {p: self._slab[p] for p in la.pools_below} if la.pools_below else None
            P = D.project(lm, reqs, sw, mode=self.mode, norm=self.norm)
        else:
            P = D.project_images(lm, x, reqs, mode=self.mode, norm=self.norm, method=self.method)
        self.split["projection_s"] += time.perf_counter() - t
        return P, done, errors

    def _render(self, layer, items, panels, out, switches):
        from .. import deconv as D
        from . import drawing as R

        S = self.a.lmap.image_size
        try:
            P, done, errors = self.project(layer, items, switches)
        except AtlasError as e:
            if not str(e).startswith("cannot project"):
                raise
            # an op without a DeconvNet rule (SiLU, a gate): no projection, but the patches are drawn,
            # so the pages still show what excited each channel
            self._patches_only(layer, items, out, str(e))
            return
        for n, why in errors.items():
            out[items[n][0]]["error"] = why
        t = time.perf_counter()
        crops = {items[n][1]["image_id"]: None for n in done}
        for i in crops:  # each image read once (a failure too: it is not retried within one call)
            crops[i] = self._crop(i)
        self.split["images_s"] += time.perf_counter() - t
        t = time.perf_counter()
        by_c: dict[int, list[int]] = {}
        for i, n in enumerate(done):
            by_c.setdefault(items[n][0], []).append(i)
        for c, idx in by_c.items():
            res, patches, gone = out[c], [], None
            for i in idx:
                r = items[done[i]][1]
                crop = crops[r["image_id"]]
                if isinstance(crop, Exception):
                    gone = res["error"] = str(crop)
                    crop = None
                patches.append(crop)
                box = tuple(P.meta[i]["rf_box"]) if self.mode == "unit" else (0, 0, S, S)
                at = res["at"][r["rank"]]
                proj, patch = res["proj"][at], res["patch"][at]
                if not proj.is_file():  # a projection needs no image: never incomplete
                    res["proj"][at] = self.cache.put(proj, R.projection_image(P, i, rank=r["rank"], text=_src(r),
                                                                              display=self.display))
                    self.rendered += 1
                if not usable(self.a, patch):
                    res["patch"][at] = self._put_patch(patch, crop, box, r, None if crop is not None else str(gone))
            if c in panels and len(idx) == len(res["proj"]):
                meta = [{**P.meta[i], **{k: items[done[i]][1][k] for k in ("rank", "image_id", "value")}}
                        for i in idx]
                sub = D.Projections(P.mode, P.norm, S, meta, [P.windows[i] for i in idx],
                                    [P.origins[i] for i in idx])
                res["panel"] = self.cache.put(res["panel"], R.panel(sub, patches, display=self.display,
                                                                    scale=self.scale, **self._labels(layer, c, meta)),
                                              unavailable=gone)
                self.rendered += 1
        self.split["drawing_s"] += time.perf_counter() - t

    def _patches_only(self, layer: str, items, out, why: str) -> None:
        S = self.a.lmap.image_size
        la = self.a.lmap.by_name[layer]
        for c, r in items:
            res = out[c]
            res["error"] = why
            at = res["at"][r["rank"]]
            if usable(self.a, res["patch"][at]):
                continue
            crop = self._crop(r["image_id"])
            gone = str(crop) if isinstance(crop, Exception) else None
            res["patch"][at] = self._put_patch(res["patch"][at], None if gone else crop,
                                               la.field_box(r["y"], r["x"], S), r, gone)

    def _put_patch(self, path: Path, crop, box, row: dict, gone: str | None) -> Path:
        """A top-k entry's image patch (its receptive-field box, unclipped) into the cache; `gone`: why
        the image is unavailable (the cell is then a placeholder, marked incomplete)."""
        from . import drawing as R

        S = self.a.lmap.image_size
        box, up = R.shown_box(box, S), R.cell_factor(R.field_side([box], S))
        self.rendered += 1
        return self.cache.put(path, R.patch_cell(crop, box, self.a.lmap.image_size, up), text=_src(row),
                              unavailable=gone)

    # -- inputs, each read once per image ---------------------------------------
    def _crop(self, image_id: int):
        """The S x S RGB image the net saw, or the AtlasError saying why it is unavailable."""
        if image_id in self._crops:
            self._crops.move_to_end(image_id)
            return self._crops[image_id]
        try:
            v = self.a.image(image_id)[1]
        except AtlasError as e:
            return e  # not remembered: the image may be back on the next request
        self._crops[image_id] = v
        if len(self._crops) > 512:
            self._crops.popitem(last=False)
        return v

    def _load_switches(self, image_ids: list[int], pools: list[str]) -> tuple[dict[int, int], set[int]]:
        """Decoded switches of these images in the slab (one tensor per pool, a slot per image):
        returns (image id -> slot, ids with no stored switches). Each image is decoded once while it
        stays in the slab (least recently used slots are reused), so nothing is stacked per call."""
        import torch

        from ..deconv.switches import SwitchRegion, decode

        if not Path(self.a.path, "switches.parquet").is_file():
            raise AtlasError(f"atlas '{self.a.path}' has no switches (built with --no-switches): project "
                             "from the images instead with --switches recompute")
        lm = self.a.lmap
        if self._slab is None:
            per = sum(lm.pool_by_name[p].channels * lm.pool_by_name[p].geometry.out_size ** 2 * 8
                      for p in lm.pool_by_name)
            cap = max(len(image_ids), min(4096, SWITCH_CACHE_BYTES // max(per, 1)))
            self._slab = {p: torch.empty((cap, pool.channels, pool.geometry.out_size, pool.geometry.out_size),
                                         dtype=torch.int64) for p, pool in lm.pool_by_name.items()}
            self._free = list(range(cap - 1, -1, -1))
        cap = next(iter(self._slab.values())).shape[0]
        if len(image_ids) > cap:  # more images in one call than slots: grow (keeps the slots in place)
            grow = len(image_ids) - cap
            self._slab = {p: torch.cat([t, t.new_empty((grow,) + t.shape[1:])]) for p, t in self._slab.items()}
            self._free += list(range(cap + grow - 1, cap - 1, -1))
        want = [i for i in image_ids if i not in self._slots]
        keep = set(image_ids)
        for i in image_ids:
            if i in self._slots:
                self._slots.move_to_end(i)
        while len(self._free) < len(want):
            old = next(j for j in self._slots if j not in keep)
            self._free.append(self._slots.pop(old))
            self._have.pop(old, None)
        if want:
            for i in want:
                self._slots[i] = self._free.pop()
            seen: dict[int, set] = {i: set() for i in want}
            for r in self.a.rows("SELECT image_id, pool, y0, x0, h, w, data FROM read_parquet('switches.parquet') "
                                 f"WHERE image_id IN ({', '.join(str(int(i)) for i in want)})"):
                pool = lm.pool_by_name[r["pool"]]
                self._slab[r["pool"]][self._slots[r["image_id"]]] = decode(
                    r["data"], pool.channels, pool.geometry, SwitchRegion(r["pool"], r["y0"], r["x0"], r["h"], r["w"]))
                seen[r["image_id"]].add(r["pool"])
            self._have.update(seen)
        return ({i: self._slots[i] for i in image_ids},
                {i for i in image_ids if not set(pools) <= self._have.get(i, set())})


def _src(r: dict) -> dict:
    return {"image_id": r["image_id"], "value": r["value"], "y": r["y"], "x": r["x"]}


# ---------------------------------------------------------------------------
# deconv_png() in SQL
# ---------------------------------------------------------------------------
SQL_FUNCTION = "atlas_deconv_png"


def register_sql(atlas) -> None:
    """Add deconv_png(layer, channel, rank [, mode := ..., norm := ..., display := ..., method := ...]) -> the
    projection's PNG path to the atlas's SQL (method := 'guided': guided backpropagation, from the images).

    The function renders on demand (through the cache) a batch of rows at a time; torch is imported
    on its first call, not here. It works on a second handle of the same atlas, because a function
    running inside a query may not use that query's connection; the function holds that handle,
    never `atlas` itself (DuckDB would keep the atlas and its connection alive in a cycle).
    """
    path, state, lock = atlas.path, {}, threading.Lock()

    def batch(layer, channel, rank, mode, norm, display, method):
        with lock:  # DuckDB may call from several threads; a renderer is not thread-safe
            if "handle" not in state:
                from ..store import AtlasReader as Atlas

                state["handle"] = Atlas(path)
            return _sql_batch(state["handle"], layer, channel, rank, mode, norm, display, method)

    con = atlas.con
    con.create_function(SQL_FUNCTION, batch, ["VARCHAR", "INTEGER", "INTEGER", "VARCHAR", "VARCHAR", "VARCHAR",
                                              "VARCHAR"], "VARCHAR", type="arrow", side_effects=True)
    con.execute(f"CREATE OR REPLACE MACRO deconv_png(layer, channel, rank, mode := 'unit', norm := 'identity', "
                f"display := '{DEFAULT_DISPLAY}', method := 'deconvnet') AS "
                f"{SQL_FUNCTION}(layer, channel, rank, mode, norm, display, method)")


def _sql_batch(h, layer, channel, rank, mode, norm, display, method):
    import pyarrow as pa

    rows = list(zip(layer.to_pylist(), channel.to_pylist(), rank.to_pylist(), mode.to_pylist(),
                    norm.to_pylist(), display.to_pylist(), method.to_pylist()))
    groups: dict[tuple, dict[int, set]] = {}
    for la, c, r, m, n, d, me in rows:
        if None in (la, c, r, m, n, d, me):
            continue
        _check_options(m, n, "auto", d, me)
        h.check_channel(la, c)
        groups.setdefault((la, m, n, d, me), {}).setdefault(c, set()).add(r)
    paths: dict[tuple, str] = {}
    for (la, m, n, d, me), chans in groups.items():
        tops = _tops(h, la, sorted(chans))
        for c, ranks in chans.items():
            have = {t["rank"] for t in tops.get(c, [])}
            bad = sorted(ranks - have)
            if bad:
                raise AtlasError(f"rank {bad[0]} is out of range for {la} channel {c} (0..{len(have) - 1})")
        asked = {c: [t for t in tops[c] if t["rank"] in chans[c]] for c in chans}  # only what the query names
        res = renderer(h, m, n, display=d, method=me).channels(la, sorted(chans), asked, panel=False)
        for c, rows_c in asked.items():
            for t, p in zip(rows_c, res[c]["proj"]):
                if p is None:
                    raise AtlasError(f"cannot project {la} channel {c} rank {t['rank']}: {res[c]['error']}")
                paths[(la, c, t["rank"], m, n, d, me)] = str(p)
    return pa.array([paths.get(t) if None not in t else None for t in rows], type=pa.string())


def _tops(atlas, layer: str, channels: list[int]) -> dict[int, list[dict[str, Any]]]:
    """channel -> its top-k rows (rank order) for some channels of a layer."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in atlas.rows("SELECT channel, rank, image_id, value, y, x FROM top_activations WHERE layer = ? AND "
                        f"channel IN ({', '.join(str(int(c)) for c in channels)}) ORDER BY channel, rank", [layer]):
        out.setdefault(r.pop("channel"), []).append(r)
    return out
