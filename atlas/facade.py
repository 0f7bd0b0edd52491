"""The Atlas that Python users hold: `atlas.open(path)`.

It is the reader (`atlas.store.AtlasReader`: manifest, SQL, model, images, switches) plus what is built
on it: pictures rendered on demand (`atlas.projections`), similarity queries (`atlas.similarity`) and
the SQL functions that call them from a query. It lives above those modules so that they can read an
atlas without importing what uses them.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .store import FUNCTION_CALL, AtlasReader


class Atlas(AtlasReader):
    """A built atlas: reading, pictures, similarity, and SQL with the functions deconv_png(),
    similar_images() and similar_channels()."""

    # -- similarity (atlas/similarity.py) ----------------------------------
    def similar_images(self, image_id: int | None = None, image: str | Path | None = None,
                       layer: str | None = None, k: int = 10) -> list[dict[str, Any]]:
        """Images most like image `image_id` of the atlas, or any image file `image`: `similarity.similar_images`."""
        from .similarity import similar_images

        return similar_images(self, image_id=image_id, image=image, layer=layer, k=k)

    def similar_channels(self, channel, k: int = 10, layer: str | None = None) -> list[dict[str, Any]]:
        """Channels whose responses are most like `channel` ("conv5:17"): `similarity.similar_channels`."""
        from .similarity import similar_channels

        return similar_channels(self, channel, k=k, layer=layer)

    # -- pictures (rendered on demand, cached under cache/; see atlas/projections.py) ---------
    def show(self, layer: str, channel: int, rank: int | None = None, **options) -> Path:
        """The figure 2 panel of a channel (or, with rank, one projection) as a PNG path: `projections.show`."""
        from .projections import show

        return show(self, layer, channel, rank, **options)

    def filters(self, layer: str | None = None, out: str | Path | None = None, **options) -> Path:
        """The first layer's filters as a grid PNG (figure 6 view): `projections.filters` (cache=DIR: where
        pictures go when the atlas cannot be written)."""
        from .projections import filters

        return filters(self, layer, out, **options)

    def _register_functions(self, query: str) -> None:
        # Python functions (deconv_png, similar_images, similar_channels) are registered on the first
        # query that calls them: registering one imports numpy (~60 ms), which opening an atlas and plain
        # SQL should not pay. A name that is not followed by "(" (a column alias) registers nothing.
        for name in set(FUNCTION_CALL.findall(query.lower())):
            module = "projections" if name == "deconv_png" else "similarity"
            if module not in self._registered:
                importlib.import_module(f".{module}", "atlas").register_sql(self)
                self._registered.add(module)
