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
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AtlasError

_POINTWISE = (nn.ReLU, nn.LocalResponseNorm, nn.Identity, nn.Dropout, nn.BatchNorm2d, nn.CrossMapLRN2d)


@dataclass
class Geometry:
    """One spatial op's parameters plus the receptive field of its output units."""

    kernel: int
    stride: int
    padding: int
    in_size: int
    out_size: int
    rf_size: int
    jump: int
    offset: int


@dataclass
class Layer:
    name: str
    kind: str                    # "conv" or "fc"
    index: int                   # position in model.features (conv) or model.classifier (fc)
    read_at: int                 # module index whose output is recorded (the ReLU after it, if any)
    channels: int
    height: int = 1
    width: int = 1
    geometry: Geometry | None = None
    pools_below: list[str] = field(default_factory=list)
    # a graph layer's field per axis, ((jump, lo, hi) along y, along x): unit i reads input pixels
    # i * jump + lo .. i * jump + hi (atlas/graph_layers.py); None with jump 0: the whole image
    rf: tuple | None = None

    def field_box(self, y: int, x: int, image_size: int) -> tuple[int, int, int, int]:
        """Receptive-field box (x0, y0, x1, y1) of unit (y, x), unclipped (exclusive ends)."""
        g = self.geometry
        if self.rf is not None:
            (jy, ly, hy), (jx, lx, hx) = self.rf
            return (x * jx + lx, y * jy + ly, x * jx + hx + 1, y * jy + hy + 1)
        if g.jump == 0:  # a graph layer that sees the whole image
            return (0, 0, image_size, image_size)
        y0, x0 = g.offset + y * g.jump, g.offset + x * g.jump
        return (x0, y0, x0 + g.rf_size, y0 + g.rf_size)

    def box(self, y: int, x: int, image_size: int) -> tuple[int, int, int, int]:
        """Receptive-field box (x0, y0, x1, y1) of unit (y, x), clipped to the image."""
        x0, y0, x1, y1 = self.field_box(y, x, image_size)
        return (max(x0, 0), max(y0, 0), min(x1, image_size), min(y1, image_size))

    def to_row(self) -> dict:
        g = self.geometry
        return {
            "layer": self.name, "kind": self.kind, "channels": self.channels,
            "height": self.height, "width": self.width,
            "kernel": g.kernel if g else None, "stride": g.stride if g else None,
            "padding": g.padding if g else None, "rf_size": g.rf_size if g else None,
            "jump": g.jump if g else None, "offset": g.offset if g else None,
        }


@dataclass
class Pool:
    name: str
    index: int
    channels: int
    geometry: Geometry
    ceil_mode: bool


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


class LayerMap:
    """Names and geometry of a model's layers for a given square input size.

    `LayerMap(model, size)` is this walk for the 2012-2014 nets and a `GraphLayerMap`
    (atlas/graph_layers.py) for every other model: the same interface."""

    is_graph = False

    def __new__(cls, model: nn.Module, image_size: int):
        if cls is LayerMap and not walks_as_sequential(model):
            from .graph_layers import GraphLayerMap

            return super().__new__(GraphLayerMap)
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
    @property
    def conv_layers(self) -> list[Layer]:
        return [la for la in self.layers if la.kind == "conv"]

    def resolve(self, names: list[str] | str | None, kinds: tuple[str, ...] = ("conv",)) -> list[Layer]:
        """Layers by name (comma list or list), default all of `kinds`; unknown names are an error."""
        if names is None or names == "" or names == []:
            return [la for la in self.layers if la.kind in kinds]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        out = []
        for n in names:
            if n not in self.by_name:
                valid = ", ".join(la.name for la in self.layers)
                raise AtlasError(f"unknown layer '{n}': valid layers are {valid}")
            out.append(self.by_name[n])
        return sorted(out, key=self.layers.index)

    def classes(self) -> int | None:
        fcs = [la for la in self.layers if la.kind == "fc"]
        return fcs[-1].channels if fcs else None

    def describe(self) -> dict:
        return {
            "image_size": self.image_size,
            "layers": [{**layer.to_row(), "pools_below": layer.pools_below} for layer in self.layers],
            "pools": [{"name": p.name, "index": p.index, "channels": p.channels, "ceil_mode": p.ceil_mode,
                       **asdict(p.geometry)} for p in self.pools],
        }

    # -- forward ------------------------------------------------------------
    def extract(self, x: torch.Tensor, names: list[str], pool_indices: bool = False,
                batch_size: int | None = None):
        """Run the model as far as the deepest requested layer.

        Returns {name: activation}; with `pool_indices`, also {pool name: argmax
        indices} (flat over each pooled map, as F.max_pool2d gives them). A pool
        name in `names` runs the model only as far as that pool (its switches,
        no activation): what the switches of a deep layer's units need.

        `batch_size`: compute in a batch of exactly this many images, a short
        batch padded with zeros (results are the real images' only). Every
        forward pass whose numbers an atlas stores or ranks goes through here
        with the atlas's batch size: CPU kernels are chosen by batch shape and
        round differently, so without it an image alone in the last batch
        comes out ~1e-8 off its identical copies and breaks the tie rule.
        """
        n = x.shape[0]
        if batch_size is not None and n < batch_size:
            out = self.extract(pad_batch(x, batch_size), names, pool_indices)
            if pool_indices:
                return ({k: v[:n] for k, v in out[0].items()}, {k: v[:n] for k, v in out[1].items()})
            return {k: v[:n] for k, v in out.items()}
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


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """x (N, ...) with zero rows appended up to `size`, in x's memory format (channels-last stays so:
    the layout picks the kernels too)."""
    n = x.shape[0]
    if n >= size:
        return x
    fmt = torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    out = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
    out[:n] = x
    return out


def interval_below(geom: Geometry, a: int, b: int) -> tuple[int, int]:
    """Input rows [a', b'] (inclusive, clipped) that output rows [a, b] of a conv/pool read."""
    lo = a * geom.stride - geom.padding
    hi = b * geom.stride - geom.padding + geom.kernel - 1
    return max(lo, 0), min(hi, geom.in_size - 1)
