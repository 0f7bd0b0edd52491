"""Every family of the README's model table, at its shallowest and deepest default layer: DeconvNet from
stored switches (encoded and decoded as an atlas stores them, from a batched forward as a build runs
it), from recomputed switches, and guided backpropagation, against a reference that shares nothing with
the engine's trace: autograd on the eager model, with every ReLU form (module, F.relu, torch.relu,
Tensor.relu, ReLU6's hardtanh) given the rule's backward and LocalResponseNorm an identity backward.
Random weights, randomised BatchNorm statistics, small images."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atlas import deconv as D
from atlas.deconv.reference import _IdentityBackward  # forward as it is, backward the identity
from atlas.net import LayerMap
from atlas.deconv.switches import SwitchRegion, decode, pack, window_codes
from conftest import randomised_model

TOL = 1e-5
FAMILIES = [("zfnet", 96), ("alexnet", 64), ("vgg11", 32), ("resnet50", 64), ("vgg11_bn", 32),
            ("densenet121", 64), ("googlenet", 64), ("inception_v3", 80), ("squeezenet1_1", 64),
            ("mobilenet_v2", 64)]


class _Rule(torch.autograd.Function):
    """Forward: the activation as the model computes it; backward: DeconvNet's or guided's rule."""

    @staticmethod
    def forward(ctx, x, hi, guided):
        ctx.save_for_backward(x)
        ctx.hi, ctx.guided = hi, guided
        return x.clamp(0, hi) if hi is not None else x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = g.clamp(min=0)
        if ctx.guided:
            on = (x > 0) if ctx.hi is None else (x > 0) & (x < ctx.hi)
            out = out * on.to(g.dtype)
        return out, None, None


@contextlib.contextmanager
def _swapped(guided: bool):
    """Every ReLU form the eager model may use, and LRN, with the reference's backward."""
    saved = {(F, "relu"): F.relu, (torch, "relu"): torch.relu, (F, "hardtanh"): F.hardtanh,
             (torch.Tensor, "relu"): torch.Tensor.relu, (F, "local_response_norm"): F.local_response_norm}
    relu = lambda x, *a, **k: _Rule.apply(x, None, guided)  # noqa: E731
    lrn = saved[(F, "local_response_norm")]

    def hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False):
        assert min_val == 0.0, "only ReLU6-like hardtanh has a rule"
        return _Rule.apply(x, float(max_val), guided)

    F.relu, torch.relu, F.hardtanh, torch.Tensor.relu = relu, relu, hardtanh, relu
    F.local_response_norm = lambda x, *a, **k: _IdentityBackward.apply(x, lambda t: lrn(t, *a, **k))
    try:
        yield
    finally:
        for (obj, name), fn in saved.items():
            setattr(obj, name, fn)


def _eager_reference(model: nn.Module, module: nn.Module, x: torch.Tensor, r: D.Request, guided: bool):
    """value * d(unit)/d(image) through the eager model, the unit read at `module`'s output."""
    got = {}
    h = module.register_forward_hook(lambda m, i, o: got.__setitem__("a", o))
    xi = x.clone().requires_grad_(True)
    try:
        with torch.enable_grad(), _swapped(guided):
            model(xi)
        a = got["a"]
        seed = torch.zeros_like(a)
        seed[r.image, r.channel, r.y, r.x] = a[r.image, r.channel, r.y, r.x].detach()
        (g,) = torch.autograd.grad(a, xi, seed)
    finally:
        h.remove()
    return g[r.image]


def _module_of(lm, layer: str) -> nn.Module:
    if layer in lm.chain_read_at:
        return lm.model.features[lm.chain_read_at[layer]]
    node = lm.read_node[layer]
    return lm.model.get_submodule(node.target if node.op == "call_module" else layer)


def _stored_switches(lm, x: torch.Tensor, reqs) -> dict:
    """Switches as an atlas stores them: a batched forward (padded to a batch of 4, as a build's), each
    image's region per pool encoded in window codes, decoded back."""
    from atlas.build.tables import switch_regions

    rows = [{"layer": r.layer, "image_id": r.image, "y": r.y, "x": r.x} for r in reqs]
    regions = switch_regions(lm, rows)
    deepest = max({p for reg in regions.values() for p in reg}, key=lambda p: lm.pool_by_name[p].index)
    with torch.no_grad():
        _, sw = lm.extract(x, [deepest], pool_indices=True, batch_size=4)
    out = {p: sw[p].clone() for p in sw}
    for i, reg in regions.items():
        for pool, box in reg.items():
            g = lm.pool_by_name[pool].geometry
            codes = window_codes(sw[pool][i, :, box.y0:box.y0 + box.h, box.x0:box.x0 + box.w], g, (box.y0, box.x0))
            out[pool][i] = decode(pack(codes, g.kernel), lm.pool_by_name[pool].channels, g,
                                  SwitchRegion(pool, box.y0, box.x0, box.h, box.w))
    return out


def live_requests(lm, x, la, channels: int = 1) -> tuple[list, torch.Tensor]:
    """For each image of `x`, a request at the strongest unit of each of the layer's first `channels` live
    channels (a maximum above zero in some image); and the layer's activations they were read from."""
    with torch.no_grad():
        act = lm.extract(x, [la.name])[la.name]
    live = [c for c in range(la.channels) if float(act[:, c].max()) > 0][:channels]
    return [D.Request(i, la.name, c, *divmod(int(act[i, c].argmax()), la.width))
            for i in range(x.shape[0]) for c in live], act


@pytest.mark.parametrize("name,size", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_every_family_agrees_with_the_eager_model(name, size):
    model = randomised_model(name)
    lm = LayerMap(model, size)
    layers = lm.resolve(None)
    x = torch.randn(2, 3, size, size)
    for la in (layers[0], layers[-1]):
        reqs, act = live_requests(lm, x, la)
        assert reqs, f"{name} {la.name}: no live unit"
        module = _module_of(lm, la.name)
        recomputed = D.project_images(lm, x, reqs)
        guided = D.project_images(lm, x, reqs, method="guided")
        vals = [D.Request(r.image, r.layer, r.channel, r.y, r.x, float(act[r.image, r.channel, r.y, r.x]))
                for r in reqs]
        stored = D.project(lm, vals, _stored_switches(lm, x, reqs) if la.pools_below else None)
        for i, r in enumerate(reqs):
            ref = _eager_reference(model, module, x, r, guided=False)
            assert float(ref.abs().max()) > 0
            assert D.relative_error(recomputed.images[i], ref) < TOL, (name, la.name, "recomputed")
            assert D.relative_error(stored.images[i], ref) < TOL, (name, la.name, "stored")
            gref = _eager_reference(model, module, x, r, guided=True)
            assert D.relative_error(guided.images[i], gref) < TOL, (name, la.name, "guided")
