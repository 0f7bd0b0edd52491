"""Following units across the snapshots of one training run by their matches, not their channel numbers
(`atlas evolution --follow matched`).

Channel i of one snapshot is channel i of the next only while training moves slowly; early on, units
can swap roles. Here consecutive snapshots are compared as two atlases are (atlas.compare.stats: the
correlation of each unit's per-image maximum over the same images, one-to-one matches), and a unit
shown at the last snapshot is followed back through the matches, one step at a time, until a step
leaves it without a counterpart.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .stats import CoMoments, one_to_one

BLOCK = 4096  # images added at a time: the float64 copies of one block stay small


@dataclass
class Step:
    """One step between snapshots, per layer: the one-to-one match of each earlier unit (-1: none) and
    its correlation."""

    matches: dict[str, np.ndarray]
    corr: dict[str, np.ndarray]

    def quality(self, layer: str) -> float | None:
        ok = self.matches[layer] >= 0
        return float(self.corr[layer][ok].mean()) if ok.any() else None


def match_snapshots(earlier: dict[str, np.ndarray], later: dict[str, np.ndarray]) -> Step:
    """Match each layer's units of two snapshots from their per-image maxima (images x channels, the
    same images in the same order in both)."""
    matches, corr = {}, {}
    for layer, x in earlier.items():
        y = later[layer]
        m = CoMoments(x.shape[1], y.shape[1])
        for lo in range(0, len(x), BLOCK):
            m.add(x[lo:lo + BLOCK], y[lo:lo + BLOCK])
        c = m.corr()
        j = one_to_one(c)
        matches[layer] = j
        corr[layer] = np.where(j >= 0, c[np.arange(len(j)), np.maximum(j, 0)], np.nan)
    return Step(matches, corr)


def follow_back(shown: list[tuple[str, int]], steps: list[Step]) -> list[list[tuple[str, int | None]]]:
    """For each snapshot (oldest first), the unit each shown row is at then: the row's channel at the last
    snapshot, then back through each step's matches; None once a step has no match for it."""
    per = [list(shown)]
    for step in reversed(steps):
        back = []
        for la, c in per[0]:
            if c is None:
                back.append((la, None))
                continue
            earlier = np.flatnonzero(step.matches[la] == c)
            back.append((la, int(earlier[0]) if len(earlier) else None))
        per.insert(0, back)
    return per


def steps_table(epochs: list[int], steps: list[Step]) -> pa.Table:
    """Every step's one-to-one matches: epoch_a, epoch_b, layer, channel_a, channel_b, corr."""
    cols: dict[str, list] = {k: [] for k in ("epoch_a", "epoch_b", "layer", "channel_a", "channel_b", "corr")}
    for (ea, eb), step in zip(zip(epochs, epochs[1:]), steps):
        for layer, j in step.matches.items():
            for i, jj in enumerate(j):
                v = step.corr[layer][i]
                for k, val in (("epoch_a", ea), ("epoch_b", eb), ("layer", layer), ("channel_a", i),
                               ("channel_b", int(jj) if jj >= 0 else None),
                               ("corr", float(v) if np.isfinite(v) else None)):
                    cols[k].append(val)
    types = {"epoch_a": pa.int32(), "epoch_b": pa.int32(), "layer": pa.string(), "channel_a": pa.int32(),
             "channel_b": pa.int32(), "corr": pa.float64()}
    return pa.table({k: pa.array(v, types[k]) for k, v in cols.items()})
