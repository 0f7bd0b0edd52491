"""The graph's local response normalisation (atlas/net/lrn.py) is torch's, bit for bit: checked against
F.local_response_norm (its avg_pool3d route shares nothing with the sliced sums) for odd and even
windows, fewer channels than the window, both memory formats and other constants; the model run by the
graph equals the model run eagerly, exactly; and anything the identity is not established for runs the
module as written. Marked `determinism`: CI runs these again with the kernels held to AVX2."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atlas.models.zfnet import ZFNetMini
from atlas.net import lrn
from atlas.net.graph import trace

pytestmark = pytest.mark.determinism


def _logits(g):
    return next(n for n in g.nodes if n.op == "output").args[0]


def _maps(shape, seed=0, fmt=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 40  # a wide range of magnitudes
    x[x.abs() < 1.0] = 0.0  # exact zeros, as after a ReLU
    return x.contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_bit_identical_to_torch(size, fmt):
    for shape in [(3, 96, 13, 11), (2, 7, 5, 5), (1, 2, 4, 3), (1, 1, 2, 2)]:
        x = _maps(shape, seed=size, fmt=fmt)
        for alpha, beta, k in [(1e-4, 0.75, 2.0), (1e-3, 0.5, 1.0), (0.1, 1.3, 0.5)]:
            want = F.local_response_norm(x, size, alpha, beta, k)
            got = lrn.local_response_norm(x, size, alpha, beta, k)
            assert torch.equal(got, want), (shape, size, alpha, beta, k, (got != want).sum().item())
            assert got.is_contiguous(memory_format=fmt)  # the next conv gets the layout it expects


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_bit_identical_at_zfnets_size(fmt):
    """conv1's normalisation in a batch: maps big enough for both threads' share of each op."""
    x = _maps((8, 96, 55, 55), seed=7, fmt=fmt).relu()
    assert torch.equal(lrn.local_response_norm(x, 5, 1e-4, 0.75, 2.0), F.local_response_norm(x, 5, 1e-4, 0.75, 2.0))


def test_under_bf16_autocast_a_float32_input_gives_torchs_numbers():
    x = _maps((2, 16, 9, 9), fmt=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        want = F.local_response_norm(x, 5, 1e-4, 0.75, 2.0)
        got = lrn.run(nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0), x)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_what_it_does_not_cover_runs_the_module():
    m = nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    x = _maps((2, 8, 5, 5)).requires_grad_()
    assert not lrn.applies(x)
    y = lrn.run(m, x)
    y.sum().backward()  # autograd through torch's own op
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(y.detach(), m(x).detach())
    b = _maps((2, 8, 5, 5)).to(torch.float64)
    assert not lrn.applies(b) and torch.equal(lrn.run(m, b), m(b))
    sliced = _maps((2, 8, 5, 7))[:, :, :, ::2]  # neither layout
    assert not lrn.applies(sliced)


class _Keyword(nn.Module):
    """Calls its normalisation by keyword, and a hook may change what it gives."""

    def __init__(self):
        super().__init__()
        self.c, self.n = nn.Conv2d(3, 8, 3), nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)

    def forward(self, z):
        return self.n(input=self.c(z))


def test_a_keyword_call_and_a_hook_are_honoured():
    torch.manual_seed(0)
    net = _Keyword().eval()
    g = trace(net)
    out = _logits(g)
    x = _maps((2, 3, 9, 9))
    with torch.inference_mode():
        assert torch.equal(g.run(x, {out})[0][out], net(x))
        h = net.n.register_forward_hook(lambda mod, a, o: o * 2)  # the model's own forward sees the hook
        try:
            assert torch.equal(g.run(x, {out})[0][out], net(x))
        finally:
            h.remove()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_the_graph_runs_zfnet_exactly_as_its_own_forward(fmt):
    """The whole model, logits included: the interpreter's LRN changes no number the model computes."""
    torch.manual_seed(0)
    net = ZFNetMini(contrast_norm=True).eval().to(memory_format=fmt)
    g = trace(net)
    out = _logits(g)
    lrns = [n for n, op in g.ops.items() if op.kind == "lrn"]
    assert len(lrns) == 2
    x = _maps((4, 3, 64, 64), seed=3, fmt=fmt)
    with torch.inference_mode():
        vals, _ = g.run(x, {out, *lrns})
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, m=m: seen.__setitem__(m, o.clone()))
                 for m in net.modules() if isinstance(m, nn.LocalResponseNorm)]
        try:
            logits = net(x)
        finally:
            for h in hooks:
                h.remove()
    assert torch.equal(vals[out], logits)
    for n in lrns:
        assert torch.equal(vals[n], seen[g.ops[n].module])


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_bit_identical_a_few_images_at_a_time(fmt, monkeypatch):
    """The exact steps run a chunk of images at a time: chunks of two over five images (the last one
    short), and an empty batch."""
    x = _maps((5, 96, 13, 11), seed=3, fmt=fmt).relu()
    monkeypatch.setattr(lrn, "CHUNK_BYTES", 2 * 96 * 13 * 11 * 4)
    got = lrn.local_response_norm(x, 5, 1e-4, 0.75, 2.0)
    assert torch.equal(got, F.local_response_norm(x, 5, 1e-4, 0.75, 2.0))
    assert got.is_contiguous(memory_format=fmt)
    empty = x[:0]
    assert torch.equal(lrn.local_response_norm(empty, 5, 1e-4, 0.75, 2.0), F.local_response_norm(empty, 5, 1e-4, 0.75, 2.0))


def test_its_buffers_are_on_the_maps_device_whatever_the_default():
    x = _maps((2, 8, 5, 5))
    with torch.device("meta"):
        got = lrn.local_response_norm(x, 5, 1e-4, 0.75, 2.0)
    assert got.device == x.device and torch.equal(got, F.local_response_norm(x, 5, 1e-4, 0.75, 2.0))
