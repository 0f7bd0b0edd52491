"""DeconvNet (and guided backpropagation) on a graph: the engine for every model atlas/net/layer_map.py
reads. Algorithm only: tensors in, tensors out.

Going down from the kept activation, the nodes between the layer and the image are visited in reverse
order; each passes its signal to its inputs by its rule, and a node with several users (a residual
block's input, DenseNet's features reused by every later layer) sums what they send back:

    conv (any groups, dilation)      the transposed filter, no bias (conv2d's input gradient)
    relu (any form)                  rectify the signal; guided: and the forward on/off pattern
    relu6 (ReLU6, clamp(0, 6))       rectify like a ReLU; guided: times the forward slope (0 < x < 6)
    leaky (LeakyReLU)                leaky_relu of the signal (the slope applied to its negative
                                     part); guided: times the forward slope (1 or the slope)
    maxpool                          unpool by the switches; overlapping windows add
    bn (eval)                        its scale gamma / sqrt(running_var + eps) only
    avgpool, adaptive_avgpool, mean  their transpose: the pool's own backward (ceil mode,
                                     count_include_pad and uneven adaptive windows come out right)
    lrn                              identity
    add                              the signal to every summand; cat: split back to the branches
    reshape, permute, pad, index,    their transpose
    linear, scale
    pass (Dropout, Identity,         the signal as it is
    StochasticDepth in eval)

Anything else (GELU, SiLU, hardswish, LayerNorm, a multiplicative gate) has no DeconvNet rule:
`check_graph` refuses the projection in one line naming the operation and where it sits.

Everything is batched: one pass carries many requests (images, channels, positions), on full maps.
Max-pools are the only image-dependent step of DeconvNet, so a projection needs only their switches;
guided backpropagation needs the forward ReLU pattern too, hence the images.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import AtlasError
from ..net.graph import RELU_KINDS, Op
from .requests import Projections, Request
from ..choices import METHODS  # noqa: F401 - re-exported

# ops with a rule going down (see the module docstring); "placeholder" is the image
RULES = {"conv", "relu", "relu6", "leaky", "maxpool", "bn", "avgpool", "adaptive_avgpool", "mean", "lrn", "add",
         "cat", "reshape", "permute", "pad", "index", "linear", "scale", "pass", "placeholder", "meta", "get_attr",
         "split", "piece"}


def check_graph(lmap, layer_name: str) -> None:
    """Refuse (AtlasError, one line) a projection from `layer_name` through an op without a rule."""
    node = lmap.read_node[layer_name]
    bad = _first_unprojectable(lmap, node)
    if bad is not None:
        op, why = bad
        raise AtlasError(f"cannot project {layer_name}: {why} at {op.where} has no DeconvNet rule (the atlas "
                         "itself -- top-k, statistics, SQL, similarity, patches, pages -- is still built)")


def _first_unprojectable(lmap, node: fx.Node):
    cache = lmap.__dict__.setdefault("_unprojectable", {})
    if node in cache:
        return cache[node]
    g = lmap.graph
    found = None
    for n in sorted(lmap._ancestors(node), key=g.position.__getitem__):
        op = g.ops[n]
        if op.kind not in RULES:
            found = (op, op.what or op.kind)
            break
        m = op.module
        if m is not None and (m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m)):
            found = (op, f"{op.what or op.kind} with forward hooks or a replaced forward")  # the rule cannot see them
            break
        if op.kind == "bn":
            m = op.params.get("module")
            if m is not None and (m.running_var is None or m.training):
                found = (op, "BatchNorm without running statistics")
                break
        if op.kind == "permute" and any(isinstance(a, fx.Node) for a in n.args[1:]):
            found = (op, "a permute by computed dimensions")
            break
    cache[node] = found
    return found


def _sum_to(g: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Undo broadcasting: g summed down to `shape` (batch dimension kept)."""
    if tuple(g.shape) == tuple(shape):
        return g
    while g.dim() > len(shape):
        g = g.sum(1)
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1 and i > 0]
    return g.sum(dims, keepdim=True) if dims else g


def _vjp(fn, shape: tuple[int, ...], g: torch.Tensor) -> torch.Tensor:
    """The transpose of a linear op, by autograd through it at zero (the op's own backward)."""
    with torch.enable_grad():
        z = torch.zeros(shape, dtype=g.dtype, device=g.device, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(z), z, g)
    return grad


def _number(a) -> float | None:
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


# kinds that act on each position and channel alone: a window of the signal stays where it is
_SAME = {"bn", "relu", "relu6", "leaky", "lrn", "pass"}


def _take(t: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per request b: t[b, :, oy[b]:oy[b]+h, ox[b]:ox[b]+w], zero where that lies outside t."""
    B, C, H, W = t.shape
    y0, x0 = int(oy[0]), int(ox[0])
    if bool((oy == y0).all()) and bool((ox == x0).all()):  # one box for every request: a slice
        ya, yb, xa, xb = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
        if ya >= yb or xa >= xb:
            return t.new_zeros((B, C, h, w))
        return F.pad(t[:, :, ya:yb, xa:xb], (xa - x0, x0 + w - xb, ya - y0, y0 + h - yb))
    pt, pl = max(0, -int(oy.min())), max(0, -int(ox.min()))
    pb, pr = max(0, int(oy.max()) + h - H), max(0, int(ox.max()) + w - W)
    if pt or pl or pb or pr:
        t = F.pad(t, (pl, pr, pt, pb))
    rows = (oy + pt).view(B, 1, 1, 1) + torch.arange(h, device=t.device).view(1, 1, h, 1)
    t = torch.gather(t, 2, rows.expand(B, C, h, t.shape[3]))
    cols = (ox + pl).view(B, 1, 1, 1) + torch.arange(w, device=t.device).view(1, 1, 1, w)
    return torch.gather(t, 3, cols.expand(B, C, h, w))


def _gather(full: torch.Tensor, img: torch.Tensor, oy, ox, h: int, w: int, chan=None) -> torch.Tensor:
    """A forward record (N, C, H, W) at each request's window (inside the map): (B, C or 1, h, w); with
    `chan`, only each request's own channel. Slices, one copy."""
    if chan is None:
        return torch.stack([full[i, :, y:y + h, x:x + w] for i, y, x in zip(img.tolist(), oy.tolist(), ox.tolist())])
    return torch.stack([full[i, c:c + 1, y:y + h, x:x + w]
                        for i, c, y, x in zip(img.tolist(), chan.tolist(), oy.tolist(), ox.tolist())])


def _conv_t(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int], groups: int
            ) -> torch.Tensor:
    """conv_transpose2d without padding: input rows from (output row * stride) on.

    With a stride and few output channels (a first conv: 3) the transposed convolution is slow on CPU;
    there it runs as s*s forward convolutions of the phase sub-kernels in one conv2d, interleaved by a
    pixel shuffle (the same sums)."""
    c_out, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    s = stride[0]
    if (s == 1 or stride[1] != s or c_out > 16 or groups != 1 or dilation != (1, 1) or kh != kw
            or x.device.type != "cpu"):  # both channels-last: the transposed convolution's fast layout
        return F.conv_transpose2d(x.contiguous(memory_format=torch.channels_last), w, None, stride, 0, 0, groups,
                                  dilation)
    kk = -(-kh // s)
    wp = w.new_zeros((w.shape[0], c_out, kk * s, kk * s))
    wp[:, :, :kh, :kh] = w
    # out[s*i + r] = sum_j x[i - j] * wp[s*j + r]: a correlation with the flipped phase kernel
    sub = wp.view(w.shape[0], c_out, kk, s, kk, s).permute(3, 5, 1, 0, 2, 4).flip(-1, -2)
    y = F.conv2d(x.contiguous(), sub.reshape(s * s * c_out, w.shape[0], kk, kk), padding=kk - 1)
    B, _, H, W = y.shape
    y = y.view(B, s, s, c_out, H, W).permute(0, 3, 4, 1, 5, 2).reshape(B, c_out, H * s, W * s)
    return y[:, :, :(x.shape[2] - 1) * s + kh, :(x.shape[3] - 1) * s + kh]


def _lrn_vjp(m, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The true gradient of a contrast normalisation at its recorded input (norm='gradient')."""
    with torch.inference_mode(False), torch.enable_grad():
        xi = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(m(xi), xi, g.clone())
    return grad.detach()


class _Down:
    """One batch of requests on one layer, going down inside the units' receptive fields.

    Each node's signal is a window of its map per request: one common size per node, each request at
    its own offset, and the window holds every position the unit reaches there (its field, found going
    down from the unit: the same per-node composition as the layer map's fields, clipped to the map).
    Ops that move values across the map (a reshape, a global pool, a linear layer, padding) work on the
    whole map, and what lies below them gets whole-map windows. Until the signal meets an op that mixes
    channels, it holds the kept channel alone (one map per request): the top convolution's transpose
    then uses that channel's filters only."""

    def __init__(self, lmap, method: str, switches: dict[str, torch.Tensor] | None, img: torch.Tensor,
                 chan: torch.Tensor, masks: dict | None, dtype: torch.dtype, norm: str = "identity",
                 norm_inputs: dict | None = None):
        self.lmap, self.g = lmap, lmap.graph
        self.method, self.switches, self.img, self.chan, self.masks = method, switches or {}, img, chan, masks or {}
        self.norm, self.norm_inputs = norm, norm_inputs or {}
        self.pool_name = {v: k for k, v in lmap.pool_node.items()}
        self.weights, self.folded, self.raw = _transposed_weights(lmap, dtype)
        self.top = None

    def shape(self, node: fx.Node, b: int) -> tuple[int, ...]:
        return (b, *self.lmap.shapes[node][1:])

    def _spatial(self, node: fx.Node) -> bool:
        return len(self.lmap.shapes.get(node, ())) == 4

    # -- where the unit reaches ---------------------------------------------------------
    def _how(self, op: Op, n: fx.Node) -> list[tuple[fx.Node, str]]:
        """How each input's box follows from the op's: 'spatial' (a kernel), 'same', or 'full'."""
        if not self._spatial(n):
            return [(a, "full") for a in op.inputs]
        k = op.kind
        if k in ("conv", "maxpool") or k == "avgpool" and self._uniform_pool(op):
            return [(op.inputs[0], "spatial")]
        if k in _SAME:
            return [(op.inputs[0], "same")]
        if k == "scale":
            c = op.params.get("factor")
            f = self.g.consts.get(c) if c is not None else None
            return [(op.inputs[0], "same" if f is None or f.dim() < 2 or tuple(f.shape[-2:]) == (1, 1) else "full")]
        if k == "add":
            here = self.lmap.shapes[n][2:]
            return [(a, "same" if self._spatial(a) and self.lmap.shapes[a][2:] == here else "full") for a in op.inputs]
        if k == "cat" and op.params["dim"] in (1, -3):
            return [(a, "same") for a in op.inputs]
        return [(a, "full") for a in op.inputs]

    def _uniform_pool(self, op: Op) -> bool:
        """An average pool whose every window divides by kernel size: its transpose is a uniform filter."""
        p = op.params
        return (p["divisor_override"] is None and not p["ceil_mode"]
                and (p["count_include_pad"] or p["padding"] == (0, 0)))

    def windows(self, order: list[fx.Node], top: fx.Node, box: tuple) -> dict:
        """Each node's window (oy, ox, h, w) per request (None: not a map; its signal is whole)."""
        boxes = {top: box}
        whole = torch.zeros_like(box[0])
        for n in order:
            b = boxes.get(n)
            if b is None and self._spatial(n):
                continue  # not reached from the unit
            op = self.g.ops[n]
            for src, how in self._how(op, n):
                if not self._spatial(src):
                    continue
                H, W = self.lmap.shapes[src][2:]
                ly, hy, lx, hx = b if b is not None else (whole, whole, whole, whole)
                if how == "spatial":
                    p = op.params
                    (sy, sx), (py, px), (dy, dx) = p["stride"], p["padding"], p["dilation"]
                    ky, kx = p["kernel"]
                    nb = ((ly * sy - py).clamp(min=0), (hy * sy - py + dy * (ky - 1)).clamp(max=H - 1),
                          (lx * sx - px).clamp(min=0), (hx * sx - px + dx * (kx - 1)).clamp(max=W - 1))
                elif how == "full" or b is None:  # below a vector (a split's pieces, a flatten): whole maps
                    nb = (whole, whole + H - 1, whole, whole + W - 1)
                else:
                    nb = b
                old = boxes.get(src)
                boxes[src] = nb if old is None else (torch.minimum(old[0], nb[0]), torch.maximum(old[1], nb[1]),
                                                      torch.minimum(old[2], nb[2]), torch.maximum(old[3], nb[3]))
        out = {}
        for n, (ly, hy, lx, hx) in boxes.items():
            H, W = self.lmap.shapes[n][2:]
            h, w = int((hy - ly).max()) + 1, int((hx - lx).max()) + 1
            out[n] = (ly.clamp(max=H - h), lx.clamp(max=W - w), h, w)
        return out

    # -- going down ----------------------------------------------------------------------
    def run(self, top: fx.Node, seed: torch.Tensor, box: tuple):
        """seed: (B, 1, h, w), each request's own channel at the top's window; returns the image-level
        window (B, 3, h, w) and its offsets (oy, ox)."""
        self.top = top
        order = self.lmap.down_order(top)
        self.win = self.windows(order, top, box)
        self.sig: dict[fx.Node, Any] = {top: (seed, True)}
        self.shared: set[int] = {id(seed)}  # tensors not to be changed in place (held twice, or the caller's)
        image = None
        for n in order:
            got = self.sig.pop(n, None)
            if got is None:
                continue
            s, single = got
            op = self.g.ops[n]
            if op.kind == "placeholder":
                image = self._full_channels(s) if single else s
                image_node = n
                continue
            if op.kind == "piece":  # a piece of a split goes back to its place among the split's outputs
                whole = self._whole(n, s, single)
                got = self.sig.setdefault(op.inputs[0], ({}, False))[0]
                i = op.params["index"] % len(self.g.pieces[op.inputs[0]])  # chunk(...)[-1] is the last
                got[i] = whole if i not in got else got[i] + whole
                continue
            for src, t, oy, ox, one in self.down(op, n, s, single):
                self._put(src, t, oy, ox, one)
        if image is None:  # the layer does not depend on the image (cannot happen for a conv net)
            z = torch.zeros(seed.shape[0], dtype=torch.long)
            S = self.lmap.image_size
            return seed.new_zeros((seed.shape[0], 3, S, S)), z, z
        oy, ox, _, _ = self.win[image_node]
        return image, oy, ox

    def _put(self, src: fx.Node, t, oy, ox, single: bool) -> None:
        """Add a contribution (at offsets oy, ox of src's map) to src's signal, in src's window."""
        win = self.win.get(src)
        if win is not None and oy is not None:
            wy, wx, h, w = win
            if not (t.shape[2] == h and t.shape[3] == w and torch.equal(oy, wy) and torch.equal(ox, wx)):
                t = _take(t, wy - oy, wx - ox, h, w)
        old = self.sig.get(src)
        if old is not None:
            u, one = old
            if one and single:
                t = u + t
            else:
                t = (self._full_channels(u, src) if one else u) + (self._full_channels(t, src) if single else t)
                single = False
        self.sig[src] = (t, single)

    def _full_channels(self, s: torch.Tensor, node: fx.Node | None = None) -> torch.Tensor:
        """A one-channel signal spread to all channels (zero but each request's own)."""
        C = self.lmap.shapes[node or self.top][1]
        out = s.new_zeros((s.shape[0], C, *s.shape[2:]))
        out[torch.arange(s.shape[0]), self.chan.to(s.device)] = s[:, 0]
        return out

    def _whole(self, n: fx.Node, s: torch.Tensor, single: bool) -> torch.Tensor:
        """The node's signal on its whole map."""
        if single:
            s = self._full_channels(s, n)
        win = self.win.get(n)
        if win is None:
            return s
        oy, ox, h, w = win
        H, W = self.lmap.shapes[n][2:]
        if (h, w) == (H, W):
            return s
        return _take(s, -oy, -ox, H, W)

    def down(self, op: Op, n: fx.Node, s: torch.Tensor, single: bool) -> list:
        """[(input, its signal, offsets of that signal in the input's map, one channel?)]."""
        k, p = op.kind, op.params
        win = self.win.get(n)
        if win is None or op.kind not in {"conv", "maxpool", "avgpool", "add", "cat", "scale"} | _SAME:
            return self._down_whole(op, n, s, single)
        oy, ox, h, w = win
        src = op.inputs[0] if op.inputs else None
        B = s.shape[0]
        if k in ("scale", "add", "cat") or k == "avgpool" and not self._uniform_pool(op):
            how = self._how(op, n)
            if any(h_ == "full" for _, h_ in how):
                return self._down_whole(op, n, s, single)
        if k == "conv":
            wt = self.raw[n] if n is self.top and n in self.raw else self.weights[n]
            (sy, sx), (py, px), dil = p["stride"], p["padding"], p["dilation"]
            if single and p["groups"] == 1:
                wc = wt[self.chan.to(wt.device)]  # (B, C_in, kh, kw): the kept channel's own filters
                if h == 1 and w == 1 and dil == (1, 1):
                    t = wc * s.view(B, 1, 1, 1)
                else:
                    t = F.conv_transpose2d(s.reshape(1, B, h, w), wc, None, (sy, sx), 0, 0, B, dil)
                    t = t.view(B, wt.shape[1], t.shape[2], t.shape[3])
            else:
                if single:
                    s = self._full_channels(s, n)
                t = _conv_t(s, wt, (sy, sx), dil, p["groups"])
            return [(src, t, oy * sy - py, ox * sx - px, False)]
        if k == "avgpool":  # uniform: a depthwise transposed filter of 1 / (kh * kw)
            if single:
                s = self._full_channels(s, n)
            kh, kw = p["kernel"]
            C = s.shape[1]
            wt = s.new_full((C, 1, kh, kw), 1.0 / (kh * kw))
            t = F.conv_transpose2d(s, wt, None, p["stride"], 0, 0, C)
            return [(src, t, oy * p["stride"][0] - p["padding"][0], ox * p["stride"][1] - p["padding"][1], False)]
        if k in RELU_KINDS:
            return [(src, self._relu(op, n, s, single, win), oy, ox, single)]
        if k == "maxpool":
            if single:
                s = self._full_channels(s, n)
            return [(src, self._unpool(op, n, s, win), *self.win[src][:2], False)]
        if k == "bn":
            if n in self.folded:  # its scale is in the conv's transposed filter below
                return [(src, s, oy, ox, single)]
            scale = _bn_scale(op).to(s.device, s.dtype)
            scale = scale[self.chan.to(s.device)].view(B, 1, 1, 1) if single else scale.view(1, -1, 1, 1)
            return [(src, s * scale, oy, ox, single)]
        if k == "lrn":
            if self.norm == "gradient":
                if single:
                    s = self._full_channels(s, n)
                x = _gather(self.norm_inputs[n], self.img, oy, ox, h, w).to(s.device, s.dtype)
                return [(src, _lrn_vjp(op.module, x, s), oy, ox, False)]
            return [(src, s, oy, ox, single)]
        if k == "pass":
            return [(src, s, oy, ox, single)]
        if k == "add":
            if len(op.inputs) > 1:
                self.shared.add(id(s))
            return [(a, s, oy, ox, single) for a in op.inputs]
        if k == "cat":
            if single:
                s = self._full_channels(s, n)
            parts = op.params["parts"]
            sizes = [self.lmap.shapes[a][1] for a in parts]
            return [(a, t, oy, ox, False) for a, t in zip(parts, torch.split(s, sizes, dim=1)) if a in self.g.signal]
        # scale
        c = op.params.get("factor")
        divide = n.target in (operator.truediv, operator.itruediv, torch.div) or str(n.target) == "div"
        if c is not None:
            f = self.g.consts[c].to(s.device, s.dtype)
            if single and f.dim() >= 3 and f.shape[-3] > 1:
                s, single = self._full_channels(s, n), False
            t = s / f if divide else s * f
            return [(src, _sum_to(t, (B, *t.shape[1:2], h, w)) if t.dim() == 4 else t, oy, ox, single)]
        f = next((_number(a) for a in n.args if _number(a) is not None), 1.0)
        return [(src, s * (1.0 / f if divide else f), oy, ox, single)]

    def _down_whole(self, op: Op, n: fx.Node, s, single: bool) -> list:
        """An op that moves values across the map, on whole maps; its inputs' windows are whole too."""
        if isinstance(s, torch.Tensor) and self._spatial(n):
            s = self._whole(n, s, single)
        elif isinstance(s, torch.Tensor) and single:
            s = self._full_channels(s, n)
        out = []
        for src, t in self._rule(op, n, s):
            if self._spatial(src) and isinstance(t, torch.Tensor):
                z = torch.zeros(t.shape[0], dtype=torch.long, device=t.device)
                out.append((src, t, z, z, False))
            else:
                out.append((src, t, None, None, False))
        return out

    def _rule(self, op: Op, n: fx.Node, s) -> list[tuple[fx.Node, torch.Tensor]]:
        """The whole-map rules (see the module docstring)."""
        k, p = op.kind, op.params
        b = s.shape[0] if isinstance(s, torch.Tensor) else next(iter(s.values())).shape[0]
        src = op.inputs[0] if op.inputs else None
        if k in RELU_KINDS or k in ("conv", "maxpool"):
            raise AssertionError(f"{k} at {op.where} has a window")  # 4-D ops always do
        if k == "bn":
            if n in self.folded:
                return [(src, s)]
            return [(src, s * _bn_scale(op).to(s.dtype).to(s.device).view(1, -1, *([1] * (s.dim() - 2))))]
        if k in ("pass", "lrn"):
            return [(src, s)]
        if k == "reshape":
            return [(src, s.reshape(self.shape(src, b)))]
        if k == "add":
            return [(a, _sum_to(s, self.shape(a, b))) for a in op.inputs]
        if k == "cat":  # split back by every part's size; the constants among them get nothing
            dim, parts = op.params["dim"], op.params["parts"]
            sizes = [self.lmap.shapes[a][dim] for a in parts]
            return [(a, t) for a, t in zip(parts, torch.split(s, sizes, dim=dim)) if a in self.g.signal]
        if k == "scale":
            divide = n.target in (operator.truediv, operator.itruediv, torch.div) or str(n.target) == "div"
            c = op.params.get("factor")
            if c is not None:  # a constant tensor (a layer scale, a normalisation inside forward)
                f = self.g.consts[c].to(s.device, s.dtype)
                return [(src, _sum_to(s / f if divide else s * f, self.shape(src, b)))]
            f = next((_number(a) for a in n.args if _number(a) is not None), 1.0)
            return [(src, s * (1.0 / f if divide else f))]
        if k == "linear":
            return [(src, s @ p["weight"].to(s.dtype))]
        shape = self.shape(src, b) if src is not None else None
        if k == "mean":
            return [(src, _vjp(lambda z: z.mean(dim=p["dims"], keepdim=p["keepdim"]), shape, s))]
        if k == "avgpool":
            return [(src, _vjp(lambda z: F.avg_pool2d(z, p["kernel"], p["stride"], p["padding"], p["ceil_mode"],
                                                      p["count_include_pad"], p["divisor_override"]), shape, s))]
        if k == "adaptive_avgpool":
            return [(src, _vjp(lambda z: F.adaptive_avg_pool2d(z, p["output_size"]), shape, s))]
        if k == "pad":
            value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", 0)
            return [(src, _vjp(lambda z: F.pad(z, p["pad"], "constant", value or 0), shape, s))]
        if k == "index":
            return [(src, _vjp(lambda z: z[p["index"]], shape, s))]
        if k == "permute":
            return [(src, _vjp(lambda z: getattr(z, "permute" if str(n.target) == "permute" or n.target is
                                                  torch.permute else "transpose")(*n.args[1:]), shape, s))]
        if k == "split":  # s: {piece index: signal}; the pieces no one sent back are zero
            shapes = self.g.pieces[n]
            parts = [s.get(i, None) for i in range(len(shapes))]
            ref = next(t for t in parts if t is not None)
            parts = [t if t is not None else ref.new_zeros((ref.shape[0], *sh[1:]))
                     for t, sh in zip(parts, shapes)]
            return [(src, torch.cat(parts, dim=op.params["dim"]))]
        if k in ("meta", "get_attr"):
            return []
        raise AtlasError(f"cannot project: {op.what or k} at {op.where} has no DeconvNet rule")

    def _relu(self, op: Op, n: fx.Node, s: torch.Tensor, single: bool, win) -> torch.Tensor:
        k = op.kind
        if k == "leaky":
            out = F.leaky_relu(s, op.params["slope"])
        else:  # a signal no other node holds (an add hands one tensor to each summand) is rectified in place
            out = s.clamp(min=0) if id(s) in self.shared else s.clamp_(min=0)
        if self.method == "guided":
            oy, ox, h, w = win
            x = _gather(self.masks[n], self.img, oy, ox, h, w, self.chan if single else None).to(s.device, s.dtype)
            if k == "relu":
                slope = (x > 0).to(s.dtype)
            elif k == "relu6":
                slope = ((x > 0) & (x < op.params["max"])).to(s.dtype)
            else:
                slope = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, op.params["slope"]))
            out = out * slope
        return out

    def _unpool(self, op: Op, n: fx.Node, s: torch.Tensor, win) -> torch.Tensor:
        """Each value to the position that won its window, inside the input's window; overlapping
        windows add. A switch outside the input's window lies outside the unit's field, where the
        signal is zero: where it is sent does not matter (clamped)."""
        name = self.pool_name[n]
        sw = self.switches.get(name)
        if sw is None:
            raise AtlasError(f"projection needs the switches of {name}")
        oy, ox, h, w = win
        idx = _gather(sw, self.img, oy, ox, h, w).to(s.device)
        ny, nx, hn, wn = self.win[op.inputs[0]]
        H, W = self.lmap.shapes[op.inputs[0]][2:]
        B, C = s.shape[0], s.shape[1]
        # flat index over the input map -> (row, column) -> index inside the input's window, in floating
        # point (vectorised and faster than integer division on CPU; exact while H * W < 2**24)
        ft = torch.float32 if H * W < (1 << 24) else torch.float64
        q = idx.to(ft)
        iy = torch.floor((q + 0.5) * (1.0 / W))
        ix = q - iy * W
        ly = (iy - ny.to(s.device, ft).view(B, 1, 1, 1)).clamp_(0, hn - 1)
        lx = (ix - nx.to(s.device, ft).view(B, 1, 1, 1)).clamp_(0, wn - 1)
        local = ly.mul_(wn).add_(lx).to(torch.int64).view(B, C, h * w)
        out = s.new_zeros((B, C, hn * wn))
        out.scatter_add_(2, local, s.reshape(B, C, h * w))
        return out.view(B, C, hn, wn)


def _bn_scale(op: Op) -> torch.Tensor:
    """gamma / sqrt(running_var + eps), in float64."""
    m = op.params.get("module")
    if m is not None:
        var, w, eps = m.running_var, m.weight, m.eps
    else:
        _, var, w, _ = op.params["functional"]
        eps = op.params["eps"]
    scale = torch.rsqrt(var.detach().to(torch.float64) + eps)
    if w is not None:
        scale = scale * w.detach().to(torch.float64)
    return scale


def _transposed_weights(lmap, dtype: torch.dtype) -> tuple[dict, set]:
    """Each conv's filter as the way down uses it: channels-last (the transposed convolution runs 2-3x
    faster so on CPU), with the scale of a BatchNorm that only it feeds folded in (one multiply per
    filter instead of one per signal); and the BatchNorms so folded. Cached on the layer map."""
    cache = lmap.__dict__.setdefault("_deconv_weights", {})
    p = next(lmap.model.parameters())
    key = (dtype, p.device, id(p), p._version)
    if key in cache:
        return cache[key]
    g = lmap.graph
    weights, folded, raw = {}, set(), {}
    for n in g.nodes:
        op = g.ops[n]
        if op.kind != "conv":
            continue
        w = op.params["weight"].detach().to(torch.float64)
        users = list(n.users)
        if len(users) == 1 and g.ops[users[0]].kind == "bn" and users[0].all_input_nodes == [n]:
            bn = g.ops[users[0]]
            if not (bn.params.get("module") is not None and bn.params["module"].running_var is None):
                raw[n] = w.to(dtype).contiguous(memory_format=torch.channels_last)
                w = w * _bn_scale(bn).view(-1, 1, 1, 1)
                folded.add(users[0])
        weights[n] = w.to(dtype).contiguous(memory_format=torch.channels_last)
    cache.clear()
    cache[key] = (weights, folded, raw)
    return weights, folded, raw


def _chunk(lmap, layer, n: int, budget: int = 64 << 20) -> int:
    """Requests per batch so that the signals alive at once stay near `budget` floats: going down keeps
    alive what the forward keeps (a block's input until its last user is done), on windows no larger
    than the maps; twice the forward's peak bounds it with a rule's temporaries."""
    return max(1, min(n, 1024, budget // max(2 * lmap.peak_floats, 1)))


def project_graph(lmap, reqs: Sequence[Request], groups: dict[str, list[int]],
                  switches: dict[str, torch.Tensor] | None, *, activations: dict[str, torch.Tensor] | None = None,
                  mode: str = "unit", method: str = "deconvnet", masks: dict | None = None,
                  norm: str = "identity", norm_inputs: dict | None = None,
                  batch_size: int | None = None) -> Projections:
    """The engine behind `atlas.deconv.project`, which checks the options and the requests and groups
    them by layer (`groups`: layer -> request indices)."""
    p = next(lmap.model.parameters())
    device, dtype = p.device, p.dtype
    S = lmap.image_size
    for name in groups:
        check_graph(lmap, name)
    windows: list = [None] * len(reqs)
    origins: list = [None] * len(reqs)
    meta: list = [None] * len(reqs)
    with torch.no_grad():
        for name, idxs in groups.items():
            layer = lmap.by_name[name]
            top = lmap.read_node[name]
            bs = batch_size or _chunk(lmap, layer, len(idxs))
            for start in range(0, len(idxs), bs):
                part = [reqs[j] for j in idxs[start:start + bs]]
                B = len(part)
                img = torch.tensor([r.image for r in part])
                chan = torch.tensor([r.channel for r in part])
                values, map_max = [], []
                if mode == "unit":
                    for r in part:
                        if r.value is not None:
                            values.append(float(r.value))
                        elif activations is not None and name in activations:
                            values.append(float(activations[name][r.image, r.channel, r.y, r.x]))
                        else:
                            raise AtlasError(f"projection of {name} channel {r.channel}: unit mode needs the "
                                             "activation's value (Request.value) or the layer's activations")
                        map_max.append(None)
                    seed = torch.tensor(values, device=device, dtype=dtype).view(B, 1, 1, 1)
                    ys, xs = torch.tensor([r.y for r in part]), torch.tensor([r.x for r in part])
                    box = (ys, ys, xs, xs)
                else:
                    if activations is None or name not in activations:
                        raise AtlasError(f"map mode projection of {name} needs the layer's activations "
                                         "(use project_images)")
                    act = activations[name]
                    seed = act[img.to(act.device), chan.to(act.device)].to(device=device, dtype=dtype).unsqueeze(1)
                    for b, r in enumerate(part):
                        values.append(float(seed[b, 0, r.y, r.x]))
                        map_max.append(float(seed[b].max()))
                    z = torch.zeros(B, dtype=torch.long)
                    box = (z, z + layer.height - 1, z, z + layer.width - 1)
                down = _Down(lmap, method, switches, img, chan, masks, dtype, norm, norm_inputs)
                out, oy, ox = down.run(top, seed, box)
                for b, r in enumerate(part):
                    j = idxs[start + b]
                    windows[j] = out[b]
                    origins[j] = (int(oy[b]), int(ox[b]))
                    bx = layer.box(r.y, r.x, S) if mode == "unit" else (0, 0, S, S)
                    meta[j] = {"mode": mode, "norm": norm, "method": method, "layer": name,
                               "channel": r.channel, "y": r.y, "x": r.x, "image": r.image, "value": values[b],
                               "map_max": map_max[b], "box": bx, "rf_box": layer.field_box(r.y, r.x, S)}
    return Projections(mode, norm, S, meta, windows, origins)


def record_graph(lmap, x: torch.Tensor, names: list[str], guided: bool = False, norm_inputs: bool = False):
    """One forward pass over images x: the switches of every pool, the layers' activations and, for
    guided backpropagation, each ReLU's input (its on/off pattern) below the layers; for
    norm='gradient', each contrast normalisation's input."""
    from .requests import ForwardRecord

    g = lmap.graph
    want = {lmap.read_node[n] for n in names}
    below = set().union(*(lmap._ancestors(nd) for nd in want)) if want else set()
    last = max(g.position[nd] for nd in want)
    pools = {lmap.pool_node[p.name] for p in lmap.pools if p.index <= last}
    relus: dict[fx.Node, torch.Tensor] = {}
    norms: dict[fx.Node, torch.Tensor] = {}

    def keep(op: Op, args) -> None:
        if op.node in below:
            if guided and op.kind in RELU_KINDS:
                relus[op.node] = args[0]
            elif norm_inputs and op.kind == "lrn":
                norms[op.node] = args[0]

    p = next(lmap.model.parameters())
    with torch.no_grad():
        vals, swn = g.run(x.to(device=p.device, dtype=p.dtype), want, pools, keep=keep)
    node_name = {v: k for k, v in lmap.pool_node.items()}
    return ForwardRecord({node_name[nd]: idx for nd, idx in swn.items()},
                         {n: vals[lmap.read_node[n]] for n in names}, norms, relus if guided else None)
