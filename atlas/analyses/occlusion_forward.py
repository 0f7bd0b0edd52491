"""The occluded copies of one image through the model, batched, skipping the work that cannot change.

Occlusion sensitivity needs one forward pass per square position (784 for the paper's setting), so
this is where its time goes; the analysis itself (atlas.analyses.occlusion) only asks for the total
activation of one map and the logits per position.

Batches: the occluded images run in large batches -- all positions at once when the memory budget
allows (on a GPU half of its free memory, on the CPU `atlas.net.runner.CPU_BUDGET_BYTES`, at most a
quarter of the memory available), else chunks of that size -- on the GPU when there is one.

Windows (method "incremental", the default): a square changes only a window of the first layers'
maps, so those layers run on that window only -- with the image's true zero / -inf padding at its
borders -- and the window is pasted into the unoccluded image's maps before the rest of the net
runs on full maps. `plan` chooses how many of the first modules to window: every prefix the
windowing supports (convs with zero padding, undilated max-pools, pointwise modules) is costed by a
rough time model (`_op_cost`) and the cheapest is taken, or none. For ZFNet at 224 px, a 50 px
square and the top conv layer that is features.0-5: conv1 on 43 x 43 windows of its 110 x 110 maps,
pool1 on 21 x 21 of 55 x 55, conv2 on 9 x 9 of 26 x 26. The result equals method "full" (every
occluded image through the whole net) up to float rounding.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AtlasError
from ..net.runner import Runner
from ..choices import FORWARDS
from ..util.progress import reported_batch


_POINTWISE = (nn.ReLU, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Identity, nn.Dropout, nn.Dropout2d,
              nn.BatchNorm2d)


def check_method(method: str) -> None:
    """Refuse an unknown method, naming the known ones."""
    if method not in FORWARDS:
        raise AtlasError(f"unknown forward '{method}': choose one of {', '.join(FORWARDS)}")


# ---------------------------------------------------------------------------
# the plan: which first modules run on windows
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


def _windowable_levels(lmap, boxes: np.ndarray, read_at: int) -> tuple[list[_Level], list[tuple], list[int]]:
    """The first modules (before `read_at`) that can run on windows, and after each of them (input
    first) the rows and columns the boxes reach, (lo_y, hi_y, lo_x, hi_x) inclusive, and the channels."""
    levels: list[_Level] = []
    ly, hy = boxes[:, 0].copy(), boxes[:, 2] - 1
    lx, hx = boxes[:, 1].copy(), boxes[:, 3] - 1
    ext = [(ly, hy, lx, hx)]
    chans = [3]
    n = lmap.image_size
    for i, m in enumerate(lmap.model.features):
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
    return levels, ext, chans


def _window_sizes(levels: list[_Level], ext: list[tuple], J: int) -> list[int]:
    """Window sizes at the input and after levels 0..J when the prefix ends at level J."""
    ly, hy, lx, hx = ext[J + 1]
    h = min(int(max((hy - ly).max(), (hx - lx).max())) + 1, levels[J].n_out)
    out = [h]
    for lv in reversed(levels[:J + 1]):
        if lv.spatial:
            h = (h - 1) * lv.s + lv.k
        out.insert(0, h)
    return out


def _prefix_cost(levels: list[_Level], ext: list[tuple], chans: list[int], J: int) -> float:
    """The time model of all the levels with 0..J on windows and the rest on full maps (J = -1: none)."""
    hs = _window_sizes(levels, ext, J) if J >= 0 else []
    total = 0.0
    for j, lv in enumerate(levels):
        h = hs[j + 1] if j <= J else lv.n_out
        total += _op_cost(lv, chans[j], chans[j + 1], h)
    return total


def _window_starts(levels: list[_Level], reach: tuple, sizes: list[int]) -> tuple[list, list]:
    """Per level (input first) the start rows and columns of each box's window: one window size for
    all boxes, shifted inside the last level's map, then traced back down to the input."""
    ly, hy, lx, hx = reach
    nJ, h = levels[-1].n_out, sizes[-1]
    sy, sx = np.minimum(ly, nJ - h), np.minimum(lx, nJ - h)
    starts_y, starts_x = [sy], [sx]
    for lv in reversed(levels):  # back down to the input: the rows each level's window needs
        if lv.spatial:
            sy, sx = sy * lv.s - lv.p, sx * lv.s - lv.p
        starts_y.insert(0, sy)
        starts_x.insert(0, sx)
    return starts_y, starts_x


def plan(lmap, boxes: np.ndarray, read_at: int, method: str = "incremental") -> Plan:
    """The windowed prefix for these boxes, stopping before module `read_at` (the layer read).

    Every prefix features[0..J] that the windowing supports is costed (windows up to J, full maps
    after it, by `_op_cost`) and the cheapest J is taken; J = -1 is the plain full computation.
    """
    S = lmap.image_size
    full = Plan([], -1, [S], [np.zeros(len(boxes), np.int64)], [np.zeros(len(boxes), np.int64)], [S])
    if method != "incremental" or len(boxes) == 0 or not lmap.chain:  # needs a chain's walk (_rest_of_net)
        return full
    levels, ext, chans = _windowable_levels(lmap, boxes, read_at)
    candidates = [J for J in range(len(levels)) if any(lv.spatial for lv in levels[:J + 1])]
    if not candidates:
        return full

    def cost(J: int) -> float:
        return _prefix_cost(levels, ext, chans, J)

    J = min(candidates, key=lambda j: (cost(j), -j))
    if cost(J) >= cost(-1):
        return full
    levels = levels[:J + 1]
    sizes = _window_sizes(levels, ext, J)
    starts_y, starts_x = _window_starts(levels, ext[J + 1], sizes)
    ns = [S] + [lv.n_out for lv in levels]
    return Plan(levels, levels[-1].index, sizes, starts_y, starts_x, ns)


# ---------------------------------------------------------------------------
# the forward pass that follows the plan
# ---------------------------------------------------------------------------
@dataclass
class Maps:
    activation: np.ndarray           # (N,) total activation of the channel's map
    logits: np.ndarray | None        # (N, K)
    seconds: float
    batch: int
    plan: Plan


@dataclass
class _Placed:
    """The plan's window starts and the boxes as tensors on the device, and the zero-padded input
    the input windows are cut from."""

    boxes: torch.Tensor
    starts_y: list[torch.Tensor]
    starts_x: list[torch.Tensor]
    padded: torch.Tensor
    pad: int


def _inside(start: torch.Tensor, h: int, n: int) -> torch.Tensor:
    r = start.view(-1, 1) + torch.arange(h, device=start.device)
    return (r >= 0) & (r < n)


def _gather(t: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor, h: int, pad: int) -> torch.Tensor:
    """Windows t[:, sy+pad : sy+pad+h, sx+pad : ...] of one padded (C, H, W) map -> (B, C, h, h)."""
    ar = torch.arange(h, device=t.device)
    rows = (sy + pad).view(-1, 1, 1) + ar.view(1, h, 1)
    cols = (sx + pad).view(-1, 1, 1) + ar.view(1, 1, h)
    return t.permute(1, 2, 0)[rows, cols].permute(0, 3, 1, 2)


def _channels_at(lmap, index: int) -> int:
    ch = 3
    for i, m in enumerate(lmap.model.features):
        if isinstance(m, nn.Conv2d):
            ch = m.out_channels
        if i == index:
            return ch
    return ch


def _unoccluded_prefix(runner: Runner, x: torch.Tensor, last: int) -> torch.Tensor | None:
    """The unoccluded image's maps after features[0..last] (1, C, n, n), the windows' background."""
    if last < 0:
        return None
    h = runner.prepare(x[None])
    for i in range(last + 1):
        h = runner.lmap.model.features[i](h)
    return h


def _bytes_per_box(runner: Runner, pl: Plan) -> int:
    """Memory per box: the windows of the first layers, then full maps."""
    win = max(3 * pl.sizes[0] ** 2, *[_channels_at(runner.lmap, lv.index) * hh * hh
                                      for lv, hh in zip(pl.levels, pl.sizes[1:])]) if pl.last >= 0 else 0
    return 8 * win + runner.per_image_bytes(start=pl.last + 1)


def _place(x: torch.Tensor, boxes: np.ndarray, pl: Plan, S: int) -> _Placed:
    dev = x.device
    pad = max(0, int(max(-pl.starts_y[0].min(), -pl.starts_x[0].min(),
                         (pl.starts_y[0] + pl.sizes[0] - S).max(), (pl.starts_x[0] + pl.sizes[0] - S).max())))
    xp = F.pad(x, (pad, pad, pad, pad))  # zeros: the conv's own padding value
    return _Placed(torch.as_tensor(boxes, device=dev), [torch.as_tensor(a, device=dev) for a in pl.starts_y],
                   [torch.as_tensor(a, device=dev) for a in pl.starts_x], xp, pad)


def _occluded_inputs(runner: Runner, x: torch.Tensor, fillv: torch.Tensor, pl: Plan, placed: _Placed,
                     a: int, b: int) -> torch.Tensor:
    """The occluded inputs of boxes a..b (their input windows when the plan windows): a fresh tensor,
    filled in place."""
    dev = x.device
    sy, sx, h0 = placed.starts_y[0][a:b], placed.starts_x[0][a:b], pl.sizes[0]
    w = _gather(placed.padded, sy, sx, h0, placed.pad) if pl.last >= 0 else x.expand(b - a, -1, -1, -1).clone()
    ar = torch.arange(h0, device=dev)
    ry, rx = sy.view(-1, 1) + ar, sx.view(-1, 1) + ar
    bb = placed.boxes[a:b]
    my = (ry >= bb[:, 0:1]) & (ry < bb[:, 2:3])
    mx = (rx >= bb[:, 1:2]) & (rx < bb[:, 3:4])
    occ = my[:, :, None] & mx[:, None, :]
    for c in range(w.shape[1]):
        w[:, c].masked_fill_(occ, fillv[0, c, 0, 0])
    return runner.prepare(w)


def _windowed_levels(w: torch.Tensor, pl: Plan, placed: _Placed, a: int, b: int) -> torch.Tensor:
    """The plan's first modules on the windows of boxes a..b."""
    for j, lv in enumerate(pl.levels):
        if lv.spatial:
            hin = pl.sizes[j]
            # outside the map: the op's own padding value (the input window is zero-padded already)
            if not (j == 0 and lv.pad_value == 0.0):
                ok = (_inside(placed.starts_y[j][a:b], hin, pl.n[j])[:, :, None]
                      & _inside(placed.starts_x[j][a:b], hin, pl.n[j])[:, None, :])
                if not bool(ok.all()):
                    w = w.masked_fill(~ok[:, None], lv.pad_value)
            m = lv.module
            if isinstance(m, nn.Conv2d):
                w = F.conv2d(w, m.weight, m.bias, m.stride, 0)
            else:
                w = F.max_pool2d(w, m.kernel_size, m.stride, 0, ceil_mode=False)
        else:
            w = lv.module(w)
    return w


def _paste_windows(runner: Runner, clean: torch.Tensor, w: torch.Tensor, pl: Plan, placed: _Placed,
                   a: int, b: int) -> torch.Tensor:
    """The windows of boxes a..b pasted into copies of the unoccluded maps."""
    dev = w.device
    hJ = pl.sizes[-1]
    full = clean.expand(b - a, -1, -1, -1).contiguous(memory_format=torch.channels_last
                                                      if runner.channels_last else torch.contiguous_format)
    arJ = torch.arange(hJ, device=dev)
    rows = (placed.starts_y[-1][a:b].view(-1, 1, 1) + arJ.view(1, hJ, 1))
    cols = (placed.starts_x[-1][a:b].view(-1, 1, 1) + arJ.view(1, 1, hJ))
    bi = torch.arange(b - a, device=dev).view(-1, 1, 1)
    full.permute(0, 2, 3, 1)[bi, rows, cols] = w.permute(0, 2, 3, 1)
    return full


def _rest_of_net(runner: Runner, w: torch.Tensor, start: int, read_at: int, channel: int,
                 logits: bool, layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """features[start:] on full maps: (the channel's total activation at module `read_at`, the logits
    or None). A graph model (no windowed prefix) runs whole, through its layer map."""
    if not runner.lmap.chain:
        last = runner.lmap.layers[-1].name
        out = runner.lmap.extract(w, [layer] + ([last] if logits else []))
        return out[layer][:, channel].sum((1, 2)).float(), (out[last] if logits else None)
    model = runner.lmap.model
    feats = model.features
    total = None
    for i in range(start, len(feats)):
        w = feats[i](w)
        if i == read_at:
            total = w[:, channel].sum((1, 2)).float()
            if not logits:
                break
    if start > read_at:  # cannot happen: the plan stops before read_at
        raise AssertionError("windowed past the layer read")
    if not logits:
        return total, None
    return total, model.classifier(torch.flatten(model.avgpool(w), 1))


def occlusion_forward(runner: Runner, x: torch.Tensor, boxes: np.ndarray, *, layer: str, channel: int,
                      fill: torch.Tensor, method: str = "incremental", batch_size: int | None = None,
                      logits: bool = True, progress=None) -> Maps:
    """The occluded copies of x (3, S, S), one per box (y0, x0, y1, x1), through the model in batches:
    the total activation of `channel` of `layer` and (if asked) the logits, per box. `progress`: an
    atlas.util.progress.Progress told of each batch's positions."""
    check_method(method)
    lmap = runner.lmap
    la = lmap.by_name[layer]
    if la.kind != "conv":
        raise AtlasError(f"occlusion maps a conv layer's feature map, not {layer}")
    t0 = time.perf_counter()
    dev = runner.device
    dtype = next(lmap.model.parameters()).dtype
    read_at = lmap.chain_read_at.get(layer, -1)  # a chain's features index; a graph runs whole
    pl = plan(lmap, boxes, read_at, method)
    x = x.to(dev, dtype)
    fillv = fill.to(dev, dtype).view(1, 3, 1, 1)
    acts, outs = [], []
    with torch.no_grad():
        clean = _unoccluded_prefix(runner, x, pl.last)
        bs = reported_batch(runner.chunk(len(boxes), _bytes_per_box(runner, pl), batch_size), len(boxes), progress)
        placed = _place(x, boxes, pl, lmap.image_size)
        for a in range(0, len(boxes), bs):
            b = min(a + bs, len(boxes))
            w = _windowed_levels(_occluded_inputs(runner, x, fillv, pl, placed, a, b), pl, placed, a, b)
            if pl.last >= 0:
                w = _paste_windows(runner, clean, w, pl, placed, a, b)
            total, out = _rest_of_net(runner, w, pl.last + 1, read_at, channel, logits, layer)
            acts.append(total.cpu())
            if logits:
                outs.append(out.float().cpu())
            if progress is not None:
                progress.update(b - a)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return Maps(torch.cat(acts).double().numpy(), torch.cat(outs).double().numpy() if logits else None,
                time.perf_counter() - t0, bs, pl)
