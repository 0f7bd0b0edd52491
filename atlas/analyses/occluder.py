"""The occluding square: its default size and stride, the positions it visits, and its colour.

Occlusion (figure 7) slides it over the model input and correspondence (figure 8) lays it on
parts, so both take it from here rather than one analysis from the other.

Positions: the input (S x S px) is cut into cells of `stride` px; the square's centre visits every
cell's centre (ceil(S / stride) positions per axis, e.g. 28 x 28 = 784 at 224 px and stride 8) and
the square is clipped at the image's border, so map cell (i, j) covers input pixels
[i*stride, (i+1)*stride) and a map over the positions lies exactly over the image. The defaults
are the paper's 50 px and 8 px at 224 px, scaled with S for other inputs (7 and 1 at 32 px, 14 and
2 at 64 px: always about 28-32 positions per axis).

Fill: "grey" is the mid-grey pixel (0.5, 0.5, 0.5) before normalisation; "mean" is the
preprocessing's mean colour, i.e. an all-zero model input.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import AtlasError
from ..choices import OCCLUDER_FILLS as FILLS

PAPER_SIZE, PAPER_STRIDE, PAPER_INPUT = 50, 8, 224


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


def check_fill(fill: str) -> None:
    """Refuse an unknown fill, naming the known ones."""
    if fill not in FILLS:
        raise AtlasError(f"unknown fill '{fill}': choose one of {', '.join(FILLS)}")


def fill_value(preprocess, fill: str) -> torch.Tensor:
    """The occluder's value in model-input units, (3, 1, 1)."""
    check_fill(fill)
    if fill == "mean":
        return torch.zeros(3, 1, 1)
    return ((torch.full((3, 1, 1), 0.5) - preprocess.mean) / preprocess.std).float()


def fill_rgb(preprocess, fill: str) -> tuple[int, int, int]:
    """The occluder's colour as display bytes (the fill value, un-normalised)."""
    pixel = fill_value(preprocess, fill).flatten() * preprocess.std.flatten() + preprocess.mean.flatten()
    return tuple(int(round(float(v) * 255)) for v in pixel.clamp(0, 1))
