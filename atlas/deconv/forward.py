"""The forward record of the recompute path: switches, activations and norm inputs from the images."""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import AtlasError
from ..net import LayerMap
from .graph_engine import record_graph
from .requests import ForwardRecord


def record(lmap: LayerMap, x: torch.Tensor, layers: Iterable[str] | None = None,
           norm_inputs: bool = False, relu_inputs: bool = False) -> ForwardRecord:
    """One forward pass over images `x` (N, 3, S, S) up to the deepest of `layers` (default all conv):
    the switches of every pool below, the layers' activations, and (if asked) the norm layers' and the
    ReLUs' inputs (guided backpropagation's on/off pattern)."""
    resolved = lmap.resolve(list(layers) if layers is not None else None)
    for la in resolved:
        if la.kind != "conv":
            raise AtlasError(f"layer '{la.name}' is not a conv layer: projections start at conv layers")
    lmap.model.eval()  # the graph was read in eval mode: Dropout and BatchNorm as they run there
    return record_graph(lmap, x, [la.name for la in resolved], guided=relu_inputs, norm_inputs=norm_inputs)


def switches_from_images(lmap: LayerMap, x: torch.Tensor, layers: Iterable[str] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Recompute the switches of every pool below `layers` (default all conv layers) for images x."""
    return record(lmap, x, layers).switches
