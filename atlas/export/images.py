"""Every picture the site shows comes through this module: the one place that calls the renderer.

`Pictures(atlas)` hands out paths of PNG files; the site writer hardlinks (or
copies) them into the site, never re-encodes them.

The projection images come from the lazy renderer's cache (`atlas.render`, the
same cache `atlas show` fills), so an export after `atlas show` reuses those
PNGs, and a show after an export finds them rendered. Until that module is
present, a stand-in below renders through the DeconvNet engine directly into
ATLAS/cache/export/.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import AtlasError

try:  # the lazy renderer (another module's public API)
    from .. import render as _render  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on what is installed
    _render = None


class Pictures:
    """PNG files for one atlas. `seconds` counts the time spent producing pictures (projection work)."""

    def __init__(self, atlas, mode: str = "unit", norm: str = "identity"):
        self.a = atlas
        self.mode, self.norm = mode, norm
        self.seconds = 0.0
        self.rendered = 0  # pictures that had to be made (not found in the cache)
        self._impl = _Fallback(atlas, mode, norm)

    @property
    def key(self) -> str:
        """Identifies what the pictures depend on besides the top-k rows: weights, settings, renderer."""
        m = self.a.manifest
        return _h(m["model"].get("weights_sha256"), m.get("created"), self.mode, self.norm, self._impl.version)

    def channels(self, layer: str, channels: list[int], tops: dict[int, list[dict[str, Any]]]
                 ) -> dict[int, dict[str, Any]]:
        """For each channel: {"panel": Path|None, "proj": [Path per rank], "patch": [Path per rank]}.

        Missing pictures (an image that is gone, no switches) are None with a reason in "error".
        """
        t0 = time.perf_counter()
        try:
            return self._impl.channels(layer, channels, tops)
        finally:
            self.seconds += time.perf_counter() - t0
            self.rendered = self._impl.rendered

    @property
    def split(self) -> dict[str, float]:
        """Picture time by kind: reading inputs (images, switches), the projection engine, drawing + PNG."""
        return {k: round(v, 3) for k, v in getattr(self._impl, "split", {}).items()}

    def filter_grid(self, layer: str) -> Path | None:
        t0 = time.perf_counter()
        try:
            return self._impl.filter_grid(layer)
        finally:
            self.seconds += time.perf_counter() - t0


def _h(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# the stand-in for the lazy cache (until atlas.render has one): atlas.render's pictures,
# atlas.deconv's projections, files under ATLAS/cache/export/
# ---------------------------------------------------------------------------
SWITCH_CACHE_BYTES = 1 << 30


class _Fallback:
    version = "render-1"

    def __init__(self, atlas, mode: str, norm: str):
        self.a, self.mode, self.norm = atlas, mode, norm
        self.rendered = 0
        self.split = {"inputs_s": 0.0, "projection_s": 0.0, "drawing_s": 0.0}  # where picture time goes
        self._crops: OrderedDict[int, Any] = OrderedDict()
        self._slab: dict[str, Any] | None = None       # pool -> (slots, C, H, W) decoded switches
        self._slots: OrderedDict[int, int] = OrderedDict()  # image id -> slot, least recently used first
        self._free: list[int] = []
        self._have: dict[int, set] = {}  # image id -> the pools whose switches are stored for it
        w = atlas.manifest["model"].get("weights_sha256") or "random"
        self.root = Path(atlas.path, "cache", "export", f"{w[:16]}-{mode}-{norm}")

    # -- inputs, each read once per image ---------------------------------------
    def _crop(self, image_id: int):
        """The S x S RGB image the net saw, or the AtlasError saying why it is unavailable."""
        if image_id in self._crops:
            self._crops.move_to_end(image_id)
            return self._crops[image_id]
        try:
            v = self.a.image(image_id)[1]
        except AtlasError as e:
            v = e
        self._crops[image_id] = v
        if len(self._crops) > 512:
            self._crops.popitem(last=False)
        return v

    def _load_switches(self, image_ids: list[int], pools: list[str]) -> tuple[dict[int, int], set[int]]:
        """Decoded switches of these images in the slab (one tensor per pool, a slot per image):
        returns (image id -> slot, ids with no stored switches). Each image is decoded once while it
        stays in the slab (least recently used slots are reused), so nothing is stacked per call."""
        import torch

        from ..switches import SwitchRegion, decode

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
            if not Path(self.a.path, "switches.parquet").is_file():
                raise AtlasError(f"atlas '{self.a.path}' has no switches (built with --no-switches)")
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

    # -- pictures -------------------------------------------------------------
    def channels(self, layer, channels, tops):
        out = {}
        todo = []
        for c in channels:
            rows = tops.get(c, [])
            d = self.root / layer
            res = {"panel": d / f"{c}-panel.png" if rows else None,
                   "proj": [d / f"{c}-{r['rank']}.png" for r in rows],
                   "patch": [d / f"{c}-{r['rank']}-patch.png" for r in rows], "error": None}
            out[c] = res
            if rows and not all(p.is_file() for p in res["proj"] + res["patch"] + [res["panel"]]):
                todo.append(c)
        if todo:
            self._render(layer, todo, tops, out)
        for c in channels:  # what could not be made is not offered
            o = out[c]
            o["proj"] = [p if p.is_file() else None for p in o["proj"]]
            o["patch"] = [p if p.is_file() else None for p in o["patch"]]
            if o["panel"] is not None and not o["panel"].is_file():
                o["panel"] = None
        return out

    def _render(self, layer, chans, tops, out):
        from .. import deconv as D
        from .. import render as R

        lm = self.a.lmap
        la = lm.by_name[layer]
        S = lm.image_size
        rows = [(c, r) for c in chans for r in tops[c]]
        ids = sorted({r["image_id"] for _, r in rows})
        slot, missing = {i: n for n, i in enumerate(ids)}, set()
        if la.pools_below:
            t = time.perf_counter()
            slot, missing = self._load_switches(ids, la.pools_below)
            self.split["inputs_s"] += time.perf_counter() - t
        reqs, meta = [], []
        for c, r in rows:
            if r["image_id"] in missing:
                out[c]["error"] = f"no switches stored for image {r['image_id']}"
                continue
            reqs.append(D.Request(slot[r["image_id"]], layer, c, r["y"], r["x"], value=r["value"]))
            meta.append((c, r))
        if not reqs:
            return
        switches = {p: self._slab[p] for p in la.pools_below} if la.pools_below else None
        t = time.perf_counter()
        P = D.project(lm, reqs, switches, mode=self.mode, norm=self.norm)
        self.split["projection_s"] += time.perf_counter() - t
        t = time.perf_counter()
        for _, r in meta:  # the images (decoded once, kept while they recur)
            self._crop(r["image_id"])
        self.split["inputs_s"] += time.perf_counter() - t
        t = time.perf_counter()
        by_c: dict[int, list[int]] = {}
        for i, (c, r) in enumerate(meta):
            by_c.setdefault(c, []).append(i)
        for c, idx in by_c.items():
            patches = []
            for i in idx:
                r = meta[i][1]
                crop = self._crop(r["image_id"])
                if isinstance(crop, Exception):
                    out[c]["error"] = str(crop)
                    crop = None
                patches.append(crop)
                box = tuple(P.meta[i]["rf_box"])
                up = R.upscale_for(max(box[2] - box[0], box[3] - box[1]))
                _write_png(out[c]["proj"][r["rank"]], R.projection_image(P, i, rank=r["rank"], text=_src(r)))
                _write_png(out[c]["patch"][r["rank"]], R.patch_cell(crop, box, S, up), text=_src(r))
                self.rendered += 2
            sub = D.Projections(P.mode, P.norm, S, [P.meta[i] for i in idx], [P.windows[i] for i in idx],
                                [P.origins[i] for i in idx])
            _write_png(out[c]["panel"], R.panel(sub, patches))
            self.rendered += 1
        self.split["drawing_s"] += time.perf_counter() - t

    def filter_grid(self, layer):
        from .. import render as R

        p = self.root / f"{layer}-filters.png"
        if p.is_file():
            return p
        lm = self.a.lmap
        la = lm.by_name.get(layer)
        if la is None or la.kind != "conv" or la.pools_below:
            return None
        w = lm.model.features[la.index].weight
        if w.shape[1] not in (1, 3):
            return None
        _write_png(p, R.filter_grid(w))
        self.rendered += 1
        return p


def _write_png(path: Path, image, text: dict | None = None) -> None:
    """atlas.render's PNG (its text chunks included), renamed into place atomically; no fsync: a
    cache can be remade, and one fsync per picture would cost more than drawing it."""
    import os

    from .. import render as R

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=R.png_info(image, text))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _src(r: dict) -> dict:
    return {"image_id": r["image_id"], "value": r["value"], "y": r["y"], "x": r["x"]}
