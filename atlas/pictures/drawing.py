"""Pictures of projections: display normalisation, the paper's figure 2 panel, filter grids, PNG files.

Display normalisation (`DISPLAYS`, the rule written into every PNG's text and
part of the cache key): a projection is a signed picture in the model's input
space (mean-subtracted pixels), so each one is shown centred on grey with a
symmetric scale s of its own,

    shown = clip(v / (2 * s), -0.5, 0.5) + 0.5        (then 0..1 -> 0..255)

percentile (the default): s is the 99.5th percentile (`PERCENTILE`) of |v| over
    the three colour channels inside the unit's receptive-field box clipped to
    the image; the few values beyond +-s are clipped to black or white.
max (the display before): s = max|v| over the same values, nothing clipped.

Why a percentile: a DeconvNet projection is heavy-tailed, so with s = max|v|
one strong pixel sets the scale and most of the picture sits within a few grey
levels of mid-grey (`atlas help channel` measures it on the demo's conv5). The paper's
figures are contrast-normalised per projection, and attribution tools clip
outliers before scaling: Captum's visualize_image_attr saturates the largest
values that carry 2 % of the total |attribution| (outlier_perc=2), Vertex AI's
image explanations clip at the 99.9th percentile. Clipping 0.5 % of the values
keeps the sign and the shape and makes the rest visible. When that percentile is 0 (a projection zero on more than 99.5 % of
its field) s falls back to max|v|, so its few non-zero pixels still show; an
all-zero projection is plain mid-grey. In both displays zero is mid-grey (128)
and negative and positive contributions are both visible; each projection has
its own scale, so brightness says nothing about strength across projections
(the activation value and s, in the PNG text, do).

A panel (`panel`) is figure 2 of the paper for one channel: the top-k
projections in a grid (3 x 3 for k = 9) beside the matching image patches.
Every cell is the unit's receptive-field box, unclipped, so patch and
projection line up pixel for pixel; the part of the box beyond the image
border is marked quietly (`OUTSIDE`: a flat light grey with thin, slightly
darker diagonal lines), the same in both, so that for a small-input model,
whose deep fields reach far beyond the image, the picture and not its border
is what one sees. Small fields are enlarged with NEAREST.

PNG files are written atomically (`write_png`, through atlas.util.files.atomic_write:
the cache and the site skip its fsync), so no reader ever sees a truncated PNG.

This module needs numpy and Pillow only; tensors are accepted (converted with
`.detach().cpu()`), torch is never imported here.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

PERCENTILE = 99.5  # of |v| in the field: the display scale of `percentile`
DISPLAYS = {
    "percentile": (f"per projection: shown = clip(v / (2 * s), -0.5, 0.5) + 0.5, s the {PERCENTILE:g}th percentile "
                   "of |v| over the three colour channels inside the unit's receptive-field box clipped to the "
                   "image (s = max|v| where that percentile is 0; all zero: mid-grey); the values beyond s are "
                   "clipped to black or white; 0 is mid-grey; negative and positive contributions both visible; "
                   "one scale per projection"),
    "max": ("per projection: shown = v / (2 * max|v|) + 0.5, max|v| over the three colour channels "
            "inside the unit's receptive-field box clipped to the image; 0 is mid-grey, the largest |v| "
            "black or white; negative and positive contributions both visible; one scale per projection"),
}
from ..choices import DEFAULT_DISPLAY  # noqa: E402,F401 - re-exported
NORMALISATION = DISPLAYS[DEFAULT_DISPLAY]
FILTER_NORMALISATION = ("per filter: shown = w / (2 * max|w|) + 0.5 over its three colour channels; "
                        "0 is mid-grey; one scale per filter")
OUTSIDE = "light grey with thin diagonal lines: the receptive field beyond the image border"
BACKGROUND = (255, 255, 255)
# Beyond the image: a flat light grey, no colour, lines one pixel wide. Lighter than any projection grey
# near zero, so it never reads as "no contribution", and quiet next to a photograph.
OUTSIDE_TONE = (232, 232, 232)
OUTSIDE_LINE = (212, 212, 212)
OUTSIDE_PERIOD = 6
HATCH = (OUTSIDE_LINE, OUTSIDE_TONE)  # the two colours of the outside, line first
TEXT_PREFIX = "atlas."
MIN_CELL = 72  # cells of smaller receptive fields are enlarged (NEAREST) to about this size


# ---------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------
def _array(t: Any) -> np.ndarray:
    """A tensor or array as float32 numpy."""
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def _crop_pad(a: np.ndarray, box: tuple[int, int, int, int], fill: float = 0.0) -> np.ndarray:
    """a[..., y0:y1, x0:x1] for a box that may extend beyond `a` (filled with `fill`)."""
    x0, y0, x1, y1 = box
    h, w = a.shape[-2:]
    out = np.full(a.shape[:-2] + (y1 - y0, x1 - x0), fill, dtype=a.dtype)
    ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if ya < yb and xa < xb:
        out[..., ya - y0:yb - y0, xa - x0:xb - x0] = a[..., ya:yb, xa:xb]
    return out


def _inside(box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """(h, w) bool: which pixels of `box` lie inside the size x size image."""
    x0, y0, x1, y1 = box
    ys = (np.arange(y0, y1) >= 0) & (np.arange(y0, y1) < size)
    xs = (np.arange(x0, x1) >= 0) & (np.arange(x0, x1) < size)
    return ys[:, None] & xs[None, :]


def check_display(display: str) -> None:
    if display not in DISPLAYS:
        from ..errors import AtlasError

        raise AtlasError(f"unknown display '{display}': choose one of {', '.join(DISPLAYS)}")


def display_scale(v: Any, region: np.ndarray | None = None, display: str = DEFAULT_DISPLAY) -> float:
    """The s of `DISPLAYS[display]` for a signed (3, h, w) projection: the |v| shown as black or white
    (0.0 for an all-zero one). `region` (bool h x w): the pixels it is taken over (default all)."""
    check_display(display)
    a = _array(v)
    if a.ndim == 2:
        a = a[None]
    sel = np.abs(a[:, region] if region is not None else a).ravel()
    if not sel.size:
        return 0.0
    m = float(sel.max())
    if display == "max" or m == 0.0:
        return m
    # linear interpolation between order statistics: the same bytes on every machine for the same values
    s = float(np.percentile(sel, PERCENTILE))
    return s if s > 0.0 else m


def normalise(v: Any, region: np.ndarray | None = None, display: str = DEFAULT_DISPLAY,
              scale: float | None = None) -> np.ndarray:
    """Signed (3, h, w) -> uint8 (h, w, 3) by `DISPLAYS[display]`; the scale from `region` (bool h x w) if
    given, or `scale` itself (as `display_scale` gives it)."""
    a = _array(v)
    if a.ndim == 2:
        a = a[None]
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    m = display_scale(a, region, display) if scale is None else float(scale)
    shown = a / (2.0 * m) + 0.5 if m > 0 else np.full_like(a, 0.5)
    return (np.clip(shown, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def _hatch(rgb: np.ndarray, outside: np.ndarray, period: int = OUTSIDE_PERIOD) -> np.ndarray:
    """Paint the `outside` pixels of rgb (h, w, 3) quietly: `OUTSIDE_TONE` crossed by thin diagonal
    `OUTSIDE_LINE`s, one pixel wide every `period` (anchored to the cell, so projection and patch agree)."""
    if not outside.any():
        return rgb
    h, w = outside.shape
    yy, xx = np.mgrid[0:h, 0:w]
    line = (yy + xx) % max(2, period) == 0
    out = rgb.copy()
    out[outside & line] = OUTSIDE_LINE
    out[outside & ~line] = OUTSIDE_TONE
    return out


def _enlarge(rgb: np.ndarray, factor: int) -> np.ndarray:
    return rgb if factor == 1 else np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def upscale_for(size: int, minimum: int = MIN_CELL, cap: int = 8) -> int:
    """The integer NEAREST enlargement that brings a `size` px cell to about `minimum` px."""
    return int(max(1, min(cap, math.ceil(minimum / max(size, 1)))))


# ---------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------
def _outside(rgb: np.ndarray, inside: np.ndarray, upscale: int) -> np.ndarray:
    """rgb enlarged, then its pixels beyond the image marked (after enlarging: lines stay one pixel)."""
    big = _enlarge(rgb, upscale)
    if inside.all():
        return big
    return _hatch(big, ~_enlarge(inside, upscale), OUTSIDE_PERIOD)


def projection_cell(projection: Any, box: tuple[int, int, int, int], image_size: int,
                    upscale: int = 1, full: bool = True, display: str = DEFAULT_DISPLAY,
                    scale: float | None = None) -> Image.Image:
    """One projection shown in `box` (x0, y0, x1, y1, unclipped): normalised by `display` over the part
    inside the image (or with `scale`), the part outside marked (`OUTSIDE`). `projection` is the full
    (3, S, S) map (full=True) or already the (3, h, w) crop of `box` (full=False)."""
    a = _array(projection)
    crop = _crop_pad(a, box) if full else a
    inside = _inside(box, image_size)
    return Image.fromarray(_outside(normalise(crop, inside, display, scale), inside, upscale))


def patch_cell(image: Any, box: tuple[int, int, int, int], image_size: int, upscale: int = 1) -> Image.Image:
    """The image patch of `box`: `image` is the S x S RGB image the net saw (PIL or uint8 array),
    or already the clipped crop of the box; None gives the "image unavailable" placeholder."""
    x0, y0, x1, y1 = box
    if image is None:
        return placeholder((x1 - x0) * upscale, (y1 - y0) * upscale)
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    inside = _inside(box, image_size)
    cy, cx = int(inside.any(axis=1).sum()), int(inside.any(axis=0).sum())
    if arr.shape[:2] == (image_size, image_size):
        crop = _crop_pad(arr.transpose(2, 0, 1), box).transpose(1, 2, 0)
    elif arr.shape[:2] == (cy, cx):  # the clipped crop itself
        crop = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        crop[inside] = arr.reshape(-1, 3)
    else:
        raise ValueError(f"patch image of {arr.shape[1]}x{arr.shape[0]} px fits neither the "
                         f"{image_size} px image nor the box {box}")
    return Image.fromarray(_outside(crop.astype(np.uint8), inside, upscale))


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def placeholder(width: int, height: int, text: str = "image unavailable") -> Image.Image:
    """A light cell with a cross and, where it fits, the text."""
    im = Image.new("RGB", (max(width, 1), max(height, 1)), (236, 236, 236))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, width - 1, height - 1], outline=(160, 160, 160))
    d.line([0, 0, width - 1, height - 1], fill=(200, 200, 200))
    d.line([0, height - 1, width - 1, 0], fill=(200, 200, 200))
    font = _font(10)
    lines = text.split(" ", 1) if width < 100 else [text]
    sizes = [d.textbbox((0, 0), ln, font=font) for ln in lines]
    tw = max(b[2] - b[0] for b in sizes)
    th = sum(b[3] - b[1] + 2 for b in sizes)
    if tw + 4 <= width and th + 4 <= height:
        y = (height - th) // 2
        for ln, b in zip(lines, sizes):
            d.text(((width - (b[2] - b[0])) // 2, y), ln, fill=(90, 90, 90), font=font)
            y += b[3] - b[1] + 2
    return im


# ---------------------------------------------------------------------------
# panels and grids
# ---------------------------------------------------------------------------
def _grid(cells: Sequence[Image.Image], cols: int, gap: int) -> Image.Image:
    cw = max(c.width for c in cells)
    ch = max(c.height for c in cells)
    rows = -(-len(cells) // cols)
    im = Image.new("RGB", (cols * cw + (cols - 1) * gap, rows * ch + (rows - 1) * gap), BACKGROUND)
    for i, c in enumerate(cells):
        r, q = divmod(i, cols)
        im.paste(c, (q * (cw + gap), r * (ch + gap)))
    return im


def _caption(im: Image.Image, text: str, pad: int = 4) -> Image.Image:
    font = _font(12)
    d = ImageDraw.Draw(im)
    lines = text.splitlines() or [""]
    heights = [d.textbbox((0, 0), ln or " ", font=font)[3] for ln in lines]
    strip = sum(h + 2 for h in heights) + 2 * pad
    out = Image.new("RGB", (im.width, im.height + strip), BACKGROUND)
    out.paste(im, (0, 0))
    d = ImageDraw.Draw(out)
    y = im.height + pad
    for ln, h in zip(lines, heights):
        d.text((pad, y), ln, fill=(20, 20, 20), font=font)
        y += h + 2
    return out


def _entries(projections: Any, boxes, image_size) -> tuple[list, list, int, list[dict]]:
    """(arrays, unclipped boxes, image size, meta) from a deconv.Projections or plain arrays."""
    if hasattr(projections, "meta") and hasattr(projections, "crop"):
        s = projections.image_size
        bx = list(boxes) if boxes is not None else [tuple(m["rf_box"]) if m["mode"] == "unit" else (0, 0, s, s)
                                                    for m in projections.meta]
        return [projections.crop(i, b) for i, b in enumerate(bx)], bx, s, list(projections.meta)
    if boxes is None or image_size is None:
        raise ValueError("plain projections need `boxes` (unclipped x0, y0, x1, y1) and `image_size`")
    arrays = [_crop_pad(_array(p), tuple(b)) for p, b in zip(projections, boxes)]
    return arrays, [tuple(b) for b in boxes], int(image_size), [{} for _ in arrays]


def panel(projections: Any, patches: Sequence[Any], *, boxes: Sequence[tuple[int, int, int, int]] | None = None,
          image_size: int | None = None, upscale: int | None = None, cols: int | None = None,
          caption: str | None = None, gap: int = 2, text: dict[str, Any] | None = None,
          display: str = DEFAULT_DISPLAY) -> Image.Image:
    """The paper's figure 2 panel for one channel: projections (left grid) beside image patches (right).

    projections  a `deconv.Projections` (boxes and image size from its meta), or a list of full
                 (3, S, S) maps with `boxes` (unclipped receptive-field boxes) and `image_size`
    patches      per projection: the S x S RGB image it was made from (PIL or uint8 array), the
                 clipped crop of its box, or None when the image file is missing (placeholder)
    upscale      NEAREST enlargement; default brings small fields to about MIN_CELL px
    cols         grid columns (default ceil(sqrt(k)): 3 x 3 for k = 9)
    caption      optional text strip under the panel
    display      how values become grey levels: a key of `DISPLAYS` (each projection its own scale)
    The returned image's `info` holds the PNG text (see `write_png`).
    """
    check_display(display)
    arrays, bx, s, meta = _entries(projections, boxes, image_size)
    if len(patches) != len(arrays):
        raise ValueError(f"{len(arrays)} projections but {len(patches)} patches")
    if not arrays:
        im = placeholder(160, 40, "no projections")
        im.info.update(_text({"display": display, "normalisation": DISPLAYS[display]}, text))
        return im
    size = max(max(b[2] - b[0], b[3] - b[1]) for b in bx)
    up = upscale or upscale_for(size)
    cols = cols or math.ceil(math.sqrt(len(arrays)))
    scales = [display_scale(a, _inside(b, s), display) for a, b in zip(arrays, bx)]
    pcells = [projection_cell(a, b, s, up, full=False, display=display, scale=sc)
              for a, b, sc in zip(arrays, bx, scales)]
    icells = [patch_cell(p, b, s, up) for p, b in zip(patches, bx)]
    left, right = _grid(pcells, cols, gap), _grid(icells, cols, gap)
    sep = max(3 * gap, 6)
    im = Image.new("RGB", (left.width + sep + right.width, max(left.height, right.height)), BACKGROUND)
    im.paste(left, (0, 0))
    im.paste(right, (left.width + sep, 0))
    if caption:
        im = _caption(im, caption)
    info: dict[str, Any] = {"display": display, "normalisation": DISPLAYS[display], "outside": OUTSIDE,
                            "scales": [float(f"{sc:.6g}") for sc in scales], "upscale": up,
                            "layout": f"left: projections, right: image patches; {cols} columns, rank order"}
    if meta and meta[0]:
        first = meta[0]
        info.update({k: first[k] for k in ("layer", "channel", "mode", "norm", "method") if k in first})
        # image ids, never the engine's batch positions: those depend on what else was in the batch,
        # and the same picture must carry the same bytes however it was asked for
        info["projections"] = json.dumps([{k: m.get(k) for k in ("rank", "image_id", "value", "y", "x", "box")}
                                          for m in meta], default=str)
    im.info.update(_text(info, text))
    return im


def projection_image(projections: Any, i: int, *, box: tuple[int, int, int, int] | None = None,
                     upscale: int | None = None, rank: int | None = None,
                     text: dict[str, Any] | None = None, display: str = DEFAULT_DISPLAY) -> Image.Image:
    """One projection of a `deconv.Projections` as a picture of its receptive-field box (marked beyond
    the image), with the PNG text (layer, channel, rank, mode, norm, value, display, normalisation,
    scale: the |v| shown as black or white) in `info`."""
    m = projections.meta[i]
    s = projections.image_size
    b = box or (tuple(m["rf_box"]) if m["mode"] == "unit" else (0, 0, s, s))
    up = upscale or upscale_for(max(b[2] - b[0], b[3] - b[1]))
    crop = projections.crop(i, b)
    sc = display_scale(crop, _inside(b, s), display)
    im = projection_cell(crop, b, s, up, full=False, display=display, scale=sc)
    info = {k: m[k] for k in ("layer", "channel", "mode", "norm", "method", "y", "x", "value", "image_id") if k in m}
    info.update({"rank": rank if rank is not None else m.get("rank"), "box": list(b), "upscale": up,
                 "display": display, "normalisation": DISPLAYS[display], "scale": float(f"{sc:.6g}"),
                 "outside": OUTSIDE})
    im.info.update(_text(info, text))
    return im


def filter_grid(conv1_weight: Any, *, cols: int | None = None, upscale: int | None = None, gap: int = 1,
                caption: str | None = None) -> Image.Image:
    """The first layer's filters (C_out, C_in, k, k) as a grid (the paper's figure 6 view), each filter
    normalised for display by `FILTER_NORMALISATION` (one- or three-channel inputs)."""
    w = _array(conv1_weight)
    if w.ndim != 4:
        raise ValueError(f"filter_grid expects a (C_out, C_in, k, k) weight, not shape {w.shape}")
    n, cin, kh, kw = w.shape
    if cin not in (1, 3):
        raise ValueError(f"filter_grid shows RGB or grey filters, not {cin}-channel ones")
    up = upscale or upscale_for(max(kh, kw), minimum=24, cap=12)
    cols = cols or math.ceil(math.sqrt(n))
    cells = [Image.fromarray(_enlarge(normalise(w[i]), up)) for i in range(n)]
    im = _grid(cells, cols, gap)
    frame = Image.new("RGB", (im.width + 2 * gap, im.height + 2 * gap), BACKGROUND)
    frame.paste(im, (gap, gap))
    if caption:
        frame = _caption(frame, caption)
    frame.info.update(_text({"normalisation": FILTER_NORMALISATION, "filters": n, "kernel": kh,
                             "layout": f"{cols} columns, filter order", "upscale": up}))
    return frame


# ---------------------------------------------------------------------------
# PNG files
# ---------------------------------------------------------------------------
def _text(info: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, str]:
    out = {}
    for k, v in {**info, **(extra or {})}.items():
        if v is None:
            continue
        key = k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k
        out[key] = v if isinstance(v, str) else json.dumps(v, default=str)
    return out


def png_info(image: Image.Image, text: dict[str, Any] | None = None) -> PngInfo:
    """PngInfo with the image's `atlas.*` info entries plus `text`."""
    info = PngInfo()
    items = {k: v for k, v in image.info.items() if k.startswith(TEXT_PREFIX) and isinstance(v, str)}
    items.update(_text({}, text))
    for k, v in items.items():
        info.add_text(k, v)
    return info


def write_png(path: str | os.PathLike, image: Image.Image, text: dict[str, Any] | None = None, *,
              fsync: bool = True) -> Path:
    """Write `image` as a PNG with its `atlas.*` info and `text` as PNG text chunks, atomically
    (atlas.util.files.atomic_write: readers see the old file or the whole new one; fsync as there)."""
    from ..util.files import atomic_write

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(image, text))

    return atomic_write(path, save, fsync=fsync)


def read_text(path: str | os.PathLike) -> dict[str, str]:
    """The `atlas.*` PNG text of a file, without the prefix."""
    with Image.open(path) as im:
        im.load()
        return {k[len(TEXT_PREFIX):]: v for k, v in im.text.items() if k.startswith(TEXT_PREFIX)}
