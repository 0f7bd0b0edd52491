"""The DeconvNet projection engine (Zeiler & Fergus 2014, section 2.1): algorithm only, no I/O.

A projection takes one chosen activation -- image n, layer L, channel c,
position (y, x) -- keeps it, zeroes every other activation of the layer, and
runs the feature extractor backwards down to pixels. Going down, each module
of `model.features` is undone by:

    ReLU               rectify: ReLU of the signal (the forward on/off pattern is NOT used)
    Conv2d             filter with the transposed weights: conv_transpose2d with the conv's
                       weight, stride and padding (no bias), cropped to the conv's input size
    MaxPool2d          unpool: each value goes to the position that won its window in the
                       forward pass (the switches); windows overlap, so values that land on
                       one position ADD (scatter_add_, never F.max_unpool2d)
    LocalResponseNorm  identity (the paper: "not inverted"), or with norm="gradient" its
                       true gradient at the recorded forward input (Captum's choice)
    Identity, Dropout  identity (eval mode)

Modes: "unit" keeps one position of the channel (the default, the paper's
figures); "map" keeps the channel's whole map of that image.

Equivalently, a projection is the vector-Jacobian product of the kept
activations with respect to the input, with every ReLU's backward replaced by
ReLU(incoming gradient): `gradient_reference` computes that with autograd (the
SLOW reference, for tests), and `relative_error` is the agreement measure

    err = max|P - R| / max|R|,   R = value * d a / d x   (unit mode)

i.e. the error of the projection divided by its own value, relative to the
largest gradient entry: max|P/value - grad| / max|grad|.

Speed: requests are grouped by layer and each group runs the chain once as a
batch (one request = one sample; its switches are gathered per request). The
signal of a unit never leaves its receptive field, so at every level the work
is done on a window that just holds the field (clipped to the map, common size
per batch, its own offset per request): for a conv5 unit of ZFNet at 224 px
the conv1 level is a 67 x 67 window instead of 110 x 110. The results equal
the full-map computation exactly (the window always contains every position
the signal can reach). Only the request's own channel enters the top
conv's transposed filter (a grouped convolution, or for one unit just a scaled
filter).

Switches: {pool name: LongTensor (N, C, H_out, W_out)} in F.max_pool2d's
layout (flat index into the pool's input map), N indexing `Request.image`.
They come either from the store (`atlas.switches.decode`, valid inside the
unit's receptive field -- enough for unit mode) or from the images
(`switches_from_images`, valid everywhere -- needed for map mode).

Models the engine cannot project exactly are refused with an AtlasError
(`check_model`): every module of `features` must be exactly one of the
supported types (a subclass may hide a functional ReLU), the modules must
reproduce `features`' output module by module on a probe input, and
`model.forward` must run `features` as one block on its raw input.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AtlasError
from .layers import Layer, LayerMap

MODES = ("unit", "map")
NORMS = ("identity", "gradient")

# Exactly these types (not subclasses) may appear in `features`.
_CONV, _RELU, _POOL = (nn.Conv2d,), (nn.ReLU,), (nn.MaxPool2d,)
_NORM = (nn.LocalResponseNorm, nn.CrossMapLRN2d)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout2d)
_SUPPORTED = _CONV + _RELU + _POOL + _NORM + _PASS
_WHY_NOT = {
    nn.BatchNorm2d: "batch normalisation has no DeconvNet inverse in the paper",
    nn.AvgPool2d: "average pooling has no switches to unpool with",
    nn.AdaptiveAvgPool2d: "average pooling has no switches to unpool with",
    nn.AdaptiveMaxPool2d: "adaptive max pooling is not supported",
}


# ---------------------------------------------------------------------------
# requests and results
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# the model check
# ---------------------------------------------------------------------------
_checked: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _structure_key(model: nn.Module, image_size: int) -> tuple:
    feats = getattr(model, "features", None)
    mods = tuple(id(m) for m in feats) if isinstance(feats, nn.Sequential) else ()
    return (image_size, id(feats), mods, type(model).forward)


def _static_check(model: nn.Module) -> None:
    feats = model.features
    for i, m in enumerate(feats):
        t = type(m)
        where = f"features.{i} ({t.__name__})"
        if t not in _SUPPORTED:
            base = next((b for b in _SUPPORTED if isinstance(m, b)), None)
            if base is not None:
                raise AtlasError(f"cannot project {where}: a subclass of {base.__name__} may compute more "
                                 f"than {base.__name__} (e.g. a functional ReLU the engine cannot see); "
                                 f"use plain {base.__name__} modules")
            why = next((w for k, w in _WHY_NOT.items() if isinstance(m, k)), "the engine does not know it")
            raise AtlasError(f"cannot project {where}: {why} (supported: Conv2d, ReLU, MaxPool2d, "
                             "LocalResponseNorm, Identity, Dropout)")
        if "forward" in vars(m):
            raise AtlasError(f"cannot project {where}: its forward was replaced on the instance")
        if m._forward_hooks or m._forward_pre_hooks:
            raise AtlasError(f"cannot project {where}: it has forward hooks that may change its output")
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise AtlasError(f"cannot project {where}: grouped convolutions are not supported")
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise AtlasError(f"cannot project {where}: only explicit zero padding is supported")
            if tuple(m.dilation) != (1, 1):
                raise AtlasError(f"cannot project {where}: dilated convolutions are not supported")
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise AtlasError(f"cannot project {where}: a pool that returns indices changes the data flow")
            d = m.dilation if isinstance(m.dilation, int) else tuple(m.dilation)
            if d not in (1, (1, 1)):
                raise AtlasError(f"cannot project {where}: dilated pooling is not supported")


def check_model(lmap: LayerMap) -> None:
    """Refuse (AtlasError) a model the engine cannot project exactly; puts it in eval mode.

    1. every module of `features` is exactly a supported type (no subclasses,
       no replaced forward, no hooks) with supported settings;
    2. on a random probe input run through `model.forward` (or `features` for a
       model without its own forward), `features` is called exactly once, on
       the raw input, and every module's input is the previous module's output
       and its output is what the engine computes for its type (catches a
       forward that applies the modules, or F.relu, on its own, a Sequential
       that does more than chain its modules, global hooks).
    The probe is small (64 px when the geometry allows it; else the image size)
    and the result is cached per model and structure.
    """
    model = lmap.model
    model.eval()
    key = _structure_key(model, lmap.image_size)
    if _checked.get(model) == key:
        return
    _static_check(model)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    sizes = [lmap.image_size]
    if lmap.image_size > 64:
        try:
            LayerMap(model, 64)
            sizes.insert(0, 64)
        except AtlasError:
            pass
    own_forward = type(model).forward is not nn.Module.forward
    for n, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn((1, 3, size, size), generator=gen, dtype=dtype).to(device)
        try:
            ins, outs, calls = _probe(model, x, own_forward)
            break
        except AtlasError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means we cannot confirm the data flow
            if n + 1 < len(sizes):
                continue
            raise AtlasError(f"cannot project: model.forward failed on a probe input of {size} px "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
    if len(calls) != 1:
        raise AtlasError(f"cannot project: model.forward calls model.features {len(calls)} times (it must "
                         "run features once, as one block, on its input, so that the engine sees every ReLU)")
    if not torch.equal(calls[0], x):
        raise AtlasError("cannot project: model.forward changes the input before model.features")
    ours = x
    with torch.no_grad():
        for i, m in enumerate(model.features):
            where = f"features.{i} ({type(m).__name__})"
            if i not in outs:
                raise AtlasError(f"cannot project: model.features did not run {where}")
            if not _close(ins[i], ours):
                raise AtlasError(f"cannot project: the input of {where} is not the previous module's output "
                                 "(model.features does more than chain its modules, e.g. a functional ReLU)")
            ours = _walk_one(m, ins[i])[0]
            if not _close(outs[i], ours):
                raise AtlasError(f"cannot project: {where} does not compute what the engine assumes for its type")
            ours = outs[i]
    _checked[model] = key


def _probe(model: nn.Module, x: torch.Tensor, own_forward: bool):
    """Run the model on x with hooks: each feature module's first input and output, and features' calls."""
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    calls: list[torch.Tensor] = []
    handles = []
    feats = model.features

    def pre(mod, inp, i):  # in-place modules overwrite their input: copy it first
        if i not in ins:
            ins[i] = inp[0].detach().clone()

    def post(mod, inp, out, i):
        if i not in outs:
            outs[i] = out.detach().clone()

    try:
        for i, m in enumerate(feats):
            handles.append(m.register_forward_pre_hook(lambda mod, inp, i=i: pre(mod, inp, i)))
            handles.append(m.register_forward_hook(lambda mod, inp, out, i=i: post(mod, inp, out, i)))
        handles.append(feats.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].detach().clone())))
        with torch.no_grad():
            (model if own_forward else feats)(x.clone())
    finally:
        for h in handles:
            h.remove()
    return ins, outs, calls


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) <= 1e-5 * scale + 1e-30 if b.numel() else True


def _walk_one(m: nn.Module, x: torch.Tensor):
    """The engine's reading of one module's forward: (output, pool indices or None)."""
    if isinstance(m, nn.Conv2d):
        return F.conv2d(x, m.weight, m.bias, m.stride, m.padding), None
    if isinstance(m, nn.ReLU):
        return F.relu(x), None
    if isinstance(m, nn.MaxPool2d):
        return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, 1, ceil_mode=m.ceil_mode,
                            return_indices=True)
    if isinstance(m, _NORM):
        return m(x), None
    return x, None


# ---------------------------------------------------------------------------
# the forward record (recompute path)
# ---------------------------------------------------------------------------
def record(lmap: LayerMap, x: torch.Tensor, layers: Iterable[str] | None = None,
           norm_inputs: bool = False) -> ForwardRecord:
    """One forward pass over images `x` (N, 3, S, S) up to the deepest of `layers` (default all conv):
    the switches of every pool below, the layers' activations, and (if asked) the norm layers' inputs."""
    check_model(lmap)
    resolved = lmap.resolve(list(layers) if layers is not None else None)
    for la in resolved:
        if la.kind != "conv":
            raise AtlasError(f"layer '{la.name}' is not a conv layer: projections start at conv layers")
    names = [la.name for la in resolved]
    want = {lmap.by_name[n].read_at: n for n in names}
    pool_at = {p.index: p.name for p in lmap.pools}
    last = max(want)
    rec = ForwardRecord({}, {}, {})
    p = next(lmap.model.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        for i in range(last + 1):
            m = lmap.model.features[i]
            if norm_inputs and isinstance(m, _NORM):
                rec.norm_inputs[i] = x
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


# ---------------------------------------------------------------------------
# the projection
# ---------------------------------------------------------------------------
def _below(geom, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows [a', b'] (inclusive, clipped) reached by output rows [a, b] (vectorised)."""
    lo = (a * geom.stride - geom.padding).clamp(min=0)
    hi = (b * geom.stride - geom.padding + geom.kernel - 1).clamp(max=geom.in_size - 1)
    return lo, hi


def _window(ya, yb, xa, xb, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per request a square window of one common size h that holds rows [ya, yb] and
    columns [xa, xb] and lies inside [0, size): (y0, x0, h)."""
    h = int(torch.maximum(yb - ya, xb - xa).max()) + 1
    cap = torch.full_like(ya, size - h)
    return torch.minimum(ya, cap), torch.minimum(xa, cap), h


def _take(t: torch.Tensor, off_y: torch.Tensor, off_x: torch.Tensor, h: int) -> torch.Tensor:
    """Per sample b: t[b, :, off_y[b]:off_y[b]+h, off_x[b]:off_x[b]+h], zero outside t."""
    size_y, size_x = t.shape[2], t.shape[3]
    oy0, ox0 = int(off_y[0]), int(off_x[0])
    if bool((off_y == oy0).all()) and bool((off_x == ox0).all()):  # one slice for all (the usual case)
        if oy0 >= 0 and ox0 >= 0 and oy0 + h <= size_y and ox0 + h <= size_x:
            return t[:, :, oy0:oy0 + h, ox0:ox0 + h]
    pad_lo = max(0, -int(min(off_y.min(), off_x.min())))
    pad_hi = max(0, int(max(off_y.max() + h - size_y, off_x.max() + h - size_x)))
    if pad_lo or pad_hi:
        t = F.pad(t, (pad_lo, pad_hi, pad_lo, pad_hi))
    B, C, W = t.shape[0], t.shape[1], t.shape[3]
    ar = torch.arange(h, device=t.device)
    rows = (off_y + pad_lo).view(B, 1, 1, 1) + ar.view(1, 1, h, 1)
    t = torch.gather(t, 2, rows.expand(B, C, h, W))
    cols = (off_x + pad_lo).view(B, 1, 1, 1) + ar.view(1, 1, 1, h)
    return torch.gather(t, 3, cols.expand(B, C, h, h))


def _conv_t(x: torch.Tensor, w: torch.Tensor, s: int) -> torch.Tensor:
    """conv_transpose2d(x, w, stride=s), no padding: (B, C_in, (h-1)*s + k, ...).

    With a stride and few output channels (conv1: 3) the transposed convolution
    is slow on CPU; there it runs as s*s forward convolutions with the phase
    sub-kernels in one conv2d, interleaved by a pixel shuffle (same sums).
    """
    c_out, k = w.shape[1], w.shape[-1]
    if s == 1 or c_out > 16 or x.device.type != "cpu":
        return F.conv_transpose2d(x, w, stride=s)
    kk = -(-k // s)
    wp = w.new_zeros((w.shape[0], c_out, kk * s, kk * s))
    wp[:, :, :k, :k] = w
    # out[s*i + r] = sum_j x[i - j] * wp[s*j + r]: a correlation with the flipped phase kernel
    sub = wp.view(w.shape[0], c_out, kk, s, kk, s).permute(3, 5, 1, 0, 2, 4).flip(-1, -2)
    y = F.conv2d(x, sub.reshape(s * s * c_out, w.shape[0], kk, kk), padding=kk - 1)
    B, _, H, W = y.shape
    y = y.view(B, s, s, c_out, H, W).permute(0, 3, 4, 1, 5, 2).reshape(B, c_out, H * s, W * s)
    n = (x.shape[2] - 1) * s + k
    return y[:, :, :n, :n]


def _lrn_vjp(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False), torch.enable_grad():
        xi = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(m(xi), xi, g.clone())
    return grad.detach()


class _Group:
    """The chain for one batch of requests on one layer."""

    def __init__(self, lmap: LayerMap, layer: Layer, reqs: list[Request], switches, activations,
                 norm_inputs, mode: str, norm: str, device, dtype):
        self.lmap, self.layer, self.reqs = lmap, layer, reqs
        self.switches, self.activations, self.norm_inputs = switches, activations, norm_inputs
        self.mode, self.norm, self.device, self.dtype = mode, norm, device, dtype

    def run(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float], list[float | None]]:
        lmap, layer, reqs, dev = self.lmap, self.layer, self.reqs, self.device
        B = len(reqs)
        img = torch.tensor([r.image for r in reqs], device=dev)
        chan = torch.tensor([r.channel for r in reqs], device=dev)
        values: list[float] = []
        map_max: list[float | None] = []
        if self.mode == "unit":
            ya = torch.tensor([r.y for r in reqs], device=dev)
            xa = torch.tensor([r.x for r in reqs], device=dev)
            yb, xb = ya.clone(), xa.clone()
            for r in reqs:
                if r.value is not None:
                    values.append(float(r.value))
                elif self.activations is not None and layer.name in self.activations:
                    values.append(float(self.activations[layer.name][r.image, r.channel, r.y, r.x]))
                else:
                    raise AtlasError(f"projection of {layer.name} channel {r.channel}: unit mode needs the "
                                     "activation's value (Request.value) or the layer's activations")
                map_max.append(None)
            sig = torch.tensor(values, device=dev, dtype=self.dtype).view(B, 1, 1, 1)
            h = 1
        else:
            if self.activations is None or layer.name not in self.activations:
                raise AtlasError(f"map mode projection of {layer.name} needs the layer's activations "
                                 "(use project_images, or record(...).activations)")
            act = self.activations[layer.name]
            sig = act[img.to(act.device), chan.to(act.device)].to(device=dev, dtype=self.dtype).unsqueeze(1)
            for r, m in zip(reqs, sig):
                values.append(float(m[0, r.y, r.x]))
                map_max.append(float(m.max()))
            H = layer.height
            ya = torch.zeros(B, dtype=torch.long, device=dev)
            xa, yb, xb = ya.clone(), ya + H - 1, ya + H - 1
            h = H
        lo_y, lo_x = ya.clone(), xa.clone()
        feats = lmap.model.features
        pools = {p.index: p.name for p in lmap.pools}
        single = True  # the signal still holds only the request's own channel
        for i in range(layer.read_at, -1, -1):
            m = feats[i]
            if isinstance(m, nn.ReLU):
                sig = sig.clamp_(min=0)  # every signal here is a fresh tensor of the engine's own
            elif isinstance(m, nn.Conv2d):
                g = lmap.geoms[i]
                w = m.weight.detach().to(self.dtype)
                ya, yb = _below(g, ya, yb)
                xa, xb = _below(g, xa, xb)
                ny, nx, hn = _window(ya, yb, xa, xb, g.in_size)
                if single:
                    wc = w[chan]  # (B, C_in, k, k): the channel's own filters
                    if h == 1:
                        t = wc * sig.view(B, 1, 1, 1)
                    else:
                        t = F.conv_transpose2d(sig.reshape(1, B, h, h), wc, stride=g.stride, groups=B)
                        t = t.view(B, w.shape[1], t.shape[2], t.shape[3])
                    single = False
                else:
                    t = _conv_t(sig, w, g.stride)
                # t covers input rows from lo*stride - padding on
                sig = _take(t, ny - (lo_y * g.stride - g.padding), nx - (lo_x * g.stride - g.padding), hn)
                lo_y, lo_x, h = ny, nx, hn
            elif isinstance(m, nn.MaxPool2d):
                assert not single
                g = lmap.geoms[i]
                ya, yb = _below(g, ya, yb)
                xa, xb = _below(g, xa, xb)
                ny, nx, hn = _window(ya, yb, xa, xb, g.in_size)
                sig = self._unpool(pools[i], sig, img, lo_y, lo_x, h, ny, nx, hn, g.in_size)
                lo_y, lo_x, h = ny, nx, hn
            elif isinstance(m, _NORM):
                if self.norm == "gradient":
                    assert not single
                    src = self.norm_inputs[i]
                    xin = self._gather_map(src, img, lo_y, lo_x, h)
                    sig = _lrn_vjp(m, xin, sig)
            # Identity / Dropout: nothing to undo
        return sig, lo_y, lo_x, values, map_max

    def _gather_map(self, t: torch.Tensor, img, lo_y, lo_x, h) -> torch.Tensor:
        """t[img[b], :, lo_y[b]:lo_y[b]+h, lo_x[b]:lo_x[b]+h] for every request b -> (B, C, h, h)."""
        dev = t.device
        B, C = img.shape[0], t.shape[1]
        ar = torch.arange(h, device=dev)
        rows = (lo_y.to(dev).view(B, 1) + ar).view(B, 1, h, 1)
        cols = (lo_x.to(dev).view(B, 1) + ar).view(B, 1, 1, h)
        chans = torch.arange(C, device=dev).view(1, C, 1, 1)
        out = t[img.to(dev).view(B, 1, 1, 1), chans, rows, cols]
        return out.to(self.device)

    def _unpool(self, name, sig, img, lo_y, lo_x, h, ny, nx, hn, in_size) -> torch.Tensor:
        sw = self.switches.get(name) if self.switches is not None else None
        if sw is None:
            raise AtlasError(f"projection of {self.layer.name} needs the switches of {name}")
        B, C = sig.shape[0], sig.shape[1]
        # the switches of each request's window above: slices, one copy
        idx = torch.stack([sw[i, :, y:y + h, x:x + h] for i, y, x in
                           zip(img.tolist(), lo_y.tolist(), lo_x.tolist())]).to(self.device)
        # flat index over the input map -> (row, column) -> index inside the window below; in
        # floating point (vectorised; exact while in_size**2 < 2**24)
        ft = torch.float32 if in_size * in_size < (1 << 24) else torch.float64
        q = idx.to(ft)
        iy = torch.floor((q + 0.5) * (1.0 / in_size))
        ix = q - iy * in_size
        # A position whose switch falls outside the window below lies outside the receptive
        # field: its value is exactly zero, so where it is sent does not matter (clamped).
        ly = (iy - ny.to(ft).view(B, 1, 1, 1)).clamp_(0, hn - 1)
        lx = (ix - nx.to(ft).view(B, 1, 1, 1)).clamp_(0, hn - 1)
        local = ly.mul_(hn).add_(lx).to(torch.int64).view(B * C, h * h)
        out = sig.new_zeros((B * C, hn * hn))
        out.scatter_add_(1, local, sig.reshape(B * C, h * h))
        return out.view(B, C, hn, hn)


def _chunks(lmap: LayerMap, layer: Layer, mode: str, n: int, budget: int = 32 << 20) -> int:
    """Requests per batch so that the largest level of a batch stays near `budget` floats."""
    h = layer.height if mode == "map" else 1
    per = 0
    for i in range(layer.index, -1, -1):
        m = lmap.model.features[i]
        if i in lmap.geoms:
            g = lmap.geoms[i]
            h = min((h - 1) * g.stride + g.kernel, g.in_size)
            c = m.in_channels if isinstance(m, nn.Conv2d) else next(
                (p.channels for p in lmap.pools if p.index == i), 1)
            per = max(per, 4 * c * h * h)
    return max(1, min(n, 4096, budget // max(per, 1)))


def project(lmap: LayerMap, requests: Sequence[Request | tuple | dict], switches: dict[str, torch.Tensor] | None,
            *, activations: dict[str, torch.Tensor] | None = None,
            norm_inputs: dict[int, torch.Tensor] | None = None,
            mode: str = "unit", norm: str = "identity", batch_size: int | None = None) -> Projections:
    """Project each request down to pixels; see the module docstring.

    switches     {pool: (N, C, H_out, W_out)} indexed by Request.image
    activations  {layer: (N, C, H, W)}: unit mode reads a request's value here when
                 Request.value is None; map mode needs it (the kept channel map)
    norm_inputs  {features index: (N, C, H, W)}: the norm layers' forward inputs,
                 needed for norm="gradient" (record(..., norm_inputs=True))
    batch_size   requests per chained batch (default: by memory)
    """
    if mode not in MODES:
        raise AtlasError(f"unknown projection mode '{mode}': choose one of {', '.join(MODES)}")
    if norm not in NORMS:
        raise AtlasError(f"unknown norm handling '{norm}': choose one of {', '.join(NORMS)}")
    check_model(lmap)
    reqs = [as_request(r) for r in requests]
    p = next(lmap.model.parameters())
    device, dtype = p.device, p.dtype
    s = lmap.image_size
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
    if norm == "gradient" and any(isinstance(m, _NORM) for m in lmap.model.features) and norm_inputs is None:
        raise AtlasError("norm='gradient' needs the norm layers' forward inputs: use project_images, or "
                         "record(..., norm_inputs=True)")
    windows: list[torch.Tensor | None] = [None] * len(reqs)
    origins: list[tuple[int, int] | None] = [None] * len(reqs)
    meta: list[dict | None] = [None] * len(reqs)
    sw = {k: v.to(device) for k, v in (switches or {}).items()}
    with torch.no_grad():
        for name, idxs in groups.items():
            layer = lmap.by_name[name]
            bs = batch_size or _chunks(lmap, layer, mode, len(idxs))
            for start in range(0, len(idxs), bs):
                part = idxs[start:start + bs]
                grp = _Group(lmap, layer, [reqs[j] for j in part], sw, activations, norm_inputs,
                             mode, norm, device, dtype)
                sig, lo_y, lo_x, values, map_max = grp.run()
                for b, j in enumerate(part):
                    r = reqs[j]
                    windows[j] = sig[b]
                    origins[j] = (int(lo_y[b]), int(lo_x[b]))
                    g = layer.geometry
                    uy, ux = g.offset + r.y * g.jump, g.offset + r.x * g.jump
                    box = layer.box(r.y, r.x, s) if mode == "unit" else (0, 0, s, s)
                    meta[j] = {"mode": mode, "norm": norm, "layer": name, "channel": r.channel, "y": r.y,
                               "x": r.x, "image": r.image, "value": values[b], "map_max": map_max[b],
                               "box": box, "rf_box": (ux, uy, ux + g.rf_size, uy + g.rf_size)}
    return Projections(mode, norm, s, meta, windows, origins)


def project_images(lmap: LayerMap, x: torch.Tensor, requests: Sequence[Request | tuple | dict], *,
                   mode: str = "unit", norm: str = "identity", batch_size: int | None = None) -> Projections:
    """The recompute path: one forward pass over images x (N, 3, S, S), then `project`.

    Request.image indexes x; a request's value, when not given, is read from the forward pass.
    """
    reqs = [as_request(r) for r in requests]
    if not reqs:
        return Projections(mode, norm, lmap.image_size, [], [], [])
    for r in reqs:
        if r.layer not in lmap.by_name:
            lmap.resolve([r.layer])  # the error names the valid layers
    rec = record(lmap, x, sorted({r.layer for r in reqs}), norm_inputs=(norm == "gradient"))
    return project(lmap, reqs, rec.switches, activations=rec.activations, norm_inputs=rec.norm_inputs,
                   mode=mode, norm=norm, batch_size=batch_size)


# ---------------------------------------------------------------------------
# the SLOW reference: autograd with a modified ReLU backward (tests only)
# ---------------------------------------------------------------------------
class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


class _IdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m):
        return m(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


def gradient_reference(lmap: LayerMap, x: torch.Tensor, request: Request | tuple | dict,
                       mode: str = "unit", norm: str = "identity") -> torch.Tensor:
    """SLOW REFERENCE (one autograd pass per request; for tests): (3, S, S).

    The vector-Jacobian product of the kept activation(s) of `request` with
    respect to image x[request.image], where every ReLU's backward is ReLU(g)
    and, for norm="identity", every norm layer's backward is the identity. In
    unit mode that is value * d a / d x; in map mode the channel map is the vector.
    """
    r = as_request(request)
    layer = lmap.by_name[r.layer]
    model = lmap.model.eval()
    p = next(model.parameters())
    xi = x[r.image:r.image + 1].detach().to(device=p.device, dtype=p.dtype).clone().requires_grad_(True)
    with torch.enable_grad():
        h = xi
        for i in range(layer.read_at + 1):
            m = model.features[i]
            if isinstance(m, nn.ReLU):
                h = _DeconvReLU.apply(h)
            elif isinstance(m, nn.Conv2d):
                h = F.conv2d(h, m.weight, None if m.bias is None else m.bias, m.stride, m.padding)
            elif isinstance(m, nn.MaxPool2d):
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
            elif isinstance(m, _NORM):
                h = m(h) if norm == "gradient" else _IdentityBackward.apply(h, m)
        seed = torch.zeros_like(h)
        if mode == "unit":
            seed[0, r.channel, r.y, r.x] = h[0, r.channel, r.y, r.x].detach()
        else:
            seed[0, r.channel] = h[0, r.channel].detach()
        (g,) = torch.autograd.grad(h, xi, seed)
    return g[0].detach()


def relative_error(p: torch.Tensor, ref: torch.Tensor) -> float:
    """max|p - ref| / max|ref| (0 when both are zero): the agreement measure of the tests."""
    scale = float(ref.abs().max())
    diff = float((p - ref).abs().max())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale
