"""The Atlas that Python users hold: `atlas.open(path)`.

It is the reader (`atlas.store.AtlasReader`: manifest, SQL, model, images, switches) plus what is built
on it: pictures rendered on demand (`atlas.pictures.projections`), similarity queries (`atlas.search.similarity`) and
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

    # -- similarity (atlas/search/similarity.py) ----------------------------------
    def similar_images(self, image_id: int | None = None, image: str | Path | None = None,
                       layer: str | None = None, k: int = 10) -> list[dict[str, Any]]:
        """Images most like image `image_id` of the atlas, or any image file `image`: `similarity.similar_images`."""
        from .notebook import similar_images_table
        from .search.similarity import similar_images

        # a Table: the same list of dicts, shown in a notebook with thumbnails of the images
        return similar_images_table(self, similar_images(self, image_id=image_id, image=image, layer=layer, k=k))

    def similar_channels(self, channel, k: int = 10, layer: str | None = None) -> list[dict[str, Any]]:
        """Channels whose responses are most like `channel` ("conv5:17"): `similarity.similar_channels`."""
        from .notebook import similar_channels_table
        from .search.similarity import similar_channels

        # a Table: the same list of dicts, shown in a notebook with each channel's strongest projection
        return similar_channels_table(self, similar_channels(self, channel, k=k, layer=layer))

    # -- pictures (rendered on demand, cached under cache/; see atlas/pictures/projections.py) ---------
    def show(self, layer: str, channel: int, rank: int | None = None, **options) -> Path:
        """The figure 2 panel of a channel (or, with rank, one projection) as a PNG path: `projections.show`."""
        from .pictures.projections import show

        return show(self, layer, channel, rank, **options)

    def filters(self, layer: str | None = None, out: str | Path | None = None, **options) -> Path:
        """The first layer's filters as a grid PNG (figure 6 view): `projections.filters` (cache=DIR: where
        pictures go when the atlas cannot be written)."""
        from .pictures.projections import filters

        return filters(self, layer, out, **options)

    def visualize(self, layer: str, channel: int, **options) -> Path:
        """The feature visualization of a channel (an image optimized to excite it) as a PNG path, rendered
        on the first request and cached: `visualizations.visualize_one` (steps=, seed=, unit=, diversity=,
        device=, cache=, out=); `visualizations.visualize` gives a layer's records with their figures."""
        from .pictures.visualizations import visualize_one

        return visualize_one(self, layer, channel, **options)

    # -- in a notebook (atlas/notebook.py: each shows itself inline, and hands its data to Python) --------
    def channel(self, layer: str, channel: int, display: str | None = None):
        """One channel: its statistics, top-k (a Table with thumbnails), figure 2 panel and projections."""
        from .notebook import Channel

        return Channel(self, layer, channel, display=display)

    def analysis(self, name: str, run: str | None = None):
        """An analysis's results in this atlas (ATLAS/analyses/NAME/): its figures and its table."""
        from .notebook import Analysis

        return Analysis(self, name, run)

    def _repr_html_(self) -> str:
        from .notebook import atlas_html

        return atlas_html(self)

    def _register_functions(self, query: str) -> None:
        # Python functions (deconv_png, similar_images, similar_channels) are registered on the first
        # query that calls them: registering one imports numpy (~60 ms), which opening an atlas and plain
        # SQL should not pay. A name that is not followed by "(" (a column alias) registers nothing.
        for name in set(FUNCTION_CALL.findall(query.lower())):
            module = {"deconv_png": "pictures.projections",
                      "featurevis_png": "pictures.visualizations"}.get(name, "search.similarity")
            if module not in self._registered:
                importlib.import_module(f".{module}", "atlas").register_sql(self)
                self._registered.add(module)
