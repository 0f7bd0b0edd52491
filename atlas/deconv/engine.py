"""The projection itself: requests grouped by layer, each group run down the chain as one batch, on
windows that just hold the receptive field (atlas/deconv/__init__.py describes the rules and why)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AtlasError
from ..layers import Layer, LayerMap
from .forward import record
from .graph_engine import METHODS, project_graph
from .requests import MODES, NORMS, Projections, Request, as_request
from .support import _NORM, check_model


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
                 norm_inputs, mode: str, norm: str, device, dtype, method: str = "deconvnet", relu_inputs=None):
        self.lmap, self.layer, self.reqs = lmap, layer, reqs
        self.switches, self.activations, self.norm_inputs = switches, activations, norm_inputs
        self.mode, self.norm, self.device, self.dtype = mode, norm, device, dtype
        self.method, self.relu_inputs = method, relu_inputs

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
                if self.method == "guided":  # and the forward on/off pattern, inside the window
                    on = self._gather_map(self.relu_inputs[i], img, lo_y, lo_x, h) > 0
                    if single:  # the signal still holds only the request's own channel
                        on = on[torch.arange(B, device=on.device), chan.to(on.device)].unsqueeze(1)
                    sig = sig * on.to(sig.dtype)
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
            mode: str = "unit", norm: str = "identity", batch_size: int | None = None,
            method: str = "deconvnet", relu_inputs: dict | None = None) -> Projections:
    """Project each request down to pixels; see the module docstring.

    switches     {pool: (N, C, H_out, W_out)} indexed by Request.image
    activations  {layer: (N, C, H, W)}: unit mode reads a request's value here when
                 Request.value is None; map mode needs it (the kept channel map)
    norm_inputs  {features index: (N, C, H, W)}: the norm layers' forward inputs,
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
    if lmap.is_graph:
        return project_graph(lmap, reqs, groups, switches, activations=activations, mode=mode, method=method,
                             masks=relu_inputs, norm=norm, norm_inputs=norm_inputs, batch_size=batch_size)
    check_model(lmap)
    p = next(lmap.model.parameters())
    device, dtype = p.device, p.dtype
    s = lmap.image_size
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
                             mode, norm, device, dtype, method, relu_inputs)
                sig, lo_y, lo_x, values, map_max = grp.run()
                for b, j in enumerate(part):
                    r = reqs[j]
                    windows[j] = sig[b]
                    origins[j] = (int(lo_y[b]), int(lo_x[b]))
                    box = layer.box(r.y, r.x, s) if mode == "unit" else (0, 0, s, s)
                    meta[j] = {"mode": mode, "norm": norm, "method": method, "layer": name, "channel": r.channel,
                               "y": r.y, "x": r.x, "image": r.image, "value": values[b], "map_max": map_max[b],
                               "box": box, "rf_box": layer.field_box(r.y, r.x, s)}
    return Projections(mode, norm, s, meta, windows, origins)


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
