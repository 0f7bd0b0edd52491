"""The atlas in a notebook: the objects' display methods (HTML escaped as the site escapes, PNG bytes that
decode, thumbnails as data: URIs) and their data (Arrow always, pandas when installed, PIL and numpy)."""
import base64
import io
import json
import re
import subprocess
import sys

import jinja2
import numpy as np
import pytest
from PIL import Image

import atlas
from atlas import notebook as NB
from atlas.errors import AtlasError

HOSTILE = '<img src=x onerror=alert(1)> & "quotes" \'too\''
DATA_URI = re.compile(r'src="data:image/(?:png|webp);base64,([A-Za-z0-9+/=]+)"')


def _decode_all(html: str) -> list[Image.Image]:
    out = []
    for b64 in DATA_URI.findall(html):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        out.append(im)
    return out


def _no_outside_references(html: str) -> None:
    """Self-contained: every picture inline, nothing fetched from a file or the network."""
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith(("data:image/png;base64,", "data:image/webp;base64,")) for s in srcs)
    assert "<script" not in html.lower()


def test_escaping_is_the_sites():
    site = jinja2.Environment(autoescape=True).from_string("{{ v }}")
    assert NB.escape(HOSTILE) == site.render(v=HOSTILE)
    t = NB.Table([{"path": HOSTILE, "label": HOSTILE, "score": 0.5}])
    html = t._repr_html_()
    assert "<img src=x" not in html and site.render(v=HOSTILE) in html
    assert NB.escape(None) == ""


def test_atlas_summary(tiny_atlas):
    a = atlas.open(tiny_atlas)
    html = a._repr_html_()
    assert "zfnet-mini" in html and "layers" in html
    for la in a.manifest["layers"]:
        assert f"<td>{la['layer']}</td>" in html
    assert str(a.manifest["dataset"]["count"]) in html


def test_channel_shows_statistics_panel_and_top_k_with_thumbnails(own_atlas):
    """The channel's display: its statistics, the panel (which holds the top-k's pictures) and the top-k's
    numbers; the top-k alone (`ch.top`) shows a projection and a patch thumbnail per rank."""
    a = atlas.open(own_atlas)
    ch = a.channel("conv3", 3)
    assert set(ch.stats) == {"mean", "std", "max", "fire_rate"}
    html = ch._repr_html_()
    _no_outside_references(html)
    pics = _decode_all(html)
    k = len(a.top("conv3", 3))
    assert len(pics) == 1  # the panel alone: each picture once
    panel = ch.panel
    assert pics[0].size == Image.open(panel.path).size
    assert "conv3 · channel 3" in html and "top 4" in html
    assert all(f"<td class=\"n\">{r['rank']}</td>" in html for r in a.top("conv3", 3))
    thumbs = _decode_all(ch.top._repr_html_())
    assert len(thumbs) == 2 * k and all(max(p.size) == NB.THUMB for p in thumbs)  # projection, patch per rank
    # the data
    top = ch.top
    assert isinstance(top, list) and [r["rank"] for r in top] == list(range(k))
    arrow = top.to_arrow()
    assert arrow.num_rows == k and "image_id" in arrow.column_names and "value" in arrow.column_names
    arr = panel.array()
    assert arr.dtype == np.uint8 and arr.shape[2] == 3 and np.array_equal(np.asarray(panel), arr)
    assert panel.image().size == (arr.shape[1], arr.shape[0]) and panel.text["display"] == "percentile"
    with Image.open(io.BytesIO(panel._repr_png_())) as im:
        assert im.size == panel.image().size


def test_projection_and_patch(own_atlas):
    a = atlas.open(own_atlas)
    ch = a.channel("conv2", 1, display="max")
    pr = ch.projection(1)
    assert pr.path.parent.parent.name == "unit-identity-max" and pr.text["rank"] == "1"
    v = pr.values()
    rf = next(la["rf_size"] for la in a.layers() if la["layer"] == "conv2")
    assert v.shape == (3, rf, rf) and v.dtype == np.float32 and np.abs(v).max() > 0
    # the picture is the values by the display rule, enlarged: the pixel of the largest |v| is black or white
    up = int(pr.text["upscale"])
    y, x = np.unravel_index(np.abs(v).max(axis=0).argmax(), v.shape[1:])
    px = pr.array()[y * up, x * up]
    assert 0 in px or 255 in px
    # the "max" rule by hand: the largest |v| over the part of the field inside the image
    x0, y0, x1, y1 = json.loads(pr.text["box"])
    size = a.image_size
    inside = v[:, max(0, -y0):min(y1, size) - y0, max(0, -x0):min(x1, size) - x0]
    assert float(pr.text["scale"]) == pytest.approx(float(np.abs(inside).max()), rel=1e-5)
    html = pr._repr_html_()
    _no_outside_references(html)
    assert len(_decode_all(html)) == 1 and "rank 1" in html
    patch = ch.patch(0)
    assert patch.array().shape[2] == 3 and patch._repr_png_().startswith(b"\x89PNG")
    with pytest.raises(AtlasError, match="out of range"):
        ch.patch(99)
    with pytest.raises(AtlasError, match="unknown display"):
        a.channel("conv2", 1, display="loud")
    with pytest.raises(AtlasError, match="out of range"):
        a.channel("conv2", 9999)


def test_similarity_results_are_tables_with_thumbnails(tiny_atlas):
    a = atlas.open(tiny_atlas)
    imgs = a.similar_images(image_id=0, k=3)
    assert isinstance(imgs, list) and isinstance(imgs, NB.Table) and imgs[0]["image_id"] == 0
    html = imgs._repr_html_()
    _no_outside_references(html)
    pics = _decode_all(html)
    assert len(pics) == 3 and all(p.size == (NB.THUMB, NB.THUMB) for p in pics)
    # the thumbnail is the image the network saw, by hand: its 32 px crop, each pixel a 2 x 2 block (lossy
    # WebP inside the HTML: near it, and far nearer it than to another image)
    def enlarged(image_id):
        crop = np.asarray(a.image(image_id)[1].convert("RGB"), dtype=np.float64)
        assert crop.shape[:2] == (NB.THUMB // 2, NB.THUMB // 2)
        return crop.repeat(2, axis=0).repeat(2, axis=1)

    got = np.asarray(pics[1].convert("RGB"), dtype=np.float64)
    near = np.abs(got - enlarged(imgs[1]["image_id"])).mean()
    other = next(i for i in range(36) if i not in {r["image_id"] for r in imgs})
    far = np.abs(got - enlarged(other)).mean()
    assert near < 12 and near < far / 3, (near, far)
    assert imgs.to_arrow().column_names == ["rank", "image_id", "score", "label", "path"]
    chans = a.channel("conv3", 3).similar(k=2)
    assert [r["rank"] for r in chans] == [0, 1] and len(_decode_all(chans._repr_html_())) == 2
    assert chans.to_arrow().num_rows == 2


def test_to_pandas_when_installed_and_one_line_when_not(tiny_atlas):
    t = NB.Table([{"a": 1, "b": "x"}, {"a": 2, "b": None}])
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(AtlasError, match="pip install pandas"):
            t.to_pandas()
    else:
        df = t.to_pandas()
        assert list(df.columns) == ["a", "b"] and df["a"].tolist() == [1, 2]
    empty = NB.Table([], ["a"])
    assert empty.to_arrow().num_rows == 0 and "0 rows" in empty._repr_html_()
    long = NB.Table([{"i": i} for i in range(NB.MAX_ROWS + 5)])
    assert long._repr_html_().count("<tr>") == NB.MAX_ROWS + 1 and "5 more rows" in long._repr_html_()


def test_analysis_result(tiny_atlas, tmp_path):
    import shutil

    copy = tmp_path / "atlas"
    # without the analyses other tests ran on the shared atlas: this one's run alone
    shutil.copytree(tiny_atlas, copy, ignore=shutil.ignore_patterns("cache", "analyses"))
    run = copy / "analyses" / "occlusion" / "r1"
    run.mkdir(parents=True)
    for i, name in enumerate(("activation", "figure", "image")):
        Image.new("RGB", (6 + i, 6), (i * 80, 10, 10)).save(run / f"{name}.png")
    a = atlas.open(copy)
    assert "occlusion" in a._repr_html_()
    an = a.analysis("occlusion")
    figs = an.figures()
    assert [f.path.stem for f in figs] == ["figure", "image", "activation"]  # the figure, then (a), (b)
    html = an._repr_html_()
    _no_outside_references(html)
    assert len(_decode_all(html)) == 1 and _decode_all(html)[0].size == (7, 6)  # the figure once
    assert an.table.to_arrow().num_rows == 0  # no table written (the pictures only)
    with pytest.raises(AtlasError, match="has no analysis 'nope'"):
        a.analysis("nope")
    with pytest.raises(AtlasError, match="no run 'r9'"):
        a.analysis("occlusion", "r9")


def test_importing_the_notebook_module_costs_nothing():
    code = ("import sys, atlas.notebook\n"
            "print(sorted(m for m in ('IPython', 'numpy', 'PIL', 'pyarrow', 'pandas', 'torch', 'duckdb')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_an_analysis_result_shows_its_figure(own_atlas, tmp_path):
    """What occlude() returns displays itself: its figure as PNG bytes that decode, and HTML with the
    figure as a data: URI and its summary lines escaped."""
    from atlas.analyses.occlusion import occlude

    a = atlas.open(own_atlas)
    res = occlude(a, 0, size=8, stride=8, out=tmp_path / "occ", store=False)
    assert Image.open(io.BytesIO(res._repr_png_())).size == Image.open(res.figures["figure"]).size
    html = res._repr_html_()
    _no_outside_references(html)
    assert len(_decode_all(html)) == 1 and res.summary()[0].split()[0] in html
    assert res.figure.path == res.figures["figure"]


def test_a_channel_display_is_light(own_atlas):
    """A saved notebook carries its pictures: a channel's display stays in the tens of KB (WebP inside the
    HTML), its panel shown at its own size so the labels read, while the files on disk stay PNG."""
    ch = atlas.open(own_atlas).channel("conv5", 2)
    html = ch._repr_html_()
    assert len(html) <= 60_000, len(html)
    assert 'style="max-width:none"' in html
    assert ch.panel.png()[:8] == b"\x89PNG\r\n\x1a\n"
