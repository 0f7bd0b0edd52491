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
        self._crops: OrderedDict[int, Any] = OrderedDict()
        self._switches: OrderedDict[int, dict] = OrderedDict()
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

    def _load_switches(self, image_ids: list[int], pools: list[str]) -> None:
        from ..switches import SwitchRegion, decode

        want = [i for i in image_ids if i not in self._switches]
        if want:
            if not Path(self.a.path, "switches.parquet").is_file():
                raise AtlasError(f"atlas '{self.a.path}' has no switches (built with --no-switches)")
            got: dict[int, dict] = {i: {} for i in want}
            for r in self.a.rows("SELECT image_id, pool, y0, x0, h, w, data FROM read_parquet('switches.parquet') "
                                 f"WHERE image_id IN ({', '.join(str(int(i)) for i in want)})"):
                pool = self.a.lmap.pool_by_name[r["pool"]]
                got[r["image_id"]][r["pool"]] = decode(r["data"], pool.channels, pool.geometry,
                                                       SwitchRegion(r["pool"], r["y0"], r["x0"], r["h"], r["w"]))
            self._switches.update(got)
        for i in image_ids:
            self._switches.move_to_end(i)
        # keep decoded switches of recently used images, up to about SWITCH_CACHE_BYTES
        per = max(1, sum(t.numel() * t.element_size() for t in self._switches[image_ids[0]].values())) \
            if image_ids else 1
        while len(self._switches) > max(len(image_ids), SWITCH_CACHE_BYTES // per):
            self._switches.popitem(last=False)

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
        if la.pools_below:
            self._load_switches(ids, la.pools_below)
        slot = {i: n for n, i in enumerate(ids)}
        reqs, meta = [], []
        for c, r in rows:
            if la.pools_below and not all(p in self._switches[r["image_id"]] for p in la.pools_below):
                out[c]["error"] = f"no switches stored for image {r['image_id']}"
                continue
            reqs.append(D.Request(slot[r["image_id"]], layer, c, r["y"], r["x"], value=r["value"]))
            meta.append((c, r))
        if not reqs:
            return
        switches = None
        if la.pools_below:
            import torch

            switches = {p: torch.stack([self._switches[i][p] for i in ids]) for p in la.pools_below}
        P = D.project(lm, reqs, switches, mode=self.mode, norm=self.norm)
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
                R.write_png(out[c]["proj"][r["rank"]], R.projection_image(P, i, rank=r["rank"], text=_src(r)))
                R.write_png(out[c]["patch"][r["rank"]], R.patch_cell(crop, box, S, up), text=_src(r))
                self.rendered += 2
            sub = D.Projections(P.mode, P.norm, S, [P.meta[i] for i in idx], [P.windows[i] for i in idx],
                                [P.origins[i] for i in idx])
            R.write_png(out[c]["panel"], R.panel(sub, patches))
            self.rendered += 1

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
        R.write_png(p, R.filter_grid(w))
        self.rendered += 1
        return p


def _src(r: dict) -> dict:
    return {"image_id": r["image_id"], "value": r["value"], "y": r["y"], "x": r["x"]}
