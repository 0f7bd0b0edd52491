"""The trace computes what the model computes: in-place ops honoured (with or without an assignment, at
the top level and inside submodules), writes the graph cannot express refused by name, the first batch
of a build compared with the eager forward, and refusals that name the module path and the op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from atlas import deconv as D
from atlas.errors import AtlasError
from atlas.net.graph import check_against_eager, trace
from atlas.net import LayerMap


def _run_graph(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    g = trace(model)
    out = next(n for n in g.nodes if n.op == "output").args[0]
    with torch.no_grad():
        return g.run(x, {out})[0][out]


class _Inner(nn.Module):
    """One in-place form per test, inside a submodule; `unassigned` drops the result as `z.relu_()` does."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, z):
        y = self.c(z)
        f = self.form
        if f == "relu_":
            y.relu_()
        elif f == "add_":
            y.add_(z)
        elif f == "mul_":
            y.mul_(0.5)
        elif f == "clamp_":
            y.clamp_(0, 0.1)
        elif f == "iadd":
            w = y
            w += z          # `y` is the same tensor: it changes too
        elif f == "copy_":
            y.copy_(z * 2)
        return self.c(y)


class _Outer(nn.Module):
    def __init__(self, form: str, top: bool):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.inner = _Inner(form)
        self.top, self.form = top, form
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        z = self.a(x)
        if self.top:  # the same write at the top level, unassigned
            getattr(z, self.form)(*{"relu_": (), "add_": (z * 0 + 1,), "mul_": (3.0,), "clamp_": (0, 0.2),
                                    "copy_": (z * 3,)}.get(self.form, ()))
        return self.head(self.inner(z).mean((2, 3)))


@pytest.mark.parametrize("top", [False, True], ids=["submodule", "top-level"])
@pytest.mark.parametrize("form", ["relu_", "add_", "mul_", "clamp_", "iadd", "copy_"])
def test_in_place_writes_are_honoured(form, top):
    if top and form == "iadd":
        pytest.skip("`+=` rebinds its name at the top level: covered inside the submodule through an alias")
    torch.manual_seed(0)
    m = _Outer(form, top).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = m(x.clone())
    assert torch.allclose(_run_graph(m, x), want, atol=1e-6)
    check_against_eager(trace(m), x)  # and the build's check agrees


def test_an_unassigned_relu_is_below_the_deeper_layers_and_the_layer_is_read_after_it():
    """Defect 2: `z.relu_()` alone on a line was dropped, the layer below read before its ReLU."""
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 3)
            self.conv2 = nn.Conv2d(6, 6, 3)

        def forward(self, x):
            z = self.conv1(x)
            z.relu_()
            return self.conv2(z)

    torch.manual_seed(1)
    m = Own().eval()
    x = torch.randn(2, 3, 14, 14)
    lm = LayerMap(m, 14)
    with torch.no_grad():
        got = lm.extract(x, ["conv1", "conv2"])
        z = F.relu(m.conv1(x))
        assert torch.allclose(got["conv1"], z) and float(got["conv1"].min()) == 0.0
        assert torch.allclose(got["conv2"], m.conv2(z), atol=1e-6)
    # and the projection goes through that ReLU: it agrees with autograd on the eager module
    r = D.Request(0, "conv2", 1, 5, 5)
    P = D.project_images(lm, x, [r])
    assert D.relative_error(P.images[0], _eager_deconv(m, x[:1], r)) < 1e-5


def _eager_deconv(m: nn.Module, x: torch.Tensor, r: D.Request) -> torch.Tensor:
    """DeconvNet of an `Own` unit by autograd on the eager module, its ReLU's backward relu(grad)."""
    class R(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clamp(min=0)

        @staticmethod
        def backward(ctx, g):
            return g.clamp(min=0)

    xi = x.clone().requires_grad_(True)
    h = m.conv2(R.apply(m.conv1(xi)))
    seed = torch.zeros_like(h)
    seed[0, r.channel, r.y, r.x] = h[0, r.channel, r.y, r.x].detach()
    (g,) = torch.autograd.grad(h, xi, seed)
    return g[0]


def test_a_write_into_a_view_read_again_is_refused_by_name():
    class View(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = nn.Sequential(nn.Conv2d(3, 4, 3))
            self.top = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            z = self.blk(x)
            z[:, :2].relu_()
            return self.top(z)

    with pytest.raises(AtlasError, match=r"in-place relu_ at the model's forward .* writes into memory that"):
        trace(View())


def test_item_assignment_is_refused_with_its_line():
    class Assign(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            z = self.a(x)
            z[:, :3] = 0
            return z

    with pytest.raises(AtlasError, match=r"cannot trace model Assign .*test_net_trace.py:\d+ \(z\[:, :3\] = 0\)"):
        trace(Assign())


def test_a_model_whose_trace_differs_is_refused_naming_where_they_part(tmp_path):
    """A forward that counts its calls in Python: the trace holds the count of the tracing call."""
    from conftest import make_image_folder

    from atlas.build import build

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU())
            self.head = nn.Conv2d(4, 4, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return torch.relu(self.head(self.block(self.stem(x)) * self.calls)).mean((2, 3))

    net = Net().eval()
    data = make_image_folder(tmp_path / "data", per_class=2)
    with pytest.raises(AtlasError, match=r"does not compute what the model computes: they part at head "):
        build(net, str(data), tmp_path / "a", k=2, batch_size=4, image_size=16, progress=False)


def test_refusals_name_the_module_path_and_the_op():
    """Defect 3: convnext's refusal said "layer_norm at layer_norm"."""
    lm = LayerMap(torchvision.models.convnext_tiny().eval(), 32)
    with pytest.raises(AtlasError, match=r"cannot project features\.1: layer_norm at features\.0\.1 "
                                         r"\(LayerNorm2d\) has no DeconvNet rule"):
        D.check_graph(lm, "features.1")


class _Residual(nn.Module):
    """A block with torchvision's stochastic depth, as a module and as a function: identity in eval mode."""

    def __init__(self, with_depth: bool):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.a, self.b, self.c = (nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1),
                                  nn.Conv2d(6, 4, 3, padding=1))
        self.depth = StochasticDepth(0.5, "row") if with_depth else nn.Identity()
        self.with_depth = with_depth

    def forward(self, x):
        from torchvision.ops import stochastic_depth

        z = torch.relu(self.a(x))
        y = self.depth(torch.relu(self.b(z)))
        if self.with_depth:
            y = stochastic_depth(y, 0.5, "row", training=self.training)
        return torch.relu(self.c(z + y))


def test_stochastic_depth_is_the_identity_in_eval_as_a_module_and_as_a_function():
    torch.manual_seed(0)
    m = _Residual(True).eval()
    plain = _Residual(False).eval()
    plain.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.allclose(_run_graph(m, x), m(x), atol=1e-6)
    check_against_eager(trace(m), x)
    reqs = [D.Request(i, "c", 2, 4, 5) for i in range(2)]  # down through both forms of it
    ours = D.project_images(LayerMap(m, 10), x, reqs)
    want = D.project_images(LayerMap(plain, 10), x, reqs)
    assert torch.allclose(torch.stack(list(ours.images)), torch.stack(list(want.images)), atol=1e-6)
