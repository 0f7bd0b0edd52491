"""WebP bytes of a picture: the one encoder behind the exported site's pictures and a notebook's inline ones.

The files on disk (the render cache, `atlas show --out`) stay PNG, with their text chunks; what is shipped
to a browser is lossy WebP, a fifth to a twentieth of the PNG's bytes. The two callers differ only in their
settings (the site: atlas/export/images.py; a notebook: atlas/notebook.py).

Lossy WebP keeps colour at half resolution (4:2:0): a grainy projection's per-pixel colour blurs (a resnet18
layer4 projection: 7 grey levels off on average, at any quality), its pattern stays. A picture whose PNG is
within `lossless_try` times its lossy WebP is flat or pixel art (a small field's cell enlarged with NEAREST,
a placeholder): lossless WebP is tried then, and kept when it costs at most `lossless_worth` times the lossy
bytes, exact (a zfnet-mini conv2 projection at 32 px: PNG 2.2 KB, lossy 1.4 KB, lossless 1.0 KB). A
photo-like picture (a 224 px patch, a deep unit's projection) is 13 to 18 times its lossy WebP, and its
lossless one nearly the PNG.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def encode(source: str | Path | bytes | Any, quality: int, method: int = 4, lossless_try: float | None = None,
           lossless_worth: float = 1.5, max_side: int | None = None) -> bytes:
    """WebP bytes of `source` (a PNG file, PNG bytes or a PIL image), lossy at `quality` (WebP's `method`:
    6 takes twice the time of 4 for 5 % fewer bytes). `lossless_try`: also try lossless when the PNG is
    within that many times the lossy bytes (above). `max_side`: shrink (LANCZOS) a larger picture to it
    first, for a picture that is shown no larger (never an enlargement: pixel art stays pixels)."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray)):
        png_bytes = len(source)
        with Image.open(io.BytesIO(source)) as im:
            rgb = im.convert("RGB")
    elif isinstance(source, (str, Path)):
        png_bytes = Path(source).stat().st_size
        with Image.open(source) as im:
            rgb = im.convert("RGB")
    else:
        png_bytes, rgb = None, source.convert("RGB")
    if max_side is not None and max(rgb.size) > max_side:
        f = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * f)), max(1, round(rgb.height * f))), Image.LANCZOS)
        png_bytes = None  # the PNG's size says nothing of the shrunk picture: it is photo-like anyway

    def save(**kw) -> bytes:
        buf = io.BytesIO()
        rgb.save(buf, format="WEBP", method=method, **kw)
        return buf.getvalue()

    lossy = save(quality=quality)
    if lossless_try is None or png_bytes is None or png_bytes > lossless_try * len(lossy):
        return lossy
    exact = save(lossless=True, quality=50)  # quality: effort here; 50 is fast, within 5 % of 100
    return exact if len(exact) <= lossless_worth * len(lossy) else lossy
