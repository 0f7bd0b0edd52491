"""The feature visualizations on the exported pages (atlas/pictures/visualizations.py makes them).

Without `--feature-vis` the export shows the default-recipe pictures already in the cache (drawn by
`atlas visualize`, featurevis_png() or an earlier `export --feature-vis`) and draws none; with it, it
renders the missing ones first, a chunk of channels of a layer at a time (batched). The site's
fingerprint includes which pictures are cached, so an export after `atlas visualize` shows them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .site import key_of


def state(a, selection: dict[str, list[int]], cache, render: bool) -> list:
    """What the pages' feature visualizations depend on: the flag and the cached pictures (a stat each)."""
    from ..pictures.visualizations import cached

    out: list = []
    missing = False
    for layer, chans in selection.items():
        have = cached(a, layer, chans, cache)
        missing = missing or len(have) < len(chans)
        for c, p in sorted(have.items()):
            st = p.stat()
            out.append((layer, c, p.parent.parent.name, st.st_size, st.st_mtime_ns))
    # --feature-vis changes the site only where a picture is missing
    return [bool(render) and missing, *out]


def link(ex, layer: str, channels: list[int], slug: str, stats: dict[int, dict]) -> dict[int, dict[str, Any]]:
    """Put the channels' pictures into the site (rendering the missing ones first when asked); returns
    {channel: {"src": path relative to the layer's pages, and the figures of `atlas visualize`}}."""
    from ..pictures.visualizations import _info, cached, visualize

    render, cache = getattr(ex, "feature_vis", (False, None))
    if render:
        visualize(ex.a, layer, channels, cache=cache, progress=False, log=ex.log)
    out = {}
    for c, src in cached(ex.a, layer, channels, cache).items():
        rel = f"{slug}/img/{c}-featurevis.png"
        st = Path(src).stat()
        k = key_of("featurevis", src.parent.parent.name, st.st_size, st.st_mtime_ns)
        if not ex.site.fresh(rel, k):
            ex.site.link(rel, k, Path(src))
        info = _info(Path(src))
        steps = src.parent.parent.name.split("-")[0].lstrip("s")
        out[c] = {"src": f"img/{c}-featurevis.png", "map_max": info.get("map_max"),
                  "dataset_max": stats.get(c, {}).get("max"), "steps": int(steps) if steps.isdigit() else None}
    return out
