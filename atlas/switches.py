"""Max-pool switches: where each pooled value came from, stored compactly.

A DeconvNet projection of a unit needs, for every max-pool below it, the
position that won each pooling window -- but only inside the unit's receptive
field, since the projected signal is zero everywhere else.

Encoding (one record per top-k activation and pool below it):
    region  y0, x0, h, w   -- the box, in the pool's *output* coordinates, that
                              the unit's receptive field covers (clipped)
    data    bytes          -- for each channel c, row, column of that box (C-order),
                              the winner's offset inside its window, dy * k + dx;
                              two offsets per byte (low nibble first) when k*k <= 16,
                              else one per byte.
Window (oy, ox) of a pool with kernel k, stride s, padding p starts at input
(oy*s - p, ox*s - p), so the winner's input position is that plus (dy, dx).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .layers import Geometry, Layer, LayerMap, interval_below


@dataclass
class SwitchRegion:
    pool: str
    y0: int
    x0: int
    h: int
    w: int


def regions_below(lmap: LayerMap, layer: Layer, y: int, x: int) -> list[SwitchRegion]:
    """The box at each pool's output that unit (y, x) of `layer` can reach, deepest pool first."""
    ya, yb, xa, xb = y, y, x, x
    pool_at = {p.index: p.name for p in lmap.pools}
    out = []
    for i in range(layer.index, -1, -1):
        if i in pool_at:
            out.append(SwitchRegion(pool_at[i], ya, xa, yb - ya + 1, xb - xa + 1))
        if i in lmap.geoms:
            g = lmap.geoms[i]
            ya, yb = interval_below(g, ya, yb)
            xa, xb = interval_below(g, xa, xb)
    return out


def encode(indices: torch.Tensor, geom: Geometry, region: SwitchRegion) -> bytes:
    """Pack one image's pool indices (C, H_out, W_out; flat over the input map) inside `region`."""
    k, s, p, w_in = geom.kernel, geom.stride, geom.padding, geom.in_size
    sub = indices[:, region.y0:region.y0 + region.h, region.x0:region.x0 + region.w].to(torch.int64)
    oy = torch.arange(region.y0, region.y0 + region.h).view(1, -1, 1) * s - p
    ox = torch.arange(region.x0, region.x0 + region.w).view(1, 1, -1) * s - p
    dy, dx = sub // w_in - oy, sub % w_in - ox
    codes = (dy * k + dx).reshape(-1).numpy().astype(np.uint8)
    if k * k <= 16:
        if codes.size % 2:
            codes = np.append(codes, np.uint8(0))
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes.tobytes()


def decode(data: bytes, channels: int, geom: Geometry, region: SwitchRegion) -> torch.Tensor:
    """Full-size index tensor (C, H_out, W_out) for F.max_pool2d's layout.

    Outside the region the indices point at the window's first element: the
    projected signal there is zero, so where it lands does not matter.
    """
    k, s, p, w_in = geom.kernel, geom.stride, geom.padding, geom.in_size
    n = channels * region.h * region.w
    raw = np.frombuffer(data, dtype=np.uint8)
    if k * k <= 16:
        codes = np.empty(raw.size * 2, dtype=np.uint8)
        codes[0::2], codes[1::2] = raw & 0x0F, raw >> 4
        codes = codes[:n]
    else:
        codes = raw[:n]
    codes = torch.from_numpy(codes.astype(np.int64)).view(channels, region.h, region.w)
    out_size = geom.out_size
    oy = torch.arange(out_size).view(-1, 1) * s - p
    ox = torch.arange(out_size).view(1, -1) * s - p
    full = (oy.clamp(min=0) * w_in + ox.clamp(min=0)).expand(channels, out_size, out_size).clone()
    ry = oy[region.y0:region.y0 + region.h]
    rx = ox[:, region.x0:region.x0 + region.w]
    full[:, region.y0:region.y0 + region.h, region.x0:region.x0 + region.w] = \
        (ry + codes // k) * w_in + (rx + codes % k)
    return full
