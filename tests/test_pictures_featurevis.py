"""Feature visualization (atlas/pictures/featurevis.py, atlas/pictures/visualizations.py, `atlas visualize`): the objective
rises, the same request gives the same bytes alone or batched, the cache serves a second request (a
read-only atlas included), and the SQL, Python and command-line doors all lead to the same picture.

Small models and few steps: the recipe's quality is measured by scripts/bench_featurevis.py."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import atlas
from atlas.pictures import featurevis as fv
from atlas.pictures import visualizations as V
from atlas.cli import main
from cli_helpers import same_picture

STEPS = 6


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res) -> str:
    # an exception other than click's exit is a traceback CliRunner swallowed: a bug, not a clear line
    assert res.exit_code != 0 and (res.exception is None or isinstance(res.exception, SystemExit)), res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture
def writable(tiny_atlas, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_atlas, tmp_path / "atlas", ignore=shutil.ignore_patterns("cache")))


@pytest.fixture
def xdg(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    return d


# ---------------------------------------------------------------------------------------------------
# the algorithm
# ---------------------------------------------------------------------------------------------------
def test_the_warp_backward_is_the_adjoint_of_its_forward():
    """The gather-written backward (deterministic on a GPU) equals autograd's scatter of the same
    bilinear resampling, for transformations well beyond the recipe's."""
    torch.manual_seed(0)
    wide = fv.Recipe(scales=(0.5, 0.8, 1.0, 1.3, 2.0), angles=(-45, -20, 0, 20, 45))
    for trial in range(6):
        g = torch.Generator().manual_seed(trial)
        img = torch.rand(3, 2, 15, 15, dtype=torch.float64, requires_grad=True)
        A, b = zip(*[fv.draw_transform(g, wide, 15) for _ in range(3)])
        A, b = torch.stack(A).double(), torch.stack(b).double()
        out, ref = fv.warp(img, A, b), fv._warp_forward(img, A, b, 0.5)
        assert torch.equal(out, ref)
        w = torch.randn_like(out)
        (g1,) = torch.autograd.grad((out * w).sum(), img)
        (g2,) = torch.autograd.grad((ref * w).sum(), img)
        assert (g1 - g2).abs().max() < 1e-12
    # the identity resamples nothing; what moves in from outside the image is the padding's grey
    eye, zero = torch.eye(2).expand(1, 2, 2), torch.zeros(1, 2)
    img = torch.rand(1, 3, 9, 9)
    assert torch.equal(fv.warp(img, eye, zero), img)
    shifted = fv.warp(img, eye, torch.tensor([[-3.0, 0.0]]))
    assert torch.equal(shifted[0, :, :3], torch.full((3, 3, 9), 0.5))
    assert torch.allclose(shifted[0, :, 3:], img[0, :, :6])


def test_the_colour_correlation_is_the_square_root_of_the_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[0.3, 0.2, 0.1], [0.0, 0.1, 0.05], [0.0, 0.0, 0.02]])
    px = torch.rand(20000, 3, generator=g) @ mix
    m = torch.tensor(fv.colour_correlation(px), dtype=torch.float64)
    cov = torch.cov(px.double().T)
    assert torch.allclose(m @ m.T, cov, atol=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(fv.colour_matrix(m.tolist()), dim=0).max(), torch.tensor(1.0))


def test_the_objective_rises(tiny_atlas):
    a = atlas.open(tiny_atlas)
    pre = a.manifest["preprocessing"]
    targets = [fv.Target("conv3", 2), fv.Target("conv3", 5), fv.Target("conv3", 5, "unit")]
    vis = fv.optimize(a.lmap, targets, fv.Recipe(steps=24, batch_size=4), mean=pre["mean"], std=pre["std"],
                      colour=fv.IMAGENET_COLOUR)
    start = fv.optimize(a.lmap, targets, fv.Recipe(steps=1, batch_size=4), mean=pre["mean"], std=pre["std"],
                        colour=fv.IMAGENET_COLOUR)
    for v, s in zip(vis, start):
        assert v.objective_end > 2 * max(v.objective_start, 1e-4), (v.target, v.history)
        # the finished, untransformed image excites the channel more than the starting one does
        assert v.objective > 2 * max(s.objective, 1e-4), (v.target, v.objective, s.objective)
        assert v.pixels.dtype == torch.uint8 and v.pixels.shape == (3, 32, 32)
    assert vis[2].unit_yx == (2, 2)  # conv3's 4x4 map at 32 px: the centre unit


@pytest.mark.determinism
def test_a_channel_alone_or_in_a_batch_of_its_layer_is_the_same_bytes(writable, tmp_path):
    a = atlas.open(writable)
    opts = dict(steps=STEPS, batch_size=4, progress=False)
    alone = V.visualize(a, "conv2", [5], cache=tmp_path / "alone", **opts)[0]
    batch = V.visualize(a, "conv2", [1, 5, 9, 12], cache=tmp_path / "batch", **opts)
    again = V.visualize(a, "conv2", [12, 5], cache=tmp_path / "again", **opts)
    five = [r for r in batch if r["channel"] == 5][0]
    assert Path(alone["png"]).read_bytes() == Path(five["png"]).read_bytes()
    assert Path(again[1]["png"]).read_bytes() == Path(five["png"]).read_bytes()
    assert alone["map_max"] == five["map_max"]
    # another seed is another picture; the other channels are pictures of their own
    other = V.visualize(a, "conv2", [5], cache=tmp_path / "seed", seed=1, **opts)[0]
    assert Path(other["png"]).read_bytes() != Path(alone["png"]).read_bytes()
    assert len({Path(r["png"]).read_bytes() for r in batch}) == 4


# ---------------------------------------------------------------------------------------------------
# the cache, and the doors to it
# ---------------------------------------------------------------------------------------------------
def test_a_picture_is_rendered_once_then_read_from_the_cache(writable, monkeypatch):
    a = atlas.open(writable)
    # asking only for what is cached draws nothing, not even the colour statistics
    assert V.visualize(a, "conv1", [0], steps=STEPS, render=False)[0]["png"] is None
    assert not list(writable.rglob("colour.json"))
    first = V.visualize(a, "conv1", [0, 3], steps=STEPS)
    png = Path(first[0]["png"])
    assert png.is_relative_to(writable / "cache") and png.is_file()
    # the build estimated the dataset's colour correlation into the manifest: nothing to estimate here
    colour = a.manifest["colour"]
    assert colour["source"] == "atlas-images" and colour["images"] == 36 and len(colour["matrix"]) == 3
    assert not list(writable.rglob("colour.json"))

    def boom(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(fv, "optimize", boom)
    second = atlas.open(writable)  # a new handle: only the files are shared
    again = V.visualize(second, "conv1", [3, 0], steps=STEPS)
    assert {r["png"] for r in again} == {r["png"] for r in first}
    # the figures come back from the PNG's text: a hit reads no model
    assert [r["map_max"] for r in again] == [first[1]["map_max"], first[0]["map_max"]]
    assert all(r["reached"] == (r["map_max"] > r["dataset_max"]) for r in again)
    assert second.visualize("conv1", 0, steps=STEPS) == png  # the facade
    assert V.visualize(second, "conv1", [3, 5], steps=STEPS, render=False)[1]["png"] is None  # 5: never drawn
    assert not list(writable.rglob("*.tmp"))


def test_a_read_only_atlas_draws_into_the_per_user_cache(tiny_atlas, tmp_path, xdg):
    from test_pictures_reliability import make_read_only, make_writable

    shared = Path(shutil.copytree(tiny_atlas, tmp_path / "shared", ignore=shutil.ignore_patterns("cache")))
    # an atlas built before the build recorded the colour statistics: they are estimated on first use
    manifest = json.loads((shared / "manifest.json").read_text())
    manifest.pop("colour", None)
    (shared / "manifest.json").write_text(json.dumps(manifest))
    make_read_only(shared)
    try:
        rec = V.visualize(atlas.open(shared), "conv1", [2], steps=STEPS)[0]
        png = Path(rec["png"])
        assert png.is_relative_to(xdg) and png.is_file()
        assert list(xdg.rglob("featurevis-v1/colour.json"))  # the colour statistics went there too
        # the same bytes as in a writable copy
        mine = V.visualize(atlas.open(shared), "conv1", [2], steps=STEPS, cache=tmp_path / "mine")[0]
        assert Path(mine["png"]).read_bytes() == png.read_bytes()
    finally:
        make_writable(shared)


def test_sql_and_the_command_line_give_the_same_picture(writable, tmp_path):
    a = atlas.open(writable)
    rows = a.sql("SELECT channel, featurevis_png(layer, channel, steps := 6) AS png FROM channels "
                 "WHERE layer = 'conv4' AND channel < 3 ORDER BY channel").fetchall()
    assert [r[0] for r in rows] == [0, 1, 2] and all(Path(r[1]).is_file() for r in rows)
    res = _cli("visualize", writable, "conv4", "--channels", "0-2", "--steps", STEPS, "--format", "json",
               "--no-progress")
    assert res.exit_code == 0, res.output
    recs = json.loads(res.stdout)
    assert [r["png"] for r in recs] == [r[1] for r in rows]
    assert {"map_max", "dataset_max", "reached", "ratio"} <= set(recs[0])
    dataset = {r["channel"]: r["max"] for r in a.channels("conv4")}
    assert all(r["dataset_max"] == pytest.approx(dataset[r["channel"]]) for r in recs)
    # the confined `atlas sql` renders too
    res = _cli("sql", writable, "SELECT featurevis_png('conv4', 1, steps := 6) AS png", "--format", "csv")
    assert res.exit_code == 0 and rows[1][1] in res.stdout, res.output
    # one channel prints its path; --out copies it
    res = _cli("visualize", writable, "conv4", 1, "--steps", STEPS, "--out", tmp_path / "one.png", "--no-progress")
    assert res.exit_code == 0 and res.stdout.strip() == rows[1][1]
    assert same_picture(tmp_path / "one.png", rows[1][1])


def test_a_whole_layer_unit_objectives_and_diversity(writable):
    res = _cli("visualize", writable, "conv5", "--all", "--steps", 2, "--batch-size", 16, "--format", "csv",
               "--no-progress")
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()) == 1 + 64
    a = atlas.open(writable)
    unit = V.visualize(a, "conv3", [1], steps=STEPS, unit="1,2")[0]
    assert (unit["objective"], unit["unit_y"], unit["unit_x"]) == ("unit", 1, 2)
    assert Path(unit["png"]).name == "1-unit-1-2.png"
    two = V.visualize(a, "conv3", [1], steps=STEPS, diversity=2)[0]
    from PIL import Image

    with Image.open(two["png"]) as im:
        w, h = im.size
        left, right = im.crop((0, 0, h, h)).tobytes(), im.crop((w - h, 0, w, h)).tobytes()
    assert w == 2 * h + 2 and left != right  # two images side by side, not the same one


@pytest.mark.parametrize("args, says", [
    (("conv2",), "give one of CHANNEL"),
    (("conv2", 1, "--all"), "not more than one"),
    (("conv9", 1), "unknown layer 'conv9'"),
    (("conv2", 99), "out of range"),
    (("conv2", 1, "--unit", "centre-ish"), "--unit 'centre-ish' is not a position"),
    (("conv2", 1, "--unit", "40,40"), "outside conv2's"),
    (("conv2", 1, "--steps", 0), "--steps must be a whole number of at least 1"),
    (("conv2", 1, "--device", "tpu"), "--device 'tpu' is not a device"),
])
def test_bad_input_is_one_line(tiny_atlas, args, says, tmp_path):
    res = _cli("visualize", tiny_atlas, *args, "--cache", tmp_path, "--no-progress")
    assert says in _one_line_error(res)


# ---------------------------------------------------------------------------------------------------
# any model: only gradients are needed
# ---------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """What the DeconvNet refuses (residual additions, batch norm, a functional ReLU)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = _Block(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_a_model_the_deconvnet_refuses_is_visualized_through_the_layer_map():
    from atlas.net import LayerMap

    lmap = LayerMap(TinyResNet().eval(), 32)
    assert not lmap.chain
    conv = [la.name for la in lmap.layers if la.kind != "fc"][-1]
    targets = [fv.Target(conv, 0), fv.Target(conv, 3)]
    kw = dict(mean=[0.5] * 3, std=[0.25] * 3, colour=fv.IMAGENET_COLOUR)
    vis = fv.optimize(lmap, targets, fv.Recipe(steps=12, batch_size=2), **kw)
    for v in vis:
        assert v.objective_end > v.objective_start, (v.target, v.history)
    again = fv.optimize(lmap, targets[1:], fv.Recipe(steps=12, batch_size=2), **kw)
    assert torch.equal(again[0].pixels, vis[1].pixels)


# ---------------------------------------------------------------------------------------------------
# on the exported pages
# ---------------------------------------------------------------------------------------------------
def test_the_export_shows_what_is_cached_and_renders_the_rest_when_asked(writable, tmp_path, monkeypatch):
    from atlas.export import export

    monkeypatch.setattr(V, "DEFAULT_STEPS", STEPS)  # the export's recipe, made cheap
    site = tmp_path / "site"
    export(writable, site, layers="conv2", channels="0-3", progress=False)
    assert not list(site.rglob("*featurevis*")) and "featurevis" not in (site / "conv2" / "0.html").read_text()

    a = atlas.open(writable)
    drawn = {r["channel"]: r for r in V.visualize(a, "conv2", [0, 1])}
    export(writable, site, layers="conv2", channels="0-3", progress=False)  # no flag: the cached ones only
    for c in (0, 1):
        page = (site / "conv2" / f"{c}.html").read_text()
        assert f'src="img/{c}-featurevis.png"' in page and "figure2" in page
        assert (site / "conv2" / "img" / f"{c}-featurevis.png").read_bytes() == Path(drawn[c]["png"]).read_bytes()
        twin = json.loads((site / "conv2" / f"{c}.json").read_text())
        assert twin["featurevis"]["map_max"] == pytest.approx(drawn[c]["map_max"])
        assert twin["featurevis"]["dataset_max"] == pytest.approx(drawn[c]["dataset_max"])
    assert "featurevis" not in (site / "conv2" / "2.html").read_text()
    layer_page = (site / "conv2" / "index.html").read_text()
    assert 'data-src="img/0-featurevis.png"' in layer_page and "img/2-featurevis.png" not in layer_page

    export(writable, site, layers="conv2", channels="0-3", progress=False, feature_vis=True)
    assert sorted(p.name for p in (site / "conv2" / "img").glob("*featurevis*")) == \
        [f"{c}-featurevis.png" for c in range(4)]
    res = _cli("export", writable, site, "--layers", "conv2", "--channels", "0-3", "--no-progress")
    assert res.exit_code == 0 and "up to date" in res.stderr, res.output
