"""Charts drawn with PIL only (matplotlib is not a dependency): one font, round tick values, colour maps,
heat maps with a colour scale, legends, line plots with axes; training's curves and the analyses' figures
draw with these."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - step * 1e-6:
        ticks.append(round(t, 12))
    return ticks


def line_panel(draw, box, series: list[tuple[str, list[tuple[float, float]], tuple[int, int, int]]], title: str,
           ylabel: str, xmax: int, percent: bool, lr_drops: list[int]) -> None:
    x0, y0, x1, y1 = box
    f, fs = font(14), font(12)
    left, right, top, bottom = x0 + 58, x1 - 12, y0 + 30, y1 - 42
    draw.text(((x0 + x1) // 2, y0 + 6), title, fill=(0, 0, 0), font=font(15), anchor="mt")
    ys = [v for _, pts, _ in series for _, v in pts if math.isfinite(v)]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    lo = min(lo, 0.0)
    ticks = nice_ticks(lo, hi * 1.05 if hi > 0 else 1.0)
    ylo, yhi = ticks[0], ticks[-1]
    xlo, xhi = 1, max(xmax, 2)

    def px(ep: float) -> float:
        return left + (ep - xlo) / (xhi - xlo) * (right - left)

    def py(v: float) -> float:
        return bottom - (v - ylo) / (yhi - ylo) * (bottom - top)

    for t in ticks:
        yy = py(t)
        draw.line([(left, yy), (right, yy)], fill=(228, 228, 228))
        lab = f"{t * 100:g}%" if percent else f"{t:g}"
        draw.text((left - 6, yy), lab, fill=(60, 60, 60), font=fs, anchor="rm")
    xt = nice_ticks(xlo, xhi, 8)
    for t in xt:
        if xlo <= t <= xhi and float(t).is_integer():
            xx = px(t)
            draw.line([(xx, bottom), (xx, bottom + 4)], fill=(0, 0, 0))
            draw.text((xx, bottom + 6), f"{int(t)}", fill=(60, 60, 60), font=fs, anchor="mt")
    for ep in lr_drops:
        xx = px(ep - 0.5)
        for yy in range(int(top), int(bottom), 8):
            draw.line([(xx, yy), (xx, min(yy + 4, bottom))], fill=(150, 150, 150))
        draw.text((xx + 3, top + 2), "lr lowered", fill=(120, 120, 120), font=fs)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text(((left + right) // 2, bottom + 24), "epoch", fill=(0, 0, 0), font=f, anchor="mt")
    draw.text((x0 + 4, top - 22), ylabel, fill=(0, 0, 0), font=fs)
    for _, pts, colour in series:
        pts = [(px(e), py(v)) for e, v in pts if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for xx, yy in pts:
            draw.ellipse([xx - 3, yy - 3, xx + 3, yy + 3], fill=colour)
    # legend, top right inside the plot
    lw = max(int(draw.textlength(name, font=fs)) for name, _, _ in series) + 34
    lx, ly = right - lw - 6, top + 6
    draw.rectangle([lx, ly, lx + lw, ly + 18 * len(series) + 6], fill=(255, 255, 255), outline=(160, 160, 160))
    for i, (name, _, colour) in enumerate(series):
        yy = ly + 12 + 18 * i
        draw.line([(lx + 6, yy), (lx + 24, yy)], fill=colour, width=3)
        draw.text((lx + 28, yy), name, fill=(0, 0, 0), font=fs, anchor="lm")


WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (120, 120, 120)

# the paper's figures use a jet-like colour map: blue (low) .. red (high)
_JET = [(0.0, (0, 0, 128)), (0.125, (0, 0, 255)), (0.375, (0, 255, 255)), (0.625, (255, 255, 0)),
        (0.875, (255, 0, 0)), (1.0, (128, 0, 0))]

# tab20-like distinct colours for curves and class labels
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229)]


@lru_cache(maxsize=8)
def font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def text_size(text: str, f=None) -> tuple[int, int]:
    from PIL import Image, ImageDraw

    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=f or font())
    return x1 - x0, y1 - y0


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (jet-like)."""
    v = np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0), 0.0, 1.0)
    xs = np.array([p for p, _ in _JET])
    out = np.empty(v.shape + (3,), np.uint8)
    for c in range(3):
        out[..., c] = np.round(np.interp(v, xs, [col[c] for _, col in _JET]))
    return out


def fmt_num(v: float, digits: int = 4) -> str:
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        return f"{v:.{max(digits - 2, 2)}e}"
    if a >= 1:
        out = f"{v:.{max(digits - int(math.floor(math.log10(a))) - 1, 0)}f}"
        return out.rstrip("0").rstrip(".") if "." in out else out
    return f"{v:.{digits}g}"


def tick_labels(values: Sequence[float]) -> list[str]:
    """Labels for tick values: the fewest significant digits (3..9) that keep them apart."""
    for p in range(3, 10):
        labs = [fmt_num(v, p) for v in values]
        if len(set(labs)) == len(set(float(v) for v in values)):
            return labs
    return labs


def heatmap(arr: np.ndarray, vmin: float, vmax: float, cell: int):
    """A 2-D array as a jet heat map, each entry a cell x cell square."""
    from PIL import Image

    a = np.asarray(arr, dtype=np.float64)
    span = vmax - vmin
    norm = (a - vmin) / span if span > 0 else np.zeros_like(a)
    im = Image.fromarray(colormap(norm))
    return im.resize((a.shape[1] * cell, a.shape[0] * cell), Image.NEAREST)


def colorbar(vmin: float, vmax: float, height: int, width: int = 12, ticks: int = 5):
    """A vertical colour scale with tick labels, high at the top."""
    from PIL import Image, ImageDraw

    f = font(10)
    labels = [vmin + (vmax - vmin) * i / (ticks - 1) for i in range(ticks)]
    texts = tick_labels(labels)
    tw = max(text_size(t, f)[0] for t in texts)
    im = Image.new("RGB", (width + 6 + tw + 2, height + 10), WHITE)
    ramp = colormap(np.linspace(1, 0, height)[:, None].repeat(width, 1))
    im.paste(Image.fromarray(ramp), (0, 5))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 5, width - 1, 5 + height - 1], outline=BLACK)
    for i, v in enumerate(labels):
        y = 5 + round((height - 1) * (1 - i / (ticks - 1)))
        d.line([width, y, width + 3, y], fill=BLACK)
        d.text((width + 6, y), texts[i], fill=BLACK, font=f, anchor="lm")
    return im


def titled(im, title: str, subtitle: str | None = None, width: int | None = None):
    """im with a title (and a smaller subtitle) above it, on white."""
    from PIL import Image, ImageDraw

    ft, fs = font(13), font(11)
    lines = [(title, ft)] + ([(s, fs) for s in subtitle.split("\n")] if subtitle else [])
    hs = [text_size(t, f)[1] + 5 for t, f in lines]
    W = max([im.width, width or 0] + [text_size(t, f)[0] + 4 for t, f in lines])
    out = Image.new("RGB", (W, sum(hs) + 6 + im.height), WHITE)
    d = ImageDraw.Draw(out)
    y = 2
    for (t, f), h in zip(lines, hs):
        d.text((2, y), t, fill=BLACK if f is ft else (60, 60, 60), font=f)
        y += h
    out.paste(im, (0, y + 4))
    return out


def beside(*ims, pad: int = 6, bg=WHITE):
    """Images side by side, top-aligned."""
    from PIL import Image

    ims = [i for i in ims if i is not None]
    W = sum(i.width for i in ims) + pad * (len(ims) - 1)
    H = max(i.height for i in ims)
    out = Image.new("RGB", (W, H), bg)
    x = 0
    for i in ims:
        out.paste(i, (x, 0))
        x += i.width + pad
    return out


def below(*ims, pad: int = 6, bg=WHITE):
    """Images one under the other, left-aligned."""
    from PIL import Image

    ims = [i for i in ims if i is not None]
    W = max(i.width for i in ims)
    H = sum(i.height for i in ims) + pad * (len(ims) - 1)
    out = Image.new("RGB", (W, H), bg)
    y = 0
    for i in ims:
        out.paste(i, (0, y))
        y += i.height + pad
    return out


def margin(im, m: int = 10, bg=WHITE):
    from PIL import Image

    out = Image.new("RGB", (im.width + 2 * m, im.height + 2 * m), bg)
    out.paste(im, (m, m))
    return out


def legend(entries: Sequence[tuple[tuple[int, int, int], str]], columns: int = 1, max_width: int | None = None):
    """Colour swatches with names, in columns."""
    from PIL import Image, ImageDraw

    f = font(11)
    if not entries:
        return Image.new("RGB", (1, 1), WHITE)
    sw, gap = 12, 4
    names = [n for _, n in entries]
    cw = max(text_size(n, f)[0] for n in names) + sw + 3 * gap
    if max_width:
        columns = max(1, min(columns, max_width // max(cw, 1)))
    rows = -(-len(entries) // columns)
    lh = max(text_size("Ag", f)[1], sw) + 5
    im = Image.new("RGB", (columns * cw, rows * lh + 2), WHITE)
    d = ImageDraw.Draw(im)
    for i, (col, name) in enumerate(entries):
        r, c = i % rows, i // rows
        x, y = c * cw, r * lh + 1
        d.rectangle([x, y + 1, x + sw - 1, y + sw], fill=tuple(col), outline=BLACK)
        d.text((x + sw + gap, y + sw // 2 + 1), name, fill=BLACK, font=f, anchor="lm")
    return im


def line_plot(series: Sequence[tuple[str, tuple[int, int, int], Sequence[float], Sequence[float]]], *,
              title: str, xlabel: str, ylabel: str, size: tuple[int, int] = (380, 250),
              ylim: tuple[float, float] | None = None, show_legend: bool = True, note: str | None = None):
    """Curves (name, colour, xs, ys) on axes with ticks, axis labels and a legend below.

    NaN values break a curve (the point is not drawn).
    """
    from PIL import Image, ImageDraw

    W, H = size
    L, R, T, B = 62, 12, 26, 44
    f, fl = font(10), font(11)
    xs_all = [float(x) for _, _, xs, _ in series for x in xs]
    ys_all = [float(y) for _, _, _, ys in series for y in ys if y is not None and math.isfinite(float(y))]
    xlo, xhi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if ylim is not None:
        ylo, yhi = ylim
    else:
        ylo, yhi = (min(ys_all + [0.0]), max(ys_all)) if ys_all else (0.0, 1.0)
        if yhi <= ylo:
            yhi = ylo + 1.0
    xt, yt = nice_ticks(xlo, xhi, 6), nice_ticks(ylo, yhi, 5)
    xlo, xhi = min(xt[0], xlo), max(xt[-1], xhi)
    if ylim is None:
        ylo, yhi = yt[0], yt[-1]
    im = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(im)
    pw, ph = W - L - R, H - T - B

    def px(x: float) -> float:
        return L + (x - xlo) / ((xhi - xlo) or 1.0) * pw

    def py(y: float) -> float:
        return T + ph - (y - ylo) / ((yhi - ylo) or 1.0) * ph

    d.text((L + pw / 2, 4), title, fill=BLACK, font=font(12), anchor="mt")
    for t in yt:
        if ylo - 1e-12 <= t <= yhi + 1e-12:
            y = py(t)
            d.line([L, y, L + pw, y], fill=(232, 232, 232))
            d.line([L - 4, y, L, y], fill=BLACK)
            d.text((L - 6, y), fmt_num(t), fill=BLACK, font=f, anchor="rm")
    for t in xt:
        if xlo - 1e-12 <= t <= xhi + 1e-12:
            x = px(t)
            d.line([x, T + ph, x, T + ph + 4], fill=BLACK)
            d.text((x, T + ph + 6), fmt_num(t), fill=BLACK, font=f, anchor="mt")
    d.rectangle([L, T, L + pw, T + ph], outline=BLACK)
    d.text((L + pw / 2, H - 4), xlabel, fill=BLACK, font=fl, anchor="mb")
    # the y label, rotated
    tw, th = text_size(ylabel, fl)
    lab = Image.new("RGB", (tw + 4, th + 6), WHITE)
    ImageDraw.Draw(lab).text((2, 1), ylabel, fill=BLACK, font=fl)
    lab = lab.rotate(90, expand=True)
    im.paste(lab, (2, int(T + ph / 2 - lab.height / 2)))
    for name, col, xs, ys in series:
        run: list[tuple[float, float]] = []
        pts = []
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(float(y)):
                if len(run) > 1:
                    d.line(run, fill=tuple(col), width=2)
                run = []
                continue
            p = (px(float(x)), py(min(max(float(y), ylo), yhi)))
            run.append(p)
            pts.append(p)
        if len(run) > 1:
            d.line(run, fill=tuple(col), width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=tuple(col))
    if note:
        d.text((L + 4, T + 3), note, fill=GREY, font=f)
    if show_legend and series:
        lg = legend([(c, n) for n, c, _, _ in series], columns=3, max_width=W - 8)
        return below(im, margin(lg, 4))
    return im


def label_colours(n: int) -> list[tuple[int, int, int]]:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]
