"""What every layer map shares: the records of a layer and a pool, lookups by name, padding a batch.

`atlas.net.layer_map.GraphLayerMap` (`atlas.net.LayerMap`) implements it for every model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import AtlasError


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
    # i * jump + lo .. i * jump + hi (atlas/net/layer_map.py); None with jump 0: the whole image
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
        # a graph layer is no one op: it has a field (rf_size, jump, offset along y; jump 0: the whole
        # image), no kernel, stride or padding of its own
        own = g is not None and self.rf is None and g.jump != 0
        return {
            "layer": self.name, "kind": self.kind, "channels": self.channels,
            "height": self.height, "width": self.width,
            "kernel": g.kernel if own else None, "stride": g.stride if own else None,
            "padding": g.padding if own else None, "rf_size": g.rf_size if g else None,
            "jump": g.jump if g else None, "offset": g.offset if g else None,
        }


@dataclass
class Pool:
    name: str
    index: int
    channels: int
    geometry: Geometry
    ceil_mode: bool


class LayerMapBase:
    """Lookups shared by both maps (`layers`, `by_name` and `image_size` are set by each)."""

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
                raise AtlasError(unknown_layer(n, [la.name for la in self.layers]))
            out.append(self.by_name[n])
        return sorted(out, key=self.layers.index)

    def candidates(self, recorded: list[str] = ()) -> list[dict]:
        """Every layer an atlas of this model can record (`--layers` takes any), with its shape and
        receptive field, in the columns of an atlas's own `layers` listing: kind (the module's: conv,
        batchnorm, relu, maxpool, block, fc, ...), rf_size pixels, a unit (y, x) starting at (y * jump +
        offset, x * jump + offset) before clipping (an "H x W" field or "Y,X" offset where they differ);
        `recorded`: whether this atlas holds it."""
        modules = dict(self.model.named_modules()) if hasattr(self, "model") else {}
        rows = []
        for la in self.layers:
            # a module called again (a ResNet block's ReLU after the sum) is named NAME_1, NAME_2, ...
            again = re.fullmatch(r"(.+)_\d+", la.name)
            module = modules.get(la.name) or (modules.get(again.group(1)) if again else None)
            row = {"layer": la.name, "kind": module_kind(module, la.kind), "channels": la.channels,
                   "height": la.height, "width": la.width, "rf_size": None, "jump": None, "offset": None}
            if la.kind == "conv":
                x0, y0, x1, y1 = la.field_box(0, 0, self.image_size)
                g = la.geometry
                jump = la.rf[0][0] if la.rf is not None else g.jump
                row.update({"rf_size": y1 - y0 if y1 - y0 == x1 - x0 else f"{y1 - y0} x {x1 - x0}",
                            "jump": jump or None, "offset": y0 if y0 == x0 else f"{y0},{x0}"})
            row["recorded"] = la.name in recorded
            rows.append(row)
        return rows

    def check_trace(self, x: torch.Tensor) -> None:
        """Whether the map computes what the model computes (a graph checks its trace; see GraphLayerMap)."""

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
            out = self._extract(pad_batch(x, batch_size), names, pool_indices)
            if pool_indices:
                return ({k: v[:n] for k, v in out[0].items()}, {k: v[:n] for k, v in out[1].items()})
            return {k: v[:n] for k, v in out.items()}
        return self._extract(x, names, pool_indices)

    def classes(self) -> int | None:
        fcs = [la for la in self.layers if la.kind == "fc"]
        return fcs[-1].channels if fcs else None


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


# torch.nn class names -> the kind `atlas layers --all` shows (a container of several ops is a "block")
_KINDS = {"Conv2d": "conv", "Linear": "fc", "BatchNorm2d": "batchnorm", "ReLU": "relu", "MaxPool2d": "maxpool",
          "AvgPool2d": "avgpool", "AdaptiveAvgPool2d": "avgpool", "LocalResponseNorm": "lrn", "Dropout": "dropout",
          "SiLU": "silu", "GELU": "gelu", "Identity": "identity", "Flatten": "flatten"}


def module_kind(module, fallback: str) -> str:
    """What a layer is, by its module: conv, batchnorm, relu, maxpool, ..., block (a container), or
    `fallback` (the map's own conv/fc) for a layer that is no one module (the 2012-2014 nets' conv1 is a
    conv and its ReLU)."""
    if module is None:
        return fallback
    name = type(module).__name__
    if name in _KINDS:
        return _KINDS[name]
    return "block" if any(True for _ in module.children()) else name.lower()


def unknown_layer(name: str, known: list[str], what: str = "layer") -> str:
    """The one line for a layer name the model does not have: the closest names first, and the whole list
    only when it is short (a ResNet has about 80 candidates)."""
    hint = did_you_mean(name, known)
    if len(known) <= 12:
        return f"unknown {what} '{name}'{hint}: valid {what}s are {', '.join(known)}"
    return (f"unknown {what} '{name}'{hint}: this model has {len(known)} candidates, from {known[0]} to "
            f"{known[-1]}; `atlas layers ATLAS --all` lists them")


def did_you_mean(name: str, known: list[str]) -> str:
    """ " (did you mean 'a' or 'b'?)" for the known names closest to a mistyped one, or "" """
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
