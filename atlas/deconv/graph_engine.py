"""DeconvNet (and guided backpropagation) on a graph: the engine for every model atlas/graph_layers.py
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
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import AtlasError
from ..graph import RELU_KINDS, Op
from .requests import Projections, Request

# ops with a rule going down (see the module docstring); "placeholder" is the image
RULES = {"conv", "relu", "relu6", "leaky", "maxpool", "bn", "avgpool", "adaptive_avgpool", "mean", "lrn", "add",
         "cat", "reshape", "permute", "pad", "index", "linear", "scale", "pass", "placeholder", "meta", "get_attr",
         "split", "piece"}
METHODS = ("deconvnet", "guided")
# rules whose output is a new tensor of the engine's own
# (a transpose by autograd -- permute, index, pad, mean -- may return a view of its signal: not here)
_FRESH = {"conv", "maxpool", "linear", "avgpool", "adaptive_avgpool", "scale", "relu", "relu6", "leaky"}


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


class _Down:
    """One batch of requests on one layer, going down."""

    def __init__(self, lmap, method: str, switches: dict[str, torch.Tensor] | None, img: torch.Tensor,
                 masks: dict[fx.Node, torch.Tensor] | None, dtype: torch.dtype):
        self.lmap, self.g = lmap, lmap.graph
        self.method, self.switches, self.img, self.masks = method, switches or {}, img, masks or {}
        self.pool_name = {v: k for k, v in lmap.pool_node.items()}
        self.weights, self.folded, self.raw = _transposed_weights(lmap, dtype)
        self.top = None

    def shape(self, node: fx.Node, b: int) -> tuple[int, ...]:
        return (b, *self.lmap.shapes[node][1:])

    def run(self, top: fx.Node, seed: torch.Tensor) -> torch.Tensor:
        g = self.g
        self.top = top
        order = self.lmap.down_order(top)
        sig: dict[fx.Node, torch.Tensor] = {top: seed}
        # ids of the signals no one else holds: a ReLU may rectify those in place (an add hands one
        # tensor to both summands, a split or a reshape gives views: those are never in here)
        fresh: set[int] = set()
        image = None
        for n in order:
            s = sig.pop(n, None)
            if s is None:
                continue
            self.own = id(s) in fresh
            fresh.discard(id(s))
            op = g.ops[n]
            if op.kind == "placeholder":
                image = s if image is None else image + s
                continue
            if op.kind == "piece":  # a piece of a split goes back to its place among the split's outputs
                got = sig.setdefault(op.inputs[0], {})
                i = op.params["index"] % len(self.g.pieces[op.inputs[0]])  # chunk(...)[-1] is the last
                got[i] = s if i not in got else got[i] + s
                continue
            outs = self.down(op, n, s)
            new = op.kind in _FRESH or (op.kind in ("pass", "lrn", "bn") and self.own and len(outs) == 1
                                         and outs[0][1] is s)
            for src, t in outs:
                if src in sig:
                    fresh.discard(id(sig[src]))
                    t, new_t = sig[src] + t, True
                else:
                    # what a rule made is its own unless it shares the signal's memory (a view of it)
                    new_t = new and (t is s or t.untyped_storage().data_ptr() != s.untyped_storage().data_ptr())
                sig[src] = t
                if new_t:
                    fresh.add(id(t))
        if image is None:  # the layer does not depend on the image (cannot happen for a conv net)
            image = seed.new_zeros((seed.shape[0], *self.lmap.shapes[order[-1]][1:]))
        return image

    def down(self, op: Op, n: fx.Node, s: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
        k, p = op.kind, op.params
        b = s.shape[0] if isinstance(s, torch.Tensor) else next(iter(s.values())).shape[0]
        src = op.inputs[0] if op.inputs else None
        if k == "conv":  # the top conv is read at its own output: the BN after it is not on the way down
            w = self.raw[n] if n is self.top and n in self.raw else self.weights[n]
            return [(src, _conv_down(s, w, p, self.shape(src, b)))]
        if k in RELU_KINDS:
            return [(src, self._relu(op, n, s))]
        if k == "maxpool":
            return [(src, self._unpool(op, n, s))]
        if k == "bn":
            if n in self.folded:  # its scale is in the conv's transposed filter below
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
        if k == "mean":
            shape = self.shape(src, b)
            return [(src, _vjp(lambda z: z.mean(dim=p["dims"], keepdim=p["keepdim"]), shape, s))]
        if k == "avgpool":
            shape = self.shape(src, b)
            return [(src, _vjp(lambda z: F.avg_pool2d(z, p["kernel"], p["stride"], p["padding"], p["ceil_mode"],
                                                      p["count_include_pad"], p["divisor_override"]), shape, s))]
        if k == "adaptive_avgpool":
            shape = self.shape(src, b)
            return [(src, _vjp(lambda z: F.adaptive_avg_pool2d(z, p["output_size"]), shape, s))]
        if k == "pad":
            shape = self.shape(src, b)
            value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", 0)
            return [(src, _vjp(lambda z: F.pad(z, p["pad"], "constant", value or 0), shape, s))]
        if k == "index":
            shape = self.shape(src, b)
            return [(src, _vjp(lambda z: z[p["index"]], shape, s))]
        if k == "permute":
            shape = self.shape(src, b)
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

    def _relu(self, op: Op, n: fx.Node, s: torch.Tensor) -> torch.Tensor:
        k = op.kind
        if k == "leaky":
            out = F.leaky_relu(s, op.params["slope"])
        else:
            out = s.clamp_(min=0) if self.own else s.clamp(min=0)
        if self.method == "guided":
            x = self.masks[n][self.img.to(self.masks[n].device)].to(s.device, s.dtype)
            if k == "relu":
                slope = (x > 0).to(s.dtype)
            elif k == "relu6":
                slope = ((x > 0) & (x < op.params["max"])).to(s.dtype)
            else:
                slope = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, op.params["slope"]))
            out = out * slope
        return out

    def _unpool(self, op: Op, n: fx.Node, s: torch.Tensor) -> torch.Tensor:
        name = self.pool_name[n]
        sw = self.switches.get(name)
        if sw is None:
            raise AtlasError(f"projection needs the switches of {name}")
        idx = sw[self.img.to(sw.device)].to(s.device)
        B, C = s.shape[0], s.shape[1]
        H, W = self.lmap.shapes[op.inputs[0]][2:]
        out = s.new_zeros((B, C, H * W))
        out.scatter_add_(2, idx.reshape(B, C, -1), s.reshape(B, C, -1))
        return out.view(B, C, H, W)


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


def _conv_down(s: torch.Tensor, w: torch.Tensor, p: dict, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The transposed convolution of signal s back to the conv's input shape (no bias)."""
    (sh, sw), (ph, pw), (dh, dw) = p["stride"], p["padding"], p["dilation"]
    kh, kw = w.shape[-2:]
    full_h = (s.shape[2] - 1) * sh - 2 * ph + dh * (kh - 1) + 1
    full_w = (s.shape[3] - 1) * sw - 2 * pw + dw * (kw - 1) + 1
    s = s.contiguous(memory_format=torch.channels_last)
    return F.conv_transpose2d(s, w, None, (sh, sw), (ph, pw), (in_shape[2] - full_h, in_shape[3] - full_w),
                              p["groups"], (dh, dw))


def _chunk(lmap, layer, n: int, budget: int = 64 << 20) -> int:
    """Requests per batch so that the signals alive at once stay near `budget` floats."""
    node = lmap.read_node[layer.name]
    per = sum(int(torch.Size(lmap.shapes[a][1:]).numel()) for a in lmap._ancestors(node) if a in lmap.shapes)
    # not every level is alive at once: a third of the sum is a generous bound for chains and blocks
    return max(1, min(n, 1024, budget // max(per // 3, 1)))


def project_graph(lmap, reqs: Sequence[Request], groups: dict[str, list[int]],
                  switches: dict[str, torch.Tensor] | None, *, activations: dict[str, torch.Tensor] | None = None,
                  mode: str = "unit", method: str = "deconvnet", masks: dict[fx.Node, torch.Tensor] | None = None,
                  batch_size: int | None = None) -> Projections:
    """The graph engine behind `atlas.deconv.project`, which checks the options and the requests and
    groups them by layer (`groups`: layer -> request indices)."""
    p = next(lmap.model.parameters())
    device, dtype = p.device, p.dtype
    S = lmap.image_size
    for name in groups:
        check_graph(lmap, name)
    windows: list = [None] * len(reqs)
    meta: list = [None] * len(reqs)
    sw = switches
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
                seed = torch.zeros((B, layer.channels, layer.height, layer.width), device=device, dtype=dtype)
                values, map_max = [], []
                if mode == "unit":
                    for b, r in enumerate(part):
                        if r.value is not None:
                            v = float(r.value)
                        elif activations is not None and name in activations:
                            v = float(activations[name][r.image, r.channel, r.y, r.x])
                        else:
                            raise AtlasError(f"projection of {name} channel {r.channel}: unit mode needs the "
                                             "activation's value (Request.value) or the layer's activations")
                        seed[b, r.channel, r.y, r.x] = v
                        values.append(v)
                        map_max.append(None)
                else:
                    if activations is None or name not in activations:
                        raise AtlasError(f"map mode projection of {name} needs the layer's activations "
                                         "(use project_images)")
                    act = activations[name]
                    maps = act[img.to(act.device), chan.to(act.device)].to(device=device, dtype=dtype)
                    seed[torch.arange(B), chan.to(device)] = maps
                    for b, r in enumerate(part):
                        values.append(float(maps[b, r.y, r.x]))
                        map_max.append(float(maps[b].max()))
                out = _Down(lmap, method, sw, img, masks, dtype).run(top, seed)
                for b, r in enumerate(part):
                    j = idxs[start + b]
                    windows[j] = out[b]
                    box = layer.box(r.y, r.x, S) if mode == "unit" else (0, 0, S, S)
                    meta[j] = {"mode": mode, "norm": "identity", "method": method, "layer": name,
                               "channel": r.channel, "y": r.y, "x": r.x, "image": r.image, "value": values[b],
                               "map_max": map_max[b], "box": box, "rf_box": layer.field_box(r.y, r.x, S)}
    return Projections(mode, "identity", S, meta, windows, [(0, 0)] * len(reqs))


def record_graph(lmap, x: torch.Tensor, names: list[str], guided: bool = False):
    """One forward pass over images x: the switches of every pool, the layers' activations and, for
    guided backpropagation, each ReLU's input (its on/off pattern) below the layers."""
    from .requests import ForwardRecord

    g = lmap.graph
    want = {lmap.read_node[n] for n in names}
    below = set().union(*(lmap._ancestors(nd) for nd in want)) if want else set()
    last = max(g.position[nd] for nd in want)
    pools = {lmap.pool_node[p.name] for p in lmap.pools if p.index <= last}
    inputs: dict[fx.Node, torch.Tensor] = {}

    def keep(op: Op, args) -> None:
        if guided and op.kind in RELU_KINDS and op.node in below:
            inputs[op.node] = args[0]

    p = next(lmap.model.parameters())
    with torch.no_grad():
        vals, swn = g.run(x.to(device=p.device, dtype=p.dtype), want, pools, keep=keep)
    node_name = {v: k for k, v in lmap.pool_node.items()}
    return ForwardRecord({node_name[nd]: idx for nd, idx in swn.items()},
                         {n: vals[lmap.read_node[n]] for n in names}, {}, inputs if guided else None)
