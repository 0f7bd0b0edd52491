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
Every cell is the unit's receptive-field box (`shown_box`), so patch and
projection line up pixel for pixel; the part of the box beyond the image
border is marked quietly (`OUTSIDE`: a flat light grey with thin, slightly
darker diagonal lines), the same in both. Where more than half of the box
would lie beyond the image (a deep unit of a ResNet, whose 435 px field is
twice a 224 px input, or a unit at a corner) the cell shows only the part of
the field inside the image, the whole image when the field covers it: a cell
that is mostly border says nothing. Small fields are enlarged with NEAREST,
large ones shrunk to about `MAX_CELL` px, so a panel of 9 stays about 1000 px
wide whatever the model. Given a title and labels (the atlas's renderer always
gives them) the panel carries them in its pixels, for a slide: the title above
(model, layer, channel, method; a loud line for random weights), and under
each cell its rank and activation (projection) or its image's name (patch).

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
# cells of larger fields are shrunk to this side: nine of them and their patches, labelled, fit a slide's
# width at a readable size, and a 512-channel layer's panels stay megabytes, not a gigabyte
MAX_CELL = 160
FILTER_CELL = 48  # a first-layer filter's cell side, about
LABEL_SIZE = 12  # px of a cell's label at scale 1; the title is larger
LABEL_CELL = 96  # the narrowest labelled cell, px at scale 1: "rank 0: 0.245" and most of a file name fit
ALERT = (190, 20, 20)  # the random-weights line: it must not be missed on a slide


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


def shown_box(box: Sequence[int], size: int) -> tuple[int, int, int, int]:
    """The part of a receptive-field box (x0, y0, x1, y1, unclipped) a cell shows: the whole box, or, when
    more than half of it lies beyond the size x size image, only the part inside it."""
    x0, y0, x1, y1 = (int(v) for v in box)
    inside = max(0, min(x1, size) - max(x0, 0)) * max(0, min(y1, size) - max(y0, 0))
    if inside == 0 or 2 * inside >= (x1 - x0) * (y1 - y0):
        return (x0, y0, x1, y1)
    return (max(x0, 0), max(y0, 0), min(x1, size), min(y1, size))


def field_side(boxes: Sequence[Sequence[int]], size: int) -> int:
    """The side a cell's scale is chosen for: the field's (the largest box, unclipped), at most the image's.
    Not the clipped boxes': a projection alone and in its panel are drawn at the same scale."""
    return min(max(max(b[2] - b[0], b[3] - b[1]) for b in boxes), size)


def cell_factor(size: int, upscale: int | None = None, scale: float = 1.0) -> float:
    """How much a cell of a `size` px field is enlarged (> 1) or shrunk (< 1): small fields to about
    MIN_CELL px, large ones to MAX_CELL px (an explicit `upscale` is kept), times `scale`."""
    if upscale:
        return upscale * scale
    up = upscale_for(size)
    return (up if size * up <= MAX_CELL else MAX_CELL / max(size, 1)) * scale


def _resized(rgb: np.ndarray, factor: float) -> Image.Image:
    """A cell drawn at 1:1, enlarged by a whole factor with NEAREST (the outside's lines stay one pixel
    wide), otherwise resampled (LANCZOS) to the factor."""
    if float(factor).is_integer():
        return Image.fromarray(_enlarge(rgb, int(factor)))
    im = Image.fromarray(rgb)
    return im.resize((max(1, round(im.width * factor)), max(1, round(im.height * factor))), Image.LANCZOS)


def _number(v: float) -> int | float:
    """A scale factor for the PNG text: a whole one as an integer (readers parse it with int())."""
    return int(v) if float(v).is_integer() else float(f"{v:.4g}")


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
def _outside(rgb: np.ndarray, inside: np.ndarray, factor: float) -> Image.Image:
    """rgb resized by `factor`, its pixels beyond the image marked (after a whole enlargement: lines stay
    one pixel wide)."""
    whole = float(factor).is_integer()
    big = _enlarge(rgb, int(factor)) if whole else rgb
    mask = _enlarge(inside, int(factor)) if whole else inside
    return _resized(big if mask.all() else _hatch(big, ~mask, OUTSIDE_PERIOD), 1 if whole else factor)


def projection_cell(projection: Any, box: tuple[int, int, int, int], image_size: int,
                    upscale: float = 1, full: bool = True, display: str = DEFAULT_DISPLAY,
                    scale: float | None = None) -> Image.Image:
    """One projection shown in `box` (x0, y0, x1, y1, unclipped): normalised by `display` over the part
    inside the image (or with `scale`), the part outside marked (`OUTSIDE`). `projection` is the full
    (3, S, S) map (full=True) or already the (3, h, w) crop of `box` (full=False)."""
    a = _array(projection)
    crop = _crop_pad(a, box) if full else a
    inside = _inside(box, image_size)
    return _outside(normalise(crop, inside, display, scale), inside, upscale)


def patch_cell(image: Any, box: tuple[int, int, int, int], image_size: int, upscale: float = 1) -> Image.Image:
    """The image patch of `box`: `image` is the S x S RGB image the net saw (PIL or uint8 array),
    or already the clipped crop of the box; None gives the "image unavailable" placeholder."""
    x0, y0, x1, y1 = box
    if image is None:
        return placeholder(round((x1 - x0) * upscale), round((y1 - y0) * upscale))
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
    return _outside(crop.astype(np.uint8), inside, upscale)


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


def _entries(projections: Any, boxes, image_size) -> tuple[list, list, int, list[dict], int]:
    """(arrays, shown boxes, image size, meta, field side) from a deconv.Projections or plain arrays."""
    if hasattr(projections, "meta") and hasattr(projections, "crop"):
        s = projections.image_size
        bx = list(boxes) if boxes is not None else [tuple(m["rf_box"]) if m["mode"] == "unit" else (0, 0, s, s)
                                                    for m in projections.meta]
        side, bx = field_side(bx, s) if bx else 1, [shown_box(b, s) for b in bx]
        return [projections.crop(i, b) for i, b in enumerate(bx)], bx, s, list(projections.meta), side
    if boxes is None or image_size is None:
        raise ValueError("plain projections need `boxes` (unclipped x0, y0, x1, y1) and `image_size`")
    bx = [shown_box(b, int(image_size)) for b in boxes]
    arrays = [_crop_pad(_array(p), b) for p, b in zip(projections, bx)]
    return arrays, bx, int(image_size), [{} for _ in arrays], field_side(boxes, int(image_size)) if boxes else 1


def fit_text(text: str, font, width: int) -> str:
    """`text`, its start cut (an ellipsis in its place) until it fits `width` px: a path's end names it."""
    from .charts import text_size

    if text_size(text, font)[0] <= width:
        return text
    while len(text) > 1 and text_size("…" + text, font)[0] > width:
        text = text[1:]
    return "…" + text


def _labelled(cells: Sequence[Image.Image], labels: Sequence[str], scale: float) -> list[Image.Image]:
    """Cells of one size (the largest), each centred over a strip with its label."""
    from .charts import font, text_size

    f = font(max(8, round(LABEL_SIZE * scale)))
    # a small field's cell is narrower than its label: the label sets the slot's width, the cell is centred
    cw, ch = max([c.width for c in cells] + [round(LABEL_CELL * scale)]), max(c.height for c in cells)
    strip = text_size("Ag", f)[1] + max(4, round(5 * scale))
    out = []
    for c, lab in zip(cells, labels):
        im = Image.new("RGB", (cw, ch + strip), BACKGROUND)
        im.paste(c, ((cw - c.width) // 2, (ch - c.height) // 2))
        ImageDraw.Draw(im).text((cw // 2, ch + 2), fit_text(lab, f, cw - 2), fill=(30, 30, 30), font=f,
                                anchor="ma")
        out.append(im)
    return out


def _wrap(lines: Sequence[str], font, width: int) -> list[str]:
    """Lines broken at spaces so that each fits `width` px where it can."""
    from .charts import text_size

    out = []
    for line in lines:
        words, cur = line.split(" "), ""
        for w in words:
            if cur and text_size(cur + " " + w, font)[0] > width:
                out.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}" if cur else w
        out.append(cur)
    return out


def heading(im: Image.Image, title: str | None, alert: str | None = None, scale: float = 1.0,
            pad: int = 6) -> Image.Image:
    """im under a title strip: the first line of `title` large, its other lines smaller, then `alert` (in
    red, e.g. random weights); the strip is as wide as the longest line needs."""
    from .charts import font, text_size

    room = max(im.width, round(360 * scale)) - 2 * pad  # a small picture's text wraps, not widens it
    lines = [(ln, f, colour) for text, f, colour in (
        ((title or "").splitlines()[:1], font(round(16 * scale)), (10, 10, 10)),
        ((title or "").splitlines()[1:], font(round(13 * scale)), (60, 60, 60)),
        ((alert or "").splitlines(), font(round(14 * scale)), ALERT)) for ln in _wrap(text, f, room)]
    if not lines:
        return im
    hs = [text_size("Ag" + t, f)[1] + round(4 * scale) for t, f, _ in lines]
    w = max([im.width] + [text_size(t, f)[0] + 2 * pad for t, f, _ in lines])
    out = Image.new("RGB", (w, im.height + sum(hs) + 2 * pad), BACKGROUND)
    d = ImageDraw.Draw(out)
    y = pad
    for (t, f, colour), h in zip(lines, hs):
        d.text((pad, y), t, fill=colour, font=f)
        y += h
    out.paste(im, (0, y + pad))
    out.info.update(im.info)
    return out


def titled_copy(path: str | os.PathLike, title: str, alert: str | None = None, least: int = 320) -> Path:
    """Rewrite the PNG at `path` (a copy a user asked for with --out) enlarged, by a whole factor with
    NEAREST, to at least `least` px high, under `title` and `alert`; its PNG text is kept, the title added.
    A cached picture stays bare: the site and the notebook caption theirs."""
    with Image.open(path) as im:
        im.load()
        text = dict(im.text)
        up = max(1, -(-least // max(im.height, 1)))
        big = im.convert("RGB").resize((im.width * up, im.height * up), Image.NEAREST)
    out = heading(big, title, alert)
    out.info.update(text)
    return write_png(path, out, {"title": title, "alert": alert})


def contact_sheet(cells: Sequence[Image.Image], labels: Sequence[str], *, title: str | None = None,
                  alert: str | None = None, cols: int | None = None, scale: float = 1.0,
                  gap: int = 6) -> Image.Image:
    """Pictures in a grid, each over its label, under a title (`atlas similar --out`); the title and labels
    also go into the PNG text."""
    if not cells:
        cells, labels = [placeholder(160, 60, "no results")], [""]
    im = _grid(_labelled(cells, labels, scale), cols or min(5, len(cells)), round(gap * scale))
    im = heading(im, title, alert, scale)
    im.info.update(_text({"title": title, "alert": alert, "labels": list(labels)}))
    return im


def panel(projections: Any, patches: Sequence[Any], *, boxes: Sequence[tuple[int, int, int, int]] | None = None,
          image_size: int | None = None, upscale: int | None = None, cols: int | None = None,
          caption: str | None = None, gap: int = 2, text: dict[str, Any] | None = None,
          display: str = DEFAULT_DISPLAY, title: str | None = None, alert: str | None = None,
          names: Sequence[str] | None = None, scale: float = 1.0) -> Image.Image:
    """The paper's figure 2 panel for one channel: projections (left grid) beside image patches (right).

    projections  a `deconv.Projections` (boxes and image size from its meta), or a list of full
                 (3, S, S) maps with `boxes` (unclipped receptive-field boxes) and `image_size`
    patches      per projection: the S x S RGB image it was made from (PIL or uint8 array), the
                 clipped crop of its box, or None when the image file is missing (placeholder)
    upscale      NEAREST enlargement; default brings small fields to about MIN_CELL px, large ones
                 down to MAX_CELL px
    cols         grid columns (default ceil(sqrt(k)): 3 x 3 for k = 9)
    caption      optional text strip under the panel
    display      how values become grey levels: a key of `DISPLAYS` (each projection its own scale)
    title        lines above the panel (the first one large); `alert` a red line under them
    names        per projection, its image's name: with them (and ranks and values in the meta) every
                 cell is labelled, the projection with "rank R: VALUE", the patch with the name
    scale        everything larger (cells, text) by this factor, for a slide or a poster
    The returned image's `info` holds the PNG text (see `write_png`), the title and labels included.
    """
    check_display(display)
    arrays, bx, s, meta, side = _entries(projections, boxes, image_size)
    if len(patches) != len(arrays):
        raise ValueError(f"{len(arrays)} projections but {len(patches)} patches")
    if not arrays:
        im = placeholder(160, 40, "no projections")
        im.info.update(_text({"display": display, "normalisation": DISPLAYS[display]}, text))
        return im
    factor = cell_factor(side, upscale, scale)
    cols = cols or math.ceil(math.sqrt(len(arrays)))
    scales = [display_scale(a, _inside(b, s), display) for a, b in zip(arrays, bx)]
    pcells = [projection_cell(a, b, s, factor, full=False, display=display, scale=sc)
              for a, b, sc in zip(arrays, bx, scales)]
    icells = [patch_cell(p, b, s, factor) for p, b in zip(patches, bx)]
    labels = None
    if names is not None and all("rank" in m and "value" in m for m in meta):
        from .charts import fmt_num

        labels = [[f"rank {m['rank']}: {fmt_num(float(m['value']), 3)}" for m in meta], [str(n) for n in names]]
        pcells, icells = _labelled(pcells, labels[0], scale), _labelled(icells, labels[1], scale)
    left, right = _grid(pcells, cols, gap), _grid(icells, cols, gap)
    sep = max(3 * gap, 6, round(12 * scale) if labels else 0)
    im = Image.new("RGB", (left.width + sep + right.width, max(left.height, right.height)), BACKGROUND)
    im.paste(left, (0, 0))
    im.paste(right, (left.width + sep, 0))
    if caption:
        im = _caption(im, caption)
    im = heading(im, title, alert, scale)
    info: dict[str, Any] = {"display": display, "normalisation": DISPLAYS[display], "outside": OUTSIDE,
                            "scales": [float(f"{sc:.6g}") for sc in scales], "upscale": _number(factor),
                            "boxes_shown": [list(b) for b in bx],
                            "layout": f"left: projections, right: image patches; {cols} columns, rank order",
                            "title": title, "alert": alert, "labels": labels}
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
    """One projection of a `deconv.Projections` as a picture of its receptive-field box (`shown_box`: marked
    beyond the image, or only its part inside), with the PNG text (layer, channel, rank, mode, norm, value, display, normalisation,
    scale: the |v| shown as black or white) in `info`."""
    m = projections.meta[i]
    s = projections.image_size
    full = box or (tuple(m["rf_box"]) if m["mode"] == "unit" else (0, 0, s, s))
    b, up = shown_box(full, s), cell_factor(field_side([full], s), upscale)
    crop = projections.crop(i, b)
    sc = display_scale(crop, _inside(b, s), display)
    im = projection_cell(crop, b, s, up, full=False, display=display, scale=sc)
    info = {k: m[k] for k in ("layer", "channel", "mode", "norm", "method", "y", "x", "value", "image_id") if k in m}
    info.update({"rank": rank if rank is not None else m.get("rank"), "box": list(b), "upscale": _number(up),
                 "display": display, "normalisation": DISPLAYS[display], "scale": float(f"{sc:.6g}"),
                 "outside": OUTSIDE})
    im.info.update(_text(info, text))
    return im


def filter_grid(conv1_weight: Any, *, cols: int | None = None, upscale: int | None = None, gap: int = 1,
                caption: str | None = None, title: str | None = None, alert: str | None = None,
                scale: float = 1.0) -> Image.Image:
    """The first layer's filters (C_out, C_in, k, k) as a grid (the paper's figure 6 view), each filter
    normalised for display by `FILTER_NORMALISATION` (one- or three-channel inputs); `title` and `alert`
    above it as on a panel, everything `scale` times larger."""
    w = _array(conv1_weight)
    if w.ndim != 4:
        raise ValueError(f"filter_grid expects a (C_out, C_in, k, k) weight, not shape {w.shape}")
    n, cin, kh, kw = w.shape
    if cin not in (1, 3):
        raise ValueError(f"filter_grid shows RGB or grey filters, not {cin}-channel ones")
    # filters are a few pixels: cells of about FILTER_CELL px read on a slide, still crisp (NEAREST)
    up = max(1, round((upscale or upscale_for(max(kh, kw), minimum=FILTER_CELL, cap=12)) * scale))
    gap = max(gap, round(gap * scale))
    cols = cols or math.ceil(math.sqrt(n))
    cells = [Image.fromarray(_enlarge(normalise(w[i]), up)) for i in range(n)]
    im = _grid(cells, cols, gap)
    frame = Image.new("RGB", (im.width + 2 * gap, im.height + 2 * gap), BACKGROUND)
    frame.paste(im, (gap, gap))
    if caption:
        frame = _caption(frame, caption)
    frame = heading(frame, title, alert, scale)
    frame.info.update(_text({"normalisation": FILTER_NORMALISATION, "filters": n, "kernel": kh,
                             "layout": f"{cols} columns, filter order", "upscale": up,
                             "title": title, "alert": alert}))
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
