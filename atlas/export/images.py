"""Every picture the site shows comes through this module: the one place the export asks for pictures.

`Pictures(atlas)` hands out paths of PNG files, and `web(png)` the lossy WebP
the site ships instead (WEB_QUALITY): made once per cache entry and kept in the
cache beside its PNG, so a re-export encodes nothing again and `atlas show`
keeps its PNGs with their text chunks. The site writer hardlinks (or copies)
the WebP files into the site. A PNG is 5 to 20 times the bytes of its WebP
(a resnet18 layer4 channel's 19 pictures: 1.5 MB as PNG; atlas/manual/site.md).

The pictures are the lazy renderer's cache (`atlas.pictures.projections`, the same
cache `atlas show` and deconv_png() fill: the atlas's own, or the per-user one
when the atlas cannot be written, or a --cache DIR), so an export after `atlas
show` reuses those PNGs, and a show after an export finds them rendered.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from ..pictures.projections import DEFAULT_DISPLAY, Renderer

# WebP's lossy quality for the site's pictures: looked at on resnet18 layer4 panels (random weights, the
# finest structure there is): at 55 (the notebook's) the projections' fine grain smears, at 75 it holds and
# the panel's labels read; 80 adds a fifth to the bytes for no difference one sees. method 4: method 6 takes
# twice the time for 5 % fewer bytes. Part of every site picture's key: a change re-encodes them all.
WEB_QUALITY = 75
WEB_METHOD = 4
# Flat pictures and pixel art are tried as lossless WebP too (atlas/pictures/webp.py says when and why).
LOSSLESS_TRY = 3
LOSSLESS_WORTH = 1.5
# A projection cell's side on the site when it is drawn at or below its field's own scale (a photo-like
# picture: a deep layer's field covers most of the image). A channel page shows each cell at 91 to 115 CSS px
# on a desktop (two to a rank's card, cards at least 200 px wide in a main column of at most 1400 px:
# atlas/static/atlas.css), so the cache's 160 px cell (drawing.MAX_CELL, drawn for a slide: `atlas show`)
# is shrunk to 112 for the site, the size it is read at, and encoded with WebP's method 6 (12 % fewer bytes
# at this size for 2 ms more a cell). resnet50 layer4, random weights, 576 projections: 2.9 KB -> 0.94 KB a
# cell, a channel's nine 26 KB -> 8.4 KB. A smaller field's cell is left as drawn (enlarged with NEAREST:
# pixel art). 128 px kept 1.6 KB a cell; q65 at 112 px lost the faint outer grain of the projections.
SITE_CELL = 112
CELL_METHOD = 6


class Pictures:
    """PNG files for one atlas. `seconds` counts the time spent producing pictures (projection work)."""

    def __init__(self, atlas, mode: str = "unit", norm: str = "identity", cache=None,
                 display: str = DEFAULT_DISPLAY):
        self.a = atlas
        self.mode, self.norm, self.display = mode, norm, display
        self.seconds = 0.0
        # the image pages' pictures made (not found in the cache): apart from `rendered`, the projection
        # pictures that `atlas show` shares with the export
        self.images_rendered = 0
        self.encoded = 0  # WebP files made from cached PNGs (not found beside them)
        self.web_seconds = 0.0
        # its own counters: they describe this export only
        self._impl = Renderer(atlas, mode, norm, cache, display=display)

    @property
    def rendered(self) -> int:
        """Pictures that had to be made (not found in the cache), the filter grid included."""
        return self._impl.rendered

    @property
    def key(self) -> str:
        """Identifies what the pictures depend on besides the top-k rows: weights, settings, renderer."""
        m = self.a.manifest
        return _h(m["model"].get("weights_sha256"), m.get("created"), self.mode, self.norm, self.display,
                  self._impl.version, "webp", WEB_QUALITY, WEB_METHOD, LOSSLESS_TRY, LOSSLESS_WORTH, SITE_CELL,
                  CELL_METHOD)

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

    @property
    def split(self) -> dict[str, float]:
        """Picture time by kind: stored switches, images, the projection engine, drawing + PNG."""
        return {k: round(v, 3) for k, v in self._impl.split.items()}

    def image(self, image_id: int) -> Path | None:
        """The S x S image the net saw (the atlas's crop of the dataset image), as a PNG in the render cache
        (one per image, whatever the projection settings), or None when the image cannot be read."""
        from ..errors import AtlasError
        from ..pictures.cache import usable

        t0 = time.perf_counter()
        try:
            cache = self._impl.cache
            path = cache.find(f"images/{int(image_id)}.png")
            if usable(self.a, path):
                return path
            try:
                crop = self.a.image(int(image_id))[1]
            except AtlasError:
                return None
            self.images_rendered += 1
            dest = cache.put(path, crop.convert("RGB"), text={"image_id": int(image_id)})
            cache.settle({dest})  # the per-user cache, when it is the one written, stays within its bound
            return dest
        finally:
            self.seconds += time.perf_counter() - t0

    def web(self, png: Path | None, max_side: int | None = None) -> Path | None:
        """The WebP of a cached PNG: beside it in the cache (`x.png` -> `x.webp`, or `x.112px-q75m6.webp` shrunk
        to `max_side`), made when missing or older than the PNG (a picture redrawn once its image is back);
        None for None."""
        if png is None:
            return None
        t0 = time.perf_counter()
        try:
            cache = self._impl.cache
            # where it is (the atlas's cache or the per-user one, whichever took it), else where it goes
            name = Path(cache.rel(png))
            # a shrunk cell's name says how it was made: a change of these settings makes new files, never
            # finds the old ones (the full-size WebP keeps its name: its settings have not changed)
            name = name.with_suffix(f".{max_side}px-q{WEB_QUALITY}m{CELL_METHOD}.webp" if max_side else ".webp")
            dest = cache.find(str(name))
            try:
                if dest.stat().st_mtime_ns >= png.stat().st_mtime_ns:
                    return dest
            except FileNotFoundError:
                pass
            from ..util.files import atomic_write_bytes

            data = _webp(png, max_side)
            self.encoded += 1
            dest = cache.put_with(dest, lambda path: atomic_write_bytes(path, data, fsync=False))
            cache.settle({dest, png})
            return dest
        finally:
            self.seconds += time.perf_counter() - t0
            self.web_seconds += time.perf_counter() - t0

    def filter_grid(self, layer: str) -> Path | None:
        t0 = time.perf_counter()
        try:
            return self._impl.filter_grid(layer)
        finally:
            self.seconds += time.perf_counter() - t0


def _webp(png: Path, max_side: int | None = None) -> bytes:
    """A PNG's WebP bytes for the site: lossy at WEB_QUALITY, or lossless where that is smaller."""
    from ..pictures.webp import encode

    return encode(png, WEB_QUALITY, CELL_METHOD if max_side else WEB_METHOD, lossless_try=LOSSLESS_TRY,
                  lossless_worth=LOSSLESS_WORTH, max_side=max_side)


def _h(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
