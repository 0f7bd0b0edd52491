"""`atlas export`: the static site -- links, escaping, numbers vs their SQL, incremental and partial exports."""
import json
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

import atlas
from atlas.errors import AtlasError
from atlas.export import export, parse_channels
from conftest import XSS_FILE, XSS_LABEL, copy_atlas, xss_channel

STATE = ".atlas-export.json"


@pytest.fixture(scope="module")
def site(hostile_atlas, tmp_path_factory) -> Path:
    a = atlas.open(hostile_atlas)
    c = xss_channel(a)
    out = tmp_path_factory.mktemp("site") / "site"
    export(hostile_atlas, out, max_channels=3, progress=False)
    # a re-export that asks for the hostile channel too (in every layer: a site is what the last export asked)
    export(hostile_atlas, out, channels=sorted({0, 1, 2, c}), progress=False)
    return out


# -- crawling ---------------------------------------------------------------------
class Links(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs, self.ids, self.scripts_inline, self.handlers = [], set(), 0, []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        for k in ("href", "src"):
            if d.get(k) is not None:
                self.refs.append((tag, k, d[k]))
        if d.get("id"):
            self.ids.add(d["id"])
        for k in d:
            if k.startswith("on"):
                self.handlers.append((tag, k, d[k]))
        if tag == "script" and "src" not in d:
            self.scripts_inline += 1


def crawl(root: Path):
    """Parse every HTML file of the site; return (pages reached from index.html, problems)."""
    problems, seen, todo = [], set(), [root / "index.html"]
    parsed = {}
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        p = Links()
        p.feed(page.read_text(encoding="utf-8"))
        parsed[page] = p
        if p.handlers:
            problems.append(f"{page}: event handler attributes {p.handlers}")
        if p.scripts_inline:
            problems.append(f"{page}: inline script")
        for tag, attr, ref in p.refs:
            if ref.startswith("data:"):
                continue
            u = urlsplit(ref)
            if u.scheme or u.netloc or ref.startswith("/"):
                problems.append(f"{page}: non-relative {attr}={ref!r}")
                continue
            if not u.path:
                continue
            target = (page.parent / unquote(u.path)).resolve()
            if not target.is_file():
                problems.append(f"{page}: broken {tag} {attr}={ref!r}")
                continue
            if target.suffix == ".html":
                todo.append(target)
            if tag == "img":
                with Image.open(target) as im:
                    im.verify()
    return seen, problems


def test_crawl_finds_no_broken_link_or_missing_image(site):
    seen, problems = crawl(site)
    assert not problems, "\n".join(problems[:20])
    html = {p.resolve() for p in site.rglob("*.html")}
    assert html == seen, f"pages no link reaches: {sorted(map(str, html - seen))[:5]}"
    # every page has its JSON twin, and it parses
    for p in html:
        json.loads(p.with_suffix(".json").read_text())
    assert (site / "conv1" / "0.html").is_file() and (site / "conv5" / "2.html").is_file()
    assert not (site / "conv5" / "3.html").exists()
    assert not list(site.rglob("*.tmp"))


def test_every_page_escapes_labels_and_paths(site, hostile_atlas):
    a = atlas.open(hostile_atlas)
    c = xss_channel(a)
    page = (site / "conv2" / f"{c}.html").read_text()
    # the hostile strings are there as text ...
    assert "&lt;img src=x onerror=window.__xss=1&gt;.png" in page
    assert "Tom&#39;s &#34;cats&#34; &amp; &lt;dogs onmouseover=window.__xss=2&gt;" in page
    for p in site.rglob("*.html"):
        text = p.read_text()
        # ... and never as markup, anywhere
        assert "<img src=x" not in text and "<dogs" not in text, p
        assert 'cats"' not in text and "Tom's" not in text, p
    layer_page = (site / "conv2" / "index.html").read_text()
    assert "<option value=\"Tom&#39;s &#34;cats&#34; &amp; &lt;dogs onmouseover=window.__xss=2&gt;\">" in layer_page
    # the JSON twin has the raw strings
    twin = json.loads((site / "conv2" / f"{c}.json").read_text())
    assert any(t["path"].endswith(XSS_FILE) for t in twin["top"])
    index = json.loads((site / "index.json").read_text())
    assert XSS_LABEL in index["dataset"]["classes"]


def test_template_escaping_unit(tmp_path):
    """The templates escape whatever they are given (autoescape), including in attributes."""
    import jinja2

    from atlas.export import TEMPLATES

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    evil = '"><script>window.__xss=3</script>&'
    html = env.get_template("layer.html").render(
        root="../", json_href="index.json", model_name=evil, weights_note=evil, dataset_name=evil,
        layer={"layer": "conv1", "channels": 1, "height": 1, "width": 1, "kernel": 1, "stride": 1, "padding": 0,
               "rf_size": 1, "jump": 1, "dead": 0, "mean_fire_rate": 0.5},
        tiles=[{"channel": 0, "mean": 1.0, "max": 2.0, "std": 0.1, "fire_rate": 0.5, "dead": False,
                "href": "0.html", "proj": None, "patch": None, "featurevis": None, "top_label": evil,
                "labels": [evil], "labels_json": json.dumps([evil])}],
        labels=[evil], exported=1, display_note=evil, random_weights=evil)
    assert "<script>window" not in html
    assert "&#34;&gt;&lt;script&gt;window.__xss=3&lt;/script&gt;&amp;" in html
    assert 'data-label="&#34;&gt;&lt;script&gt;' in html


def test_numbers_match_the_sql_shown(site, hostile_atlas):
    a = atlas.open(hostile_atlas)
    n_ok = a.rows("SELECT count(*) AS n FROM images WHERE status = 'ok'")[0]["n"]
    for layer, c in (("conv1", 0), ("conv2", xss_channel(a)), ("conv4", 2)):
        twin = json.loads((site / layer / f"{c}.json").read_text())
        sql = {s["title"].split(" (")[0]: s["sql"] for s in twin["sql"]}
        stats = a.rows(sql["Statistics over the dataset"])[0]
        assert twin["stats"]["max"] == pytest.approx(stats["max"])
        assert twin["stats"]["fire_rate"] == pytest.approx(stats["fire_rate"])
        top = a.rows(sql["Top-k activations"])
        assert [t["image_id"] for t in top] == [t["image_id"] for t in twin["top"]]
        mix = a.rows(sql["Label mix of the top-k"])
        assert [(m["label"], m["n"]) for m in mix] == [(m["label"], m["n"]) for m in twin["label_mix"]]
        hist = a.rows(sql["Histogram of the per-image maxima"])
        counts = [0] * len(twin["histogram"]["counts"])
        for h in hist:
            counts[h["bin"]] = h["images"]
        assert counts == twin["histogram"]["counts"] and sum(counts) == n_ok
        sim = a.rows(sql["Most similar channels"])
        assert [s["channel"] for s in sim][:3] == [s["channel"] for s in twin["similar"]][:3]
        for s, t in zip(sim, twin["similar"]):
            assert s["r"] == pytest.approx(t["r"], abs=2e-4)


def test_second_export_is_a_no_op_and_changes_are_picked_up(hostile_atlas, tmp_path):
    hostile_atlas = copy_atlas(hostile_atlas, tmp_path / "atlas")  # an analysis is planted in it below
    out = tmp_path / "site"
    export(hostile_atlas, out, layers=["conv1", "conv3"], max_channels=2, progress=False)
    st = json.loads((out / STATE).read_text())
    assert st["last_run"]["files_written"] > 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != STATE}
    t0 = time.perf_counter()
    msgs = []
    export(hostile_atlas, out, layers=["conv1", "conv3"], max_channels=2, progress=False, log=msgs.append)
    assert time.perf_counter() - t0 < 2.0
    assert "up to date" in msgs[-1]
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != STATE}
    # The lazy cache is shared: the site's pictures are the cache's files (hardlinks), not copies.
    cache = {f.stat().st_ino for f in (Path(hostile_atlas) / "cache").rglob("*") if f.suffix in (".png", ".webp")}
    pics = [p for p in out.rglob("*") if p.suffix in (".png", ".webp")]
    assert pics and all(p.stat().st_ino in cache for p in pics)

    # An analysis appears: only the index and the analysis page are written; channel pages stay.
    an = Path(hostile_atlas) / "analyses" / "occlusion"
    an.mkdir(parents=True)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"image_id": [0, 1], "label": [XSS_LABEL, "x"], "p": [0.5, 0.25]}),
                       an / "part-0.parquet")
        Image.new("RGB", (20, 10), (200, 10, 10)).save(an / "map <b>.png")
        export(hostile_atlas, out, layers=["conv1", "conv3"], max_channels=2, progress=False)
        run = json.loads((out / STATE).read_text())["last_run"]
        assert run["pictures_rendered"] == 0
        assert run["files_written"] == 4  # index.html/json, analyses/occlusion.html/json
        assert run["files_linked"] == 1
        idx = (out / "index.html").read_text()
        assert 'href="analyses/occlusion.html"' in idx
        page = (out / "analyses" / "occlusion.html").read_text()
        assert "Tom&#39;s &#34;cats&#34;" in page and "map &lt;b&gt;.png" in page
        seen, problems = crawl(out)
        assert not problems, problems
    finally:
        shutil.rmtree(an.parent)
    # ... and when it goes away, its page goes too
    export(hostile_atlas, out, layers=["conv1", "conv3"], max_channels=2, progress=False)
    assert not (out / "analyses").exists()
    assert 'analyses/' not in (out / "index.html").read_text()


def test_partial_exports_are_what_was_asked_and_a_new_atlas_replaces(hostile_atlas, own_atlas, tmp_path):
    out = tmp_path / "site"
    export(hostile_atlas, out, layers="conv1", channels="0-1,5", progress=False)
    assert sorted(p.name for p in (out / "conv1").glob("*.html")) == ["0.html", "1.html", "5.html", "index.html"]
    assert not (out / "conv2").exists()
    assert 'href="conv2/index.html"' not in (out / "index.html").read_text()
    layer_page = (out / "conv1" / "index.html").read_text()
    assert 'href="5.html"' in layer_page and 'href="4.html"' not in layer_page
    ch1 = (out / "conv1" / "1.html").read_text()
    assert 'rel="next" href="5.html"' in ch1 and 'rel="prev" href="0.html"' in ch1
    export(hostile_atlas, out, layers="conv2", max_channels=1, progress=False)  # another layer replaces conv1
    assert not (out / "conv1").exists() and (out / "conv2" / "0.html").is_file()
    index = (out / "index.html").read_text()
    assert 'href="conv2/index.html"' in index and 'href="conv1/index.html"' not in index
    export(hostile_atlas, out, layers="conv1,conv2", channels="0-1,5", progress=False)
    assert (out / "conv1" / "5.html").is_file() and (out / "conv2" / "5.html").is_file()
    # another atlas: the old pages go
    export(own_atlas, out, layers="conv1", max_channels=1, progress=False)
    assert not (out / "conv2").exists() and not (out / "conv1" / "5.html").exists()
    assert (out / "conv1" / "0.html").is_file()
    assert not crawl(out)[1]


def test_bad_requests(hostile_atlas, tmp_path):
    with pytest.raises(AtlasError, match="unknown layer"):
        export(hostile_atlas, tmp_path / "s1", layers="conv9", progress=False)
    with pytest.raises(AtlasError, match="out of range"):
        export(hostile_atlas, tmp_path / "s2", layers="conv1", channels=[999], progress=False)
    with pytest.raises(AtlasError, match="max-channels"):
        export(hostile_atlas, tmp_path / "s3", max_channels=0, progress=False)
    with pytest.raises(AtlasError, match="not a channel number"):
        parse_channels("1,x")
    assert parse_channels("3, 0-2,2") == [0, 1, 2, 3]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(AtlasError, match="not an exported atlas site"):
        export(hostile_atlas, busy, max_channels=1, progress=False)
    assert (busy / "notes.txt").read_text() == "mine"


def test_progress_and_log(hostile_atlas, tmp_path, capsys):
    msgs = []
    export(hostile_atlas, tmp_path / "s", layers="conv1", max_channels=2, progress=True, log=msgs.append)
    err = capsys.readouterr().err
    assert "export: 2/2 channels" in err
    assert msgs and "site written to" in msgs[-1]


def test_a_missing_image_gives_a_placeholder_not_a_broken_site(small_atlas, tmp_path):
    path, data = small_atlas
    a = atlas.open(path)
    top = a.rows("SELECT t.channel, i.path FROM top_activations t JOIN images i USING (image_id) "
                 "WHERE t.layer = 'conv2' AND t.rank = 0 ORDER BY t.channel LIMIT 1")[0]
    image = (data / top["path"]).read_bytes()
    (data / top["path"]).unlink()
    out = export(path, tmp_path / "site", layers="conv2", channels=[top["channel"]], progress=False)
    page = (out / "conv2" / f"{top['channel']}.html").read_text()
    assert "Some pictures are incomplete" in page and "is unavailable" in page
    twin = json.loads((out / "conv2" / f"{top['channel']}.json").read_text())
    assert all(t["proj"] and t["patch"] for t in twin["top"])  # the projection needs switches only
    assert not crawl(out)[1]
    # the image comes back: exporting the same site again (atlas unchanged) draws the whole picture
    (data / top["path"]).write_bytes(image)
    export(path, out, layers="conv2", channels=[top["channel"]], progress=False)
    page = (out / "conv2" / f"{top['channel']}.html").read_text()
    assert "Some pictures are incomplete" not in page and "is unavailable" not in page
