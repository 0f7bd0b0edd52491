"""Captum as a second witness of the engine, per family of the README's model table.

Captum's NeuronDeconvolution and NeuronGuidedBackprop change the backward of nn.ReLU modules only (hooks
on `isinstance(module, nn.ReLU)`). They witness a projection where every ReLU between the image and the
layer is an nn.ReLU module call: a reused module is fine (its hooks fire per call, in the order the
backward meets them), an in-place one too (Captum clones its input). They cannot where a ReLU is a
function (googlenet's and inception_v3's BasicConv2d call F.relu) or another module class (mobilenet_v2's
nn.ReLU6 is a Hardtanh): there Captum silently returns a plain gradient for those steps, and the families
are checked against the autograd reference alone (tests/test_deconv_fidelity.py).

Captum runs as a user would: on the eager model, batched over the images, the unit read at the module
whose output is the layer. ZFNet's contrast normalisations get their true gradient from Captum, so the
engine runs there with norm="gradient". Random weights, randomised BatchNorm statistics, small images;
within 1e-5 of the largest value."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from atlas import deconv as D
from atlas.net import LayerMap
from atlas.net.graph import RELU_KINDS
from conftest import randomised_model
from test_deconv_fidelity import live_requests

captum = pytest.importorskip("captum.attr")  # in the dev extra

TOL = 1e-5
FAMILIES = [("zfnet", 96), ("alexnet", 64), ("vgg11", 32), ("vgg11_bn", 32), ("resnet50", 64),
            ("densenet121", 64), ("googlenet", 64), ("inception_v3", 80), ("squeezenet1_1", 64),
            ("mobilenet_v2", 64)]
# what the manual's model table says (atlas/manual/models.md), checked by the first test
WITNESSED = {"zfnet", "alexnet", "vgg11", "vgg11_bn", "resnet50", "densenet121", "squeezenet1_1"}


@pytest.fixture(scope="module")
def lmap():
    """`lmap(name, size)`: the LayerMap of the family's randomised model, made once for this file's tests
    (each reads it: Captum's hooks are removed after each attribution, the engine writes nothing)."""
    made = {}

    def get(name: str, size: int) -> LayerMap:
        if (name, size) not in made:
            made[name, size] = LayerMap(randomised_model(name), size)
        return made[name, size]

    yield get
    made.clear()


def _relus_below(lm, layer: str) -> list:
    g = lm.graph
    return [n for n in lm.down_order(lm.read_node[layer]) if g.ops[n].kind in RELU_KINDS]


def captum_sees_every_relu(lm, layer: str) -> bool:
    """Whether every ReLU-kind op below `layer` is a call of an nn.ReLU module (what Captum hooks)."""
    model = lm.model
    relus = _relus_below(lm, layer)
    return bool(relus) and all(n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.ReLU)
                               for n in relus)


def _module_of(lm, layer: str) -> nn.Module:
    if layer in lm.chain_read_at:
        return lm.model.features[lm.chain_read_at[layer]]
    node = lm.read_node[layer]
    return lm.model.get_submodule(node.target if node.op == "call_module" else layer)


@pytest.mark.slow
def test_the_witnessed_families_are_those_whose_relus_are_all_modules(lmap):
    seen = set()
    for name, size in FAMILIES:
        lm = lmap(name, size)
        layers = lm.resolve(None)
        if all(captum_sees_every_relu(lm, la.name) for la in (layers[0], layers[-1])):
            seen.add(name)
    assert seen == WITNESSED


# squeezenet runs in the quick suite; the others take 15-60 s each on a loaded 2-core machine
@pytest.mark.parametrize("name,size", [pytest.param(f, s, marks=() if f == "squeezenet1_1" else pytest.mark.slow)
                                       for f, s in FAMILIES if f in WITNESSED],
                         ids=[f for f, _ in FAMILIES if f in WITNESSED])
def test_captum_witnesses_deconvnet_and_guided(lmap, name, size):
    lm = lmap(name, size)
    model = lm.model
    layers = lm.resolve(None)
    norm = "gradient" if any(isinstance(m, nn.LocalResponseNorm) for m in model.modules()) else "identity"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for la in (layers[0], layers[-1]):
        # one live channel, its strongest unit in each image, at both layers, by both methods: a second
        # channel of the same layer went down through the same ops
        reqs, _ = live_requests(lm, x, la)
        assert reqs, f"{name} {la.name}: no live unit"
        module = _module_of(lm, la.name)
        for method, cls in (("deconvnet", captum.NeuronDeconvolution), ("guided", captum.NeuronGuidedBackprop)):
            ours = D.project_images(lm, x, reqs, method=method, norm=norm)
            for i, r in enumerate(reqs):
                attr = cls(model, module).attribute(x, neuron_selector=(r.channel, r.y, r.x))
                # the engine projects value * d(unit)/d(image); Captum gives the (modified) gradient alone
                theirs = ours.meta[i]["value"] * attr[r.image].detach()
                assert float(theirs.abs().max()) > 0, (name, la.name, method)
                assert D.relative_error(ours.images[i], theirs) < TOL, (name, la.name, method, r)


@pytest.mark.parametrize("name,size", [f for f in FAMILIES if f[0] not in WITNESSED],
                         ids=[f for f, _ in FAMILIES if f not in WITNESSED])
def test_captum_cannot_witness_where_a_relu_is_no_relu_module(lmap, name, size):
    """The reason, stated: a ReLU below the deepest default layer is a function or a ReLU6 module."""
    lm = lmap(name, size)
    deepest = lm.resolve(None)[-1].name
    odd = [n for n in _relus_below(lm, deepest)
           if not (n.op == "call_module" and isinstance(lm.model.get_submodule(n.target), nn.ReLU))]
    assert odd
    kinds = {("ReLU6 module" if n.op == "call_module" and isinstance(lm.model.get_submodule(n.target), nn.ReLU6)
              else "function") for n in odd}
    assert kinds == ({"ReLU6 module"} if name == "mobilenet_v2" else {"function"}), kinds
