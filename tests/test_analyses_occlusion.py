"""Occlusion sensitivity (figure 7): a planted model, the batched/windowed forward against a naive one,
the stored table and figures, a model without a classifier, bad input."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from atlas.net.runner import Runner
from atlas.analyses.occluder import default_geometry, positions
from atlas.analyses.occlusion import occlude
from atlas.analyses.occlusion_forward import occlusion_forward
from atlas.errors import AtlasError
from atlas.net import LayerMap
from atlas.models.zfnet import AlexNetSingle, ZFNetMini
from atlas.facade import Atlas
from conftest import without_classifier as _without_classifier

S = 32
R = (8, 16, 16, 24)  # the planted region: rows 8..15, columns 16..23 (y0, x0, y1, x1)


class Planted(nn.Module):
    """torchvision layout; the logit of class 0 depends on the mean red value over region R only.

    features: conv1 (1x1): channel 0 = red + 10 (always positive, so the ReLU is linear), channel 1 = 1.
    classifier: logit0 = 4 * (mean over R of channel 0 - 10) - 8, logit1 = 0. On the planted image
    (red patch = 2 in model units over R, grey = 0 elsewhere) p(class 0) = 0.5; occluding any
    pixel of R with grey lowers it, occluding anything else changes nothing.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d((S, S))
        self.classifier = nn.Sequential(nn.Linear(2 * S * S, 2))
        with torch.no_grad():
            conv = self.features[0]
            conv.weight.zero_()
            conv.weight[0, 0] = 1.0
            conv.bias.copy_(torch.tensor([10.0, 1.0]))
            lin = self.classifier[0]
            lin.weight.zero_()
            w = torch.zeros(2, S, S)
            y0, x0, y1, x1 = R
            w[0, y0:y1, x0:x1] = 4.0 / ((y1 - y0) * (x1 - x0))
            lin.weight[0] = w.flatten()
            lin.bias.copy_(torch.tensor([-4.0 * 10 - 8.0, 0.0]))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def planted_atlas(path: Path) -> Atlas:
    """A real atlas (zfnet-mini, 32 px) whose model is swapped for the planted one."""
    a = Atlas(path)
    model = Planted().eval()
    model.atlas_meta = {}
    a.__dict__["model"] = model
    a.__dict__["lmap"] = LayerMap(model, S)
    return a


def planted_image(tmp_path: Path) -> Path:
    arr = np.full((S, S, 3), 128, np.uint8)  # grey: 0 in the model's units (mean 0.5, std 0.25)
    y0, x0, y1, x1 = R
    arr[y0:y1, x0:x1] = (255, 128, 128)  # red = (1 - 0.5) / 0.25 = 2
    p = tmp_path / "planted.png"
    Image.fromarray(arr).save(p)
    return p


def _overlaps(boxes: np.ndarray) -> np.ndarray:
    y0, x0, y1, x1 = R
    return (boxes[:, 0] < y1) & (boxes[:, 2] > y0) & (boxes[:, 1] < x1) & (boxes[:, 3] > x0)


@pytest.mark.parametrize("method", ["incremental", "full"])
def test_planted_probability_drops_exactly_over_the_region(own_atlas, tmp_path, method):
    a = planted_atlas(own_atlas)
    res = occlude(a, str(planted_image(tmp_path)), size=5, stride=2, fill="grey", label=0, method=method,
                    out=tmp_path / "fig")
    assert res.probability_base == pytest.approx(0.5, abs=1e-6)
    assert res.layer == "conv1" and res.channel == 0
    over = _overlaps(res.boxes).reshape(res.n, res.n)
    assert over.any() and (~over).any()
    p = res.probability
    # exactly unchanged where the square misses R, clearly lower wherever it touches R
    assert np.abs(p[~over] - res.probability_base).max() < 1e-9
    assert (p[over] < res.probability_base - 1e-3).all()
    # the lowest probability is where the square lies inside R (most of R occluded)
    k = int(np.argmin(p))
    y0, x0, y1, x1 = res.boxes[k]
    assert R[0] <= y0 and y1 <= R[2] and R[1] <= x0 and x1 <= R[3]
    # the strongest map (channel 0 = red + 10) drops by >= 2 per occluded pixel of R; elsewhere the
    # grey pixel 128/255 differs from the fill (0.5) by 0.0078 model units: <= 25 px * 0.0078 = 0.2
    act = res.activation
    assert np.abs(act[~over] - res.activation_base).max() < 0.25
    assert (act[over] < res.activation_base - 1.5).all()
    # the most probable class: class 1 where the occluder hides enough of R
    assert (res.top_class[over] == 1).all()
    for name in ("figure", "image", "activation", "projection", "probability", "top_class"):
        assert res.figures[name].is_file() and res.figures[name].parent == tmp_path / "fig"


def test_positions_and_default_geometry():
    assert default_geometry(224) == (50, 8)
    assert default_geometry(32) == (7, 1)
    assert default_geometry(64) == (14, 2)
    n, boxes = positions(224, 50, 8)
    assert n == 28 and len(boxes) == 784
    assert boxes[:, :2].min() == 0 and boxes[:, 2:].max() == 224
    # cell (i, j) is centred in input pixels [8i, 8i+8): the square around it, clipped
    assert boxes[0].tolist() == [0, 0, 29, 29]
    assert boxes[n + 1].tolist() == [0, 0, 37, 37]
    assert boxes[14 * n + 14].tolist() == [116 - 25, 116 - 25, 116 + 25, 116 + 25]


class _Runner(Runner):
    def __init__(self, model, size):
        self.device = torch.device("cpu")
        self.channels_last = True
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.lmap = LayerMap(self.model, size)


@pytest.mark.parametrize("make,size", [(lambda: ZFNetMini(contrast_norm=True), 64), (AlexNetSingle, 99)])
def test_batched_windowed_forward_equals_naive(make, size):
    """Incremental (first layers on windows, real padding at the borders) and full batches give what a
    plain forward pass of each occluded image gives; corners and edges included. ZFNet-mini: padded
    convs, ceil-mode pools, LRN; single-tower AlexNet: 11x11 stride 4, floor-mode pools."""
    torch.manual_seed(0)
    model = make().eval()
    naive = LayerMap(copy.deepcopy(model), size)
    runner = _Runner(model, size)
    s, st = default_geometry(size)
    n, boxes = positions(size, s, st)
    pick = np.unique(np.r_[0, 1, n - 1, n, n * n // 2 + n // 2, n * (n - 1), n * n - 1, 3 * n + 5])
    b = boxes[pick]
    x = torch.randn(3, size, size)
    fill = torch.full((3, 1, 1), 0.25)
    layer = runner.lmap.conv_layers[-1].name
    plans = {}
    for method in ("incremental", "full"):
        m = occlusion_forward(runner, x, b, layer=layer, channel=3, fill=fill, method=method, batch_size=3)
        xs = x.repeat(len(b), 1, 1, 1)
        for i, (y0, x0, y1, x1) in enumerate(b.tolist()):
            xs[i, :, y0:y1, x0:x1] = fill
        with torch.no_grad():
            acts = naive.extract(xs, [layer, naive.layers[-1].name])
        ref_a = acts[layer][:, 3].sum((1, 2)).double().numpy()
        ref_l = acts[naive.layers[-1].name].double().numpy()
        assert np.abs(m.activation - ref_a).max() <= 1e-4 * max(np.abs(ref_a).max(), 1e-6)
        assert np.abs(m.logits - ref_l).max() <= 1e-4 * max(np.abs(ref_l).max(), 1e-6)
        plans[method] = m.plan
    assert plans["incremental"].last >= 0  # the first layers really ran on windows
    assert plans["full"].last == -1


def test_occlude_dataset_image_stores_table_and_figures(own_atlas):
    res = occlude(str(own_atlas), "3")
    assert (res.size, res.stride, res.n) == (7, 1, 32)
    # a random head records no class names: 'blue' is the image's label, not a class of the model
    assert res.image_id == 3 and res.dataset_label == "blue" and res.class_source == "most_probable"
    a = Atlas(own_atlas)
    rows = a.sql(f"SELECT count(*), count(DISTINCT (pos_y, pos_x)), min(probability) >= 0, max(probability) <= 1, "
                 f"any_value(layer), any_value(dataset_label) FROM occlusion WHERE run = '{res.run}'").fetchall()[0]
    assert rows == (1024, 1024, True, True, "conv5", "blue")
    back = a.sql(f"SELECT activation FROM occlusion WHERE run = '{res.run}' ORDER BY pos_y, pos_x").fetchall()
    assert np.allclose([r[0] for r in back], res.activation.ravel())
    assert res.figures["figure"].is_file()
    assert res.figures["figure"].parent == own_atlas / "analyses" / "occlusion" / res.run
    assert any("SQL view occlusion" in line for line in res.summary())




def test_no_classifier_still_gives_activation_maps(tiny_atlas, tmp_path):
    path = _without_classifier(tiny_atlas, tmp_path)
    res = occlude(path, 0, size=8, stride=4, figures=True)
    assert res.probability is None and res.top_class is None
    assert res.activation.shape == (8, 8)
    assert any("no classifier" in n and "gone.pt" in n for n in res.notes)
    assert "probability" not in res.figures and res.figures["activation"].is_file()
    rows = Atlas(path).sql("SELECT count(*), count(probability) FROM occlusion").fetchall()[0]
    assert rows == (64, 0)
    with pytest.raises(AtlasError, match="classifier.*gone.pt"):
        occlude(path, 0, label="red", store=False, figures=False)


def test_bad_input(tiny_atlas, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    cases = [
        (dict(image=str(bad)), "cannot be read"),
        (dict(image=str(tmp_path / "missing.png")), "does not exist"),
        (dict(image=10_000), "not in atlas"),
        (dict(image=0, layer="conv9"), "unknown layer 'conv9'"),
        (dict(image=0, layer="fc7"), "fc layer"),
        (dict(image=0, size=0), "size 0"),
        (dict(image=0, size=33), "does not fit"),
        (dict(image=0, stride=0), "stride 0"),
        (dict(image=0, fill="pink"), "unknown fill"),
        (dict(image=0, label="zebra"), "class 'zebra'.*not a class"),
        (dict(image=0, label=99), "out of range"),
        (dict(image=0, method="magic"), "unknown forward"),
    ]
    for kw, pattern in cases:
        image = kw.pop("image")
        with pytest.raises(AtlasError, match=pattern):
            occlude(tiny_atlas, image, store=False, figures=False, **kw)
