"""The projection front: options and requests checked, then the engine (atlas/deconv/graph_engine.py)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import AtlasError
from ..net import LayerMap
from .forward import record
from .graph_engine import METHODS, project_graph
from .requests import MODES, NORMS, Projections, Request, as_request


def project(lmap: LayerMap, requests: Sequence[Request | tuple | dict], switches: dict[str, torch.Tensor] | None,
            *, activations: dict[str, torch.Tensor] | None = None,
            norm_inputs: dict[int, torch.Tensor] | None = None,
            mode: str = "unit", norm: str = "identity", batch_size: int | None = None,
            method: str = "deconvnet", relu_inputs: dict | None = None) -> Projections:
    """Project each request down to pixels; see the module docstring.

    switches     {pool: (N, C, H_out, W_out)} indexed by Request.image
    activations  {layer: (N, C, H, W)}: unit mode reads a request's value here when
                 Request.value is None; map mode needs it (the kept channel map)
    norm_inputs  {LRN node: (N, C, H, W)}: the norm layers' forward inputs,
                 needed for norm="gradient" (record(..., norm_inputs=True))
    batch_size   requests per chained batch (default: by memory)
    method       "deconvnet" (the paper's) or "guided" (guided backpropagation: needs
                 relu_inputs, the ReLUs' forward inputs: use project_images)
    """
    if mode not in MODES:
        raise AtlasError(f"unknown projection mode '{mode}': choose one of {', '.join(MODES)}")
    if norm not in NORMS:
        raise AtlasError(f"unknown norm handling '{norm}': choose one of {', '.join(NORMS)}")
    if method not in METHODS:
        raise AtlasError(f"unknown projection method '{method}': choose one of {', '.join(METHODS)}")
    if method == "guided" and relu_inputs is None:
        raise AtlasError("guided backpropagation needs the images' forward pass: use project_images")
    reqs = [as_request(r) for r in requests]
    groups = _check_requests(lmap, reqs, switches)
    lmap.model.eval()  # the graph was read in eval mode: Dropout and BatchNorm as they run there
    if norm == "gradient" and norm_inputs is None and any(op.kind == "lrn" for op in lmap.graph.ops.values()):
        raise AtlasError("norm='gradient' needs the norm layers' forward inputs: use project_images, or "
                         "record(..., norm_inputs=True)")
    return project_graph(lmap, reqs, groups, switches, activations=activations, mode=mode, method=method,
                         masks=relu_inputs, norm=norm, norm_inputs=norm_inputs, batch_size=batch_size)

def _check_requests(lmap: LayerMap, reqs: list[Request], switches) -> dict[str, list[int]]:
    """The requests grouped by layer, each checked (one line for a bad one)."""
    n_images = None
    for t in (switches or {}).values():
        n_images = t.shape[0]
        break
    groups: dict[str, list[int]] = {}
    for j, r in enumerate(reqs):
        layer = lmap.by_name.get(r.layer)
        if layer is None or layer.kind != "conv":
            valid = ", ".join(la.name for la in lmap.conv_layers)
            raise AtlasError(f"cannot project layer '{r.layer}': projections exist for conv layers ({valid})")
        if not 0 <= r.channel < layer.channels:
            raise AtlasError(f"{r.layer} has channels 0..{layer.channels - 1}, not {r.channel}")
        if not (0 <= r.y < layer.height and 0 <= r.x < layer.width):
            raise AtlasError(f"{r.layer} positions are 0..{layer.height - 1}, not (y={r.y}, x={r.x})")
        if layer.pools_below and n_images is not None and not 0 <= r.image < n_images:
            raise AtlasError(f"request {j}: image index {r.image} outside the {n_images} switch records")
        groups.setdefault(r.layer, []).append(j)
    return groups


def project_images(lmap: LayerMap, x: torch.Tensor, requests: Sequence[Request | tuple | dict], *,
                   mode: str = "unit", norm: str = "identity", batch_size: int | None = None,
                   method: str = "deconvnet") -> Projections:
    """The recompute path: one forward pass over images x (N, 3, S, S), then `project`.

    Request.image indexes x; a request's value, when not given, is read from the forward pass.
    """
    reqs = [as_request(r) for r in requests]
    if not reqs:
        return Projections(mode, norm, lmap.image_size, [], [], [])
    for r in reqs:
        if r.layer not in lmap.by_name:
            lmap.resolve([r.layer])  # the error names the valid layers
    rec = record(lmap, x, sorted({r.layer for r in reqs}), norm_inputs=(norm == "gradient"),
                 relu_inputs=(method == "guided"))
    return project(lmap, reqs, rec.switches, activations=rec.activations, norm_inputs=rec.norm_inputs,
                   mode=mode, norm=norm, batch_size=batch_size, method=method,
                   relu_inputs=rec.relu_inputs if method == "guided" else None)
