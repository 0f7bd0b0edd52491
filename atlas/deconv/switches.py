"""Max-pool switches: where each pooled value came from, stored compactly.

A DeconvNet projection of a unit needs, for every max-pool below it, the
position that won each pooling window -- but only inside the unit's receptive
field, since the projected signal is zero everywhere else. Switches depend on
the image alone, so the units of one image share them.

Encoding (one record per top-k image and pool):
    region  y0, x0, h, w   -- the box, in the pool's *output* coordinates, that
                              covers the receptive fields of all of that image's
                              top-k units above the pool (their bounding box, clipped)
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

from ..net import Geometry, Layer, LayerMap


@dataclass
class SwitchRegion:
    pool: str
    y0: int
    x0: int
    h: int
    w: int


def regions_below(lmap: LayerMap, layer: Layer, y: int, x: int) -> list[SwitchRegion]:
    """The box at each pool's output that unit (y, x) of `layer` can reach, deepest pool first."""
    return [SwitchRegion(pool, *lmap.region_below(layer, pool, y, x)) for pool in reversed(layer.pools_below)]


def window_codes(indices: torch.Tensor, geom: Geometry, origin: tuple[int, int] = (0, 0), *,
                 in_place: bool = False) -> np.ndarray:
    """Each pooled position's winner as its offset inside the window, dy * k + dx (uint8, C x H x W).

    `indices` may be a crop of the pool's output whose top-left corner is `origin`.
    `indices` may also be a batch of them (N x C x H x W). Computed by torch (all threads) where the
    indices are, one copy back. `in_place`: `indices` are used up (overwritten) instead of a new int64
    tensor being made: on a CPU a fresh buffer of a batch's pool1 indices (150 MB for zfnet at batch 64)
    costs more in page faults than the arithmetic (the build's capture hands its indices over).
    """
    k, s, p, w_in = geom.kernel, geom.stride, geom.padding, geom.in_size
    h, w = indices.shape[-2:]
    dev = indices.device
    oy = ((torch.arange(h, device=dev) + origin[0]) * s - p).view(-1, 1)
    ox = ((torch.arange(w, device=dev) + origin[1]) * s - p).view(1, -1)
    # The winner (oy + dy, ox + dx) is dy * w_in + dx past the window's start: a table turns that into
    # dy * k + dx. One subtraction and one gather: int64 division on a CPU cost several times more.
    lut = torch.zeros((k - 1) * w_in + k, dtype=torch.uint8, device=dev)
    d = torch.arange(k, device=dev)
    lut[(d.view(-1, 1) * w_in + d.view(1, -1)).view(-1)] = torch.arange(k * k, device=dev).to(torch.uint8)
    start = oy * w_in + ox
    offset = indices.sub_(start) if in_place else indices - start
    return torch.take(lut, offset).cpu().numpy()  # take: a contiguous result, whatever the indices' layout


def pack(codes: np.ndarray, kernel: int) -> bytes:
    """Codes in C order, two per byte (low nibble first) when kernel*kernel <= 16."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if kernel * kernel <= 16:
        if codes.size % 2:
            codes = np.append(codes, np.uint8(0))
        # each pair as one little-endian uint16, first code in its low byte: (pair | pair >> 4) has the
        # second code above the first in its low byte (codes are < 16); contiguous passes, not strided ones
        pairs = codes.view("<u2")
        codes = (pairs | (pairs >> 4)).astype(np.uint8)
    return codes.tobytes()


def unpack(data: bytes, n: int, kernel: int) -> np.ndarray:
    """The first `n` codes of `pack`'s bytes (uint8, flat, C order)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if kernel * kernel <= 16:
        wide = raw.astype("<u2")
        # little-endian pairs whatever the host's order: the first code is the low byte
        return ((wide & 0x0F) | ((wide & 0xF0) << 4)).astype("<u2", copy=False).view(np.uint8)[:n]
    return raw[:n]


def encode(indices: torch.Tensor, geom: Geometry, region: SwitchRegion) -> bytes:
    """Pack one image's pool indices (C, H_out, W_out; flat over the input map) inside `region`."""
    crop = indices[:, region.y0:region.y0 + region.h, region.x0:region.x0 + region.w]
    return pack(window_codes(crop, geom, origin=(region.y0, region.x0)), geom.kernel)


def union(regions: list[SwitchRegion]) -> SwitchRegion:
    """The bounding box of several regions of one pool."""
    y0, x0 = min(r.y0 for r in regions), min(r.x0 for r in regions)
    y1, x1 = max(r.y0 + r.h for r in regions), max(r.x0 + r.w for r in regions)
    return SwitchRegion(regions[0].pool, y0, x0, y1 - y0, x1 - x0)


def decode(data: bytes, channels: int, geom: Geometry, region: SwitchRegion) -> torch.Tensor:
    """Full-size index tensor (C, H_out, W_out) for F.max_pool2d's layout.

    Outside the region the indices point at the window's first element: the
    projected signal there is zero, so where it lands does not matter.
    """
    k, s, p, w_in = geom.kernel, geom.stride, geom.padding, geom.in_size
    codes = unpack(data, channels * region.h * region.w, k)
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
