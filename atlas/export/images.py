"""Every picture the site shows comes through this module: the one place the export asks for pictures.

`Pictures(atlas)` hands out paths of PNG files; the site writer hardlinks (or
copies) them into the site, never re-encodes them.

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
                  self._impl.version)

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

    def filter_grid(self, layer: str) -> Path | None:
        t0 = time.perf_counter()
        try:
            return self._impl.filter_grid(layer)
        finally:
            self.seconds += time.perf_counter() - t0


def _h(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
