"""Graph models (ResNet, DenseNet, GoogLeNet, a user's module): every ReLU seen, exact receptive fields,
DeconvNet and guided backpropagation against their autograd references and against Captum."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

from atlas import deconv as D
from atlas.deconv import Request
from atlas.errors import AtlasError
from atlas.net.graph import RELU_KINDS
from atlas.net import LayerMap


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm with random running statistics and affine terms: default ones (mean 0, var 1) would
    hide a wrong scale."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


class EveryRelu(nn.Module):
    """ReLUs in every form (module reused and in place, F.relu, torch.relu, x.relu(), relu_, ReLU6,
    LeakyReLU, clamp), BatchNorm, a residual add, a concatenation, an overlapping ceil-mode max-pool,
    an average pool and an asymmetric pad."""

    def __init__(self, w: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.bn = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.a = nn.Conv2d(w, w, 3, padding=1)
        self.b = nn.Conv2d(w, w, 3, padding=1, groups=2)
        self.c = nn.Conv2d(w, w, (1, 3), padding=(0, 1))
        self.d = nn.Conv2d(w, w, 2)
        self.six = nn.ReLU6()
        self.leaky = nn.LeakyReLU(0.2)
        self.down = nn.Conv2d(3 * w, 2 * w, 3, stride=2, padding=1, dilation=1)
        self.avg = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        self.top = nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.pool(x)
        y = F.relu(self.a(x))
        y = torch.relu(self.b(y))
        x = self.relu(x + y)                      # the one ReLU module, used again
        p = self.six(self.c(x))
        q = self.d(F.pad(x, (0, 1, 1, 0))).relu_()
        r = self.leaky(x.clamp(min=0))
        x = torch.cat([p, q, r], 1)
        x = self.avg(self.down(x)).relu()
        return F.relu(self.top(x))


def _units(lm, x, layer: str, n: int = 4):
    """Requests at the strongest positions of a few live channels of each image."""
    la = lm.by_name[layer]
    with torch.no_grad():
        act = lm.extract(x, [layer])[layer]
    reqs = []
    for i in range(x.shape[0]):
        for c in range(la.channels):
            if float(act[i, c].max()) > 0 and len([r for r in reqs if r.image == i]) < n:
                y, xx = divmod(int(act[i, c].argmax()), la.width)
                reqs.append(Request(i, layer, c, y, xx))
    # and a unit at the corner, whose field crosses the padding
    reqs.append(Request(0, layer, int(act[0, :, 0, 0].argmax()), 0, 0))
    return reqs


def test_every_relu_form_is_seen_and_projected_exactly():
    model = _randomise_bn(EveryRelu())
    lm = LayerMap(model, 24)
    assert not lm.chain
    kinds = [lm.graph.ops[n].kind for n in lm.graph.nodes]
    assert kinds.count("relu") == 8 and kinds.count("relu6") == 1 and kinds.count("leaky") == 1
    assert "opaque" not in kinds
    x = torch.randn(3, 3, 24, 24)
    for method in D.METHODS:
        for layer in ("stem", "relu_1", "top"):
            reqs = _units(lm, x, layer)
            got = D.project_images(lm, x, reqs, method=method)
            for i, r in enumerate(reqs):
                ref = D.gradient_reference(lm, x, r, method=method)
                assert float(ref.abs().max()) > 0
                assert D.relative_error(got.images[i], ref) < 1e-5, (method, layer, r)


def test_map_mode_on_a_graph():
    lm = LayerMap(_randomise_bn(EveryRelu()), 24)
    x = torch.randn(2, 3, 24, 24)
    reqs = _units(lm, x, "top", n=2)
    got = D.project_images(lm, x, reqs, mode="map")
    for i, r in enumerate(reqs):
        assert D.relative_error(got.images[i], D.gradient_reference(lm, x, r, mode="map")) < 1e-5


def test_in_place_relus_do_not_overwrite_what_was_read():
    """BatchNorm's output, captured with the in-place ReLU after it in the same run, keeps its negative
    values (a leaf is read after its ReLU: `bn` names that ReLU's output, so the node is asked directly)."""
    lm = LayerMap(_randomise_bn(EveryRelu()), 24)
    x = torch.randn(2, 3, 24, 24)
    bn = next(n for n in lm.graph.nodes if n.target == "bn")
    relu = next(iter(bn.users))
    with torch.no_grad():
        got, _ = lm.graph.run(x, {bn, relu})
        ref = lm.model.bn(lm.model.stem(x))
    assert torch.equal(got[bn], ref) and float(ref.min()) < 0
    assert torch.equal(got[relu], ref.clamp(min=0))
    assert torch.equal(lm.extract(x, ["bn"])["bn"], ref.clamp(min=0))


class _AvgEveryRelu(EveryRelu):
    """The same geometry with average pools: a max-pool's gradient reaches only its winners, an
    average pool's its whole window, so the gradient's support is the whole field."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=True)
        self.six = nn.Hardtanh(0.0, 1e9)  # a clamp from 0 that positive values never reach (no dead gradient)


@pytest.mark.parametrize("make,size", [(_AvgEveryRelu, 24), (_AvgEveryRelu, 23)])
def test_receptive_fields_are_the_support_of_the_gradient(make, size):
    """With positive weights and a positive input nothing cancels, so the support of a unit's gradient
    is exactly its receptive field, clipped to the image: a field need not be centred on its unit."""
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.abs() + 0.01)
    lm = LayerMap(model, size)
    x = torch.rand(1, 3, size, size) + 0.5
    for layer in ("stem", "pool", "relu_1", "c", "d", "top"):
        la = lm.by_name[layer]
        for y, xx in {(0, 0), (la.height - 1, la.width - 1), (la.height // 2, 0), (1, la.width // 2)}:
            xi = x.clone().requires_grad_(True)
            out = lm.extract(xi, [layer])[layer]
            (g,) = torch.autograd.grad(out[0, 0, y, xx], xi)
            nz = (g[0].abs().sum(0) > 0).nonzero()
            support = (int(nz[:, 1].min()), int(nz[:, 0].min()), int(nz[:, 1].max()) + 1, int(nz[:, 0].max()) + 1)
            assert support == la.box(y, xx, size), (layer, y, xx)


def test_resnet_and_densenet_layers_and_defaults():
    r = LayerMap(torchvision.models.resnet18(weights=None).eval(), 64)
    assert [la.name for la in r.default_layers()] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert {"layer3.1", "layer1.0.relu", "layer1.0.relu_1", "fc"} <= set(r.by_name)
    assert r.by_name["conv1"].read_at == r.by_name["relu"].read_at  # a conv is read after its ReLU
    assert [p.name for p in r.pools] == ["maxpool"]
    assert r.by_name["layer4"].pools_below == ["maxpool"]
    d = LayerMap(torchvision.models.densenet121(weights=None).eval(), 32)
    assert [la.name for la in d.default_layers()] == ["features.pool0"] + [
        f"features.denseblock{i}" for i in range(1, 5)]


def test_an_operation_without_a_rule_is_refused_in_one_line():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.SiLU()
            self.gate = nn.Conv2d(4, 4, 1)
            self.top = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            x = self.act(self.conv(x))
            x = x * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, 1)))  # squeeze-and-excitation
            return F.relu(self.top(x))

    lm = LayerMap(Gated().eval(), 16)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(AtlasError, match=r"cannot project top: SiLU at act has no DeconvNet rule") as e:
        D.project_images(lm, x, [Request(0, "top", 0, 2, 2)])
    assert "\n" not in str(e.value)
    assert lm.extract(x, ["top"])["top"].shape == (1, 4, 12, 12)  # the atlas itself is still built
    assert lm.by_name["top"].box(0, 0, 16) == (0, 0, 16, 16)  # a gate from the whole map: the whole image


def test_a_model_that_cannot_be_traced_says_where():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return x

    with pytest.raises(AtlasError, match=r"cannot trace model Branchy with torch.fx at .*test_net_graph_models.py:\d+"):
        LayerMap(Branchy(), 16)


def _stored_equals_recomputed(lm, x, layer):
    from atlas.deconv.switches import SwitchRegion, decode, encode, regions_below

    rec = D.record(lm, x, [layer])
    la = lm.by_name[layer]
    reqs = _units(lm, x, layer)
    sw = {}
    for pool in la.pools_below:
        g = lm.pool_by_name[pool].geometry
        rows = []
        for i in range(x.shape[0]):
            regs = [reg for r in reqs if r.image == i for reg in regions_below(lm, la, r.y, r.x) if reg.pool == pool]
            y0, x0 = min(r.y0 for r in regs), min(r.x0 for r in regs)
            y1, x1 = max(r.y0 + r.h for r in regs), max(r.x0 + r.w for r in regs)
            reg = SwitchRegion(pool, y0, x0, y1 - y0, x1 - x0)
            rows.append(decode(encode(rec.switches[pool][i], g, reg), lm.pool_by_name[pool].channels, g, reg))
        sw[pool] = torch.stack(rows)
    stored = D.project(lm, [Request(r.image, r.layer, r.channel, r.y, r.x,
                                    float(rec.activations[layer][r.image, r.channel, r.y, r.x])) for r in reqs], sw)
    images = D.project(lm, reqs, rec.switches, activations=rec.activations)
    assert torch.equal(stored.images, images.images)


def test_stored_switches_project_exactly_as_recomputed_ones():
    """Switches kept only inside the units' fields (for GoogLeNet's pool in every block too) give the
    very projection the image's own switches give."""
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False,
                                         transform_input=False)
    lm = LayerMap(_randomise_bn(model), 64)
    _stored_equals_recomputed(lm, torch.randn(2, 3, 64, 64), "inception3b")
    _stored_equals_recomputed(LayerMap(_randomise_bn(EveryRelu()), 24), torch.randn(2, 3, 24, 24), "top")


# -- Captum ----------------------------------------------------------------------------------------

def one_relu_module_per_use(lm) -> fx.GraphModule:
    """A copy of the traced model in which every ReLU-kind op (a function, a method, a reused or
    in-place module) is its own out-of-place nn.ReLU module: what Captum's hooks need to see them."""
    g = lm.graph
    gm = copy.deepcopy(g.gm)
    graph = gm.graph
    for k, node in enumerate(list(graph.nodes)):
        op_kind = g.ops[g.nodes[k]].kind if k < len(g.nodes) else None
        if op_kind == "relu":
            name = f"atlas_relu_{k}"
            gm.add_submodule(name, nn.ReLU())
            with graph.inserting_after(node):
                new = graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    gm.recompile()
    return gm.eval()


def _captum_layer(gm, lm, layer: str):
    """The module of the copy whose output is the layer's read node."""
    read = lm.read_node[layer]
    k = lm.graph.nodes.index(read)
    name = f"atlas_relu_{k}"
    return getattr(gm, name)


def test_captum_agrees_where_its_hooks_see_every_relu():
    import captum.attr as captum  # in the dev extra: a missing one fails, never skips
    model = _randomise_bn(torchvision.models.resnet18(weights=None))
    lm = LayerMap(model, 48)
    gm = one_relu_module_per_use(lm)
    x = torch.randn(2, 3, 48, 48)
    for layer in ("conv1", "layer2", "layer4"):   # the first layer, a middle stage, the last stage
        reqs = _units(lm, x, layer, n=2)
        for method, cls in (("deconvnet", captum.NeuronDeconvolution), ("guided", captum.NeuronGuidedBackprop)):
            got = D.project_images(lm, x, reqs, method=method)
            for i, r in enumerate(reqs):
                attr = cls(gm, _captum_layer(gm, lm, layer)).attribute(x, neuron_selector=(r.channel, r.y, r.x))
                # atlas projects value * d(unit)/d(image); Captum gives the (modified) gradient alone
                value = got.meta[i]["value"]
                assert D.relative_error(got.images[i], value * attr[r.image].detach()) < 1e-5, (layer, method, r)


def test_captum_is_silently_wrong_on_functional_relus_and_atlas_is_right():
    import captum.attr as captum  # in the dev extra: a missing one fails, never skips

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(6, 6, 3, padding=1)
            self.c = nn.Conv2d(6, 6, 3)

        def forward(self, x):
            x = F.relu(self.a(x))
            x = F.max_pool2d(x, 2)
            x = F.relu(self.b(x) + x)
            return F.relu(self.c(x))

    torch.manual_seed(3)
    model = Functional().eval()
    lm = LayerMap(model, 20)
    x = torch.randn(1, 3, 20, 20)
    r = _units(lm, x, "c", n=1)[0]
    ours = D.project_images(lm, x, [r]).images[0]
    ref = D.gradient_reference(lm, x, r)
    assert D.relative_error(ours, ref) < 1e-5
    with torch.no_grad():
        value = float(lm.extract(x, ["c"])["c"][0, r.channel, r.y, r.x])
    # Captum hooks only nn.ReLU modules: here there are none, so it returns the plain gradient
    theirs = value * captum.NeuronDeconvolution(model, model.c).attribute(x, neuron_selector=(r.channel, r.y, r.x))[0]
    assert D.relative_error(theirs.detach(), ref) > 1e-2
    xi = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(model(xi)[0, r.channel, r.y, r.x], xi)[0][0] * value
    assert D.relative_error(theirs.detach(), plain) < 1e-5
    assert all(lm.graph.ops[n].kind != "opaque" for n in lm.graph.nodes)
    assert sum(lm.graph.ops[n].kind in RELU_KINDS for n in lm.graph.nodes) == 3


def test_split_and_chunk_go_back_to_their_places():
    """CSP blocks split a map along its channels and use the pieces apart (one of them not at all)."""
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(6, 6, 3)

        def forward(self, x):
            x = F.leaky_relu(self.a(x), 0.1)
            left, right = x.split(4, dim=1)
            p, q = torch.chunk(self.b(right), 2, dim=1)
            return F.relu(self.c(torch.cat([left, q], 1)))  # p unused

    torch.manual_seed(0)
    lm = LayerMap(Split().eval(), 16)
    x = torch.randn(2, 3, 16, 16)
    reqs = _units(lm, x, "c", n=3)
    for method in D.METHODS:
        got = D.project_images(lm, x, reqs, method=method)
        for i, r in enumerate(reqs):
            assert D.relative_error(got.images[i], D.gradient_reference(lm, x, r, method=method)) < 1e-5


# -- what an independent review found: each a model that was silently wrong, or crashed ----------------

class _Small(nn.Module):
    def __init__(self, top_in: int = 4):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.top = nn.Conv2d(top_in, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]).view(4, 1, 1))
        self.std = nn.Parameter(torch.tensor([0.2, 0.5, 4.0]).view(3, 1, 1))
        self.bias = nn.Parameter(torch.randn(4))


class LayerScale(_Small):
    def forward(self, x):
        return F.relu(self.top(F.relu(self.a(x)) * self.gamma))


class NormInside(_Small):
    def forward(self, x):
        return F.relu(self.top(F.relu(self.a(x / self.std))))


class Double(_Small):
    def forward(self, x):
        y = F.relu(self.a(x))
        return F.relu(self.top(y + y))


class CatSame(_Small):
    def __init__(self):
        super().__init__(8)

    def forward(self, x):
        y = F.relu(self.a(x))
        return F.relu(self.top(torch.cat([y, y], 1)))


class LastPiece(_Small):
    def __init__(self):
        super().__init__(2)

    def forward(self, x):
        return F.relu(self.top(F.relu(self.a(x)).chunk(2, 1)[-1]))


class BiasView(_Small):
    def forward(self, x):
        return F.relu(self.top(F.relu(self.a(x)) + self.bias.view(1, -1, 1, 1)))


class TransposedBranch(_Small):
    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.a(x))
        return F.relu(self.top(F.relu(self.b(h)).transpose(2, 3) + self.c(h)))


@pytest.mark.parametrize("make", [LayerScale, NormInside, Double, CatSame, LastPiece, BiasView, TransposedBranch])
def test_constants_repeats_pieces_and_views(make):
    torch.manual_seed(0)
    lm = LayerMap(make().eval(), 12)
    x = torch.randn(2, 3, 12, 12)
    reqs = _units(lm, x, "top", n=2)
    for method in D.METHODS:
        got = D.project_images(lm, x, reqs, method=method)
        for i, r in enumerate(reqs):
            assert D.relative_error(got.images[i], D.gradient_reference(lm, x, r, method=method)) < 1e-5


def test_a_square_is_refused_and_a_conv_read_before_its_batchnorm_is_exact():
    class Square(_Small):
        def forward(self, x):
            y = F.relu(self.a(x))
            return F.relu(self.top(y * y))

    with pytest.raises(AtlasError, match=r"mul at the model.s forward \(mul\) has no DeconvNet rule"):
        lm = LayerMap(Square().eval(), 12)
        D.project_images(lm, torch.randn(1, 3, 12, 12), [Request(0, "top", 0, 5, 5)])
    lm = LayerMap(_randomise_bn(torchvision.models.resnet18(weights=None)), 32)
    x = torch.randn(2, 3, 32, 32)
    for layer in ("layer1.0.conv2", "layer2.0.downsample.0"):  # read at the conv: its BN is not below
        reqs = _units(lm, x, layer, n=1)
        got = D.project_images(lm, x, reqs)
        for i, r in enumerate(reqs):
            assert D.relative_error(got.images[i], D.gradient_reference(lm, x, r)) < 1e-5


def test_in_place_after_an_alias_leaves_the_read_value_alone():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.ident = nn.Identity()
            self.act = nn.ReLU(inplace=True)
            self.top = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.top(self.act(self.ident(self.block(x))))

    lm = LayerMap(_randomise_bn(Aliased()), 12)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        alone = lm.extract(x, ["block"])["block"]
        both = lm.extract(x, ["block", "top"])["block"]
    assert torch.equal(alone, both) and float(alone.min()) < 0


def test_fields_of_a_convolution_without_a_rule_and_unique_names():
    class Reflect(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 5, padding=2, padding_mode="reflect")
            self.relu = nn.ReLU()
            self.relu_1 = nn.ReLU()
            self.top = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.relu_1(self.top(self.relu(self.relu(self.a(x)))))

    lm = LayerMap(Reflect().eval(), 12)
    assert lm.by_name["a"].box(6, 6, 12) == (4, 4, 9, 9)
    assert lm.by_name["top"].box(6, 6, 12) == (3, 3, 10, 10)
    assert len({la.name for la in lm.layers}) == len(lm.layers)


def test_a_model_that_squeezes_its_batch_keeps_its_classifier():
    class Squeezing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).squeeze())

    lm = LayerMap(Squeezing().eval(), 16)
    assert lm.by_name["fc"].kind == "fc" and lm.classes() == 5
