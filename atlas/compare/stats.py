"""The numbers of a comparison: streamed correlations between two sets of units, and their matches.

Li, Yosinski, Clune, Lipson and Hopcroft (2016) match the units of two networks by the correlation of
their activations over one image set. Here a unit's activation on an image is one number per image
(what the atlas stores per image and channel), so a layer pair's correlations are a
channels_a x channels_b matrix over the shared images.

`CoMoments` accumulates it a block of images at a time in float64, by the pairwise update of Chan,
Golub and LeVeque (each block centred on its own means, then merged): memory is two vectors and the
cross-moment matrix, whatever the number of images, and a unit whose values are large and nearly
constant keeps its digits (summing x*y and subtracting the product of the means would not).

Matching: `one_to_one` is an optimal assignment (SciPy's `linear_sum_assignment`) maximising the total
correlation of the matched pairs, `best` each unit's most correlated counterpart (one-to-many). A dead
unit (no variance over the images: a correlation is undefined) is matched to nothing, and no unit is
matched to it. Ties go to the smaller channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A unit is dead when its standard deviation over the images is below this share of its mean's size (or
# of 1 for units near zero): float32 maps of a constant unit leave rounding noise, not signal.
DEAD_RTOL = 1e-9
# Assignments whose totals differ by less than this are ties: see `one_to_one`.
TIE = 1e-12


class CoMoments:
    """Means, sums of squared deviations and the cross-moment matrix of two sets of units over images,
    streamed: `add(x, y)` a block (images x units_a, images x units_b, rows paired); `corr()` at the end."""

    def __init__(self, units_a: int, units_b: int):
        self.n = 0
        self.mean_a, self.mean_b = np.zeros(units_a), np.zeros(units_b)
        self.m2_a, self.m2_b = np.zeros(units_a), np.zeros(units_b)
        self.cross = np.zeros((units_a, units_b))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(x) != len(y):
            raise ValueError(f"blocks of {len(x)} and {len(y)} images do not pair")
        nb = len(x)
        if nb == 0:
            return
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        ma, mb = x.mean(0), y.mean(0)
        xc, yc = x - ma, y - mb
        m2a, m2b = np.einsum("ij,ij->j", xc, xc), np.einsum("ij,ij->j", yc, yc)
        cross = xc.T @ yc
        if self.n == 0:
            self.n, self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.cross = nb, ma, mb, m2a, m2b, cross
            return
        n = self.n + nb
        da, db = ma - self.mean_a, mb - self.mean_b
        w = self.n * nb / n
        self.mean_a = self.mean_a + da * (nb / n)
        self.mean_b = self.mean_b + db * (nb / n)
        self.m2_a += m2a + da * da * w
        self.m2_b += m2b + db * db * w
        cross += np.outer(da * w, db)
        self.cross += cross
        self.n = n

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks of the units of A and of B that vary over the images."""
        return _varies(self.m2_a, self.mean_a, self.n), _varies(self.m2_b, self.mean_b, self.n)

    def corr(self) -> np.ndarray:
        """Pearson correlations (units_a x units_b); NaN where either unit is dead."""
        la, lb = self.live()
        sa = np.where(la, np.sqrt(np.maximum(self.m2_a, 0)), np.nan)
        sb = np.where(lb, np.sqrt(np.maximum(self.m2_b, 0)), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = self.cross / sa[:, None] / sb[None, :]
        return np.clip(c, -1.0, 1.0)


def _varies(m2: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    if n < 2:
        return np.zeros(len(m2), bool)
    std = np.sqrt(np.maximum(m2, 0) / n)
    return std > DEAD_RTOL * np.maximum(1.0, np.abs(mean))


@dataclass
class Matches:
    """A layer pair's matches: for each unit of A its counterpart in B (-1: none) and the correlation."""

    one_to_one: np.ndarray   # (units_a,) B channel or -1
    best_a: np.ndarray       # (units_a,) each A unit's most correlated B unit, or -1
    best_b: np.ndarray       # (units_b,) each B unit's most correlated A unit, or -1


def one_to_one(corr: np.ndarray) -> np.ndarray:
    """For each unit of A (a row) its B unit (a column) in the assignment of live units maximising the sum
    of correlations, or -1 (dead, or left over when the layers' live units differ in number).

    Ties go to the smaller channel: among assignments whose totals differ by less than TIE, the one that
    pairs smaller A channels with smaller B channels (a reward of TIE * i * j / (units_a * units_b) per pair,
    largest for sorted pairings by the rearrangement inequality, and too small to change any other choice)."""
    from scipy.optimize import linear_sum_assignment

    na, nb = corr.shape
    out = np.full(na, -1, np.int64)
    rows = np.flatnonzero(~np.all(np.isnan(corr), axis=1)) if nb else np.zeros(0, np.int64)
    cols = np.flatnonzero(~np.all(np.isnan(corr), axis=0)) if na else np.zeros(0, np.int64)
    if len(rows) == 0 or len(cols) == 0:
        return out
    sub = corr[np.ix_(rows, cols)]
    tie = TIE * np.outer(rows + 1, cols + 1) / (na * nb)
    r, c = linear_sum_assignment(-(sub + tie))
    out[rows[r]] = cols[c]
    return out


def best(corr: np.ndarray) -> np.ndarray:
    """For each row its most correlated column (the smallest on ties), or -1 when the row is dead."""
    out = np.full(corr.shape[0], -1, np.int64)
    if corr.shape[1] == 0:
        return out
    filled = np.where(np.isnan(corr), -np.inf, corr)
    arg = np.argmax(filled, axis=1)  # the first maximum: the smallest channel
    ok = np.isfinite(filled[np.arange(len(arg)), arg])
    out[ok] = arg[ok]
    return out


def match(corr: np.ndarray) -> Matches:
    return Matches(one_to_one(corr), best(corr), best(corr.T))
