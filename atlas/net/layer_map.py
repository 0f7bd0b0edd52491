"""Layers of a graph model (ResNet, DenseNet, GoogLeNet, timm, a user's module): names, geometry, extraction.

`atlas.net.LayerMap(model, size)` gives a `GraphLayerMap` for every model that is not a plain Sequential of
Conv2d / ReLU / MaxPool2d (atlas/net/__init__.py keeps that walk and its names, conv1..conv5, for the
2012-2014 nets). The same interface: `layers`, `resolve`, `extract`, `pools`, `describe`.

Names are module paths, as users know them (`layer3.1`, `features.denseblock3`, `inception4a`); a
module called more than once gets `_1`, `_2` for its later calls. Every module call whose output is a
feature map (or, for Linear, a vector) is a candidate layer. A leaf that a ReLU follows (a conv, its
BatchNorm) is read after that ReLU; a block (a residual block, a dense block, an inception module) is
read at its output, as it is: after its last ReLU for a ResNet block, the concatenation for a dense
block or an inception module (there the values are not rectified after the last BatchNorm, so "fire
rate", the share of images whose maximum is above zero, counts images, not ReLU firings).

Default layers, each stage's output: the end of the stem (the last leaf before the first block), then
of the blocks, the last one at each spatial resolution -- for a ResNet `maxpool, layer1..layer4`, a
DenseNet `features.pool0, features.denseblock1..4`, a GoogLeNet `conv1, conv3, inception3b, inception4e,
inception5b`. A model with no blocks (VGG-BN) gets the last conv of each resolution.

Geometry is exact for graphs: along each axis a unit i of a node reads input pixels
[i * jump + lo, i * jump + hi]; each op composes (jump, lo, hi), and where branches meet (a residual
add, a concatenation) the field is their union. A field need not be centred on its unit. A node whose
field is not of this form (after a global pool, a gate computed from the whole map) sees the whole image.
"""
from __future__ import annotations

from dataclasses import asdict
from functools import cached_property

import torch
import torch.fx as fx
from torch import nn

from .graph import POINTWISE_KINDS, RELU_KINDS, SPATIAL_KINDS, Graph, Op, _pairs, check_against_eager, trace
from .graph import shapes as probe_shapes
from .layer_base import Geometry, Layer, LayerMapBase, Pool

Axis = tuple[int, int, int]           # (jump, lo, hi) along one axis
Field = tuple[Axis, Axis] | None      # (y, x); None: the whole image


def _compose(f: Field, op: Op) -> Field:
    """The field of op's output from the field of its (single) input."""
    if f is None:
        return None
    p = op.params
    out = []
    for axis, (j, lo, hi) in enumerate(f):
        k, s, pad, d = p["kernel"][axis], p["stride"][axis], p["padding"][axis], p["dilation"][axis]
        out.append((j * s, lo - pad * j, hi + (d * (k - 1) - pad) * j))
    return tuple(out)


def _union(fields: list[Field]) -> Field:
    if any(f is None for f in fields) or not fields:
        return None
    ys, xs = [f[0] for f in fields], [f[1] for f in fields]
    if len({a[0] for a in ys}) != 1 or len({a[0] for a in xs}) != 1:
        return None  # branches at different strides: no per-unit box of this form
    return ((ys[0][0], min(a[1] for a in ys), max(a[2] for a in ys)),
            (xs[0][0], min(a[1] for a in xs), max(a[2] for a in xs)))


class GraphLayerMap(LayerMapBase):
    """LayerMap for a traced graph (see the module docstring)."""

    def __init__(self, model: nn.Module, image_size: int):
        self.aliases: dict[str, str] = {}
        self.model = model
        self.image_size = image_size
        self.graph: Graph = trace(model)
        self.shapes = probe_shapes(self.graph, image_size)
        g = self.graph
        self.geoms: dict[int, Geometry] = {}  # a chain net's features index -> that conv's or pool's geometry
        self.read_node: dict[str, fx.Node] = {}
        self.layers: list[Layer] = []
        self.pools: list[Pool] = []
        self.pool_node: dict[str, fx.Node] = {}
        self._fields = self._fields_from(g.nodes[0] if g.nodes else None)
        names = self._candidates()
        for name, node, read, kind in names:
            shape = self.shapes[read]
            if kind == "conv":
                f = self._fields.get(read)
                layer = Layer(name, "conv", g.position[node], g.position[read], int(shape[1]), int(shape[2]),
                              int(shape[3]), self._geometry(f, int(shape[2])))
                layer.rf = f
            else:
                layer = Layer(name, "fc", g.position[node], g.position[read], int(shape[1]))
            self.layers.append(layer)
            self.read_node[name] = read
        self._name_pools()
        for layer in self.layers:
            if layer.kind == "conv":
                below = self._ancestors(self.read_node[layer.name])
                layer.pools_below = [p.name for p in self.pools if self.pool_node[p.name] in below]
        # the 2012-2014 nets keep the names their atlases were built with (conv1.., fc6.., pool1..)
        self.chain = _runs_as_a_chain(model, g)
        self.chain_read_at: dict[str, int] = {}  # chain layer -> the features index read (occlusion's walk)
        if self.chain:
            self._chain_names()
        self.by_name = {la.name: la for la in self.layers}
        self.pool_by_name = {p.name: p for p in self.pools}
        convs = [la for la in self.layers if la.kind == "conv"]
        self.feature_channels = convs[-1].channels if convs else 3

    def _chain_names(self) -> None:
        """A chain net's layers as its atlases name them: the i-th Conv2d of `features` is `conv{i}` (read
        after its ReLU, its own kernel, stride and padding beside its field), the classifier's Linear
        layers continue the count (`fc6`..), a max-pool is named after the conv before it (`pool1`); only
        these are layers. Each layer's module path stays an alias (`resolve("features.0")` is conv1)."""
        g, feats = self.graph, self.model.features
        by_path = {la.name: la for la in self.layers}
        pool_by_path = {p.name: p for p in self.pools}
        renamed: dict[str, str] = {}
        layers, nconv = [], 0
        for i, m in enumerate(feats):
            path = f"features.{i}"
            op = next((o for o in g.ops.values() if o.node.op == "call_module" and o.node.target == path), None)
            if op is not None and isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                k, st, pad = op.params["kernel"][0], op.params["stride"][0], op.params["padding"][0]
                ins, out = self.shapes[op.inputs[0]], self.shapes[op.node]
                f = self._fields.get(op.node)
                (j, lo, hi) = f[0]
                self.geoms[i] = Geometry(k, st, pad, int(ins[2]), int(out[2]), hi - lo + 1, j, lo)
            if isinstance(m, nn.Conv2d) and path in by_path:
                nconv += 1
                la = by_path[path]
                renamed[path] = la.name = f"conv{nconv}"
                la.geometry, la.rf = self.geoms[i], None  # a square field, centred as the walk had it
                nxt = feats[i + 1] if i + 1 < len(feats) else None
                self.chain_read_at[la.name] = i + 1 if isinstance(nxt, nn.ReLU) else i
                layers.append(la)
            elif isinstance(m, nn.MaxPool2d) and path in pool_by_path:
                renamed[path] = pool_by_path[path].name = f"pool{nconv}"
        nfc = nconv
        for i, m in enumerate(getattr(self.model, "classifier", None) or []):
            path = f"classifier.{i}"
            if isinstance(m, nn.Linear) and path in by_path:
                nfc += 1
                renamed[path] = by_path[path].name = f"fc{nfc}"
                layers.append(by_path[path])
        self.layers = layers
        self.aliases = {old: new for old, new in renamed.items()}
        self.read_node = {renamed.get(k, k): v for k, v in self.read_node.items() if renamed.get(k, k) != k}
        self.pool_node = {renamed.get(k, k): v for k, v in self.pool_node.items()}
        for la in layers:
            la.pools_below = [renamed.get(p, p) for p in la.pools_below]

    # -- candidates --------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, fx.Node, fx.Node, str]]:
        g = self.graph
        out, named = [], set()
        leaf_paths = {n.target for n in g.nodes if n.op == "call_module"}
        for name, node in g.calls:
            shape = self.shapes.get(node)
            if shape is None:
                continue
            op = g.ops[node]
            if len(shape) == 4:
                base = name.rsplit("_", 1)[0] if name not in leaf_paths and name.rsplit("_", 1)[0] in leaf_paths \
                    else name
                read = self._after_relu(node) if base in leaf_paths else node
                out.append((name, node, read, "conv"))
            elif len(shape) == 2 and op.kind == "linear":
                out.append((name, node, self._after_relu(node), "fc"))
            named.add(node)
        for node in g.nodes:  # a ReLU applied in forward itself (DenseNet's last F.relu) has no module name
            op = g.ops[node]
            if op.kind in RELU_KINDS and node not in named and len(self.shapes.get(node, ())) == 4 \
                    and node.name not in {n for n, *_ in out}:
                out.append((node.name, node, node, "conv"))
        out.sort(key=lambda t: (g.position[t[2]], g.position[t[1]]))
        return out

    def _after_relu(self, node: fx.Node) -> fx.Node:
        """The ReLU that a leaf's output goes through, through BatchNorm / Dropout / Identity, if any."""
        g, cur = self.graph, node
        for _ in range(8):
            users = list(cur.users)
            if len(users) != 1:
                return node
            nxt = users[0]
            kind = g.ops[nxt].kind
            if kind in RELU_KINDS:
                return nxt
            if kind not in ("bn", "pass", "scale"):
                return node
            cur = nxt
        return node

    def _name_pools(self) -> None:
        g = self.graph
        by_node: dict[fx.Node, str] = {}
        for name, node in g.calls:
            by_node.setdefault(node, name)
        for node in g.nodes:
            op = g.ops[node]
            if op.kind != "maxpool":
                continue
            name = by_node.get(node, node.name)
            p = op.params
            src = self.shapes[op.inputs[0]]
            out = self.shapes[node]
            if len(set(p["kernel"])) != 1 or len(set(p["stride"])) != 1 or len(set(p["padding"])) != 1 \
                    or tuple(p["dilation"]) != (1, 1) or src[2] != src[3] or out[2] != out[3]:
                # the switch encoding is for square pools on square maps: this one keeps its geometry
                # (fields), and projections through it are refused in one line
                op.kind, op.what = "opaque", f"a non-square or dilated max-pool (kernel {p['kernel']})"
                op.params["spatial"] = True
                continue
            k, s, pad = p["kernel"][0], p["stride"][0], p["padding"][0]
            f = self._fields.get(node)
            rf, jump, off = (f[0][2] - f[0][1] + 1, f[0][0], f[0][1]) if f else (self.image_size, 1, 0)
            geom = Geometry(k, s, pad, int(src[2]), int(out[2]), rf, jump, off)
            self.pools.append(Pool(name, g.position[node], int(out[1]), geom, p["ceil_mode"]))
            self.pool_node[name] = node

    # -- geometry ------------------------------------------------------------------
    def _fields_from(self, start: fx.Node | None) -> dict[fx.Node, Field]:
        """Each node's field (see the module docstring), in the coordinates of `start`'s output."""
        g = self.graph
        out: dict[fx.Node, Field] = {}
        if start is None:
            return out
        ident = ((1, 0, 0), (1, 0, 0))
        pos0 = g.position[start]
        for node in g.nodes[pos0:]:
            if node is start:
                out[node] = ident
                continue
            op = g.ops[node]
            srcs = [a for a in op.inputs if a in out]
            if not srcs:
                continue
            f = self._field_of(op, node, srcs, out)
            out[node] = f
        return out

    def _field_of(self, op: Op, node: fx.Node, srcs: list[fx.Node], fields) -> Field:
        shape = self.shapes.get(node)
        if op.kind in SPATIAL_KINDS:
            return _compose(fields[srcs[0]], op)
        if op.params.get("spatial"):  # a convolution without a DeconvNet rule: its geometry all the same
            return self._opaque_conv_field(op, fields[srcs[0]], srcs[0], node)
        if op.kind in POINTWISE_KINDS or op.kind in ("add", "cat"):
            return _union([fields[s] for s in srcs])
        if op.kind == "adaptive_avgpool" and shape is not None and len(shape) == 4:
            src = self.shapes[srcs[0]]
            if src[2:] == shape[2:]:
                return fields[srcs[0]]
            if src[2] % shape[2] == 0 and src[3] % shape[3] == 0:
                kh, kw = src[2] // shape[2], src[3] // shape[3]
                fake = Op(node, "avgpool", "", srcs, {"kernel": (kh, kw), "stride": (kh, kw), "padding": (0, 0),
                                                       "dilation": (1, 1)})
                return _compose(fields[srcs[0]], fake)
            return None
        if op.kind == "pad":
            f = fields[srcs[0]]
            pad = op.params["pad"]
            if f is None or len(pad) < 4:
                return f if len(pad) < 2 or f is None else ((f[0]), (f[1][0], f[1][1] - pad[0] * f[1][0],
                                                                      f[1][2] - pad[0] * f[1][0]))
            (jy, ly, hy), (jx, lx, hx) = f
            return ((jy, ly - pad[2] * jy, hy - pad[2] * jy), (jx, lx - pad[0] * jx, hx - pad[0] * jx))
        # any other op that keeps the spatial shape of its inputs (an activation, a gate) reads the
        # union of their fields; a field from the whole map (a gate's pooled input) makes it the image
        if shape is not None and len(shape) == 4 and all(len(self.shapes.get(s, ())) == 4 for s in srcs):
            if all(self.shapes[s][2:] == shape[2:] or self.shapes[s][2:] == (1, 1) for s in srcs):
                return _union([fields[s] if self.shapes[s][2:] == shape[2:] else None for s in srcs])
        return None

    def _opaque_conv_field(self, op: Op, f: Field, src: fx.Node, node: fx.Node) -> Field:
        p = dict(op.params)
        if "kernel" not in p:
            w = self.shapes.get(p.get("weight_node"))
            if w is None:
                return None
            p["kernel"] = tuple(int(k) for k in w[-2:])
        if "padding" not in p:
            pad = p.get("pad_arg", 0)
            if pad == "valid":
                pad = 0
            if isinstance(pad, str):  # 'same' at stride 1: whatever keeps the size, put where PyTorch puts it
                total = [d * (k - 1) for k, d in zip(p["kernel"], p["dilation"])]
                p["padding"] = tuple(t // 2 for t in total)
            else:
                p["padding"] = _pairs(pad)
        return _compose(f, Op(node, "conv", "", [src], p))

    def _geometry(self, f: Field, out_size: int) -> Geometry:
        if f is None:
            return Geometry(self.image_size, 1, 0, self.image_size, out_size, self.image_size, 0, 0)
        (j, lo, hi) = f[0]
        return Geometry(hi - lo + 1, j, -lo, self.image_size, out_size, hi - lo + 1, j, lo)

    def _ancestors(self, node: fx.Node) -> frozenset[fx.Node]:
        """The node and everything it is computed from (memoised: the engine asks per batch of requests)."""
        memo = self.__dict__.setdefault("_ancestor_memo", {})
        if node not in memo:
            seen, stack = set(), [node]
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(n.all_input_nodes)
            memo[node] = frozenset(seen)
        return memo[node]

    def down_order(self, node: fx.Node) -> list[fx.Node]:
        """`_ancestors(node)` from the node down to the image: the way a projection goes (memoised)."""
        memo = self.__dict__.setdefault("_down_memo", {})
        if node not in memo:
            memo[node] = sorted(self._ancestors(node), key=self.graph.position.__getitem__, reverse=True)
        return memo[node]

    @cached_property
    def _pool_fields(self) -> dict[str, dict[fx.Node, Field]]:
        return {p.name: self._fields_from(self.pool_node[p.name]) for p in self.pools}

    def region_below(self, layer: Layer, pool: str, y: int, x: int) -> tuple[int, int, int, int]:
        """The box (y0, x0, h, w) of `pool`'s output that unit (y, x) of `layer` reaches, clipped."""
        f = self._pool_fields[pool].get(self.read_node[layer.name])
        n = self.pool_by_name[pool].geometry.out_size
        if f is None:
            return 0, 0, n, n
        (jy, ly, hy), (jx, lx, hx) = f
        y0, y1 = max(y * jy + ly, 0), min(y * jy + hy, n - 1)
        x0, x1 = max(x * jx + lx, 0), min(x * jx + hx, n - 1)
        return y0, x0, y1 - y0 + 1, x1 - x0 + 1

    # -- lookup ----------------------------------------------------------------------
    def default_layers(self) -> list[Layer]:
        """Each stage's output (see the module docstring)."""
        model = self.model
        body_name, body = "", model
        kids = list(model.named_children())
        big = [(n, m) for n, m in kids if sum(1 for _ in m.modules()) > 0.5 * sum(1 for _ in model.modules())]
        if big and list(big[0][1].children()):
            body_name, body = big[0][0] + ".", big[0][1]
        stem, blocks = None, []
        for n, m in body.named_children():
            name = body_name + n
            la = self.by_name.get(name)
            if la is None or la.kind != "conv":
                continue
            # a block holds a convolution; a container without one (timm's BatchNormAct2d) is part of
            # the stem before the first block, and of no stage after it
            if any(isinstance(c, nn.Conv2d) for c in m.modules()) and list(m.children()):
                blocks.append(la)
            elif not blocks:
                stem = la
        if not blocks:  # a flat net (VGG-BN, a user's few convs): every convolution, as for the 2012 nets
            return [la for la in self.layers if la.kind == "conv" and self.conv_weight(la) is not None]
        chosen = [stem] if stem is not None else []
        for i, la in enumerate(blocks):
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            if nxt is None or (nxt.height, nxt.width) != (la.height, la.width):
                chosen.append(la)
        return chosen or [la for la in self.layers if la.kind == "conv"][-1:]

    @cached_property
    def peak_floats(self) -> int:
        """The most floats of one image alive at once in a whole run (`Graph.run` frees a value after its
        last user): what sizes a batch. DenseNet keeps every block's features to its concatenation."""
        g = self.graph
        remaining = {n: len(n.users) for n in g.nodes}
        size = {n: int(torch.Size(sh[1:]).numel()) for n, sh in self.shapes.items() if len(sh) > 1
                and n in g.signal}
        alive = peak = 0
        for n in g.nodes:
            alive += size.get(n, 0)
            peak = max(peak, alive)
            for a in n.all_input_nodes:
                remaining[a] -= 1
                if remaining[a] == 0:
                    alive -= size.get(a, 0)
        return peak

    @cached_property
    def conv_layers(self) -> list[Layer]:
        """The layers the analyses default to, in order: the first convolution (its filters are the
        figure 6 view) and each stage's output (`default_layers`); every candidate is in `layers`."""
        first = next((la for la in self.layers if la.kind == "conv" and self.conv_weight(la) is not None), None)
        out = ([first] if first is not None else []) + [la for la in self.default_layers() if la is not first]
        return sorted(out, key=lambda la: (la.read_at, la.index))

    def conv_weight(self, layer: Layer):
        op = self.graph.ops[self.graph.nodes[layer.index]]
        return op.params["weight"] if op.kind == "conv" else None

    def resolve(self, names, kinds: tuple[str, ...] = ("conv",)) -> list[Layer]:
        if names is None or names == "" or names == []:
            return [la for la in self.default_layers() if la.kind in kinds]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        return super().resolve([self.aliases.get(n, n) for n in names], kinds)

    def describe(self) -> dict:
        return {
            "image_size": self.image_size, "graph": True,
            "layers": [{**layer.to_row(), "pools_below": layer.pools_below} for layer in self.layers],
            "pools": [{"name": p.name, "index": p.index, "channels": p.channels, "ceil_mode": p.ceil_mode,
                       **asdict(p.geometry)} for p in self.pools],
        }

    # -- forward -----------------------------------------------------------------------
    def check_trace(self, x: torch.Tensor) -> None:
        """Once per map: the graph computes what the model computes on (two of) these images
        (graph.check_against_eager), else one line naming where they part."""
        if not self.__dict__.get("_trace_checked"):
            check_against_eager(self.graph, x[:2])
            self._trace_checked = True

    def _extract(self, x: torch.Tensor, names: list[str], pool_indices: bool = False):
        """LayerMapBase.extract, on a batch as it is: the graph run as far as the deepest node asked."""
        want: dict[fx.Node, list[str]] = {}
        for name in names:
            # a name that is both a layer and a pool (a ResNet's stem `maxpool`) is the layer
            node = self.read_node.get(name) or self.pool_node.get(name)
            if node is None:
                self.resolve([name])  # the error lists the valid layers
            want.setdefault(node, []).append(name)
        last = max((self.graph.position[nd] for nd in want), default=-1)
        pools = {self.pool_node[p.name] for p in self.pools if p.index <= last} if pool_indices else set()
        vals, sw = self.graph.run(x, set(want), pools)
        out = {}
        for node, ns in want.items():
            for name in ns:
                if name in self.read_node:
                    out[name] = vals[node]
        if pool_indices:
            node_name = {v: k for k, v in self.pool_node.items()}
            return out, {node_name[nd]: idx for nd, idx in sw.items()}
        return out


_CHAIN_MODULES = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Identity, nn.Dropout)


def _runs_as_a_chain(model: nn.Module, graph: Graph) -> bool:
    """Whether the model is a 2012-2014 net: `features` a Sequential of exactly these module types (no
    subclasses), plain convolutions, no convolution outside it, and model.forward runs features.0 ..
    features.{n-1} on its raw input, each on the previous one's output. Those keep their names."""
    feats = getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential) or not len(feats):
        return False
    for m in feats:
        if type(m) not in _CHAIN_MODULES:
            return False
        if type(m) is nn.Conv2d and (m.groups != 1 or tuple(m.dilation) != (1, 1) or isinstance(m.padding, str)
                                      or m.padding_mode != "zeros" or len(set(_pairs(m.kernel_size))) != 1
                                      or len(set(_pairs(m.stride))) != 1 or len(set(_pairs(m.padding))) != 1):
            return False
    inside = {id(m) for m in feats.modules()}
    if any(isinstance(m, nn.Conv2d) and id(m) not in inside for m in model.modules()):
        return False
    calls = [nd for nd in graph.nodes if nd.op != "get_attr"]
    n = len(feats)
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
