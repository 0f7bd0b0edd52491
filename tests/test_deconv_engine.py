"""The DeconvNet projection engine: agreement with the gradient formulation, exactness, refusals."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atlas import deconv as D
from atlas.deconv import Request
from atlas.errors import AtlasError
from atlas.net import LayerMap
from atlas.models import load_model
from atlas.deconv.switches import decode, encode, regions_below

TOL = 1e-5  # relative max error, see atlas.deconv.relative_error


def _units(lmap, acts, layers, images=(0,), per_image=None):
    """Requests with a positive activation: interior units and units on every border."""
    reqs = []
    for name in layers:
        a = acts[name]
        H, W = a.shape[-2:]
        spots = per_image or [(0, 0), (H - 1, W - 1), (H // 2, W // 3), (0, W - 1), (H - 1, 1)]
        for img in images:
            for (y, x) in spots:
                y, x = min(y, H - 1), min(x, W - 1)
                c = int(a[img, :, y, x].argmax())
                assert a[img, c, y, x] > 0, (name, y, x)
                reqs.append(Request(img, name, c, y, x))
    return reqs


def _live(acts, img, name, rank=0):
    """The channel with the rank-th largest map maximum in image img."""
    return int(acts[name][img].amax(dim=(1, 2)).argsort(descending=True)[rank])


def _check_agreement(lmap, x, reqs, mode="unit", norm="identity"):
    P = D.project_images(lmap, x, reqs, mode=mode, norm=norm)
    assert P.images.shape == (len(reqs), 3, lmap.image_size, lmap.image_size)
    worst = 0.0
    for i, r in enumerate(reqs):
        ref = D.gradient_reference(lmap, x, r, mode=mode, norm=norm)
        assert float(ref.abs().max()) > 0
        err = D.relative_error(P.images[i], ref)
        worst = max(worst, err)
        assert err <= TOL, (r, mode, norm, err)
    return worst


@pytest.fixture(scope="module")
def zfnet():
    torch.manual_seed(0)
    model = load_model("zfnet", seed=0)
    lm = LayerMap(model, 224)
    x = torch.randn(2, 3, 224, 224)
    rec = D.record(lm, x)
    return lm, x, rec


# ---------------------------------------------------------------------------
# agreement with the gradient formulation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["identity", "gradient"])
def test_zfnet_unit_agrees_with_gradient(zfnet, norm):
    lm, x, rec = zfnet
    reqs = _units(lm, rec.activations, ["conv1", "conv2", "conv5"], images=(0, 1),
                  per_image=[(0, 0), (12, 12), (6, 2), (0, 12)])
    reqs += _units(lm, rec.activations, ["conv3", "conv4"], images=(1,), per_image=[(12, 0), (5, 7)])
    assert _check_agreement(lm, x, reqs, norm=norm) <= TOL


def test_zfnet_map_mode_agrees_with_gradient(zfnet):
    lm, x, rec = zfnet
    a = rec.activations
    reqs = [Request(0, "conv2", _live(a, 0, "conv2")), Request(1, "conv5", _live(a, 1, "conv5", 3)),
            Request(1, "conv3", _live(a, 1, "conv3", 10))]
    assert _check_agreement(lm, x, reqs, mode="map") <= TOL
    assert _check_agreement(lm, x, reqs[:1], mode="map", norm="gradient") <= TOL


def test_identity_and_gradient_norm_differ_and_say_so(zfnet):
    lm, x, rec = zfnet
    reqs = _units(lm, rec.activations, ["conv5"], per_image=[(6, 6)])
    a = D.project_images(lm, x, reqs, norm="identity")
    b = D.project_images(lm, x, reqs, norm="gradient")
    assert a.meta[0]["norm"] == "identity" and b.meta[0]["norm"] == "gradient"
    assert not torch.allclose(a.images, b.images)


@pytest.mark.parametrize("name,size,layers", [
    ("alexnet", 224, ["conv1", "conv2", "conv5"]),   # torchvision, in-place ReLUs
    ("vgg16", 64, ["conv1", "conv4", "conv13"]),     # non-overlapping 2x2 pools, RF > image at the top
    ("zfnet-mini", 64, ["conv1", "conv2", "conv3", "conv4", "conv5"]),
])
def test_other_nets_agree_with_gradient(name, size, layers):
    model = load_model(name, seed=1)
    lm = LayerMap(model, size)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    acts = D.record(lm, x).activations
    reqs = _units(lm, acts, layers, images=(0, 1))
    assert _check_agreement(lm, x, reqs) <= TOL
    maps = [Request(i, la, _live(acts, i, la, i)) for i, la in ((0, layers[0]), (1, layers[-1]))]
    assert _check_agreement(lm, x, maps, mode="map") <= TOL


def test_zfnet_mini_with_contrast_norm_gradient():
    model = load_model("zfnet-mini", seed=2, contrast_norm=True)
    lm = LayerMap(model, 64)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 64) * 20  # large inputs: the LRN is far from linear
    acts = D.record(lm, x).activations
    reqs = _units(lm, acts, ["conv2", "conv5"])
    for norm in ("identity", "gradient"):
        assert _check_agreement(lm, x, reqs, norm=norm) <= TOL


# ---------------------------------------------------------------------------
# exactness of the engine's own mechanics
# ---------------------------------------------------------------------------
class _PoolNet(nn.Module):
    """1x1 convs that pass channel 0 through, around ZFNet's overlapping 3x3 stride-2 pool."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), nn.ReLU(),
                                      nn.MaxPool2d(3, 2), nn.Conv2d(1, 1, 1, bias=False), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0, 0] = 1.0
            self.features[3].weight.fill_(1.0)

    def forward(self, x):
        return self.features(x)


def test_overlapping_windows_add_where_max_unpool_would_overwrite():
    lm = LayerMap(_PoolNet(), 7)
    x = torch.zeros(1, 3, 7, 7)
    x[0, 0, 2, 2] = 5.0  # the corner shared by the windows (0,0), (0,1), (1,0), (1,1)
    x[0, 0, 6, 6] = 1.0
    P = D.project_images(lm, x, [Request(0, "conv2", 0)], mode="map")
    # the four pooled 5.0s all return to (2, 2) and add up: 4 * 5 = 20
    assert float(P.images[0, 0, 2, 2]) == pytest.approx(20.0)
    rec = D.record(lm, x)
    wrong = F.max_unpool2d(rec.activations["conv2"], rec.switches["pool1"], 3, 2, output_size=(7, 7))
    assert float(wrong[0, 0, 2, 2]) == pytest.approx(5.0)  # overwrites: what the engine must not do
    ref = D.gradient_reference(lm, x, Request(0, "conv2", 0), mode="map")
    assert D.relative_error(P.images[0], ref) == 0.0
    U = D.project_images(lm, x, [Request(0, "conv2", 0, 0, 1)])  # one unit: one window, no sum
    assert float(U.images[0, 0, 2, 2]) == pytest.approx(5.0)


def test_recomputed_switches_equal_layermap_extract(zfnet):
    lm, x, rec = zfnet
    _, sw = lm.extract(x, ["conv5"], pool_indices=True)
    mine = D.switches_from_images(lm, x)
    assert set(mine) == {"pool1", "pool2"} and set(sw) >= set(mine)
    for k in mine:
        assert torch.equal(mine[k], sw[k])


def test_stored_switches_equal_recompute(zfnet):
    """encode/decode round trip: per request, only the switches inside its receptive field."""
    lm, x, rec = zfnet
    reqs = _units(lm, rec.activations, ["conv2", "conv5"], images=(0, 1),
                  per_image=[(0, 0), (12, 12), (4, 9)])
    reqs += _units(lm, rec.activations, ["conv1"], images=(1,), per_image=[(0, 0), (50, 109)])
    pools = {p.name: p for p in lm.pools}
    stored = {name: [] for name in ("pool1", "pool2")}
    valued = []
    for j, r in enumerate(reqs):
        layer = lm.by_name[r.layer]
        regions = {reg.pool: reg for reg in regions_below(lm, layer, r.y, r.x)}
        for name in stored:
            p = pools[name]
            if name in regions:
                data = encode(rec.switches[name][r.image], p.geometry, regions[name])
                stored[name].append(decode(data, p.channels, p.geometry, regions[name]))
            else:
                stored[name].append(torch.zeros_like(rec.switches[name][0]))
        valued.append(Request(j, r.layer, r.channel, r.y, r.x,
                              value=float(rec.activations[r.layer][r.image, r.channel, r.y, r.x])))
    sw = {k: torch.stack(v) for k, v in stored.items()}
    a = D.project(lm, valued, sw)
    b = D.project(lm, reqs, rec.switches, activations=rec.activations)
    assert torch.equal(a.images, b.images)
    assert [m["value"] for m in a.meta] == [m["value"] for m in b.meta]


def test_batched_equals_one_at_a_time(zfnet):
    lm, x, rec = zfnet
    reqs = _units(lm, rec.activations, ["conv5", "conv2", "conv4"], images=(0, 1),
                  per_image=[(0, 0), (7, 12), (12, 3)])
    together = D.project(lm, reqs, rec.switches, activations=rec.activations)
    for i, r in enumerate(reqs):
        alone = D.project(lm, [r], rec.switches, activations=rec.activations)
        assert D.relative_error(together.images[i], alone.images[0]) <= 1e-6
        assert together.meta[i]["layer"] == r.layer and together.meta[i]["channel"] == r.channel
    small = D.project(lm, reqs, rec.switches, activations=rec.activations, batch_size=2)
    assert D.relative_error(small.images, together.images) <= 1e-6


def test_unit_projection_stays_inside_its_box(zfnet):
    lm, x, rec = zfnet
    reqs = _units(lm, rec.activations, ["conv3", "conv5"], per_image=[(0, 0), (6, 11)])
    P = D.project(lm, reqs, rec.switches, activations=rec.activations)
    for i, m in enumerate(P.meta):
        x0, y0, x1, y1 = m["box"]
        img = P.images[i].clone()
        assert img[:, y0:y1, x0:x1].abs().max() > 0
        img[:, y0:y1, x0:x1] = 0
        assert img.abs().max() == 0
        assert torch.equal(P.crop(i), P.images[i][:, y0:y1, x0:x1])


def test_metadata_and_value_scaling(zfnet):
    lm, x, rec = zfnet
    r = _units(lm, rec.activations, ["conv4"], per_image=[(3, 4)])[0]
    P = D.project(lm, [r], rec.switches, activations=rec.activations)
    m = P.meta[0]
    v = float(rec.activations["conv4"][0, r.channel, 3, 4])
    assert {k: m[k] for k in ("mode", "norm", "layer", "channel", "y", "x", "image")} == \
        {"mode": "unit", "norm": "identity", "layer": "conv4", "channel": r.channel, "y": 3, "x": 4, "image": 0}
    assert m["value"] == pytest.approx(v)
    assert m["box"] == lm.by_name["conv4"].box(3, 4, 224)
    # the projection is positively homogeneous in the seed value
    Q = D.project(lm, [Request(0, "conv4", r.channel, 3, 4, value=2 * v)], rec.switches)
    assert D.relative_error(Q.images[0], 2 * P.images[0]) <= 1e-6
    M = D.project(lm, [Request(0, "conv4", r.channel, 3, 4)], rec.switches, activations=rec.activations,
                  mode="map")
    assert M.meta[0]["mode"] == "map" and M.meta[0]["value"] == pytest.approx(v)
    assert M.meta[0]["map_max"] >= v and M.meta[0]["box"] == (0, 0, 224, 224)


def test_eval_mode_is_forced():
    model = load_model("zfnet-mini", seed=3).train()
    lm = LayerMap(model, 32)
    x = torch.randn(1, 3, 32, 32)
    D.project_images(lm, x, [Request(0, "conv3", 0, 1, 1)])
    assert not model.training


def test_bad_requests_are_atlas_errors(zfnet):
    lm, x, rec = zfnet
    sw, acts = rec.switches, rec.activations
    for bad in (Request(0, "conv9", 0), Request(0, "fc6", 0), Request(0, "conv1", 96),
                Request(0, "conv2", 0, 26, 0), Request(5, "conv2", 0, 1, 1)):
        with pytest.raises(AtlasError):
            D.project(lm, [bad], sw, activations=acts)
    with pytest.raises(AtlasError, match="value"):
        D.project(lm, [Request(0, "conv2", 0, 1, 1)], sw)
    with pytest.raises(AtlasError, match="activations"):
        D.project(lm, [Request(0, "conv2", 0, 1, 1, value=1.0)], sw, mode="map")
    with pytest.raises(AtlasError, match="mode"):
        D.project(lm, [Request(0, "conv2", 0, 1, 1, value=1.0)], sw, mode="full")
    with pytest.raises(AtlasError, match="norm"):
        D.project(lm, [Request(0, "conv2", 0, 1, 1, value=1.0)], sw, norm="invert")
    with pytest.raises(AtlasError, match="norm"):
        D.project(lm, [Request(0, "conv2", 0, 1, 1, value=1.0)], sw, norm="gradient")
    with pytest.raises(AtlasError, match="pool1"):
        D.project(lm, [Request(0, "conv2", 0, 1, 1, value=1.0)], {})


# ---------------------------------------------------------------------------
# refusals: models the engine cannot project exactly
# ---------------------------------------------------------------------------
class _ReLUConv(nn.Conv2d):
    def forward(self, x):
        return F.relu(super().forward(x))


def _mini(*mods):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*mods)

        def forward(self, x):
            return self.features(x)
    return Net()


class _LoopNet(nn.Module):
    """Calls the modules itself and hides a functional ReLU between them."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU())

    def forward(self, x):
        for m in self.features:
            x = m(x)
            if isinstance(m, nn.Conv2d):
                x = F.relu(x)
        return x


class _ReluSequential(nn.Sequential):
    def forward(self, x):
        for m in self:
            x = F.relu(m(x)) if isinstance(m, nn.Conv2d) else m(x)
        return x


class _ReluAfterConv1(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = _ReluSequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU())

    def forward(self, x):
        return self.features(x)


class _Normalising(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x):
        return self.features((x - 0.5) * 2)


@pytest.mark.parametrize("model", [
    _mini(_ReLUConv(3, 8, 3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU()),   # a ReLU inside a conv subclass
    _LoopNet(),                                                                  # F.relu between the modules
    _ReluAfterConv1(),                                                           # a Sequential that adds F.relu
    _Normalising(),                                                              # the input changed first
    _mini(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU()),
    _mini(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU()),
    _mini(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU()),
], ids=["conv-subclass", "loop", "relu-sequential", "normalising", "batchnorm", "avgpool", "grouped"])
def test_models_the_walk_cannot_read_are_projected_as_graphs(model):
    """What the Sequential walk once refused (a hidden functional ReLU, an input transform, BatchNorm,
    average pooling, groups) is read as a graph and projected exactly (against the autograd reference)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # default statistics would hide a wrong scale
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    lm = LayerMap(model.eval(), 32)
    assert not lm.chain
    x = torch.randn(2, 3, 32, 32)
    last = [la for la in lm.layers if la.kind == "conv"][-1]
    with torch.no_grad():
        act = lm.extract(x, [last.name])[last.name]
    reqs = [Request(i, last.name, c, *divmod(int(act[i, c].argmax()), last.width)) for i in range(2)
            for c in range(last.channels) if float(act[i, c].max()) > 0][:4]
    assert reqs
    got = D.project_images(lm, x, reqs)
    for i, r in enumerate(reqs):
        ref = D.gradient_reference(lm, x, r)
        assert float(ref.abs().max()) > 0
        assert D.relative_error(got.images[i], ref) < 1e-5


def test_hooked_module_is_refused():
    model = _mini(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
    model.features[1].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(AtlasError, match=r"cannot project conv1: ReLU with forward hooks .* at features\.1 has no DeconvNet rule"):
        D.check_graph(LayerMap(model, 16), "conv1")


def test_supported_small_model_passes_the_check():
    model = _mini(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(),
                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    lm = LayerMap(model, 16)
    D.check_graph(lm, "conv2")
    x = torch.randn(1, 3, 16, 16)
    acts = D.record(lm, x).activations
    reqs = _units(lm, acts, ["conv2"], per_image=[(0, 0), (6, 6)])
    assert _check_agreement(lm, x, reqs) <= TOL


def test_guided_backprop_on_the_windowed_engine():
    """Guided backpropagation on a 2012-2014 chain (the windowed engine: the forward ReLU pattern
    gathered per window) agrees with its autograd reference."""
    from atlas.models.registry import load_model

    lm = LayerMap(load_model("zfnet-mini", seed=3), 32)
    assert lm.chain
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        acts = D.record(lm, x).activations
    for layer in ("conv1", "conv3", "conv5"):
        a = acts[layer]
        reqs = [Request(i, layer, c, *divmod(int(a[i, c].argmax()), a.shape[-1])) for i in range(3)
                for c in (0, 1) if float(a[i, c].max()) > 0]
        got = D.project_images(lm, x, reqs, method="guided")
        plain = D.project_images(lm, x, reqs)
        for i, r in enumerate(reqs):
            ref = D.gradient_reference(lm, x, r, method="guided")
            assert D.relative_error(got.images[i], ref) < 1e-5
        if layer != "conv1":  # below conv1's own (positive) unit there is no ReLU: the two agree there
            assert any(not torch.equal(got.images[i], plain.images[i]) for i in range(len(reqs)))
