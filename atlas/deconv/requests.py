"""What the engine is asked (Request: image, layer, channel, position) and what it returns
(Projections); the forward record of the recompute path (ForwardRecord)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from ..choices import MODES, NORMS  # noqa: F401 - re-exported



@dataclass(frozen=True)
class Request:
    """One projection: `image` indexes the batch of switches (and activations)."""

    image: int
    layer: str
    channel: int
    y: int = 0
    x: int = 0
    value: float | None = None  # the activation's value, if the caller knows it (unit mode seed)


def as_request(r: Any) -> Request:
    if isinstance(r, Request):
        return r
    if isinstance(r, dict):
        return Request(**{k: r[k] for k in ("image", "layer", "channel", "y", "x", "value") if k in r})
    return Request(*r)


@dataclass
class Projections:
    """The result of `project`: one projection per request, in request order.

    `images` is the (N, 3, S, S) tensor (built on first use); each projection
    is kept internally as the window that holds its receptive field, so
    `crop(i)` (the RF box, clipped) costs nothing. `meta[i]`: mode, norm,
    layer, channel, y, x, image, value (the kept activation; in map mode the
    map's value at (y, x)), map_max (map mode), box (RF box clipped to the
    image, x0 y0 x1 y1, exclusive), rf_box (unclipped).
    """

    mode: str
    norm: str
    image_size: int
    meta: list[dict]
    windows: list[torch.Tensor] = field(repr=False)   # (3, h, w) per request
    origins: list[tuple[int, int]] = field(repr=False)  # (y0, x0) of each window in the image
    _images: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            s = self.image_size
            ref = self.windows[0] if self.windows else torch.zeros(0)
            out = ref.new_zeros((len(self.windows), 3, s, s))
            for i, (w, (y0, x0)) in enumerate(zip(self.windows, self.origins)):
                out[i, :, y0:y0 + w.shape[1], x0:x0 + w.shape[2]] = w
            self._images = out
        return self._images

    def crop(self, i: int, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Projection i inside `box` (x0, y0, x1, y1; default its clipped RF box): (3, y1-y0, x1-x0)."""
        x0, y0, x1, y1 = box if box is not None else self.meta[i]["box"]
        w, (oy, ox) = self.windows[i], self.origins[i]
        out = w.new_zeros((3, y1 - y0, x1 - x0))
        ya, yb = max(y0, oy), min(y1, oy + w.shape[1])
        xa, xb = max(x0, ox), min(x1, ox + w.shape[2])
        if ya < yb and xa < xb:
            out[:, ya - y0:yb - y0, xa - x0:xb - x0] = w[:, ya - oy:yb - oy, xa - ox:xb - ox]
        return out


@dataclass
class ForwardRecord:
    """What one forward pass over images leaves for projections."""

    switches: dict[str, torch.Tensor]          # pool name -> (N, C, H_out, W_out) int64
    activations: dict[str, torch.Tensor]       # layer name -> (N, C, H, W), read after its ReLU
    norm_inputs: dict[int, torch.Tensor]       # features index of a norm layer -> its input
    relu_inputs: dict | None = None            # ReLU (features index, or graph node) -> its input (guided)
