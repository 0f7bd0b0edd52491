"""Charts drawn with PIL (no plotting library): the font, round tick values and a line panel, used by
training's curves and the analyses' figures alike."""
from __future__ import annotations

import math

def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v < hi + step * 0.999:
        ticks.append(round(v, 10))
        v += step
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
