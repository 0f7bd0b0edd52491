"""The forward record of the recompute path: switches, activations and norm inputs from the images."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import AtlasError
from ..layers import LayerMap
from .graph_engine import record_graph
from .requests import ForwardRecord
from .support import _NORM, _walk_one, check_model


def record(lmap: LayerMap, x: torch.Tensor, layers: Iterable[str] | None = None,
           norm_inputs: bool = False, relu_inputs: bool = False) -> ForwardRecord:
    """One forward pass over images `x` (N, 3, S, S) up to the deepest of `layers` (default all conv):
    the switches of every pool below, the layers' activations, and (if asked) the norm layers' and the
    ReLUs' inputs (guided backpropagation's on/off pattern)."""
    resolved = lmap.resolve(list(layers) if layers is not None else None)
    for la in resolved:
        if la.kind != "conv":
            raise AtlasError(f"layer '{la.name}' is not a conv layer: projections start at conv layers")
    names = [la.name for la in resolved]
    if lmap.is_graph:
        return record_graph(lmap, x, names, guided=relu_inputs, norm_inputs=norm_inputs)
    check_model(lmap)
    want = {lmap.by_name[n].read_at: n for n in names}
    pool_at = {p.index: p.name for p in lmap.pools}
    last = max(want)
    rec = ForwardRecord({}, {}, {}, {} if relu_inputs else None)
    p = next(lmap.model.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        for i in range(last + 1):
            m = lmap.model.features[i]
            if norm_inputs and isinstance(m, _NORM):
                rec.norm_inputs[i] = x
            if relu_inputs and isinstance(m, nn.ReLU):
                rec.relu_inputs[i] = x  # the engine's ReLU runs out of place
            x, idx = _walk_one(m, x)
            if idx is not None:
                rec.switches[pool_at[i]] = idx
            if i in want:
                rec.activations[want[i]] = x
    return rec


def switches_from_images(lmap: LayerMap, x: torch.Tensor, layers: Iterable[str] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Recompute the switches of every pool below `layers` (default all conv layers) for images x."""
    return record(lmap, x, layers).switches
