"""A matched pair's figure-2 panels side by side: each unit's top-k projections beside their image patches,
drawn by its own atlas (atlas.pictures.projections.show), under a title naming both units and their correlation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AtlasError
from ..util.files import atomic_write


def _panel(atlas, layer: str, channel, display: str, label: str):
    """The unit's panel as a PIL image under its label, or a grey note when it has none."""
    from PIL import Image

    from ..pictures.charts import titled
    from ..pictures.projections import show

    if channel is None:
        return titled(Image.new("RGB", (160, 60), (236, 236, 236)), label, "no counterpart")
    try:
        with Image.open(show(atlas, layer, int(channel), display=display)) as im:
            return titled(im.convert("RGB"), label)
    except AtlasError as e:
        return titled(Image.new("RGB", (160, 60), (236, 236, 236)), label, f"no panel: {e}"[:120])


def pair_figure(cmp, match: dict[str, Any], path: Path, display: str) -> Path:
    from ..pictures.charts import beside, margin, titled

    a_name, b_name = cmp.names
    left = _panel(cmp.atlas("a"), match["layer_a"], match["channel_a"], display,
                  f"{a_name} (A): {match['layer_a']} channel {match['channel_a']}")
    right = _panel(cmp.atlas("b"), match["layer_b"], match["channel_b"], display,
                   f"{b_name} (B): {match['layer_b']} channel {match['channel_b']}")
    corr = "none" if match["corr"] is None else f"{match['corr']:.3f}"
    im = titled(beside(left, right, pad=18), f"{match['kind']} match, correlation {corr} over "
                f"{cmp.record['images']['shared']} shared images")
    atomic_write(path, lambda tmp: margin(im, 8).save(tmp, format="PNG"))
    return path
