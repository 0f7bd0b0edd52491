"""The lazy projection path: `atlas show`, `atlas filters`, deconv_png() in SQL, the shared PNG cache."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import atlas
from atlas import deconv as D
from atlas.pictures import projections as PJ
from atlas.pictures import drawing as R
from atlas.build import build
from atlas.cli import main
from atlas.errors import AtlasError
from cli_helpers import same_picture

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh(tiny_atlas, tmp_path):
    """A copy of the tiny atlas with an empty cache (its dataset is the shared tiny folder)."""
    dst = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _hatched(rgb):
    return np.all(rgb == R.HATCH[0], axis=-1) | np.all(rgb == R.HATCH[1], axis=-1)


def _busy_channel(a, layer):
    """A channel whose strongest unit sits at the image border (hatched part in its cells)."""
    rows = a.rows("SELECT channel, x0, y0, x1, y1 FROM top_activations WHERE layer = ? AND rank = 0 "
                  "ORDER BY channel", [layer])
    rf = a.lmap.by_name[layer].geometry.rf_size
    return next(r["channel"] for r in rows if (r["x1"] - r["x0"]) < rf or (r["y1"] - r["y0"]) < rf)


# ---------------------------------------------------------------------------
# the panel
# ---------------------------------------------------------------------------
def test_panel_is_titled_labelled_and_lines_up(fresh):
    a = atlas.open(fresh)
    c = _busy_channel(a, "conv2")
    p = a.show("conv2", c)
    assert p.parent == PJ.cache_root(a) / "unit-identity-percentile" / "conv2" and p.name == f"{c}-panel.png"
    t = R.read_text(p)
    top = a.top("conv2", c)
    assert t["title"].startswith(f"{a.manifest['model']['name']}  ·  conv2  ·  channel {c}  ·  DeconvNet")
    labels = json.loads(t["labels"])
    assert labels[1] == [r["path"] for r in top] and labels[0][0].startswith("rank 0: ")
    one = np.asarray(Image.open(p.parent / f"{c}-0.png").convert("RGB"))
    patch = np.asarray(Image.open(p.parent / f"{c}-0-patch.png").convert("RGB"))
    assert one.shape == patch.shape and (_hatched(one) == _hatched(patch)).all()
    assert one[~_hatched(one)].std() > 5 and patch[~_hatched(patch)].std() > 5  # not blank
    # the rank-0 projection and its patch are the panel's first cells, below the title, on the same rows
    im = np.asarray(Image.open(p).convert("RGB"))
    h, w = one.shape[:2]
    at = lambda cell, xs: [(y, x) for y in range(im.shape[0] - h) for x in xs  # noqa: E731
                           if (im[y:y + h, x:x + w] == cell).all()]
    [(y, x)] = at(one, range(0, 40))[:1]
    assert y > 30 and (im[:y - 4].min(axis=-1) < 100).any()  # the title's dark text above the grid
    assert any(yy == y for yy, _ in at(patch, range(x + w, im.shape[1] - w)))


def test_png_text_states_the_normalisation(fresh):
    a = atlas.open(fresh)
    panel = R.read_text(a.show("conv3", 1))
    assert panel["normalisation"] == R.NORMALISATION and "unavailable" not in panel
    assert [m["rank"] for m in json.loads(panel["projections"])] == list(range(len(a.top("conv3", 1))))
    one = R.read_text(a.show("conv3", 1, rank=2))
    assert one["normalisation"] == R.NORMALISATION
    assert (one["layer"], one["channel"], one["rank"], one["mode"]) == ("conv3", "1", "2", "unit")
    assert "mid-grey" in R.NORMALISATION and "negative and positive" in R.NORMALISATION


# ---------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------
def test_cache_hit_returns_the_same_bytes_without_rendering(fresh):
    a = atlas.open(fresh)
    p = a.show("conv4", 3)
    data, mtime = p.read_bytes(), p.stat().st_mtime_ns
    r = PJ.renderer(a)
    before = r.rendered
    again = a.show("conv4", 3)  # a hit is proven by the bytes, mtime and counter, not by a clock (CI is noisy)
    assert again == p and again.read_bytes() == data and p.stat().st_mtime_ns == mtime
    assert r.rendered == before
    grid = a.filters()
    # another process: the same files, read from the cache, and torch is never imported
    code = ("import sys, atlas; a = atlas.open(sys.argv[1]); print(a.show('conv4', 3)); print(a.filters()); "
            "print(a.sql('SELECT count(*) FROM channels').fetchall()[0][0]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(fresh)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(p), str(grid), str(len(a.rows("SELECT * FROM channels"))), "False"]
    assert p.stat().st_mtime_ns == mtime


def test_the_same_picture_has_the_same_bytes_whatever_was_asked_before(fresh, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fresh, other)
    a = atlas.open(fresh)
    first = PJ.show(a, "conv5", 3).read_bytes()
    b = atlas.open(other)
    for c in (7, 1, 5):  # fill the renderer's slots with other images first
        PJ.show(b, "conv5", c)
    PJ.show(b, "conv2", 0)
    assert PJ.show(b, "conv5", 3).read_bytes() == first
    assert PJ.show(b, "conv5", 3, rank=2).read_bytes() == PJ.show(a, "conv5", 3, rank=2).read_bytes()


def test_threads_sharing_one_atlas_handle(fresh):
    from concurrent.futures import ThreadPoolExecutor

    a = atlas.open(fresh)
    asks = [("conv5", c % 4, None if c % 2 else c % 3) for c in range(16)]
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda q: PJ.show(a, q[0], q[1], rank=q[2]), asks))
    one = atlas.open(fresh)
    assert [p.read_bytes() for p in paths] == [PJ.show(one, *q[:2], rank=q[2]).read_bytes() for q in asks]
    assert a.rows("SELECT count(*) AS n FROM similar_images(0, 3)")[0]["n"] == 3  # no lock held across its UDF


def test_two_processes_asking_at_once_both_get_a_whole_png(fresh, tmp_path):
    go = tmp_path / "go"
    code = ("import sys, time, os, atlas; a = atlas.open(sys.argv[1]); _ = a.lmap; print('ready', flush=True)\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.002)\n"
            "print(a.show('conv5', 7))")
    other = subprocess.Popen([sys.executable, "-c", code, str(fresh), str(go)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    a = atlas.open(fresh)
    _ = a.lmap
    assert other.stdout.readline().strip() == "ready"
    go.touch()  # this process and the other one render the same uncached panel at the same time
    mine = a.show("conv5", 7)
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    assert Path(out.strip()) == mine
    with Image.open(mine) as im:
        im.load()
        assert im.size[0] > 0
    assert not list(mine.parent.glob(".*.tmp"))


def test_a_crash_mid_write_leaves_no_file_and_the_next_call_renders(fresh, monkeypatch):
    a = atlas.open(fresh)
    real = Image.Image.save

    def half(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)  # half a PNG, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half)
    with pytest.raises(KeyboardInterrupt):
        a.show("conv3", 4)
    folder = PJ.cache_root(a) / "unit-identity-percentile" / "conv3"
    assert not (folder / "4-panel.png").exists()
    assert not [f for f in folder.glob("*") if f.name.startswith("4-")] and not list(folder.glob(".*"))
    monkeypatch.setattr(Image.Image, "save", real)
    p = a.show("conv3", 4)
    with Image.open(p) as im:
        im.load()
    assert R.read_text(p)["channel"] == "4"


def test_export_and_show_share_the_cache(fresh, tmp_path):
    from atlas.export import export

    a = atlas.open(fresh)
    panel, grid = a.show("conv2", 5), a.filters()
    site = export(fresh, tmp_path / "site", layers="conv2", channels=[5], progress=False, panels=True)
    # the site's WebP is made once beside the cached PNG, and hardlinked
    assert (site / "conv2" / "img" / "5-panel.webp").stat().st_ino == panel.with_suffix(".webp").stat().st_ino
    assert (site / "img" / "conv1-filters.png").stat().st_ino == grid.stat().st_ino
    st = json.loads((site / ".atlas-export.json").read_text())
    assert st["last_run"]["pictures_rendered"] == 0
    # ... and the other way round: a channel the export drew is a cache hit for show
    export(fresh, tmp_path / "site", layers="conv2", channels=[6], progress=False)
    p = PJ.cache_root(a) / "unit-identity-percentile" / "conv2" / "6-panel.png"
    mtime = p.stat().st_mtime_ns
    assert a.show("conv2", 6) == p and p.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------
# stored switches against recomputed ones
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["conv2", "conv5"])
def test_stored_and_recomputed_switches_give_the_same_projections(fresh, layer):
    a = atlas.open(fresh)
    c = 3
    stored = PJ.project(a, layer, c, switches="stored")
    again = PJ.project(a, layer, c, switches="recompute")
    assert len(stored) == len(again) == len(a.top(layer, c))
    for i in range(len(stored)):
        assert float(stored.images[i].abs().max()) > 0
        assert D.relative_error(again.images[i], stored.images[i]) < 1e-5
        assert again.meta[i]["value"] == pytest.approx(stored.meta[i]["value"], rel=1e-5)
    # both agree with the slow gradient formulation on the recomputed image
    x = a.image(a.top(layer, c)[0]["image_id"])[0][None]
    m = stored.meta[0]
    ref = D.gradient_reference(a.lmap, x, D.Request(0, layer, c, m["y"], m["x"]))
    assert D.relative_error(stored.images[0], ref) < 1e-4


def test_map_mode_recomputes_and_stored_map_is_refused(fresh):
    a = atlas.open(fresh)
    p = a.show("conv3", 2, mode="map")
    assert p.parent.parent.name == "map-identity-percentile"
    cell = a.image_size * R.upscale_for(a.image_size)  # a map projection's cell is the whole image
    t = R.read_text(p)
    assert json.loads(t["boxes_shown"]) == [[0, 0, a.image_size, a.image_size]] * 4
    w, h = Image.open(p).size
    assert w >= 2 * (2 * cell + 2) + 6 and h > 2 * cell + 2  # k = 4: two 2 x 2 grids, labelled, under a title
    assert R.read_text(p)["mode"] == "map"
    with pytest.raises(AtlasError, match="map mode needs switches over the whole image"):
        a.show("conv3", 2, rank=0, mode="map", switches="stored")


# ---------------------------------------------------------------------------
# deconv_png() in SQL
# ---------------------------------------------------------------------------
def test_deconv_png_in_atlas_sql(fresh):
    res = _cli("sql", fresh, "SELECT rank, deconv_png(layer, channel, rank) AS png FROM top_activations "
                             "WHERE layer = 'conv5' AND channel = 17 ORDER BY rank", "--format", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    a = atlas.open(fresh)
    assert [r["rank"] for r in rows] == list(range(len(a.top("conv5", 17))))
    for r in rows:
        p = Path(r["png"])
        assert p.is_file() and p == a.show("conv5", 17, rank=r["rank"])
        assert R.read_text(p)["rank"] == str(r["rank"])
    # the canned gallery query, a mode argument and NULLs
    res = _cli("sql", fresh, "-q", "channel_gallery", "-p", "layer=conv4", "-p", "channel=2", "--format", "json")
    assert res.exit_code == 0, res.output
    assert all(Path(r["projection"]).is_file() for r in json.loads(res.output))
    got = a.sql("SELECT deconv_png('conv2', 0, 1, 'map'), deconv_png(NULL, 0, 1)").fetchall()[0]
    assert Path(got[0]).parent.parent.name == "map-identity-percentile" and Path(got[0]).is_file() and got[1] is None
    # a query draws what it names, no more: two ranks of two channels are two projections (and patches)
    folder = PJ.cache_root(a) / "unit-identity-percentile" / "conv3"
    a.sql("SELECT deconv_png('conv3', 0, 0), deconv_png('conv3', 1, 2)").fetchall()
    assert sorted(f.name for f in folder.glob("*.png") if not f.name.endswith("-patch.png")) == ["0-0.png", "1-2.png"]


def test_deconv_png_bad_input_is_one_sql_error(fresh):
    import duckdb

    a = atlas.open(fresh)
    with pytest.raises(duckdb.Error, match=r"AtlasError: rank 99 is out of range for conv3 channel 1"):
        a.sql("SELECT deconv_png('conv3', 1, 99)").fetchall()
    with pytest.raises(duckdb.Error, match=r"AtlasError: unknown layer 'pool1'"):
        a.sql("SELECT deconv_png('pool1', 1, 0)").fetchall()


# ---------------------------------------------------------------------------
# the commands and bad input
# ---------------------------------------------------------------------------
def test_show_and_filters_commands(fresh, tmp_path):
    res = _cli("show", fresh, "conv3", 6)
    assert res.exit_code == 0 and Path(res.output.strip()).is_file()
    res = _cli("show", fresh, "conv3", 6, "--rank", "1", "--out", tmp_path / "one.png")
    assert res.exit_code == 0 and res.output.strip() == str(tmp_path / "one.png")
    assert same_picture(tmp_path / "one.png", atlas.open(fresh).show("conv3", 6, rank=1))
    res = _cli("filters", fresh, "--out", tmp_path)
    assert res.exit_code == 0 and res.output.strip() == str(tmp_path / "conv1-filters.png")
    w = atlas.open(fresh).lmap.model.features[0].weight
    n, k = w.shape[0], w.shape[-1]
    cols = int(np.ceil(np.sqrt(n)))
    cell = k * R.upscale_for(k, minimum=R.FILTER_CELL, cap=12)
    side = cols * cell + (cols - 1) + 2
    with Image.open(tmp_path / "conv1-filters.png") as im:
        # the grid, under its title (which may be wider than a small grid)
        assert im.width >= side and im.height > -(-n // cols) * cell + (-(-n // cols) - 1) + 2 + 30
        assert "filters" in im.info["atlas.title"] and "RANDOM WEIGHTS" in im.info["atlas.alert"]
        assert im.info["atlas.normalisation"] == R.FILTER_NORMALISATION and im.info["atlas.filters"] == str(n)
    for args in (["show", "-h"], ["filters", "-h"]):
        assert "atlas " in _cli(*args).output  # an example in the help


@pytest.mark.parametrize("args, message", [
    (["conv9", "1"], "unknown layer 'conv9'"),
    (["conv3", "999"], "channel 999 is out of range for conv3"),
    (["conv3", "1", "--rank", "9"], "rank 9 is out of range for conv3 channel 1"),
    (["conv3", "1", "--rank", "-1"], "rank -1 is out of range"),
])
def test_show_bad_input_is_one_line(fresh, args, message):
    res = _cli("show", fresh, *args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert not (Path(fresh) / "cache").exists()  # nothing written


def test_filters_of_a_deeper_layer_are_refused(fresh):
    res = _cli("filters", fresh, "conv2")
    assert res.exit_code == 2 and "only the first layer's filters are pictures (conv1)" in res.output


def test_an_atlas_without_switches(tmp_path, tiny_folder):
    path = build("zfnet-mini", str(tiny_folder), tmp_path / "noswitch", k=2, batch_size=16, image_size=32,
                 layers="conv1,conv3", index=False, progress=False, switches=False)
    res = _cli("show", path, "conv3", 0)
    assert res.exit_code == 2 and "has no switches (built with --no-switches)" in res.output
    assert "--switches recompute" in res.output
    assert not list(Path(path).rglob("*.png"))
    # conv1 has no pool below: its projections need no switches
    assert _cli("show", path, "conv1", 0).exit_code == 0
    # recomputed from the images, it works
    res = _cli("show", path, "conv3", 0, "--switches", "recompute")
    assert res.exit_code == 0 and Path(res.output.strip()).is_file()


def test_a_missing_image_gives_a_placeholder_patch_and_a_warning(small_atlas):
    path, data = small_atlas
    a = atlas.open(path)
    top = a.rows("SELECT t.channel, t.rank, i.path FROM top_activations t JOIN images i USING (image_id) "
                 "WHERE t.layer = 'conv3' AND t.rank = 0 ORDER BY t.channel LIMIT 1")[0]
    (data / top["path"]).unlink()
    c = top["channel"]
    res = _cli("show", path, "conv3", c)
    assert res.exit_code == 0
    p = Path(res.stdout.strip())
    assert p.is_file() and "unavailable" in R.read_text(p)["unavailable"]
    assert "Warning:" in res.stderr and "is unavailable" in res.stderr and "placeholder" in res.stderr
    patch = np.asarray(Image.open(p.parent / f"{c}-0-patch.png").convert("RGB"))
    assert (patch == (236, 236, 236)).all(axis=-1).mean() > 0.5  # the placeholder's light grey
    proj = np.asarray(Image.open(p.parent / f"{c}-0.png").convert("RGB"))
    # the projection needs only the switches: drawn, not a placeholder (this random net's one is all zero)
    assert "unavailable" not in R.read_text(p.parent / f"{c}-0.png") and (proj == 128).all()
    # the next request draws it again (the image may be back) and warns again
    res2 = _cli("show", path, "conv3", c)
    assert res2.exit_code == 0 and "Warning:" in res2.output
    # the recompute path needs the image: a clear error, no picture
    shutil.rmtree(Path(path) / "cache")
    res3 = _cli("show", path, "conv3", c, "--switches", "recompute")
    assert res3.exit_code == 2 and "is unavailable" in res3.output and "needs the image" in res3.output
    assert not (PJ.cache_root(a) / "unit-identity-percentile" / "conv3" / f"{c}-panel.png").exists()


def test_export_redraws_incomplete_pictures_once_the_image_is_back(small_atlas, tmp_path):
    from atlas.export import export

    path, data = small_atlas
    a = atlas.open(path)
    top = a.rows("SELECT t.channel, i.path FROM top_activations t JOIN images i USING (image_id) "
                 "WHERE t.layer = 'conv2' AND t.rank = 0 ORDER BY t.channel LIMIT 1")[0]
    c, image = top["channel"], data / top["path"]
    saved = image.read_bytes()
    image.unlink()
    for site in ("s1", "s2"):  # the second export reads the cache, and must say so all the same
        export(path, tmp_path / site, layers="conv2", channels=[c], progress=False)
        assert "Some pictures are incomplete" in (tmp_path / site / "conv2" / f"{c}.html").read_text()
    image.write_bytes(saved)
    export(path, tmp_path / "s3", layers="conv2", channels=[c], progress=False)
    assert "Some pictures are incomplete" not in (tmp_path / "s3" / "conv2" / f"{c}.html").read_text()
    panel = PJ.cache_root(a) / "unit-identity-percentile" / "conv2" / f"{c}-panel.png"
    assert PJ.incomplete(panel) is None and "unavailable" not in R.read_text(panel)


def test_with_the_whole_dataset_gone_the_cached_panel_is_served(small_atlas):
    path, data = small_atlas
    a = atlas.open(path)
    c = a.rows("SELECT channel FROM top_activations WHERE layer = 'conv2' ORDER BY channel LIMIT 1")[0]["channel"]
    shutil.rmtree(data)
    first = _cli("show", path, "conv2", c)
    assert first.exit_code == 0 and "Warning:" in first.stderr
    p = Path(first.stdout.strip())
    stamp = p.stat().st_mtime_ns
    again = _cli("show", path, "conv2", c)  # nothing could be better now: no redraw, no warning
    assert again.exit_code == 0 and again.stdout == first.stdout and "Warning" not in again.stderr
    assert p.stat().st_mtime_ns == stamp


def test_unknown_options_are_refused_before_any_work(fresh):
    a = atlas.open(fresh)
    for kw, msg in (({"mode": "full"}, "unknown projection mode 'full'"), ({"norm": "x"}, "unknown norm handling"),
                    ({"switches": "disk"}, "unknown switches 'disk'")):
        with pytest.raises(AtlasError, match=msg):
            PJ.show(a, "conv2", 0, **kw)
