"""How projections are shown: the percentile display (and the max one, kept by name), the quiet marking of
the field beyond the image, the display in the cache key, the PNG text, the CLI, SQL and the site, and
the analysis page showing each of a figure's panels once, in the paper's order."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import atlas
from atlas.pictures import projections as PJ
from atlas.pictures import drawing as R
from atlas.cli import main
from atlas.errors import AtlasError


def _near_grey(u: np.ndarray, levels: int = 8) -> float:
    return float(np.mean(np.all(np.abs(u.astype(int) - 128) <= levels, axis=-1)))


# ---------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------
def test_percentile_display_clips_an_outlier_that_max_lets_wash_everything_out():
    rng = np.random.default_rng(0)
    v = rng.laplace(0, 1.0, (3, 40, 40)).astype(np.float32)
    v[0, 3, 3] = 400.0  # one strong pixel
    by_max, by_pct = R.normalise(v, display="max"), R.normalise(v)
    assert _near_grey(by_max) > 0.95  # the max rule: nearly all of it within 8 grey levels of mid-grey
    assert _near_grey(by_pct) < 0.15
    s = R.display_scale(v)
    assert s == pytest.approx(float(np.percentile(np.abs(v), R.PERCENTILE)))
    assert 0.005 * 0.8 < np.mean(np.abs(v) > s) <= 0.005 + 1e-9  # 0.5 % of the values clipped
    assert by_pct[3, 3, 0] == 255  # the outlier is white, clipped
    # zero is mid-grey, the sign is kept, the scale is symmetric
    w = np.zeros((3, 4, 4), np.float32)
    w[0, 0, 0], w[1, 0, 0], w[2, 0, 0] = 1.0, -1.0, 0.0
    u = R.normalise(w, scale=2.0)
    assert u[0, 0].tolist() == [191, 64, 128] and u[1, 1].tolist() == [128, 128, 128]
    assert R.DEFAULT_DISPLAY == "percentile" and R.NORMALISATION == R.DISPLAYS["percentile"]
    assert f"{R.PERCENTILE:g}th percentile" in R.NORMALISATION and "clipped" in R.NORMALISATION


def test_all_zero_and_sparse_projections():
    assert R.display_scale(np.zeros((3, 5, 5))) == 0.0
    assert np.all(R.normalise(np.zeros((3, 5, 5))) == 128)
    # zero on more than 99.5 % of the field: the percentile is 0, so the scale falls back to max|v|
    v = np.zeros((3, 30, 30), np.float32)
    v[1, 10, 10] = -3.0
    assert R.display_scale(v) == 3.0
    assert R.normalise(v)[10, 10].tolist() == [128, 0, 128]
    # the scale comes from the region only
    region = np.zeros((30, 30), bool)
    region[:5] = True
    assert R.display_scale(v, region) == 0.0 and np.all(R.normalise(v, region) == 128)
    with pytest.raises(AtlasError, match="unknown display 'loud'"):
        R.normalise(v, display="loud")


def test_outside_the_image_is_quiet_and_the_same_in_projection_and_patch():
    size, box = 16, (-6, -5, 10, 11)  # a corner unit whose field reaches beyond the image
    proj = np.random.default_rng(1).normal(0, 1, (3, size, size)).astype(np.float32)
    img = np.random.default_rng(2).integers(0, 255, (size, size, 3)).astype(np.uint8)
    p = np.asarray(R.projection_cell(proj, box, size, upscale=3))
    q = np.asarray(R.patch_cell(img, box, size, upscale=3))
    inside = np.zeros((16, 16), bool)  # by hand: the box's rows y = -5..10 and columns x = -6..9, those >= 0
    inside[5:, 6:] = True
    inside = np.repeat(np.repeat(inside, 3, 0), 3, 1)
    for cell in (p, q):
        out = cell[~inside]
        assert (out.max(axis=-1) == out.min(axis=-1)).all()  # neutral: no colour at all
        assert out.min() >= 200  # light, never a projection's near-zero grey
        tone = np.all(out == R.OUTSIDE_TONE, axis=-1)
        assert 0.6 < tone.mean() < 0.95  # mostly the flat tone, crossed by thin lines
    assert np.array_equal(p[~inside], q[~inside])  # the same pattern in both cells
    # lines one pixel wide after enlarging: no 2x2 block of line colour
    line = np.all(p == R.OUTSIDE_LINE, axis=-1) & ~inside
    assert line.any() and not (line[:-1, :-1] & line[1:, :-1] & line[:-1, 1:] & line[1:, 1:]).any()


def test_panel_records_the_display_and_each_scale():
    size, box = 16, (2, 3, 9, 10)
    proj = np.zeros((3, size, size), np.float32)
    proj[:, 5, 5] = 2.0
    im = R.panel([proj], [np.zeros((size, size, 3), np.uint8)], boxes=[box], image_size=size, display="max")
    assert im.info["atlas.display"] == "max" and im.info["atlas.normalisation"] == R.DISPLAYS["max"]
    assert json.loads(im.info["atlas.scales"]) == [2.0]  # the |v| shown as white, per projection
    with pytest.raises(AtlasError):
        R.panel([proj], [None], boxes=[box], image_size=size, display="loud")


# ---------------------------------------------------------------------------
# the cache, show, SQL, the CLI
# ---------------------------------------------------------------------------
def test_display_is_in_the_cache_key_and_the_png_text(own_atlas):
    a = atlas.open(own_atlas)
    pct = a.show("conv3", 2, rank=0)
    mx = a.show("conv3", 2, rank=0, display="max")
    root = PJ.cache_root(a)
    assert root.parent.name == "projections-v3"
    assert pct.parent.parent.name == "unit-identity-percentile" and mx.parent.parent.name == "unit-identity-max"
    tp, tm = R.read_text(pct), R.read_text(mx)
    assert tp["display"] == "percentile" and tp["normalisation"] == R.DISPLAYS["percentile"]
    assert tm["display"] == "max" and tm["normalisation"] == R.DISPLAYS["max"]
    assert float(tp["scale"]) <= float(tm["scale"])  # a percentile is never above the max
    assert pct.read_bytes() != mx.read_bytes()
    panel = R.read_text(a.show("conv3", 2, display="max"))
    assert panel["display"] == "max" and len(json.loads(panel["projections"])) == 4
    assert json.loads(panel["scales"])[0] == pytest.approx(float(tm["scale"]), rel=1e-5)
    with pytest.raises(AtlasError, match="unknown display 'loud': choose one of percentile, max"):
        a.show("conv3", 2, display="loud")
    got = a.sql("SELECT deconv_png('conv3', 2, 0, display := 'max') AS m, deconv_png('conv3', 2, 0) AS p").fetchall()[0]
    assert Path(got[0]) == mx and Path(got[1]) == pct


def test_old_v1_and_v2_pictures_are_never_served(own_atlas):
    a = atlas.open(own_atlas)
    olds = [own_atlas / "cache" / "projections-v1" / PJ.cache_root(a).name / "unit-identity" / "conv2",
            own_atlas / "cache" / "projections-v2" / PJ.cache_root(a).name / "unit-identity-percentile" / "conv2"]
    for old in olds:
        old.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (196, 72, 196)).save(old / "3-panel.png")
    p = a.show("conv2", 3)
    assert "projections-v3" in p.parts and p.stat().st_size > 1000


def test_cli_display_option(own_atlas):
    r = CliRunner()
    res = r.invoke(main, ["show", str(own_atlas), "conv2", "1", "--display", "max", "--format", "json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)[0]
    assert row["display"] == "max" and "unit-identity-max" in row["png"]
    bad = r.invoke(main, ["show", str(own_atlas), "conv2", "1", "--display", "loud"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and "'loud' is not one of" in bad.output
    assert "--display" in r.invoke(main, ["export", "--help"]).output


def test_export_with_the_max_display_is_another_site(own_atlas, tmp_path):
    from atlas.export import DISPLAY_NOTES, export

    assert f"{R.PERCENTILE:g}th percentile" in DISPLAY_NOTES["percentile"]
    site = tmp_path / "site"
    logs = []
    export(own_atlas, site, layers="conv2", max_channels=2, progress=False, log=logs.append)
    pct = (site / "conv2" / "img" / "0-0.webp").read_bytes()
    assert DISPLAY_NOTES["percentile"] in (site / "conv2" / "0.html").read_text()
    export(own_atlas, site, layers="conv2", max_channels=2, progress=False, log=logs.append, display="max")
    assert "up to date" not in logs[-1]
    assert (site / "conv2" / "img" / "0-0.webp").read_bytes() != pct
    # the site's WebP is the one made beside the cache's PNG, whose text says how it was drawn
    shipped = (site / "conv2" / "img" / "0-0.webp").stat().st_ino
    png = next(p.with_suffix(".png") for p in Path(own_atlas, "cache").rglob("0-0.webp") if p.stat().st_ino == shipped)
    assert R.read_text(png)["display"] == "max"
    assert DISPLAY_NOTES["max"] in (site / "conv2" / "0.html").read_text()
    assert DISPLAY_NOTES["max"] in (site / "conv2" / "index.html").read_text()
    with pytest.raises(AtlasError, match="unknown display"):
        export(own_atlas, site, display="loud", progress=False)


# ---------------------------------------------------------------------------
# the layer page loads its pictures lazily; the occlusion page shows each panel once, in order
# ---------------------------------------------------------------------------
def test_layer_page_defers_tile_pictures_to_the_script(own_atlas, tmp_path):
    from atlas.export import export

    site = export(own_atlas, tmp_path / "site", layers="conv1", max_channels=3, progress=False)
    html = (site / "conv1" / "index.html").read_text()
    tiles = html[html.index('id="tiles"'):]
    # 3 tiles x (projection, patch: shared by the site, in its root's img/patches/)
    assert tiles.count('data-src="img/') == 3 and tiles.count('data-src="../img/patches/') == 3
    assert ' src="img/' not in tiles and ' src="../img/' not in tiles
    assert 'loading="lazy"' not in html and "<noscript>" in html
    js = (site / "static" / "atlas.js").read_text()
    assert "IntersectionObserver" in js and 'LAZY_MARGIN = "600px"' in js


def test_occlusion_page_shows_the_figure_once_and_its_panels_in_the_papers_order(tiny_atlas, tmp_path):
    from atlas.analyses.occlusion_figure import PANELS
    from atlas.export import export
    from atlas.export.gather import PANEL_ORDER

    assert PANEL_ORDER["occlusion"] == PANELS
    copy = tmp_path / "atlas"
    # without the analyses other tests ran on the shared atlas: this one's run alone
    shutil.copytree(tiny_atlas, copy, ignore=shutil.ignore_patterns("cache", "analyses"))
    run = copy / "analyses" / "occlusion" / "img0"
    run.mkdir(parents=True)
    for name in ("figure", *sorted(PANELS)):  # written in file-name order: b, a, d, c, e
        Image.new("RGB", (8, 8), (10, 20, 30)).save(run / f"{name}.png")
    site = export(copy, tmp_path / "site", layers="conv1", max_channels=1, progress=False)
    page = (site / "analyses" / "occlusion.html").read_text()
    body = page[page.index("<main>"):]
    assert body.count("<img ") == 1  # the figure, once: it holds the panels
    shown = [body.index(f">{p}.png</a>") for p in PANELS]
    assert shown == sorted(shown)  # (a) image, (b) activation, (c) projection, (d) probability, (e) label map
    data = json.loads((site / "analyses" / "occlusion.json").read_text())
    assert [p["name"] for p in data["runs"][0]["pictures"]] == ["figure.png"] + [f"{p}.png" for p in PANELS]
