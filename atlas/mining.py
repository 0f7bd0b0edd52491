"""Streaming statistics over a dataset: per-channel top-k and exact moments.

Algorithms only: tensors in, tensors out, no files and no models. The build
job feeds them batch by batch; distributed ranks and resumed chunks merge
their partial states with `merge`, which is associative and, thanks to the
total order below, gives the same result in any grouping.

Order of activations: larger value first; at equal value, smaller image id
first. Inside one image the position of a channel's maximum is the first one
in row-major order (torch.max's documented choice).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NO_IMAGE = np.iinfo(np.int64).max  # id of an empty top-k slot: sorts after every real image


def spatial_max(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: the spatial maximum (float32) and its flat position (y * W + x).

    Reduced in the activation's own dtype and layout (a bf16 maximum is exact in float32, and the first
    maximum is the same in either): converting a conv1 map to float32, or flattening a channels-last map
    (a copy), cost more than the reduction.

    Computed as a max-pool whose window is the whole map: the same values and the same first position
    (row-major) as torch.max, 4-10x faster on a CPU (torch.max along a strided dimension runs one
    element at a time; the pool is vectorised over channels). On CPU only (a GPU's torch.max is fast and
    its build's numbers stay as they were). A map holding a NaN, where the two may pick another NaN, is
    reduced by torch.max (tests/test_mining_spatial_max.py checks both)."""
    if act.ndim == 2:  # fully connected: one "position"
        return act.float(), torch.zeros_like(act, dtype=torch.int64)
    if act.ndim == 4 and act.device.type == "cpu" and act.dtype in _POOLED_DTYPES and act.numel():
        values, pos = F.max_pool2d(act, tuple(act.shape[2:]), return_indices=True)
        values, pos = values.flatten(1), pos.flatten(1)
        if not bool(torch.isnan(values).any()):
            return values.float(), pos
    return _torch_max(act)


_POOLED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _torch_max(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """spatial_max by torch.max: the reference the pooled reduction must match."""
    if act.is_contiguous(memory_format=torch.channels_last) and not act.is_contiguous():
        # (B, H*W, C) is a view of a channels-last map; torch.max gives the first maximum along H*W
        values, pos = act.permute(0, 2, 3, 1).flatten(1, 2).max(dim=1)
    else:
        values, pos = act.flatten(2).max(dim=2)
    return values.float(), pos


def _order(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the permutation sorting by (value desc, id asc)."""
    by_id = torch.sort(ids, dim=1, stable=True).indices
    v = torch.gather(values, 1, by_id)
    by_value = torch.sort(v, dim=1, descending=True, stable=True).indices
    return torch.gather(by_id, 1, by_value)


class TopK:
    """The k strongest (value, image id, position) per channel, merged exactly."""

    def __init__(self, channels: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.values = torch.full((channels, k), float("-inf"), device=device)
        self.ids = torch.full((channels, k), NO_IMAGE, dtype=torch.int64, device=device)
        self.pos = torch.zeros((channels, k), dtype=torch.int64, device=device)

    def update(self, values: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> None:
        """values, pos: (B, C); ids: (B,) -- one batch of images."""
        c = self.values.shape[0]
        self._absorb(values.t().float(), ids.view(1, -1).expand(c, -1), pos.t())

    def merge(self, other: "TopK") -> None:
        self._absorb(other.values.to(self.values.device), other.ids.to(self.ids.device),
                     other.pos.to(self.pos.device))

    def _absorb(self, values: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> None:
        v = torch.cat([self.values, values], 1)
        i = torch.cat([self.ids, ids.to(torch.int64)], 1)
        p = torch.cat([self.pos, pos.to(torch.int64)], 1)
        keep = _order(v, i)[:, :self.k]
        self.values, self.ids, self.pos = (torch.gather(t, 1, keep) for t in (v, i, p))

    def state(self) -> dict[str, np.ndarray]:
        return {"values": self.values.cpu().numpy(), "ids": self.ids.cpu().numpy(), "pos": self.pos.cpu().numpy()}

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> "TopK":
        t = cls(st["values"].shape[0], st["values"].shape[1])
        t.values, t.ids, t.pos = (torch.from_numpy(np.array(st[n])) for n in ("values", "ids", "pos"))
        return t


class Moments:
    """Count, sum, sum of squares, max and fire count per channel, in float64.

    Partial moments are merged in a fixed order (chunk by chunk) so the same
    data gives bit-identical statistics however the work was split.
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        z = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        self.count, self.sum, self.sumsq, self.fires = z(), z(), z(), z()
        self.max = torch.full((channels,), float("-inf"), dtype=torch.float64, device=device)

    def update(self, values: torch.Tensor) -> None:
        """values: (B, C), one row per valid image."""
        v = values.to(torch.float64)
        self.count += v.shape[0]
        self.sum += v.sum(0)
        self.sumsq += (v * v).sum(0)
        self.fires += (v > 0).sum(0)
        if v.shape[0]:
            self.max = torch.maximum(self.max, v.amax(0))

    def merge(self, other: "Moments") -> None:
        for name in ("count", "sum", "sumsq", "fires"):
            getattr(self, name).add_(getattr(other, name).to(self.sum.device))
        self.max = torch.maximum(self.max, other.max.to(self.max.device))

    def summary(self) -> dict[str, np.ndarray]:
        n = self.count.clamp(min=1)
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp(min=0)
        return {"mean": mean.cpu().numpy(), "std": var.sqrt().cpu().numpy(),
                "max": self.max.cpu().numpy(), "fire_rate": (self.fires / n).cpu().numpy()}

    def state(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n).cpu().numpy() for n in ("count", "sum", "sumsq", "fires", "max")}

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> "Moments":
        m = cls(st["count"].shape[0])
        for n in ("count", "sum", "sumsq", "fires", "max"):
            setattr(m, n, torch.from_numpy(np.array(st[n])))
        return m
