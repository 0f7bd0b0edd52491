"""Occlusion sensitivity (Zeiler & Fergus 2014, figure 7).

CLI: atlas occlude ATLAS IMAGE [--size PX] [--stride PX] [--fill grey|mean] [--class CLASS] [--layer conv5]
                   [--method incremental|full] [--batch-size N] [--device auto|cpu|cuda] [--out DIR]
     IMAGE is an image_id of the atlas (digits) or any image file. One call:
         r = occlude(Atlas(ATLAS), IMAGE, size=..., stride=..., fill=..., label=..., layer=..., method=...,
                     batch_size=..., device=..., out=...)
     then print "\\n".join(r.summary()).

A square (grey, or the preprocessing's mean colour) is slid over the model input;
at each position the occluded image runs through the model and we record

  (a) the total activation (sum over the map) of the top conv layer's feature
      map -- the channel whose largest activation on the UNoccluded image is the
      largest (ties: the lowest channel) -- or of `layer`'s;
  (b) (once, for the unoccluded image) the DeconvNet projection of that whole
      map (atlas.deconv, mode "map");
  (c) the probability of one class of the model: `label` if given (an output
      index, or one of the model's recorded class names); else the image's true
      class -- its dataset label, when that is one of the model's own recorded
      class names (an `atlas train` checkpoint records them; see
      common.true_class); else the correct class is unknown and the most
      probable class of the unoccluded image is charted, labelled as such
      (class_source "most_probable"), never as the true label;
  (d) the most probable class.

Positions: the input (S x S px) is cut into cells of `stride` px; the square's
centre visits every cell's centre (ceil(S / stride) positions per axis, e.g.
28 x 28 = 784 at 224 px and stride 8) and the square is clipped at the image's
border, so map cell (i, j) covers input pixels [i*stride, (i+1)*stride) and the
maps lie exactly over the image. Defaults: size 50, stride 8 at 224 px (the
paper's setting); for other input sizes both scale with S: size =
round(50 * S / 224), stride = max(1, round(8 * S / 224)) -- 7 and 1 at 32 px,
14 and 2 at 64 px (always about 28-32 positions per axis).

Fill: "grey" is the mid-grey pixel (0.5, 0.5, 0.5) before normalisation;
"mean" is the preprocessing's mean colour, i.e. an all-zero model input there.

Speed: the occluded images run in large batches (all positions at once when
the memory budget allows -- on a GPU half of its free memory, on the CPU
`common.CPU_BUDGET_BYTES` -- else chunks of that size), on the GPU when there
is one. method="incremental" (the default) also skips work that cannot change:
a square of 50 px changes only a window of the first layers' maps (for ZFNet at
224 px: 31 x 31 of conv1's 110 x 110, 15 x 15 of pool1's 55 x 55), so the
first layers run on that window only -- with the image's true zero/-inf
padding at its borders -- and the window is pasted into the unoccluded image's
maps before the rest of the net runs on full maps. The first layers are
windowed while the window covers at most half a map's area. The result equals
method="full" (every occluded image through the whole net) up to float
rounding; the tests check that.

Output: ATLAS/analyses/occlusion/RUN.parquet (the SQL view `occlusion`: one row
per position with the raw maps; dataset_label is the image's label, true_class
the model's class that is it (null: the correct class is unknown), class_index /
class_name / class_source the class whose probability is charted) and the figure panels as PNGs (figure.png, and
image.png, activation.png, projection.png, probability.png, top_class.png) in
ATLAS/analyses/occlusion/RUN/ or `out`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AtlasError
from . import common
from .. import plotting
from ..runner import Runner

FILLS = ("grey", "mean")
METHODS = ("incremental", "full")
PAPER_SIZE, PAPER_STRIDE, PAPER_INPUT = 50, 8, 224

_POINTWISE = (nn.ReLU, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Identity, nn.Dropout, nn.Dropout2d,
              nn.BatchNorm2d)


def default_geometry(image_size: int) -> tuple[int, int]:
    """(size, stride) for an input of image_size px: the paper's 50/8 at 224, proportional otherwise."""
    s = image_size / PAPER_INPUT
    return max(1, round(PAPER_SIZE * s)), max(1, round(PAPER_STRIDE * s))


def positions(image_size: int, size: int, stride: int) -> tuple[int, np.ndarray]:
    """(n per axis, boxes (n*n, 4) as y0, x0, y1, x1 (exclusive), row-major over (pos_y, pos_x))."""
    n = -(-image_size // stride)
    centres = np.arange(n) * stride + stride // 2
    lo = np.clip(centres - size // 2, 0, image_size)
    hi = np.clip(centres - size // 2 + size, 0, image_size)
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    boxes = np.stack([lo[yy.ravel()], lo[xx.ravel()], hi[yy.ravel()], hi[xx.ravel()]], 1).astype(np.int64)
    return n, boxes


def fill_value(preprocess, fill: str) -> torch.Tensor:
    """The occluder's value in model-input units, (3, 1, 1)."""
    if fill == "mean":
        return torch.zeros(3, 1, 1)
    if fill == "grey":
        return ((torch.full((3, 1, 1), 0.5) - preprocess.mean) / preprocess.std).float()
    raise AtlasError(f"unknown fill '{fill}': choose one of {', '.join(FILLS)}")


# ---------------------------------------------------------------------------
# the batched forward over occluder positions
# ---------------------------------------------------------------------------
@dataclass
class _Level:
    index: int            # module index in features
    module: nn.Module
    spatial: bool         # conv or max-pool (windowed with explicit padding)
    k: int = 1
    s: int = 1
    p: int = 1
    n_in: int = 0
    n_out: int = 0
    pad_value: float = 0.0


@dataclass
class Plan:
    """How the first layers are windowed: levels 0..J, the window size and starts at each level."""

    levels: list[_Level]
    last: int                      # J: index of the last windowed module (-1: none)
    sizes: list[int]               # window size at the input (sizes[0]) and after each level
    starts_y: list[np.ndarray]     # per level (input first): window start rows per box
    starts_x: list[np.ndarray]
    n: list[int]                   # map size at the input and after each level

    def describe(self) -> str:
        if self.last < 0:
            return "full maps"
        return (f"features.0-{self.last} on {self.sizes[-1]} x {self.sizes[-1]} windows of "
                f"{self.n[-1]} x {self.n[-1]} maps (input window {self.sizes[0]} px)")


def _affected(lo: np.ndarray, hi: np.ndarray, k: int, s: int, p: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Output rows [lo', hi'] (inclusive) whose window reads any of input rows [lo, hi]."""
    a = np.ceil((lo + p - k + 1) / s).astype(np.int64)
    b = np.floor((hi + p) / s).astype(np.int64)
    return np.clip(a, 0, n_out - 1), np.clip(b, 0, n_out - 1)


def _op_cost(lv: _Level, c_in: int, c_out: int, h_out: int) -> float:
    """A rough time model of one module on an h_out x h_out output: conv multiply-adds; pools and
    pointwise modules are memory-bound, so each of their element reads counts as 20."""
    if isinstance(lv.module, nn.Conv2d):
        return float(c_in * c_out * lv.k * lv.k * h_out * h_out)
    if lv.spatial:
        return 20.0 * c_out * lv.k * lv.k * h_out * h_out
    return 20.0 * c_out * h_out * h_out


def plan(lmap, boxes: np.ndarray, read_at: int, method: str = "incremental") -> Plan:
    """The windowed prefix for these boxes, stopping before module `read_at` (the layer read).

    Every prefix features[0..J] that the windowing supports is costed (windows up to J, full maps
    after it, by `_op_cost`) and the cheapest J is taken; J = -1 is the plain full computation.
    """
    S = lmap.image_size
    feats = lmap.model.features
    full = Plan([], -1, [S], [np.zeros(len(boxes), np.int64)], [np.zeros(len(boxes), np.int64)], [S])
    if method != "incremental" or len(boxes) == 0:
        return full
    levels: list[_Level] = []
    ly, hy = boxes[:, 0].copy(), boxes[:, 2] - 1
    lx, hx = boxes[:, 1].copy(), boxes[:, 3] - 1
    ext = [(ly, hy, lx, hx)]
    chans = [3]
    n = S
    for i, m in enumerate(feats):
        if i >= read_at:
            break
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and i in lmap.geoms:
            if isinstance(m, nn.MaxPool2d) and m.dilation not in (1, (1, 1)):
                break
            if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                break  # the windows pad with zeros
            g = lmap.geoms[i]
            ly, hy = _affected(ly, hy, g.kernel, g.stride, g.padding, g.out_size)
            lx, hx = _affected(lx, hx, g.kernel, g.stride, g.padding, g.out_size)
            lvl = _Level(i, m, True, g.kernel, g.stride, g.padding, n, g.out_size,
                         0.0 if isinstance(m, nn.Conv2d) else -math.inf)
            n = g.out_size
        elif type(m) in _POINTWISE:
            lvl = _Level(i, m, False, n_in=n, n_out=n)
        else:
            break
        levels.append(lvl)
        ext.append((ly, hy, lx, hx))
        chans.append(m.out_channels if isinstance(m, nn.Conv2d) else chans[-1])

    def sizes_for(J: int) -> list[int]:
        """Window sizes at the input and after levels 0..J when the prefix ends at level J."""
        ly, hy, lx, hx = ext[J + 1]
        h = min(int(max((hy - ly).max(), (hx - lx).max())) + 1, levels[J].n_out)
        out = [h]
        for lv in reversed(levels[:J + 1]):
            if lv.spatial:
                h = (h - 1) * lv.s + lv.k
            out.insert(0, h)
        return out

    def cost(J: int) -> float:
        hs = sizes_for(J) if J >= 0 else []
        total = 0.0
        for j, lv in enumerate(levels):
            h = hs[j + 1] if j <= J else lv.n_out
            total += _op_cost(lv, chans[j], chans[j + 1], h)
        return total

    candidates = [J for J in range(len(levels)) if any(lv.spatial for lv in levels[:J + 1])]
    if not candidates:
        return full
    J = min(candidates, key=lambda j: (cost(j), -j))
    if cost(J) >= cost(-1):
        return full
    levels = levels[:J + 1]
    sizes = sizes_for(J)
    ly, hy, lx, hx = ext[J + 1]
    nJ, h = levels[-1].n_out, sizes[-1]
    sy, sx = np.minimum(ly, nJ - h), np.minimum(lx, nJ - h)  # one window size, shifted inside the map
    starts_y, starts_x = [sy], [sx]
    for lv in reversed(levels):  # back down to the input: the rows each level's window needs
        if lv.spatial:
            sy, sx = sy * lv.s - lv.p, sx * lv.s - lv.p
        starts_y.insert(0, sy)
        starts_x.insert(0, sx)
    ns = [S] + [lv.n_out for lv in levels]
    return Plan(levels, levels[-1].index, sizes, starts_y, starts_x, ns)


def _inside(start: torch.Tensor, h: int, n: int) -> torch.Tensor:
    r = start.view(-1, 1) + torch.arange(h, device=start.device)
    return (r >= 0) & (r < n)


def _gather(t: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor, h: int, pad: int) -> torch.Tensor:
    """Windows t[:, sy+pad : sy+pad+h, sx+pad : ...] of one padded (C, H, W) map -> (B, C, h, h)."""
    ar = torch.arange(h, device=t.device)
    rows = (sy + pad).view(-1, 1, 1) + ar.view(1, h, 1)
    cols = (sx + pad).view(-1, 1, 1) + ar.view(1, 1, h)
    return t.permute(1, 2, 0)[rows, cols].permute(0, 3, 1, 2)


@dataclass
class Maps:
    activation: np.ndarray           # (N,) total activation of the channel's map
    logits: np.ndarray | None        # (N, K)
    seconds: float
    batch: int
    plan: Plan


def occlusion_forward(runner: Runner, x: torch.Tensor, boxes: np.ndarray, *, layer: str, channel: int,
                      fill: torch.Tensor, method: str = "incremental", batch_size: int | None = None,
                      logits: bool = True) -> Maps:
    """The occluded copies of x (3, S, S), one per box (y0, x0, y1, x1), through the model in batches:
    the total activation of `channel` of `layer` and (if asked) the logits, per box."""
    if method not in METHODS:
        raise AtlasError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    lmap = runner.lmap
    la = lmap.by_name[layer]
    if la.kind != "conv":
        raise AtlasError(f"occlusion maps a conv layer's feature map, not {layer}")
    feats = lmap.model.features
    t0 = time.perf_counter()
    dev = runner.device
    dtype = next(lmap.model.parameters()).dtype
    pl = plan(lmap, boxes, la.read_at, method)
    J = pl.last
    S = lmap.image_size
    x = x.to(dev, dtype)
    fillv = fill.to(dev, dtype).view(1, 3, 1, 1)
    with torch.no_grad():
        clean_J = None
        if J >= 0:
            h = runner.prepare(x[None])
            for i in range(J + 1):
                h = feats[i](h)
            clean_J = h  # (1, C, nJ, nJ)
        # memory per box: the windows of the first layers, then full maps
        win = max(3 * pl.sizes[0] ** 2, *[_channels_at(lmap, lv.index) * hh * hh
                                          for lv, hh in zip(pl.levels, pl.sizes[1:])]) if J >= 0 else 0
        per = 8 * win + runner.per_image_bytes(start=J + 1)
        bs = runner.chunk(len(boxes), per, batch_size)
        pad = max(0, int(max(-pl.starts_y[0].min(), -pl.starts_x[0].min(),
                             (pl.starts_y[0] + pl.sizes[0] - S).max(), (pl.starts_x[0] + pl.sizes[0] - S).max())))
        xp = F.pad(x, (pad, pad, pad, pad))  # zeros: the conv's own padding value
        tb = torch.as_tensor(boxes, device=dev)
        st_y = [torch.as_tensor(a, device=dev) for a in pl.starts_y]
        st_x = [torch.as_tensor(a, device=dev) for a in pl.starts_x]
        acts, outs = [], []
        for a in range(0, len(boxes), bs):
            b = min(a + bs, len(boxes))
            sy, sx, h0 = st_y[0][a:b], st_x[0][a:b], pl.sizes[0]
            # the occluded inputs (windows of them): a fresh tensor, filled in place
            w = _gather(xp, sy, sx, h0, pad) if J >= 0 else x.expand(b - a, -1, -1, -1).clone()
            ar = torch.arange(h0, device=dev)
            ry, rx = sy.view(-1, 1) + ar, sx.view(-1, 1) + ar
            bb = tb[a:b]
            my = (ry >= bb[:, 0:1]) & (ry < bb[:, 2:3])
            mx = (rx >= bb[:, 1:2]) & (rx < bb[:, 3:4])
            occ = my[:, :, None] & mx[:, None, :]
            for c in range(w.shape[1]):
                w[:, c].masked_fill_(occ, fillv[0, c, 0, 0])
            w = runner.prepare(w)
            for j, lv in enumerate(pl.levels):  # the windowed first layers
                if lv.spatial:
                    hin = pl.sizes[j]
                    # outside the map: the op's own padding value (the input window is zero-padded already)
                    if not (j == 0 and lv.pad_value == 0.0):
                        ok = (_inside(st_y[j][a:b], hin, pl.n[j])[:, :, None]
                              & _inside(st_x[j][a:b], hin, pl.n[j])[:, None, :])
                        if not bool(ok.all()):
                            w = w.masked_fill(~ok[:, None], lv.pad_value)
                    m = lv.module
                    if isinstance(m, nn.Conv2d):
                        w = F.conv2d(w, m.weight, m.bias, m.stride, 0)
                    else:
                        w = F.max_pool2d(w, m.kernel_size, m.stride, 0, ceil_mode=False)
                else:
                    w = lv.module(w)
            if J >= 0:  # paste the windows into the unoccluded maps
                hJ = pl.sizes[-1]
                full = clean_J.expand(b - a, -1, -1, -1).contiguous(memory_format=torch.channels_last
                                                                     if runner.channels_last else
                                                                     torch.contiguous_format)
                arJ = torch.arange(hJ, device=dev)
                rows = (st_y[-1][a:b].view(-1, 1, 1) + arJ.view(1, hJ, 1))
                cols = (st_x[-1][a:b].view(-1, 1, 1) + arJ.view(1, 1, hJ))
                bi = torch.arange(b - a, device=dev).view(-1, 1, 1)
                full.permute(0, 2, 3, 1)[bi, rows, cols] = w.permute(0, 2, 3, 1)
                w = full
            total = None
            for i in range(J + 1, len(feats)):
                w = feats[i](w)
                if i == la.read_at:
                    total = w[:, channel].sum((1, 2)).float()
                    if not logits:
                        break
            if J + 1 > la.read_at:  # cannot happen: the plan stops before read_at
                raise AssertionError("windowed past the layer read")
            acts.append(total.cpu())
            if logits:
                w = torch.flatten(lmap.model.avgpool(w), 1)
                outs.append(lmap.model.classifier(w).float().cpu())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return Maps(torch.cat(acts).double().numpy(), torch.cat(outs).double().numpy() if logits else None,
                time.perf_counter() - t0, bs, pl)


def _channels_at(lmap, index: int) -> int:
    ch = 3
    for i, m in enumerate(lmap.model.features):
        if isinstance(m, nn.Conv2d):
            ch = m.out_channels
        if i == index:
            return ch
    return ch


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# the analysis
# ---------------------------------------------------------------------------
@dataclass
class OcclusionResult:
    run: str
    image: str
    image_id: int | None
    path: str
    model: str
    image_size: int
    layer: str
    channel: int
    size: int
    stride: int
    fill: str
    n: int                                   # positions per axis
    boxes: np.ndarray = field(repr=False)    # (n*n, 4) y0, x0, y1, x1
    activation: np.ndarray = field(repr=False)          # (n, n)
    fill_rgb: tuple = (128, 128, 128)        # the occluder's colour, for display
    activation_base: float = 0.0
    probability: np.ndarray | None = field(default=None, repr=False)   # (n, n) p(class_index)
    probability_base: float | None = None
    top_class: np.ndarray | None = field(default=None, repr=False)     # (n, n) class index
    top_class_base: int | None = None
    dataset_label: str | None = None         # the image's label in the dataset: a fact about the image,
                                             # a class of the model only when true_index is set
    true_index: int | None = None            # the model's class that is the image's label (None: unknown)
    class_index: int | None = None           # the class whose probability is charted
    class_source: str | None = None          # given | true | most_probable (the correct class is unknown)
    unknown_reason: str | None = None        # why the correct class is unknown, when it is
    class_names: list[str] = field(default_factory=list, repr=False)
    projection: Any = field(default=None, repr=False)  # (3, S, S) tensor, or None
    notes: list[str] = field(default_factory=list)
    table: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    method: str = "incremental"
    batch: int = 0
    device: str = "cpu"
    seconds: float = 0.0
    plan: str = ""

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for k, (y0, x0, y1, x1) in enumerate(self.boxes.tolist()):
            py, px = divmod(k, self.n)
            tc = None if self.top_class is None else int(self.top_class[py, px])
            out.append({
                "run": self.run, "image": self.image, "image_id": self.image_id, "path": self.path,
                "model": self.model, "layer": self.layer, "channel": self.channel, "size": self.size,
                "stride": self.stride, "fill": self.fill, "pos_y": py, "pos_x": px,
                "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                "activation": float(self.activation[py, px]), "activation_base": self.activation_base,
                "dataset_label": self.dataset_label, "true_class_index": self.true_index,
                "true_class": self.true_class, "class_index": self.class_index, "class_name": self.class_name,
                "class_source": self.class_source,
                "probability": None if self.probability is None else float(self.probability[py, px]),
                "probability_base": self.probability_base,
                "top_class": tc, "top_class_name": None if tc is None else self.class_names[tc],
            })
        return out

    @property
    def class_name(self) -> str | None:
        return None if self.class_index is None else self.class_names[self.class_index]

    @property
    def true_class(self) -> str | None:
        return None if self.true_index is None or not self.class_names else self.class_names[self.true_index]

    def class_phrase(self) -> str:
        """What the charted class is, in words that claim no more than is known."""
        if self.class_source == "true":
            return f"the image's true class (its label '{self.dataset_label}')"
        if self.class_source == "given":
            extra = ""
            if self.true_index is not None and self.true_index != self.class_index:
                extra = f"; the image's true class is {self.true_class}"
            return f"the class given{extra}"
        return "the most probable class of the unoccluded image; the correct class is unknown"

    def summary(self) -> list[str]:
        n = self.n
        what = f"image {self.image_id} ({self.path})" if self.image_id is not None else self.path
        lines = [f"occlusion of {what} with {self.model} at {self.image_size} px: "
                 f"{self.size} px {self.fill} square, stride {self.stride}, {n} x {n} positions "
                 f"({n * n} forward passes in {self.seconds:.2f} s on {self.device}, {self.method}, "
                 f"batches of {self.batch})"]
        am = np.unravel_index(int(np.argmin(self.activation)), self.activation.shape)
        lines.append(f"strongest {self.layer} map for the unoccluded image: channel {self.channel}; total activation "
                     f"{self.activation_base:.4g} unoccluded, {self.activation.min():.4g} at the lowest "
                     f"({self._where(am)})")
        if self.probability is not None:
            pm = np.unravel_index(int(np.argmin(self.probability)), self.probability.shape)
            lines.append(f"p({self.class_name}) [{self.class_phrase()}]: {self.probability_base:.4f} unoccluded, "
                         f"{self.probability.min():.4f} at the lowest ({self._where(pm)})")
            vals, counts = np.unique(self.top_class, return_counts=True)
            order = np.argsort(-counts)[:5]
            share = ", ".join(f"{self.class_names[vals[i]]} {100 * counts[i] / counts.sum():.0f}%" for i in order)
            lines.append(f"most probable class over positions: {share}")
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.table:
            lines.append(f"table: {self.table} (SQL view occlusion, run '{self.run}')")
        if self.figures:
            fig = self.figures.get("figure")
            rest = ", ".join(p.name for k, p in self.figures.items() if k != "figure")
            lines.append(f"figures: {fig} (+ {rest})")
        return lines

    def _where(self, pos) -> str:
        k = int(pos[0]) * self.n + int(pos[1])
        y0, x0, y1, x1 = self.boxes[k].tolist()
        return f"square at x {x0}..{x1 - 1}, y {y0}..{y1 - 1}"


def _schema():
    import pyarrow as pa

    i32, f64, s = pa.int32(), pa.float64(), pa.string()
    return pa.schema([("run", s), ("image", s), ("image_id", i32), ("path", s), ("model", s), ("layer", s),
                      ("channel", i32), ("size", i32), ("stride", i32), ("fill", s), ("pos_y", i32),
                      ("pos_x", i32), ("x0", i32), ("y0", i32), ("x1", i32), ("y1", i32),
                      ("activation", f64), ("activation_base", f64), ("dataset_label", s),
                      ("true_class_index", i32), ("true_class", s), ("class_index", i32), ("class_name", s),
                      ("class_source", s), ("probability", f64), ("probability_base", f64),
                      ("top_class", i32), ("top_class_name", s)])


def occlude(atlas, image, *, size: int | None = None, stride: int | None = None, fill: str = "grey",
            label: int | str | None = None, layer: str | None = None, batch_size: int | None = None,
            device: str = "auto", out: str | Path | None = None, method: str = "incremental",
            store: bool = True, figures: bool = True) -> OcclusionResult:
    """Occlusion sensitivity maps of one image (figure 7); see the module docstring.

    image   an image_id of the atlas (int, or a string of digits) or a path to any image file
    size, stride   in model-input pixels (default: 50 / 8 at 224 px, proportional otherwise)
    label   the class whose probability is mapped: an output index, or one of the model's recorded
            class names; default the image's true class when known (its dataset label is one of the
            model's recorded class names), else the most probable class (the correct one is unknown)
    layer   the conv layer whose strongest map is followed (default: the top conv layer)
    out     folder for the PNGs (default ATLAS/analyses/occlusion/RUN/); the table is always
            written into the atlas
    """
    atlas = common.open_atlas(atlas)
    S = atlas.image_size
    if fill not in FILLS:
        raise AtlasError(f"unknown fill '{fill}': choose one of {', '.join(FILLS)}")
    if method not in METHODS:
        raise AtlasError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    dsize, dstride = default_geometry(S)
    size = dsize if size is None else int(size)
    stride = dstride if stride is None else int(stride)
    if not 1 <= size <= S:
        raise AtlasError(f"occluder size {size} px does not fit the {S} x {S} px model input (use 1..{S})")
    if not 1 <= stride <= S:
        raise AtlasError(f"stride {stride} px is out of range for the {S} x {S} px model input (use 1..{S})")
    lmap = atlas.lmap
    convs = lmap.conv_layers
    if layer is None:
        layer = convs[-1].name
    else:
        lmap.resolve([layer])  # unknown -> AtlasError listing the layers
        if lmap.by_name[layer].kind != "conv":
            raise AtlasError(f"occlusion follows a conv layer's feature map; '{layer}' is a fc layer "
                             f"(use one of {', '.join(c.name for c in convs)})")
    has_cls, why = common.classifier_status(atlas)
    if label is not None and not has_cls:
        common.require_classifier(atlas, "the probability map of a given class")
    ref = common.resolve_image(atlas, image, label)
    notes = []
    names = common.class_names(atlas) if has_cls else []
    runner = Runner(atlas, device)
    # the unoccluded image: the strongest map, its projection, the base probabilities
    with torch.no_grad():
        want = [layer] + ([lmap.layers[-1].name] if has_cls else [])
        base = runner.extract(ref.x[None], want)
    amap = base[layer][0]  # (C, H, W)
    peak = amap.flatten(1).max(1).values
    channel = int(torch.argmax(peak))
    act_base = float(amap[channel].sum())
    charted = source = reason = None
    prob_base = top_base = None
    if has_cls:
        p0 = softmax(base[lmap.layers[-1].name][0].double().numpy()[None])[0]
        top_base = int(p0.argmax())
        if ref.class_index is not None:
            charted, source = ref.class_index, ref.class_source
        else:
            reason = common.unknown_class_reason(atlas, ref)
            charted, source = top_base, "most_probable"
            notes.append(f"the correct class is unknown: {reason}; charting the most probable class of the "
                         f"unoccluded image ({names[top_base]}) instead")
        prob_base = float(p0[charted])
    else:
        notes.append(f"no probability or class maps: the model has no classifier ({why}); "
                     "the activation maps are still made")
    n, boxes = positions(S, size, stride)
    maps = occlusion_forward(runner, ref.x, boxes, layer=layer, channel=channel,
                             fill=fill_value(atlas.preprocess, fill), method=method,
                             batch_size=batch_size, logits=has_cls)
    # (b) the projection of the whole map, for the unoccluded image
    projection = None
    try:
        from .. import deconv as D

        yx = int(torch.argmax(amap[channel]))
        H = amap.shape[-1]
        P = D.project_images(atlas.lmap, ref.x[None], [D.Request(0, layer, channel, yx // H, yx % H)], mode="map")
        projection = P.images[0].detach().float().cpu()
    except AtlasError as e:
        notes.append(f"no projection: {e}")
    res = OcclusionResult(
        run="", image=ref.key, image_id=ref.image_id, path=ref.path, model=atlas.manifest["model"]["name"],
        image_size=S, layer=layer, channel=channel, size=size, stride=stride, fill=fill, n=n, boxes=boxes,
        activation=maps.activation.reshape(n, n), activation_base=act_base, notes=notes, method=method,
        batch=maps.batch, device=str(runner.device), seconds=maps.seconds, plan=maps.plan.describe(),
        projection=projection, class_names=names,
        fill_rgb=tuple(int(round(float(v) * 255)) for v in (fill_value(atlas.preprocess, fill).flatten()
                                                           * atlas.preprocess.std.flatten()
                                                           + atlas.preprocess.mean.flatten()).clamp(0, 1)))
    if has_cls:
        probs = softmax(maps.logits)
        res.probability = probs[:, charted].reshape(n, n)
        res.top_class = probs.argmax(1).reshape(n, n)
        res.probability_base, res.top_class_base = prob_base, top_base
        res.class_index, res.class_source, res.unknown_reason = charted, source, reason
        res.true_index = ref.true_index
    res.dataset_label = ref.label
    lab = f"-{common._slug(str(label), 16)}" if label is not None else ""
    res.run = f"{ref.slug}-{layer}-s{size}-t{stride}-{fill}{lab}"
    if store:
        res.table = common.store_table(atlas, "occlusion", res.run, res.rows(), _schema())
    if figures:
        res.figures = render(res, ref.crop, common.figure_dir(atlas, "occlusion", res.run, out))
    return res


# ---------------------------------------------------------------------------
# figure 7
# ---------------------------------------------------------------------------
def image_caption(res: OcclusionResult) -> str:
    """The input panel's caption: what the charted class is, claiming "true label" only for a class
    known to be the image's own (see common.true_class)."""
    sub = f"{Path(res.path).name}\n{res.size} px {res.fill} square (one position shown), stride {res.stride}"
    if res.class_index is not None:
        if res.class_source == "true":
            sub += f"\ntrue label: {res.class_name} (p = {res.probability_base:.3f})"
        elif res.class_source == "given":
            sub += f"\ngiven class: {res.class_name} (p = {res.probability_base:.3f})"
            if res.true_index is not None and res.true_index != res.class_index:
                sub += f"\ntrue label: {res.true_class}"
        else:
            sub += f"\nmost probable class: {res.class_name} (p = {res.probability_base:.3f})"
            sub += "\ncorrect class unknown"
        if res.dataset_label is not None and res.true_index is None:
            sub += f"\ndataset label: {res.dataset_label} (not a known class of the model)"
    return sub


def render(res: OcclusionResult, crop, folder: Path) -> dict[str, Path]:
    """The panels as PNGs (figure.png holds them all, in the paper's order)."""
    from PIL import Image, ImageDraw

    S = res.image_size
    D = max(1, round(200 / S))  # display scale: panels about 200 px wide
    W = S * D

    def maparea(arr, vmin, vmax):
        cell = res.stride * D
        hm = plotting.heatmap(arr, vmin, vmax, cell)
        return hm.crop((0, 0, W, W))

    panels: dict[str, Any] = {}
    # the image, with the occluder drawn at one position (the centre) and the legend
    img = crop.convert("RGB").resize((W, W), Image.NEAREST if D > 1 else Image.BILINEAR)
    d = ImageDraw.Draw(img)
    k = (res.n // 2) * res.n + res.n // 2
    y0, x0, y1, x1 = res.boxes[k].tolist()
    d.rectangle([x0 * D, y0 * D, x1 * D - 1, y1 * D - 1], fill=tuple(res.fill_rgb), outline=(255, 255, 255), width=1)
    sub = image_caption(res)
    panels["image"] = plotting.titled(img, "(a) input image", sub, width=W)
    lo, hi = float(res.activation.min()), float(res.activation.max())
    hm = maparea(res.activation, lo, hi)
    panels["activation"] = plotting.titled(plotting.beside(hm, plotting.colorbar(lo, hi, W), pad=4),
                                    f"(b) {res.layer} feature map {res.channel}",
                                    f"total activation vs square position\nunoccluded: {res.activation_base:.4g}")
    if res.projection is not None:
        pim = plotting.projection_image(res.projection).resize((W, W), Image.NEAREST if D > 1 else Image.BILINEAR)
        panels["projection"] = plotting.titled(pim, f"(c) projection of {res.layer} map {res.channel}",
                                        "DeconvNet, unoccluded image\n(grey = 0, scaled by max |value|)")
    if res.probability is not None:
        # the map's own range (a flat map: 0..max), so that small changes show; the scale gives the values
        plo, phi = float(res.probability.min()), float(res.probability.max())
        if phi - plo <= 1e-12:
            plo = 0.0
        hp = maparea(res.probability, plo, max(phi, 1e-12))
        panels["probability"] = plotting.titled(plotting.beside(hp, plotting.colorbar(plo, max(phi, 1e-12), W), pad=4),
                                         f"(d) p({res.class_name})",
                                         {"true": "probability of the true class", "given": "probability of the "
                                          "given class", "most_probable": "probability of the most probable "
                                          "class (correct class unknown)"}[res.class_source]
                                         + "\nvs square position")
        vals, counts = np.unique(res.top_class, return_counts=True)
        order = [int(vals[i]) for i in np.argsort(-counts, kind="stable")]
        shown = order[:10]
        cols = {c: plotting.PALETTE[i % len(plotting.PALETTE)] for i, c in enumerate(shown)}
        other = (60, 60, 60)
        rgb = np.zeros(res.top_class.shape + (3,), np.uint8)
        for c in order:
            rgb[res.top_class == c] = cols.get(c, other)
        lm = Image.fromarray(rgb).resize((res.n * res.stride * D,) * 2, Image.NEAREST).crop((0, 0, W, W))
        entries = [(cols[c], res.class_names[c] + (" (true)" if c == res.true_index else "")) for c in shown]
        if len(order) > len(shown):
            entries.append((other, f"{len(order) - len(shown)} other classes"))
        panels["top_class"] = plotting.titled(plotting.below(lm, plotting.legend(entries, columns=1, max_width=W)),
                                       "(e) most probable class", "label map vs square position")
    folder = Path(folder)
    files = {}
    for name, im in panels.items():
        files[name] = common.save_png(folder / f"{name}.png", plotting.margin(im, 6))
    shown = Path(res.path).name if res.image_id is None else f"image {res.image_id} ({Path(res.path).name})"
    head = plotting.titled(plotting.beside(*panels.values(), pad=14), f"Occlusion sensitivity: {res.model}, {shown}",
                    "Zeiler & Fergus figure 7: a square slid over the image; each map is indexed by the "
                    "square's centre")
    files = {"figure": common.save_png(folder / "figure.png", plotting.margin(head, 10)), **files}
    return files
