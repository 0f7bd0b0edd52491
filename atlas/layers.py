"""The model walk: stable layer names, receptive-field geometry, feature extraction.

Every supported model keeps its convolutional part in `model.features` (an
nn.Sequential of Conv2d / ReLU / MaxPool2d / normalisation) and, optionally, a
classifier in `model.classifier` after `model.avgpool` -- torchvision's AlexNet
and VGG layout, which our own models follow too.

Names: the i-th Conv2d is `conv{i}` and is read *after* its ReLU; the Linear
layers of the classifier continue the count (`fc6`, `fc7`, `fc8` for ZFNet);
a pool is named after the conv it follows (`pool1`, `pool2`, `pool5`).

Geometry: for a conv layer, the unit at (y, x) sees the input box
    y0 = offset + y * jump,  y1 = y0 + rf_size   (exclusive; same for x)
in the coordinates of the preprocessed (cropped) image, before clipping.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AtlasError
from .graph_layers import GraphLayerMap
from .layer_base import Geometry, Layer, LayerMapBase, Pool, pad_batch

__all__ = ["Geometry", "GraphLayerMap", "Layer", "LayerMap", "Pool", "interval_below", "pad_batch",
           "walks_as_sequential"]

_POINTWISE = (nn.ReLU, nn.LocalResponseNorm, nn.Identity, nn.Dropout, nn.BatchNorm2d, nn.CrossMapLRN2d)


def _pair(v) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise AtlasError(f"non-square kernels/strides are not supported ({v})")
        return int(v[0])
    return int(v)


def _out_size(size: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (math.ceil(span / s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:  # PyTorch: the last window must start inside
        out -= 1
    return out


_SEQUENTIAL = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Identity, nn.Dropout)


def walks_as_sequential(model: nn.Module) -> bool:
    """Whether the model is a 2012-2014 net: `features` a Sequential of exactly these module types (no
    subclasses), plain convolutions, and no convolution outside it. Those keep the walk of this module
    and its names (conv1..conv5, fc6..fc8); every other model is read as a graph."""
    feats = getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential) or not len(feats):
        return False
    for m in feats:
        if type(m) not in _SEQUENTIAL:
            return False
        if type(m) is nn.Conv2d and (m.groups != 1 or tuple(m.dilation) != (1, 1) or isinstance(m.padding, str)
                                      or m.padding_mode != "zeros"):
            return False
    inside = {id(m) for m in feats.modules()}
    if any(isinstance(m, nn.Conv2d) and id(m) not in inside for m in model.modules()):
        return False
    return _runs_features_as_a_chain(model, len(feats))


def _runs_features_as_a_chain(model: nn.Module, n: int) -> bool:
    """Whether model.forward runs features.0 .. features.{n-1} on its raw input, each on the previous
    one's output and on nothing else (no functional ReLU between, no input transform before): what
    the walk assumes. Read from the traced graph; a model that cannot be traced is not walked."""
    from .graph import trace

    try:
        graph = trace(model)
    except AtlasError:
        return False
    calls = [nd for nd in graph.nodes if nd.op != "get_attr"]
    if len(calls) < n + 1 or calls[0].op != "placeholder":
        return False
    prev = calls[0]
    for i, nd in enumerate(calls[1:n + 1]):
        if nd.op != "call_module" or nd.target != f"features.{i}" or list(nd.all_input_nodes) != [prev]:
            return False
        if len(prev.users) != 1 and i > 0:
            return False
        prev = nd
    return True


class LayerMap(LayerMapBase):
    """Names and geometry of a model's layers for a given square input size.

    `LayerMap(model, size)` is this walk for the 2012-2014 nets and a `GraphLayerMap`
    (atlas/graph_layers.py) for every other model: the same interface."""

    def __new__(cls, model: nn.Module, image_size: int):
        if cls is LayerMap and not walks_as_sequential(model):
            return GraphLayerMap(model, image_size)  # not a LayerMap: Python does not call __init__ again
        return super().__new__(cls)

    def __init__(self, model: nn.Module, image_size: int):
        if not isinstance(getattr(model, "features", None), nn.Sequential):
            raise AtlasError(f"model {type(model).__name__} has no `features` Sequential: "
                             "the atlas needs a conv/ReLU/max-pool feature extractor")
        self.model = model
        self.image_size = image_size
        self.layers: list[Layer] = []
        self.pools: list[Pool] = []
        self.geoms: dict[int, Geometry] = {}  # features index -> geometry of every spatial op
        feats = list(model.features)
        size, rf, jump, off, channels = image_size, 1, 1, 0, 3
        nconv = 0
        pools_so_far: list[str] = []
        for i, m in enumerate(feats):
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
                d = _pair(getattr(m, "dilation", 1))
                if d != 1:
                    raise AtlasError(f"dilated layers are not supported (features.{i})")
                ceil = bool(getattr(m, "ceil_mode", False))
                out = _out_size(size, k, s, p, d, ceil)
                if out < 1:
                    raise AtlasError(f"input of {image_size} px is too small for {type(m).__name__} features.{i}")
                off, rf, jump = off - p * jump, rf + (k - 1) * jump, jump * s
                geom = Geometry(k, s, p, size, out, rf, jump, off)
                self.geoms[i] = geom
                size = out
                if isinstance(m, nn.Conv2d):
                    if m.groups != 1:
                        raise AtlasError(f"grouped convolutions are not supported (features.{i})")
                    nconv += 1
                    channels = m.out_channels
                    read_at = i + 1 if i + 1 < len(feats) and isinstance(feats[i + 1], nn.ReLU) else i
                    self.layers.append(Layer(f"conv{nconv}", "conv", i, read_at, channels, out, out, geom,
                                             list(pools_so_far)))
                elif isinstance(m, nn.MaxPool2d):
                    name = f"pool{nconv}"
                    self.pools.append(Pool(name, i, channels, geom, ceil))
                    pools_so_far.append(name)
            elif not isinstance(m, _POINTWISE):
                raise AtlasError(f"unsupported module in features.{i}: {type(m).__name__} "
                                 "(the atlas walks Conv2d, ReLU, MaxPool2d and normalisation layers)")
        self.feature_size = size
        self.feature_channels = channels
        cls = getattr(model, "classifier", None)
        if isinstance(cls, nn.Sequential):
            mods = list(cls)
            nfc = nconv
            for i, m in enumerate(mods):
                if isinstance(m, nn.Linear):
                    nfc += 1
                    read_at = i + 1 if i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU) else i
                    self.layers.append(Layer(f"fc{nfc}", "fc", i, read_at, m.out_features))
        self.by_name = {layer.name: layer for layer in self.layers}
        self.pool_by_name = {p.name: p for p in self.pools}

    # -- lookup -------------------------------------------------------------
    def conv_weight(self, layer: Layer):
        """The filters of the convolution a layer is named after (None for a layer that is not one)."""
        m = self.model.features[layer.index] if layer.kind == "conv" else None
        return m.weight if isinstance(m, nn.Conv2d) else None

    def describe(self) -> dict:
        return {
            "image_size": self.image_size,
            "layers": [{**layer.to_row(), "pools_below": layer.pools_below} for layer in self.layers],
            "pools": [{"name": p.name, "index": p.index, "channels": p.channels, "ceil_mode": p.ceil_mode,
                       **asdict(p.geometry)} for p in self.pools],
        }

    # -- forward ------------------------------------------------------------
    def _extract(self, x: torch.Tensor, names: list[str], pool_indices: bool = False):
        """LayerMapBase.extract, on a batch as it is: the modules of `features` in turn."""
        layers = [n for n in names if n not in self.pool_by_name]
        wanted = {self.by_name[n].read_at: n for n in layers if self.by_name[n].kind == "conv"}
        fc_wanted = {self.by_name[n].read_at: n for n in layers if self.by_name[n].kind == "fc"}
        out: dict[str, torch.Tensor] = {}
        switches: dict[str, torch.Tensor] = {}
        pool_at = {p.index: p.name for p in self.pools}
        last = max([*wanted, *(self.pool_by_name[n].index for n in names if n in self.pool_by_name)], default=-1)
        if fc_wanted:
            last = len(self.model.features) - 1
        feats = self.model.features
        for i in range(last + 1):
            m = feats[i]
            if pool_indices and i in pool_at:
                x, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation,
                                      ceil_mode=m.ceil_mode, return_indices=True)
                switches[pool_at[i]] = idx
            else:
                x = m(x)
            if i in wanted:
                # The next module may be an in-place ReLU of a conv read before it.
                out[wanted[i]] = x if self._safe_after(feats, i) else x.clone()
        if fc_wanted:
            x = torch.flatten(self.model.avgpool(x), 1)
            cls = self.model.classifier
            for i in range(max(fc_wanted) + 1):
                x = cls[i](x)
                if i in fc_wanted:
                    out[fc_wanted[i]] = x if self._safe_after(cls, i) else x.clone()
        return (out, switches) if pool_indices else out

    @staticmethod
    def _safe_after(seq: nn.Sequential, i: int) -> bool:
        nxt = seq[i + 1] if i + 1 < len(seq) else None
        return not (nxt is not None and getattr(nxt, "inplace", False))


def interval_below(geom: Geometry, a: int, b: int) -> tuple[int, int]:
    """Input rows [a', b'] (inclusive, clipped) that output rows [a, b] of a conv/pool read."""
    lo = a * geom.stride - geom.padding
    hi = b * geom.stride - geom.padding + geom.kernel - 1
    return max(lo, 0), min(hi, geom.in_size - 1)
