"""The site's pages of images, layers at a glance, partial layer pages, analysis wording and the label filter.

A small atlas built here (zfnet-mini, random weights, 18 images at 32 px), exported in part; the numbers
on the image pages are checked against the Parquet files read by a DuckDB connection of the test's own
(none of the atlas's views or queries), the links by resolving every href, src and data-src of every page.
"""
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import duckdb
import pytest

import atlas
from atlas.build import build
from atlas.export import export

from conftest import make_image_folder

LAYERS = ["conv2", "conv5"]
CHANNELS = [0, 1, 2, 7]
STRONGEST = 8


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgpages")
    data = make_image_folder(root / "data", per_class=6)
    return build("zfnet-mini", str(data), root / "atlas", k=4, batch_size=16, image_size=32, progress=False)


@pytest.fixture(scope="module")
def partial_site(small_atlas, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imgsite") / "site"
    return export(small_atlas, out, layers=",".join(LAYERS), channels=CHANNELS, progress=False)


def raw(atlas_path: Path, sql: str, params=None) -> list[tuple]:
    """A query on the atlas's Parquet files with a DuckDB connection of the test's own."""
    con = duckdb.connect()
    try:
        return con.execute(sql.replace("ATLAS", str(atlas_path)), params or []).fetchall()
    finally:
        con.close()


class Refs(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.refs.append((tag, dict(attrs)))


def refs_of(page: Path) -> list[tuple[str, dict]]:
    p = Refs()
    p.feed(page.read_text(encoding="utf-8"))
    return p.refs


def target(page: Path, ref: str) -> Path | None:
    u = urlsplit(ref)
    assert not u.scheme and not u.netloc and not ref.startswith("/"), f"{page}: non-relative {ref!r}"
    return (page.parent / unquote(u.path)).resolve() if u.path else None


def exported_top(atlas_path: Path) -> list[tuple]:
    """(layer, channel, rank, image_id, value) of every exported channel's top-k."""
    return raw(atlas_path, "SELECT layer, channel, rank, image_id, value FROM read_parquet('ATLAS/top_activations.parquet') "
                           "WHERE list_contains(?, layer) AND list_contains(?, channel) ORDER BY ALL",
               [LAYERS, CHANNELS])


# -- links ----------------------------------------------------------------------------
def test_every_link_of_every_page_resolves_and_patches_lead_to_image_pages(partial_site, small_atlas):
    pages = sorted(partial_site.rglob("*.html"))
    broken = []
    for page in pages:
        for tag, attrs in refs_of(page):
            for k in ("href", "src", "data-src"):
                ref = attrs.get(k)
                if ref is None or ref.startswith("data:"):
                    continue
                t = target(page, ref)
                if t is not None and not t.is_file():
                    broken.append(f"{page.relative_to(partial_site)}: {tag} {k}={ref!r}")
    assert not broken, "\n".join(broken[:20])

    # a page per image of an exported top-k, no more; each with its picture, and no picture twice: an
    # image with a patch in the site that is the whole image (a deep unit's field covers it) shows that
    want = {r[3] for r in exported_top(small_atlas)}
    assert {int(p.stem) for p in (partial_site / "images").glob("*.html")} == want
    boxes = {(r[0], r[1], r[2]): r[5:] for r in raw(
        small_atlas, "SELECT layer, channel, rank, image_id, value, x0, y0, x1, y1 "
                     "FROM read_parquet('ATLAS/top_activations.parquet')")}
    S = atlas.open(small_atlas).image_size
    own, reused = set(), set()
    for i in want:
        twin = json.loads((partial_site / "images" / f"{i}.json").read_text())
        if twin["picture"] == f"img/{i}.webp":
            own.add(i)
            continue
        assert re.fullmatch(r"\.\./img/patches/[0-9a-f]{20}\.webp", twin["picture"])  # a shared patch
        src = twin["picture_from"]
        layer, c, rank = src["layer"], src["channel"], src["rank"]
        held = next(h for h in twin["held"] if (h["layer"], h["channel"], h["rank"]) == (layer, c, rank))
        assert held["patch"] == twin["picture"]  # the patch of that entry
        assert boxes[(layer, int(c), int(rank))] == (0, 0, S, S)  # that entry's field holds the whole image
        reused.add(i)
    assert own and reused  # both kinds are here: conv2's fields are parts of the image, conv5's the whole
    assert {int(p.stem) for p in (partial_site / "images" / "img").glob("*.webp")} == own
    # the channel pages' patches lead to their image's page, rank by rank
    for layer in LAYERS:
        for c in CHANNELS:
            top = [r for r in exported_top(small_atlas) if r[0] == layer and r[1] == c]
            links = [a["href"] for tag, a in refs_of(partial_site / layer / f"{c}.html")
                     if tag == "a" and "to-image" in (a.get("class") or "")]
            assert links == [f"../images/{r[3]}.html" for r in top]
    # ... and so do the tiles' patches (the rank-0 image), while the rest of a tile leads to the channel
    tiles = refs_of(partial_site / "conv2" / "index.html")
    to_image = [a["href"] for tag, a in tiles if tag == "a" and "to-image" in (a.get("class") or "")]
    rank0 = {r[1]: r[3] for r in exported_top(small_atlas) if r[0] == "conv2" and r[2] == 0}
    assert to_image == [f"../images/{rank0[c]}.html" for c in CHANNELS]


# -- numbers ----------------------------------------------------------------------------
def test_image_pages_list_the_strongest_channels_of_the_statistics_table(partial_site, small_atlas):
    a = atlas.open(small_atlas)
    layers = list(a.layer_names)
    held_all = exported_top(small_atlas)
    for page in sorted((partial_site / "images").glob("*.json")):
        i = int(page.stem)
        twin = json.loads(page.read_text())
        assert [la["layer"] for la in twin["layers"]] == layers
        html = (partial_site / "images" / f"{i}.html").read_text()
        for la in twin["layers"]:
            # the reference: every value of this image and layer, sorted here (strongest first, ties by channel)
            vals = raw(small_atlas, "SELECT channel, value FROM read_parquet('ATLAS/activations/*/*.parquet', "
                                    "hive_partitioning = true) WHERE image_id = ? AND layer = ?", [i, la["layer"]])
            ref = sorted(vals, key=lambda t: (-t[1], t[0]))[:STRONGEST]
            assert [c["channel"] for c in la["channels"]] == [c for c, _ in ref]
            assert [c["value"] for c in la["channels"]] == pytest.approx([v for _, v in ref], rel=1e-6)
            # the page shows the same channels in the same order, linked where exported
            row = re.search(rf'<tr data-layer="{la["layer"]}">(.*?)</tr>', html, re.S).group(1)
            assert [int(x) for x in re.findall(r'data-channel="(\d+)"', row)] == [c for c, _ in ref]
            for c, _ in ref:
                linked = f'href="../{la["layer"]}/{c}.html"' in row
                assert linked == (la["layer"] in LAYERS and c in CHANNELS), (i, la["layer"], c)
        # the top-k entries it holds: exactly those of the exported channels
        held = sorted((h["layer"], h["channel"], h["rank"]) for h in twin["held"])
        assert held == sorted((r[0], r[1], r[2]) for r in held_all if r[3] == i)
        # its SQL reproduces its numbers through the atlas's own views too
        by_sql: dict[str, list[int]] = {}
        for r in a.rows(twin["sql"][0]["sql"]):
            by_sql.setdefault(r["layer"], []).append(r["channel"])
        assert by_sql == {la["layer"]: [c["channel"] for c in la["channels"]] for la in twin["layers"]}


# -- layer pages and the index ---------------------------------------------------------------------
def test_a_partial_layer_page_lists_exactly_the_exported_channels(partial_site, small_atlas):
    page = (partial_site / "conv2" / "index.html").read_text()
    assert [int(c) for c in re.findall(r'<div class="tile[^"]*" data-channel="(\d+)"', page)] == CHANNELS
    assert "not exported" not in page
    channels = raw(small_atlas, "SELECT channels FROM read_parquet('ATLAS/layers.parquet') WHERE layer = 'conv2'")[0][0]
    assert f"{len(CHANNELS)} of {channels} channels exported" in page
    assert "<code>atlas export ATLAS SITE --layers conv2,conv5</code>" in page  # every layer, so none is dropped
    assert re.search(r"px apart\. \d+ dead channels?, ", page), "the geometry and the dead count run together"
    assert f'<span id="count" class="count">{len(CHANNELS)} channels</span>' in page


def test_a_whole_layer_has_no_partial_line(small_atlas, tmp_path):
    out = export(small_atlas, tmp_path / "site", layers="conv1", progress=False)
    page = (out / "conv1" / "index.html").read_text()
    n = raw(small_atlas, "SELECT channels FROM read_parquet('ATLAS/layers.parquet') WHERE layer = 'conv1'")[0][0]
    assert len(re.findall(r'<div class="tile[^"]*" data-channel=', page)) == n
    assert "channels exported" not in page and "atlas export ATLAS SITE" not in page


def test_the_index_shows_each_exported_layer_at_a_glance(partial_site, small_atlas):
    index = (partial_site / "index.html").read_text()
    glance = index.split('<div class="glance">', 1)[1].split("</section>", 1)[0]
    for layer in LAYERS:
        maxima = raw(small_atlas, "SELECT channel, max FROM read_parquet('ATLAS/channels.parquet') WHERE layer = ?",
                     [layer])
        want = [c for c, _ in sorted(((c, m) for c, m in maxima if c in CHANNELS), key=lambda t: (-t[1], t[0]))][:6]
        shown = [int(c) for c in re.findall(rf'<a class="g" href="{layer}/(\d+)\.html"', glance)]
        assert shown == want
        for c in want:
            patch = json.loads((partial_site / layer / f"{c}.json").read_text())["top"][0]["patch"]
            assert f'src="{patch[len("../"):]}"' in glance
    assert "conv3/" not in glance  # a layer not exported has no pictures to show


def test_same_atlas_same_bytes(small_atlas, partial_site, tmp_path):
    other = export(small_atlas, tmp_path / "again", layers=",".join(LAYERS), channels=CHANNELS, progress=False)
    files = sorted(p.relative_to(partial_site) for p in partial_site.rglob("*")
                   if p.is_file() and p.name != ".atlas-export.json")
    assert files == sorted(p.relative_to(other) for p in other.rglob("*")
                           if p.is_file() and p.name != ".atlas-export.json")
    assert [f for f in files if (partial_site / f).read_bytes() != (other / f).read_bytes()] == []


# -- analyses ----------------------------------------------------------------------------------
def test_an_analysis_page_says_what_its_run_measured(tmp_path):
    """An occlusion run on conv4 of a model with no class names: the page and its index line name the model,
    the layer and the map the run followed, and the class it charted as the most probable one, never 'the
    true class' nor layer 5; the long table is folded under a one-line summary."""
    from atlas.analyses.occlusion import occlude

    data = make_image_folder(tmp_path / "data", per_class=2)
    path = build("zfnet-mini", str(data), tmp_path / "atlas", k=2, batch_size=8, image_size=32, progress=False)
    res = occlude(path, 3, size=8, stride=4, layer="conv4", progress=False)
    assert res.class_source == "most_probable"  # the premise: the correct class is unknown
    out = export(path, tmp_path / "site", layers="conv1", max_channels=1, progress=False)
    page = (out / "analyses" / "occlusion.html").read_text()
    index = (out / "index.html").read_text()
    run = raw(path, "SELECT DISTINCT model, layer, channel, class_name, size, stride "
                    "FROM read_parquet('ATLAS/analyses/occlusion/*.parquet')")
    assert len(run) == 1
    model, layer, channel, class_name, size, stride = run[0]
    assert (layer, channel) == ("conv4", res.channel)
    for text in (page, index):
        assert f"{model} on " in text
        assert f"the total activation of {layer} channel {channel}" in text
        assert f"p({class_name}), the most probable class of the unaltered image (the correct class is unknown)" in text
        assert f"square of {size} px, stride {stride}" in text
        assert "layer-5" not in text and "probability of the true class" not in text
        assert "the image&#39;s true class" not in text
    # the table: folded, its size said first
    details = page.split("<details", 1)[1]
    assert re.match(r' class="table">\s*<summary>Table <code>occlusion</code>: 64 rows × \d+ columns', details)
    assert page.index("What the run measured") < page.index("<details")


def test_a_narrower_re_export_removes_the_image_pages_no_top_k_holds(small_atlas, tmp_path):
    out = export(small_atlas, tmp_path / "site", layers=",".join(LAYERS), channels=CHANNELS, progress=False)
    before = {int(p.stem) for p in (out / "images").glob("*.html")}
    export(small_atlas, out, layers="conv5", channels=[1], progress=False)
    want = {r[0] for r in raw(small_atlas, "SELECT image_id FROM read_parquet('ATLAS/top_activations.parquet') "
                                           "WHERE layer = 'conv5' AND channel = 1")}
    assert {int(p.stem) for p in (out / "images").glob("*.html")} == want < before
    assert {int(p.stem) for p in (out / "images" / "img").glob("*.webp")} <= want
    msgs = []
    export(small_atlas, out, layers="conv5", channels=[1], progress=False, log=msgs.append)
    assert "up to date" in msgs[-1]


def test_without_the_activations_table_an_image_page_lists_the_top_k_entries_it_holds(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)
    path = build("zfnet-mini", str(data), tmp_path / "atlas", k=3, batch_size=16, image_size=32, activations=False,
                 index=False, progress=False)
    out = export(path, tmp_path / "site", layers="conv3", channels=[0, 1, 2], progress=False)
    top = raw(path, "SELECT image_id, channel, rank, value FROM read_parquet('ATLAS/top_activations.parquet') "
                    "WHERE layer = 'conv3' AND channel < 3")
    for i in {r[0] for r in top}:
        twin = json.loads((out / "images" / f"{i}.json").read_text())
        assert [la["layer"] for la in twin["layers"]] == ["conv3"]  # the only layer it can say anything of
        la = twin["layers"][0]
        assert la["source"] == "top_activations"
        want = sorted(((c, v) for j, c, _, v in top if j == i), key=lambda t: (-t[1], t[0]))
        assert [(c["channel"], c["value"]) for c in la["channels"]] == [(c, pytest.approx(v)) for c, v in want]
        assert "no activations table for this layer" in (out / "images" / f"{i}.html").read_text()
