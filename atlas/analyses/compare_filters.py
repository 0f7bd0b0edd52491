"""Architecture comparison from the first layer's filters (the paper's figure 6): two models'
conv1 filters side by side, with the numbers that tell them apart.

The paper's point (figure 6): AlexNet's conv1 (11x11, stride 4) has a mix of very high and very
low frequency filters with little coverage of the mid frequencies, and some dead filters; ZFNet's
(7x7, stride 2) has more distinctive, mid-frequency filters and fewer dead ones. The numbers:

  dead      a filter whose RMS is below `dead_fraction` (1 %) of the largest filter RMS of the same
            layer, or exactly 0. (A filter that never gets a gradient decays under weight decay by
            orders of magnitude; live filters sit near the renormalisation radius.)
  spectrum  per filter: the power spectrum of its k x k kernel, zero-padded to fft_size x
            fft_size, summed over the input colour channels; radial frequency r = |(fy, fx)| in
            cycles per pixel of the layer's input (0 .. 0.71; Nyquist per axis is 0.5). The DC term
            (a flat colour blob) counts as low frequency.
  bands     low: r < 0.125 (period > 8 px); mid: 0.125 <= r < 0.25 (period 4-8 px);
            high: r >= 0.25 (period < 4 px).
  per model, over the live filters: the mean share of spectral energy in each band
            (low_share, mid_share, high_share; they sum to 1), the fraction of filters whose largest
            share is each band (low_dominated, mid_dominated, high_dominated), and the
            energy-weighted mean radial frequency (mean_frequency).

Display: each model's filters are scaled by that layer's max |weight| around mid-grey (grey = 0;
RGB input channels as colours), so a dead filter shows as flat grey; dead filters are outlined red.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import AtlasError
from ..util.files import atomic_write
from ..models.registry import build_model, read_weights, trainable_names
from . import font, signed_to_uint8, wrap_text

BAND_NAMES = ("low", "mid", "high")


# ---------------------------------------------------------------------------
# the numbers
# ---------------------------------------------------------------------------
def filter_rms(weight: np.ndarray | torch.Tensor) -> np.ndarray:
    w = np.asarray(torch.as_tensor(weight).detach().double().cpu())
    return np.sqrt((w.reshape(w.shape[0], -1) ** 2).mean(axis=1))


def dead_filters(weight, dead_fraction: float = 0.01) -> np.ndarray:
    """Boolean mask: RMS < dead_fraction x the layer's largest RMS, or RMS == 0."""
    rms = filter_rms(weight)
    top = rms.max() if rms.size else 0.0
    return (rms <= 0) | (rms < dead_fraction * top)


def filter_spectra(weight, bands: Sequence[float] = (0.125, 0.25), fft_size: int = 64
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per filter: (energy share in each band (n, len(bands)+1), energy-weighted mean radial frequency (n,)).

    weight (n, c, k, k); see the module docstring for the definitions."""
    w = np.asarray(torch.as_tensor(weight).detach().double().cpu())
    if w.ndim != 4:
        raise AtlasError(f"conv filters must be 4-D (n, c, k, k), not {tuple(w.shape)}")
    n, _, kh, kw = w.shape
    size = max(int(fft_size), kh, kw)
    power = (np.abs(np.fft.fft2(w, s=(size, size), axes=(2, 3))) ** 2).sum(axis=1)  # (n, size, size)
    f = np.fft.fftfreq(size)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    edges = [0.0, *sorted(float(b) for b in bands), np.inf]
    total = power.reshape(n, -1).sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    shares = np.stack([power[:, (r >= lo) & (r < hi)].sum(axis=1) / safe
                       for lo, hi in zip(edges[:-1], edges[1:])], axis=1)
    mean_f = (power * r[None]).reshape(n, -1).sum(axis=1) / safe
    return shares, mean_f


def _resolve(src: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, folder for default outputs)."""
    p = Path(src)
    if p.is_dir():
        f = p / "final.pt"
        if not f.is_file():
            raise AtlasError(f"training run '{src}' has no final.pt (is the run finished?)")
        return f, p
    if not p.exists():
        raise AtlasError(f"weights '{src}' do not exist (pass a training run folder or a weights file)")
    return p, p.parent


def first_conv(src: str | os.PathLike) -> dict[str, Any]:
    """The first conv layer's filters of a run or weights file: {"weight", "stride", "model", "path"}."""
    path, _ = _resolve(src)
    state, meta = read_weights(path)
    key = "features.0.weight" if "features.0.weight" in state and state["features.0.weight"].ndim == 4 else None
    if key is None:
        key = next((k for k, v in state.items() if k.endswith("weight") and v.ndim == 4), None)
    if key is None:
        raise AtlasError(f"weights '{path}' hold no conv filters (no 4-D weight)")
    model = meta.get("model")
    stride = None
    if model in trainable_names():  # a name in a file is never a path to code to run (ours, torchvision's)
        try:
            with torch.device("meta"):
                net = build_model(model, num_classes=int(meta.get("num_classes") or 10))
            conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
            stride = int(conv.stride[0])
        except Exception:  # the stride is only a label
            stride = None
    return {"weight": state[key].detach().float().cpu(), "stride": stride, "model": model, "path": path,
            "key": key}


def summarize(weight, label: str, dead_fraction: float = 0.01, bands: Sequence[float] = (0.125, 0.25),
              fft_size: int = 64) -> dict[str, Any]:
    """One row of the comparison table for one model's conv1 filters."""
    dead = dead_filters(weight, dead_fraction)
    shares, mean_f = filter_spectra(weight, bands, fft_size)
    names = BAND_NAMES if len(bands) == 2 else tuple(f"band{i}" for i in range(len(bands) + 1))
    live = ~dead
    w = torch.as_tensor(weight)
    row: dict[str, Any] = {"model": label, "filters": int(w.shape[0]), "kernel": int(w.shape[-1]),
                           "dead": int(dead.sum()), "dead_fraction": float(dead.mean()) if dead.size else 0.0}
    dom = shares.argmax(axis=1)
    for i, b in enumerate(names):
        row[f"{b}_share"] = float(shares[live, i].mean()) if live.any() else float("nan")
    for i, b in enumerate(names):
        row[f"{b}_dominated"] = float((dom[live] == i).mean()) if live.any() else float("nan")
    row["mean_frequency"] = float(mean_f[live].mean()) if live.any() else float("nan")
    return row


# ---------------------------------------------------------------------------
# the figure
# ---------------------------------------------------------------------------
def _filter_grid(weight: torch.Tensor, dead: np.ndarray, cell: int):
    from PIL import Image, ImageDraw

    w = weight.detach().double().cpu().numpy()
    n, c = w.shape[:2]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    gap = 2
    img = Image.new("RGB", (cols * (cell + gap) + gap, rows * (cell + gap) + gap), (255, 255, 255))
    d = ImageDraw.Draw(img)
    scale = float(np.abs(w).max()) or 1.0
    for i in range(n):
        f = w[i].transpose(1, 2, 0)
        if c == 1:
            f = np.repeat(f, 3, axis=2)
        elif c != 3:
            f = f[:, :, :3] if c > 3 else np.concatenate([f, np.zeros(f.shape[:2] + (3 - c,))], axis=2)
        tile = Image.fromarray(signed_to_uint8(f, scale)).resize((cell, cell), Image.NEAREST)
        x, y = gap + (i % cols) * (cell + gap), gap + (i // cols) * (cell + gap)
        img.paste(tile, (x, y))
        if dead[i]:
            d.rectangle([x - 1, y - 1, x + cell, y + cell], outline=(220, 0, 0), width=2)
    return img


def _draw(models: list[dict[str, Any]], rows: list[dict[str, Any]], bands: Sequence[float], path: Path) -> Path:
    """The figure: each model's filter grid under its title, the table of numbers, and stacked bars of
    the band shares."""
    from PIL import Image, ImageDraw

    cell = 32
    f, fs, fb = font(14), font(12), font(16)
    panels = [_filter_grid(m["weight"], m["dead"], cell) for m in models]
    titles = []
    for m, r in zip(models, rows):
        k = r["kernel"]
        stride = f", stride {m['stride']}" if m["stride"] else ""
        titles.append((m["label"], f"{r['filters']} filters {k}x{k}{stride}, {r['dead']} dead"))
    widths = [max(p.width, int(max(fb.getlength(t[0]), f.getlength(t[1]))) + 8) for p, t in zip(panels, titles)]
    pad, head = 24, 76
    width = max(sum(widths) + pad * (len(panels) + 1), 900)
    b1, b2 = sorted(bands)[:2]
    note = (f"low / mid / high: mean share of the spectral energy (zero-padded FFT of each filter) at radial "
            f"frequency < {b1:g}, {b1:g} to {b2:g}, >= {b2:g} cycles/px, over the live filters; -dom.: the "
            f"share of live filters whose largest band it is. Dead: RMS below the given fraction of the "
            f"layer's largest filter RMS.")
    nlines = wrap_text(note, fs, width - 2 * pad)
    table_h = 16 + 22 * (len(rows) + 1) + 16 * len(nlines) + 12 + 26 * len(rows) + 16
    height = head + max(p.height for p in panels) + table_h
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((pad, 8), "conv1 filters (paper figure 6): dead filters outlined red; grey = 0, each model scaled "
           "by its largest |weight|", fill=(0, 0, 0), font=f)
    x = pad
    for p, (t1, t2), w in zip(panels, titles, widths):
        d.text((x, 32), t1, fill=(0, 0, 0), font=fb)
        d.text((x, 52), t2, fill=(60, 60, 60), font=f)
        img.paste(p, (x, head))
        x += w + pad
    # the table
    y = head + max(p.height for p in panels) + 16
    cols = [("model", 230), ("dead", 80), ("low", 70), ("mid", 70), ("high", 70),
            ("low-dom.", 80), ("mid-dom.", 80), ("high-dom.", 85), ("mean freq.", 90)]
    xx = pad
    for name, w in cols:
        d.text((xx, y), name, fill=(0, 0, 0), font=f)
        xx += w
    y += 22
    for r in rows:
        vals = [r["model"], f"{r['dead']}/{r['filters']}", f"{r['low_share']:.0%}", f"{r['mid_share']:.0%}",
                f"{r['high_share']:.0%}", f"{r['low_dominated']:.0%}", f"{r['mid_dominated']:.0%}",
                f"{r['high_dominated']:.0%}", f"{r['mean_frequency']:.3f}"]
        xx = pad
        for (name, w), v in zip(cols, vals):
            while name == "model" and f.getlength(v) > w - 8 and len(v) > 4:
                v = v[:-2] + "\u2026"
            d.text((xx, y), v, fill=(0, 0, 0), font=f)
            xx += w
        y += 22
    for line in nlines:
        d.text((pad, y), line, fill=(90, 90, 90), font=fs)
        y += 16
    # stacked bars of the band shares
    y += 12
    colours = [(70, 110, 200), (90, 180, 90), (220, 120, 50)]
    bar_w = width - 2 * pad - 240
    for r in rows:
        label = r["model"]
        while fs.getlength(label) > 230 and len(label) > 4:
            label = label[:-2] + "\u2026"
        d.text((pad, y + 10), label, fill=(0, 0, 0), font=fs, anchor="lm")
        x0 = pad + 240
        for i, b in enumerate(BAND_NAMES):
            share = r.get(f"{b}_share", 0.0)
            share = 0.0 if share != share else share
            x1 = x0 + share * bar_w
            d.rectangle([x0, y, x1, y + 20], fill=colours[i])
            if share > 0.06:
                d.text(((x0 + x1) / 2, y + 10), f"{b} {share:.0%}", fill=(255, 255, 255), font=fs, anchor="mm")
            x0 = x1
        y += 26
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def compare_filters(a: str | os.PathLike, b: str | os.PathLike, *, out: str | os.PathLike | None = None,
                    labels: Sequence[str] | str | None = None, dead_fraction: float = 0.01,
                    bands: Sequence[float] | str = (0.125, 0.25), fft_size: int = 64
                    ) -> tuple[Path, list[dict[str, Any]]]:
    """Figure 6 for two models: (PNG path, one row of numbers per model)."""
    if isinstance(bands, str):
        try:
            bands = [float(v) for v in bands.split(",") if v.strip()]
        except ValueError:
            raise AtlasError(f"--bands must be two frequencies like 0.125,0.25 (got '{bands}')") from None
    bands = list(bands)
    if len(bands) != 2 or not 0 < bands[0] < bands[1]:
        raise AtlasError(f"--bands must be two increasing frequencies in cycles/px, like 0.125,0.25 (got {bands})")
    if not 0 <= dead_fraction < 1:
        raise AtlasError(f"--dead-fraction must be in [0, 1) (got {dead_fraction})")
    if fft_size < 8:
        raise AtlasError(f"--fft-size must be at least 8 (got {fft_size})")
    if isinstance(labels, str):
        labels = [s.strip() for s in labels.split(",")]
    if labels is not None and len(labels) != 2:
        raise AtlasError(f"--labels takes two names, one per model (got {len(labels)})")
    models, rows = [], []
    for i, src in enumerate((a, b)):
        fc = first_conv(src)
        path = Path(src)
        default = f"{fc['model'] or 'model'} ({path.name if path.is_dir() else path.stem})"
        label = labels[i] if labels else default
        row = summarize(fc["weight"], label, dead_fraction, bands, fft_size)
        row["stride"] = fc["stride"]
        row["source"] = str(fc["path"])
        rows.append(row)
        models.append({**fc, "label": label, "dead": dead_filters(fc["weight"], dead_fraction)})
    if out is None:
        out = _resolve(a)[1] / "compare-filters.png"
    png = _draw(models, rows, bands, Path(out))
    return png, rows
