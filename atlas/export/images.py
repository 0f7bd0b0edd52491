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
import io
import time
from pathlib import Path
from typing import Any

from ..errors import AtlasError
from ..fsutil import atomic_write_bytes

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
# the stand-in renderer (until atlas.render lands)
# ---------------------------------------------------------------------------
class _Fallback:
    version = "fallback-1"

    def __init__(self, atlas, mode: str, norm: str):
        self.a, self.mode, self.norm = atlas, mode, norm
        self.rendered = 0
        self._crops: dict[int, Any] = {}
        w = atlas.manifest["model"].get("weights_sha256") or "random"
        self.root = Path(atlas.path, "cache", "export", f"{w[:16]}-{mode}-{norm}")

    def _crop(self, image_id: int):
        if image_id not in self._crops:
            if len(self._crops) > 512:
                self._crops.clear()
            try:
                self._crops[image_id] = self.a.image(image_id)
            except AtlasError as e:
                self._crops[image_id] = e
        return self._crops[image_id]

    def channels(self, layer, channels, tops):
        out = {}
        todo = []
        for c in channels:
            rows = tops.get(c, [])
            d = self.root / layer
            res = {"panel": None, "proj": [d / f"{c}-{r['rank']}.png" for r in rows],
                   "patch": [d / f"{c}-{r['rank']}-patch.png" for r in rows], "error": None}
            if rows:
                res["panel"] = d / f"{c}-panel.png"
            out[c] = res
            if rows and not all(p.is_file() for p in res["proj"] + res["patch"] + [res["panel"]]):
                todo.append(c)
        for i in range(0, len(todo), 8):
            self._render(layer, todo[i:i + 8], tops, out)
        return out

    def _render(self, layer, chans, tops, out):
        import torch

        from .. import deconv as D

        reqs, sw_lists, meta = [], {}, []
        for c in chans:
            for r in tops[c]:
                crop = self._crop(r["image_id"])
                if isinstance(crop, Exception):
                    out[c]["error"] = str(crop)
                    continue
                try:
                    sw = self.a.switches(layer, c, r["rank"])
                except AtlasError as e:
                    out[c]["error"] = str(e)
                    continue
                for k, v in sw.items():
                    sw_lists.setdefault(k, []).append(v)
                reqs.append(D.Request(len(reqs), layer, c, r["y"], r["x"], value=r["value"]))
                meta.append((c, r))
        if reqs:
            switches = {k: torch.stack(v) for k, v in sw_lists.items()}
            P = D.project(self.a.lmap, reqs, switches, mode=self.mode, norm=self.norm)
            by_c: dict[int, list] = {}
            for i, (c, r) in enumerate(meta):
                proj = _to_image(P.crop(i, (r["x0"], r["y0"], r["x1"], r["y1"])))
                patch = self._crop(r["image_id"])[1].crop((r["x0"], r["y0"], r["x1"], r["y1"]))
                _save(out[c]["proj"][r["rank"]], proj)
                _save(out[c]["patch"][r["rank"]], patch)
                by_c.setdefault(c, []).append((proj, patch))
                self.rendered += 2
            for c, pairs in by_c.items():
                _save(out[c]["panel"], _panel(pairs))
                self.rendered += 1
        for c in chans:  # what could not be made is not offered
            o = out[c]
            o["proj"] = [p if p.is_file() else None for p in o["proj"]]
            o["patch"] = [p if p.is_file() else None for p in o["patch"]]
            if o["panel"] is not None and not o["panel"].is_file():
                o["panel"] = None

    def filter_grid(self, layer):
        import numpy as np
        from PIL import Image

        p = self.root / f"{layer}-filters.png"
        if p.is_file():
            return p
        lm = self.a.lmap
        la = lm.by_name.get(layer)
        if la is None or la.kind != "conv" or la.pools_below:
            return None
        w = lm.model.features[la.index].weight.detach().float().cpu().numpy()  # (C, 3, k, k)
        if w.shape[1] != 3:
            return None
        n, k = w.shape[0], w.shape[-1]
        cols = int(np.ceil(np.sqrt(n)))
        rows = -(-n // cols)
        cell = k + 1
        grid = np.full((rows * cell + 1, cols * cell + 1, 3), 255, np.uint8)
        for i in range(n):
            f = w[i].transpose(1, 2, 0)
            m = np.abs(f).max() or 1.0
            img = ((f / m) * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
            y, x = divmod(i, cols)
            grid[1 + y * cell:1 + y * cell + k, 1 + x * cell:1 + x * cell + k] = img
        scale = max(1, 12 // k)
        im = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
        _save(p, im)
        self.rendered += 1
        return p


def _to_image(t):
    """A signed projection (3, h, w) as an RGB image: zero is mid-grey, scaled by its largest |value|."""
    from PIL import Image

    a = t.detach().float().cpu().numpy().transpose(1, 2, 0)
    m = float(abs(a).max()) or 1.0
    return Image.fromarray((a / m * 127.5 + 127.5).clip(0, 255).astype("uint8"))


def _panel(pairs):
    """Figure 2: each projection beside its image patch, in a grid."""
    from PIL import Image

    cw = max(p.width for p, _ in pairs)
    ch = max(p.height for p, _ in pairs)
    cols = int(len(pairs) ** 0.5 + 0.999)
    rows = -(-len(pairs) // cols)
    pad = 2
    W = cols * (2 * cw + 3 * pad) + pad
    H = rows * (ch + pad) + pad
    im = Image.new("RGB", (W, H), (255, 255, 255))
    for i, (p, q) in enumerate(pairs):
        y, x = divmod(i, cols)
        x0 = pad + x * (2 * cw + 3 * pad)
        im.paste(p, (x0, pad + y * (ch + pad)))
        im.paste(q, (x0 + cw + pad, pad + y * (ch + pad)))
    return im


def _save(path: Path, im) -> None:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())
