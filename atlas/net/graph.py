"""Any traceable CNN as a graph: every operation seen, however it is written.

`trace(model)` captures the model's forward with torch.fx and reads each node as an `Op` of a known
kind, so a ReLU is a ReLU whether it is an `nn.ReLU` module (reused or in place), `F.relu`,
`torch.relu`, `x.relu()` or `relu_`. Only torch.nn's own modules stay leaves; everything else
(torchvision.ops' Conv2dNormActivation, SqueezeExcitation, StochasticDepth, timm's BatchNormAct2d,
Conv2dSame, a user's blocks) is traced into, so nothing hides an operation.

The graph is run by our own interpreter (`Graph.run`) rather than the generated code, for three
reasons: in-place operations are run out of place (a captured value is never overwritten by a later
`relu_`), a run stops at the deepest node asked for, and max-pools can hand back their switches.

Kinds (what the DeconvNet engine and the receptive-field geometry need to know of a node):
    conv, linear, bn, relu, relu6, leaky, maxpool, avgpool, adaptive_avgpool, mean, lrn, add, cat,
    reshape, pad, scale, index, permute, pass        -- known, each with its rule going down
    opaque                                          -- anything else (GELU, SiLU, LayerNorm, a
                                                       multiplicative gate): no DeconvNet rule
"""
from __future__ import annotations

import copy
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import AtlasError
from . import lrn

RELU_KINDS = ("relu", "relu6", "leaky")
# kinds whose output may share its input's storage (a view, the same tensor): an in-place op after one
# would overwrite another node's value
_ALIASES = {"pass", "reshape", "index", "piece", "permute", "split", "meta", "opaque", "get_attr", "placeholder"}
# Kinds whose output unit (i) reads input rows [i*stride - pad, i*stride - pad + dilation*(kernel-1)].
SPATIAL_KINDS = ("conv", "maxpool", "avgpool")
POINTWISE_KINDS = ("bn", "relu", "relu6", "leaky", "lrn", "scale", "pass", "split", "piece")


@dataclass
class Op:
    """One node of the graph as the atlas reads it."""

    node: fx.Node
    kind: str
    where: str                       # the module path (or the node's name) users know it by
    inputs: list[fx.Node]            # the nodes whose tensors carry the signal through this op
    params: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None  # the leaf module, for call_module nodes
    what: str = ""                   # the operation, in words, for messages


def _pairs(v, n=2) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(a) for a in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return tuple(int(v) for _ in range(n))


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)}
_RELU6_FUNCS = {F.relu6}
_HARDTANH_FUNCS = {F.hardtanh, getattr(F, "hardtanh_", None)}
_LEAKY_FUNCS = {F.leaky_relu, getattr(F, "leaky_relu_", None)}
_CONV_FUNCS = {F.conv2d, torch.conv2d}
_MAXPOOL_FUNCS = {F.max_pool2d, torch.max_pool2d}
_AVGPOOL_FUNCS = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_ADAPTIVE_FUNCS = {F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d, torch.adaptive_avg_pool1d}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_CAT_FUNCS = {torch.cat, torch.concat}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_PASS_METHODS = {"contiguous", "clone", "detach"}
_INPLACE_FUNCS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.itruediv: operator.truediv,
                  operator.isub: operator.sub, torch.relu_: torch.relu}
for _f in ("relu_", "hardtanh_", "leaky_relu_", "elu_", "rrelu_", "threshold_"):
    if hasattr(F, _f):
        _INPLACE_FUNCS[getattr(F, _f)] = getattr(F, _f[:-1])
_RELU_FUNCS.discard(None)
_HARDTANH_FUNCS.discard(None)
_LEAKY_FUNCS.discard(None)


def _is_stochastic_depth(f) -> bool:
    """Whether `f` is torchvision.ops.stochastic_depth (an fx leaf function: identity in eval mode). Not
    imported here: torchvision's ops import torch._dynamo, seconds of every build's start-up; a model that
    calls it has imported it."""
    mod = sys.modules.get("torchvision.ops.stochastic_depth")
    return mod is not None and f is getattr(mod, "stochastic_depth", None)


class _Proxy(fx.Proxy):
    """fx's Proxy has no `__iadd__`: Python then runs `w += z` as `w = w + z`, and a tensor that `w` shares
    with another name (`w = y; w += z`, then y read) would keep its old value. These record the write."""

    def _write(self, fn, other):
        return self.tracer.create_proxy("call_function", fn, (self, other), {})

    def __iadd__(self, other):
        return self._write(operator.iadd, other)

    def __isub__(self, other):
        return self._write(operator.isub, other)

    def __imul__(self, other):
        return self._write(operator.imul, other)

    def __itruediv__(self, other):
        return self._write(operator.itruediv, other)


class _Tracer(fx.Tracer):
    """torch.nn's own modules are leaves (their forward is known); every other module is traced into.
    Each module call is recorded with the node that is its output: the layer names users know."""

    def __init__(self, notrace: tuple = ((), ())):
        super().__init__(autowrap_functions=tuple(notrace[1]))
        self.calls: list[tuple[str, fx.Node]] = []
        self._notrace = tuple(notrace[0])

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._notrace and isinstance(m, self._notrace):  # timm's own: shape-dependent inside, opaque here
            return True
        return (type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential)
                and type(m) is not nn.ModuleList)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.calls.append((self.path_of_module(m), out.node))
        return out


def _timm_notrace() -> tuple[list, list]:
    """The modules and functions timm registers as not traceable (timm's own feature extraction keeps
    them whole), when timm is imported: they stay leaves, read as opaque ops."""
    import sys

    if "timm" not in sys.modules:
        return [], []
    try:
        from timm.layers import _fx
        return list(_fx.get_notrace_modules()), list(_fx.get_notrace_functions())
    except Exception:  # noqa: BLE001 - another timm version: trace everything
        return [], []


def _where_traced(exc: BaseException) -> str:
    """The last frame of the user's code in a tracing error's traceback."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/atlas/net/graph.py" not in f.filename]
    if frames:
        f = frames[-1]
        return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()[:80]})"
    return ""


@dataclass
class Graph:
    """A traced model: its nodes in order, each read as an Op, and the module calls by name."""

    model: nn.Module
    gm: fx.GraphModule
    nodes: list[fx.Node]
    ops: dict[fx.Node, Op]
    calls: list[tuple[str, fx.Node]]         # (module path, its output node), in call order
    position: dict[fx.Node, int]
    shapes: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    pieces: dict[fx.Node, list[tuple[int, ...]]] = field(default_factory=dict)  # a split node's outputs' shapes
    signal: set = field(default_factory=set)      # the nodes that carry the image (signal_nodes)
    consts: dict = field(default_factory=dict)    # the constant tensors a signal op uses (a factor, a part)
    _runners: dict[fx.Node, Callable] = field(default_factory=dict, repr=False)
    call_paths: list[str] = field(default_factory=list)  # each call's module path, as `calls` (not unique)

    # -- running ---------------------------------------------------------------
    def run(self, x: torch.Tensor, want: set[fx.Node], switches: set[fx.Node] = frozenset(),
            replace: dict[str, Callable] | None = None, keep: Callable | None = None) -> tuple[dict, dict]:
        """Run the graph on x as far as the last node of `want`; returns ({node: value} for `want`,
        {pool node: flat argmax indices} for the max-pools in `switches` that ran).

        `replace[kind](op, x)`, when given, computes the ops of that kind instead (the autograd
        references give ReLUs their DeconvNet backward so); `keep(op, inputs)` sees each op's inputs
        before it runs (guided backprop records its masks so)."""
        last = max((self.position[n] for n in set(want) | set(switches)), default=-1)
        env: dict[fx.Node, Any] = {}
        remaining = {n: len(n.users) for n in self.nodes}
        out: dict[fx.Node, Any] = {}
        sw: dict[fx.Node, torch.Tensor] = {}
        first = True
        for node in self.nodes[:last + 1]:
            if node.op == "placeholder":  # the image; any further input takes its default
                val, first = (x if first else (node.args[0] if node.args else None)), False
            elif node.op == "output":
                break
            else:
                op = self.ops.get(node)
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                if keep is not None and op is not None:
                    keep(op, args)
                if replace is not None and op is not None and op.kind in replace:
                    val = replace[op.kind](op, args[0])
                elif node in switches:
                    val, idx = self._maxpool(op, args[0], indices=True)
                    sw[node] = idx
                else:
                    # an in-place op may overwrite its input when nothing else will read it (not asked
                    # for, no later user, not the caller's image): the model's own memory traffic
                    a0 = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
                    free = (a0 is not None and a0.op != "placeholder" and remaining[a0] == 1 and a0 not in want
                            and keep is None and not torch.is_grad_enabled()
                            and self.ops[a0].kind not in _ALIASES)
                    val = self._call(node, args, kwargs, free)
            env[node] = val
            if node in want:
                out[node] = val
                if len(out) == len(want) and not (set(switches) - set(sw)):
                    break
            for a in node.all_input_nodes:  # free what no later node needs
                remaining[a] -= 1
                if remaining[a] == 0 and a not in want:
                    env.pop(a, None)
        return out, sw

    def _maxpool(self, op: Op, x: torch.Tensor, indices: bool):
        p = op.params
        return F.max_pool2d(x, p["kernel"], p["stride"], p["padding"], p["dilation"], ceil_mode=p["ceil_mode"],
                            return_indices=indices)

    def _call(self, node: fx.Node, args, kwargs, in_place: bool = False):
        fns = self._runners.get(node)
        if fns is None:
            fns = self._runners[node] = (_runner(self.gm, node), _as_written(self.gm, node))
        return (fns[1] if in_place and fns[1] is not None else fns[0])(args, kwargs)


def _as_written(gm: fx.GraphModule, node: fx.Node) -> Callable | None:
    """How the model itself runs an in-place node (None for a node that is not in place)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return (lambda a, k: m(*a, **k)) if getattr(m, "inplace", False) else None
    if node.op == "call_method":
        name = str(node.target)
        inplace = name.endswith("_") and not name.endswith("__")
        return (lambda a, k: getattr(a[0], name)(*a[1:], **k)) if inplace else None
    if node.op == "call_function" and (node.kwargs.get("inplace") or node.target in _INPLACE_FUNCS):
        fn = node.target
        return lambda a, k: fn(*a, **k)
    return None


def _runner(gm: fx.GraphModule, node: fx.Node) -> Callable:
    """How to run one node out of place."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) is nn.LocalResponseNorm:  # torch's numbers in less time (lrn.py)
            return lambda a, k: lrn.run(m, *a, **k)
        if getattr(m, "inplace", False):
            m = copy.copy(m)  # a shallow copy shares the weights; only the flag differs
            m.inplace = False
        return lambda a, k: m(*a, **k)
    if node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return lambda a, k: obj
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.endswith("__") and name not in ("requires_grad_",):
            plain = name[:-1]
            if hasattr(torch.Tensor, plain):
                return lambda a, k: getattr(a[0], plain)(*a[1:], **k)
            return lambda a, k: getattr(a[0].clone(), name)(*a[1:], **k)  # zero_, fill_: on a copy
        return lambda a, k: getattr(a[0], name)(*a[1:], **k)
    fn = _INPLACE_FUNCS.get(node.target, node.target)
    if "inplace" in node.kwargs:
        return lambda a, k: fn(*a, **{**k, "inplace": False})
    return lambda a, k: fn(*a, **k)


def trace(model: nn.Module) -> Graph:
    """The model's graph (in eval mode); a model that cannot be traced is refused in one line."""
    was_training = model.training
    model.eval()
    try:
        tracer, g = _traced(model)
    finally:
        model.train(was_training)
    gm = fx.GraphModule(tracer.root, g)
    nodes = list(g.nodes)
    calls = unique_calls(tracer.calls)
    innermost: dict[fx.Node, str] = {}
    for name, node in calls:  # a call is recorded as it returns: a leaf before the blocks around it
        innermost.setdefault(node, name)
    _honour_in_place(gm, model)
    nodes = list(g.nodes)
    graph = Graph(model, gm, nodes, {}, calls, {n: i for i, n in enumerate(nodes)})
    graph.call_paths = [path for path, _ in tracer.calls]
    signal = signal_nodes(nodes)
    for n in nodes:
        graph.ops[n] = _read_op(gm, n, innermost.get(n) or _where(n), signal)
    graph.signal = signal
    return graph


def _where(n: fx.Node) -> str:
    """Where a functional op sits, as users know it: the module whose forward runs it (fx records the
    module stack), else the model's own forward."""
    stack = n.meta.get("nn_module_stack")
    if stack:
        path, cls = next(reversed(stack.values()))
        return f"{path} ({getattr(cls, '__name__', cls)})"
    return f"the model's forward ({n.name})"


# ops whose result may share its input's memory: a write into one is a write into the other
_VIEW_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as", "permute",
                 "transpose", "expand", "expand_as", "narrow", "select", "unfold", "t", "detach", "contiguous",
                 "split", "chunk", "unbind", "as_strided", "to", "__getitem__"}
_VIEW_FUNCS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
               torch.transpose, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.t}
_VIEW_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Flatten)


def _is_view(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_method":
        return str(n.target) in _VIEW_METHODS
    if n.op == "call_function":
        return n.target in _VIEW_FUNCS
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _VIEW_MODULES)
    return False


def _honour_in_place(gm: fx.GraphModule, model: nn.Module) -> None:
    """Make every later reader of a tensor written in place read the written value.

    torch.fx records `z.relu_()`, `x += y`, `copy_` or an in-place module as a node, but the nodes after
    it still read `z` itself, i.e. the value from before the write (the interpreter runs in-place ops out
    of place). Here each later reader of the written tensor is pointed at the write's node instead. A
    write into memory that a view shares with another node read afterwards cannot be expressed so: it is
    refused in one line naming the module and the op. (Item assignment, `x[:, :3] = y`, fails in fx's
    tracing itself, refused with its file and line by `_traced`.)"""
    g = gm.graph
    nodes = list(g.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    latest: dict[fx.Node, fx.Node] = {}   # a tensor -> the node that holds its value now
    base: dict[fx.Node, fx.Node] = {}     # a view (or an in-place result) -> the tensor whose memory it is
    signal = signal_nodes(nodes)
    for n in nodes:
        for a in list(n.all_input_nodes):
            if a in latest:
                n.replace_input_with(a, latest[a])
        a0 = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        # `h += 1` on a size is a Python int: rebound, not written (only tensors carrying the image are)
        writes = a0 is not None and _writes_in_place(gm, n) and (
            a0 in signal or n.target not in _INPLACE_FUNCS)
        if a0 is not None and (_is_view(gm, n) or writes):
            base[n] = base.get(a0, a0)
        if not writes:
            continue
        root = base.get(a0, a0)
        shared = [m for m, b in base.items() if b is root and m is not n and m is not a0] + [root]
        later = [m for m in shared if m is not a0 and any(pos[u] > pos[n] for u in m.users)]
        if later and (_is_view(gm, a0) or any(_is_view(gm, m) for m in later)):
            what = str(n.target) if n.op != "call_module" else type(gm.get_submodule(n.target)).__name__
            where = _where(n) if n.op != "call_module" else str(n.target)
            raise AtlasError(f"cannot trace model {type(model).__name__}: the in-place {what} at {where} writes "
                             f"into memory that {later[0].name} shares and is read afterwards (a view and its "
                             "tensor): write into a copy instead (x = x.clone()) or use the out-of-place op")
        for k, v in list(latest.items()):
            if v is a0:
                latest[k] = n
        latest[a0] = n
    gm.recompile()


def _writes_in_place(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_method":
        name = str(n.target)
        return name.endswith("_") and not name.endswith("__") and name != "requires_grad_"
    return _as_written(gm, n) is not None


def _traced(model: nn.Module):
    """Trace into every module; if that fails and timm is loaded, again with timm's not-traceable modules
    and functions kept whole (they become opaque ops: the atlas is built, projections through them are
    refused), as timm's own feature extraction does."""
    first = None
    for notrace in (((), ()), _timm_notrace()):
        if first is not None and not (notrace[0] or notrace[1]):
            break
        tracer = _Tracer(notrace)
        try:
            return tracer, tracer.trace(model)
        except Exception as e:  # noqa: BLE001 - fx raises many types; the user needs the line, not the stack
            first = first or e
    raise AtlasError(f"cannot trace model {type(model).__name__} with torch.fx{_where_traced(first)}: "
                     f"{str(first).splitlines()[0][:160]}") from None


def unique_calls(calls: list[tuple[str, fx.Node]]) -> list[tuple[str, fx.Node]]:
    """Module calls with unique names: a module called again (one `self.relu` reused in a block) is
    `path_1`, `path_2`, ... for its later calls, as torchvision's feature extraction names them."""
    taken = {name for name, _ in calls}
    seen: dict[str, int] = {}
    out = []
    for name, node in calls:
        k = seen.get(name, 0)
        unique = name
        if k:
            while f"{name}_{k}" in taken:  # a module already named `relu_1` keeps its name
                k += 1
            unique = f"{name}_{k}"
            taken.add(unique)
        seen[name] = k + 1
        out.append((unique, node))
    return out


_META_METHODS = {"size", "dim", "numel", "nelement", "stride", "element_size"}


def signal_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes whose values carry the image: reached from the input through anything but shape queries
    (x.size(), x.shape, x.dim()). The rest (weights, a bias reshaped in forward, arithmetic on sizes)
    are constants for a given input size, however they are computed."""
    out: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder":
            out.add(n)
        elif n.op in ("call_function", "call_method", "call_module") and any(a in out for a in n.all_input_nodes):
            meta = (n.op == "call_method" and n.target in _META_METHODS) or (
                n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in
                ("shape", "dtype", "device", "ndim"))
            if not meta:
                out.add(n)
    return out


def _tensor_args(node: fx.Node, signal: set[fx.Node]) -> list[fx.Node]:
    """The node's signal-carrying arguments, in order and with multiplicity (`y + y` has two)."""
    seen: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: seen.append(a) or a)
    return [a for a in seen if a in signal]


def _read_op(gm: fx.GraphModule, n: fx.Node, where: str, signal: set[fx.Node]) -> Op:
    """The kind of one node, with the parameters its rule needs."""
    ins = _tensor_args(n, signal)
    if n.op in ("placeholder", "output", "get_attr"):
        return Op(n, n.op, where, ins)
    if n not in signal:  # a constant for this input size (a weight's view, arithmetic on sizes)
        return Op(n, "meta", where, [], what="a constant")
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return _read_module(n, m, where, ins)
    if n.op == "call_method":
        return _read_method(n, where, ins)
    return _read_function(gm, n, where, ins)


def _read_module(n: fx.Node, m: nn.Module, where: str, ins) -> Op:
    t = type(m)
    what = t.__name__
    if t is nn.Conv2d:
        if m.padding_mode != "zeros":
            pad = m.padding if not isinstance(m.padding, str) else _same_padding(m)
            return Op(n, "opaque", where, ins, {"kernel": _pairs(m.kernel_size), "stride": _pairs(m.stride),
                                                 "padding": _pairs(pad), "dilation": _pairs(m.dilation),
                                                 "spatial": True}, module=m,
                      what=f"Conv2d with padding_mode='{m.padding_mode}'")
        pad = m.padding if not isinstance(m.padding, str) else _same_padding(m)
        return Op(n, "conv", where, ins, {"weight": m.weight, "bias": m.bias, "kernel": _pairs(m.kernel_size),
                                           "stride": _pairs(m.stride),
                                           "padding": _pairs(pad), "dilation": _pairs(m.dilation),
                                           "groups": m.groups}, m, what)
    if t is nn.Linear:
        return Op(n, "linear", where, ins, {"weight": m.weight}, m, what)
    if t in (nn.BatchNorm2d, nn.BatchNorm1d):
        return Op(n, "bn", where, ins, {"module": m}, m, what)
    if t is nn.ReLU:
        return Op(n, "relu", where, ins, {}, m, what)
    if t is nn.ReLU6:
        return Op(n, "relu6", where, ins, {"max": 6.0}, m, what)
    if t is nn.Hardtanh and m.min_val == 0.0:
        return Op(n, "relu6", where, ins, {"max": float(m.max_val)}, m, what)
    if t is nn.LeakyReLU:
        return Op(n, "leaky", where, ins, {"slope": float(m.negative_slope)}, m, what)
    if t is nn.MaxPool2d:
        if m.return_indices:
            return Op(n, "opaque", where, ins, module=m, what="MaxPool2d returning indices")
        return Op(n, "maxpool", where, ins, _pool_params(m.kernel_size, m.stride, m.padding, m.dilation,
                                                           m.ceil_mode), m, what)
    if t is nn.AvgPool2d:
        return Op(n, "avgpool", where, ins, {**_pool_params(m.kernel_size, m.stride, m.padding, 1, m.ceil_mode),
                                              "count_include_pad": m.count_include_pad,
                                              "divisor_override": m.divisor_override}, m, what)
    if t is nn.AdaptiveAvgPool2d:
        return Op(n, "adaptive_avgpool", where, ins, {"output_size": m.output_size}, m, what)
    if t in (nn.LocalResponseNorm, nn.CrossMapLRN2d):
        return Op(n, "lrn", where, ins, {"module": m}, m, what)
    if t in (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout):
        return Op(n, "pass", where, ins, {}, m, what)
    if t is nn.Flatten:
        return Op(n, "reshape", where, ins, {}, m, what)
    return Op(n, "opaque", where, ins, module=m, what=what)


def _same_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return (0, 0)
    k, d = _pairs(m.kernel_size), _pairs(m.dilation)
    total = [dd * (kk - 1) for kk, dd in zip(k, d)]
    if any(t % 2 for t in total):  # PyTorch pads 'same' asymmetrically then: not a plain padding
        raise AtlasError(f"Conv2d padding='same' with an even kernel is not supported ({m})")
    return tuple(t // 2 for t in total)


def _pool_params(k, s, p, d, ceil) -> dict[str, Any]:
    k = _pairs(k)
    s = _pairs(s) if s is not None and s != [] else k
    return {"kernel": k, "stride": s, "padding": _pairs(p), "dilation": _pairs(d), "ceil_mode": bool(ceil)}


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _read_method(n: fx.Node, where: str, ins) -> Op:
    name = str(n.target).rstrip("_") if str(n.target) not in ("__getitem__",) else str(n.target)
    what = f"Tensor.{n.target}"
    if name == "relu":
        return Op(n, "relu", where, ins, what=what)
    if name in ("clamp", "clip"):
        lo, hi = _arg(n, 1, "min"), _arg(n, 2, "max")
        if lo == 0 and (hi is None or _is_number(hi)):
            return Op(n, "relu6" if hi is not None else "relu", where, ins,
                      {"max": float(hi)} if hi is not None else {}, what=what)
    if name in _RESHAPE_METHODS:
        return Op(n, "reshape", where, ins[:1], what=what)
    if name in _PASS_METHODS or (name == "to" and not any(isinstance(a, torch.dtype) for a in n.args)):
        return Op(n, "pass", where, ins[:1], what=what)
    if name == "mean":
        dims = _arg(n, 1, "dim")
        if _spatial_dims(dims):
            return Op(n, "mean", where, ins[:1], {"dims": dims, "keepdim": bool(_arg(n, 2, "keepdim", False))},
                      what=what)
    if name in ("permute", "transpose"):
        return Op(n, "permute", where, ins[:1], what=what)
    if name == "add" and len(ins) <= 2 and _arg(n, 2, "alpha", 1) == 1:
        return Op(n, "add" if len(ins) == 2 else "pass", where, ins, what=what)
    if name in ("mul", "div") and len(ins) == 1 and n.args[0] is ins[0]:
        factor = next((a for a in n.args[1:] if isinstance(a, fx.Node)), None)
        return Op(n, "scale", where, ins, {"factor": factor}, what=what)
    if name in ("size", "dim", "numel"):
        return Op(n, "meta", where, [], what=what)
    if name in ("split", "chunk") and len(ins) == 1:
        return Op(n, "split", where, ins, {"dim": _arg(n, 2, "dim", 0)}, what=what)
    return Op(n, "opaque", where, ins, what=what)


def _spatial_dims(dims) -> bool:
    if dims is None:
        return False
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return set(int(d) % 4 if d < 0 else int(d) for d in dims) <= {2, 3} and len(dims) >= 1


def _read_function(gm, n: fx.Node, where: str, ins) -> Op:
    f = n.target
    what = getattr(f, "__name__", str(f))
    if f in _RELU_FUNCS:
        return Op(n, "relu", where, ins, what=what)
    if f in _RELU6_FUNCS:
        return Op(n, "relu6", where, ins, {"max": 6.0}, what=what)
    if f in _HARDTANH_FUNCS and float(_arg(n, 1, "min_val", -1.0)) == 0.0:
        return Op(n, "relu6", where, ins, {"max": float(_arg(n, 2, "max_val", 1.0))}, what=what)
    if f in (torch.clamp, torch.clip) and _arg(n, 1, "min") == 0 and _is_number(_arg(n, 2, "max", 0)):
        hi = _arg(n, 2, "max")
        return Op(n, "relu6" if hi is not None else "relu", where, ins,
                  {"max": float(hi)} if hi is not None else {}, what=what)
    if f in _LEAKY_FUNCS:
        return Op(n, "leaky", where, ins, {"slope": float(_arg(n, 1, "negative_slope", 0.01))}, what=what)
    if f in _CONV_FUNCS:
        w = _const(gm, _arg(n, 1, "weight"))
        b = _arg(n, 2, "bias")
        pad = _arg(n, 4, "padding", 0)
        if isinstance(pad, str) or w is None:  # still a convolution: its geometry, from the probed weight
            return Op(n, "opaque", where, ins[:1], {"weight_node": _arg(n, 1, "weight"), "pad_arg": pad,
                                                    "stride": _pairs(_arg(n, 3, "stride", 1)),
                                                    "dilation": _pairs(_arg(n, 5, "dilation", 1)), "spatial": True},
                      what=f"{what} with padding='{pad}'" if w is not None else f"{what} with a computed weight")
        return Op(n, "conv", where, ins[:1], {"weight": w, "bias": _const(gm, b) if isinstance(b, fx.Node) else b,
                                              "kernel": tuple(int(k) for k in w.shape[-2:]),
                                              "stride": _pairs(_arg(n, 3, "stride", 1)), "padding": _pairs(pad),
                                              "dilation": _pairs(_arg(n, 5, "dilation", 1)),
                                              "groups": int(_arg(n, 6, "groups", 1))}, what=what)
    if f in _MAXPOOL_FUNCS:
        if _arg(n, 6, "return_indices", False):
            return Op(n, "opaque", where, ins, what="max_pool2d returning indices")
        k = _arg(n, 1, "kernel_size")
        return Op(n, "maxpool", where, ins[:1], _pool_params(k, _arg(n, 2, "stride", None), _arg(n, 3, "padding", 0),
                                                              _arg(n, 4, "dilation", 1), _arg(n, 5, "ceil_mode", False)),
                  what=what)
    if f in _AVGPOOL_FUNCS:
        return Op(n, "avgpool", where, ins[:1],
                  {**_pool_params(_arg(n, 1, "kernel_size"), _arg(n, 2, "stride", None), _arg(n, 3, "padding", 0),
                                  1, _arg(n, 4, "ceil_mode", False)),
                   "count_include_pad": bool(_arg(n, 5, "count_include_pad", True)),
                   "divisor_override": _arg(n, 6, "divisor_override", None)}, what=what)
    if f in _ADAPTIVE_FUNCS:
        return Op(n, "adaptive_avgpool", where, ins[:1], {"output_size": _arg(n, 1, "output_size")}, what=what)
    if f is torch.mean and _spatial_dims(_arg(n, 1, "dim")):
        return Op(n, "mean", where, ins[:1], {"dims": _arg(n, 1, "dim"), "keepdim": bool(_arg(n, 2, "keepdim", False))},
                  what=what)
    if f is F.batch_norm and not _arg(n, 5, "training", False):
        return Op(n, "bn", where, ins[:1], {"functional": [_const(gm, _arg(n, i, k)) for i, k in
                                                            ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                                             (4, "bias"))], "eps": float(_arg(n, 7, "eps", 1e-5))},
                  what=what)
    if f in _ADD_FUNCS:
        if len(ins) == 2 and (f is not torch.add or _arg(n, 2, "alpha", 1) == 1):
            return Op(n, "add", where, ins, what="add")
        if len(ins) == 1:  # a constant added: a bias, dropped going down like a conv's
            return Op(n, "pass", where, ins, what="add")
    if f in (operator.sub, operator.isub, torch.sub) and len(ins) == 1 and n.args and n.args[0] is ins[0]:
        return Op(n, "pass", where, ins, what="subtract")  # a constant taken away: a bias
    if f in _MUL_FUNCS and len(ins) == 1 and all(_is_number(a) or isinstance(a, fx.Node)
                                                 for a in n.args if a is not ins[0]):
        if f in (operator.truediv, operator.itruediv, torch.div) and n.args[0] is not ins[0]:
            return Op(n, "opaque", where, ins, what="a number divided by a tensor")
        factor = next((a for a in n.args if isinstance(a, fx.Node) and a is not ins[0]), None)
        return Op(n, "scale", where, ins, {"factor": factor}, what=what)
    if f in _CAT_FUNCS:
        dim = _arg(n, 1, "dim", 0)
        parts = list(_arg(n, 0, "tensors"))  # every part, constants too: the sizes to split back by
        return Op(n, "cat", where, ins, {"dim": dim, "parts": parts}, what=what)
    if f in _RESHAPE_FUNCS:
        return Op(n, "reshape", where, ins[:1], what=what)
    if f in (torch.permute, torch.transpose):
        return Op(n, "permute", where, ins[:1], what=what)
    if f is F.pad and _arg(n, 2, "mode", "constant") == "constant" and not _has_node(_arg(n, 1, "pad")):
        return Op(n, "pad", where, ins[:1], {"pad": tuple(_arg(n, 1, "pad"))}, what=what)
    if f is F.dropout and not _arg(n, 2, "training", True) or f in (F.dropout2d,) and not _arg(n, 2, "training", True):
        return Op(n, "pass", where, ins[:1], what=what)
    if _is_stochastic_depth(f) and not _arg(n, 3, "training", True):
        return Op(n, "pass", where, ins[:1], what=what)
    if f in (torch.split, torch.chunk) and len(ins) == 1:
        return Op(n, "split", where, ins, {"dim": _arg(n, 2, "dim", 0)}, what=what)
    if f is operator.getitem and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], int) and (
            n.args[0].op == "call_method" and n.args[0].target in ("split", "chunk")
            or n.args[0].target in (torch.split, torch.chunk)):
        return Op(n, "piece", where, [n.args[0]], {"index": n.args[1]}, what="a piece of a split")
    if f is operator.getitem:
        src = n.args[0]
        if isinstance(src, fx.Node) and isinstance(n.args[1], (int, slice, tuple, type(None), type(Ellipsis))) \
                and not _has_node(n.args[1]):
            return Op(n, "index", where, [src], {"index": n.args[1]}, what="indexing")
    if f is getattr or f in (torch.Tensor.size,):
        return Op(n, "meta", where, [], what=what)
    return Op(n, "opaque", where, ins, what=what)


def _has_node(v) -> bool:
    found = []
    fx.node.map_arg(v, lambda a: found.append(a) or a)
    return bool(found)


def _const(gm, a):
    """The tensor behind a get_attr node (a weight the forward uses functionally)."""
    if isinstance(a, fx.Node) and a.op == "get_attr":
        obj = gm
        for part in str(a.target).split("."):
            obj = getattr(obj, part)
        return obj
    if a is None or isinstance(a, torch.Tensor):
        return a
    return None


def shapes(graph: Graph, image_size: int) -> dict[fx.Node, tuple[int, ...]]:
    """Every tensor node's shape (batch dimension first; use shape[1:]) at `image_size` px: a probe pass on zeros."""
    p = next(graph.model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    # two images: a model that squeezes its batch dimension away would mis-shape a probe of one
    x = torch.zeros((2, 3, image_size, image_size), device=dev, dtype=dtype)
    want = {n for n in graph.nodes if n.op not in ("output", "placeholder")}
    out: dict[fx.Node, tuple[int, ...]] = {}

    def grab(node, val):
        if isinstance(val, torch.Tensor):
            out[node] = tuple(val.shape)

    try:
        with torch.no_grad():
            vals, _ = graph.run(x, want)
    except AtlasError:
        raise
    except Exception as e:  # noqa: BLE001 - a model that cannot take this size says so in one line
        raise AtlasError(f"model {type(graph.model).__name__} fails on a {image_size} px input "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:140]})") from None
    used = {a for op in graph.ops.values() for a in ([op.params.get("factor")] + list(op.params.get("parts", ())))
            if isinstance(a, fx.Node) and a not in graph.signal}
    for node, val in vals.items():
        grab(node, val)
        if node in used and isinstance(val, torch.Tensor):
            graph.consts[node] = val.detach()
        if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
            graph.pieces[node] = [tuple(v.shape) for v in val]  # a split's outputs
    for n in graph.nodes:
        if n.op == "placeholder":
            out[n] = tuple(x.shape)
            break
    return out


def check_against_eager(graph: Graph, x: torch.Tensor, rtol: float = 1e-4) -> None:
    """Refuse (one line naming the first place they part) a graph whose run does not compute what the
    model's own forward computes on images x: its logits and every module output a forward hook sees
    (cloned in the hook: a later in-place op must not change what was seen). Functional values (a
    `torch.relu(self.conv5(z))`) have no hook of their own; the modules after them and the logits catch
    them."""
    model = graph.model
    seen: dict[str, list] = {}
    hooks = []
    for path, m in model.named_modules():
        if path:
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, p=path: seen.setdefault(p, []).append(
                    out.detach().clone() if isinstance(out, torch.Tensor) else None)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x.clone())
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out_node = next(n for n in graph.nodes if n.op == "output")
    pairs: list[tuple[fx.Node, Any, str]] = []
    count: dict[str, int] = {}
    for path, (name, node) in zip(graph.call_paths, graph.calls):
        k = count[path] = count.get(path, 0) + 1
        got = seen.get(path, [])
        if len(got) < k:
            raise AtlasError(f"the traced graph of {type(model).__name__} does not compute what the model "
                             f"computes: it calls {path} {k} times, the model {len(got)}")
        pairs.append((node, got[k - 1], name))
    if isinstance(out_node.args[0], fx.Node) and isinstance(logits, torch.Tensor):
        pairs.append((out_node.args[0], logits, "the model's output"))
    with torch.no_grad():
        vals, _ = graph.run(x, {n for n, _, _ in pairs})
    for node, eager, name in sorted(pairs, key=lambda t: graph.position[t[0]]):
        ours = vals.get(node)
        if not isinstance(eager, torch.Tensor) or not isinstance(ours, torch.Tensor):
            continue
        # max |x| in one pass (no abs() copy): the check runs on every build's first batch
        e = eager.float()
        scale = float(torch.linalg.vector_norm(e, float("inf"))) if e.numel() else 0.0
        if ours.shape != eager.shape:
            diff = float("inf")
        else:
            diff = float(torch.linalg.vector_norm(ours.float() - e, float("inf"))) if e.numel() else 0.0
        if diff > rtol * scale + 1e-6:
            op = graph.ops[node]
            raise AtlasError(f"the traced graph of {type(model).__name__} does not compute what the model "
                             f"computes: they part at {name} ({op.what or op.kind}; largest difference "
                             f"{diff:.3g}, values up to {scale:.3g}): the atlas would show another model")
