"""The weight of an exported site's pictures: lossy WebP made once per cached PNG, each distinct image patch
shipped once, few bytes a channel, and a re-export that encodes nothing it has.

A small atlas built here (zfnet-mini, random weights, 18 images at 32 px): conv5's fields cover the whole
image, so its channels' patches are the same few images; conv2's are parts of them. The references are the
cache's own PNGs (what `atlas show` writes) and the top-k rows read from the Parquet files by a DuckDB
connection of the test's own.
"""
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from atlas.build import build
from atlas.export import export
from atlas.export.site import STATE

from conftest import make_image_folder

LAYERS = "conv2,conv5"
N = 8  # channels exported per layer
K = 4


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight")
    data = make_image_folder(root / "data", per_class=6)
    path = build("zfnet-mini", str(data), root / "atlas", k=K, batch_size=16, image_size=32, progress=False)
    return path, data


@pytest.fixture(scope="module")
def site(small, tmp_path_factory):
    return export(small[0], tmp_path_factory.mktemp("weightsite") / "site", layers=LAYERS, max_channels=N,
                  progress=False)


def raw(atlas_path: Path, sql: str) -> list[tuple]:
    con = duckdb.connect()
    try:
        return con.execute(sql.replace("ATLAS", str(atlas_path))).fetchall()
    finally:
        con.close()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def cached_png(atlas_path: Path, layer: str, name: str) -> Path:
    found = list(Path(atlas_path, "cache").glob(f"projections-v3/*/unit-identity-percentile/{layer}/{name}"))
    assert len(found) == 1, found
    return found[0]


def tops(site: Path, layer: str) -> list[dict]:
    return [dict(t, channel=c) for c in range(N)
            for t in json.loads((site / layer / f"{c}.json").read_text())["top"]]


def test_the_site_ships_webp_that_decodes_to_the_cached_pictures(small, site):
    path, _ = small
    shipped = [p for p in site.rglob("*") if p.suffix in (".png", ".webp")]
    assert [p.name for p in shipped if p.suffix == ".png"] == ["conv1-filters.png"]  # the filter grid: pixel art
    for p in shipped:
        if p.suffix == ".webp":
            with Image.open(p) as im:
                assert im.format == "WEBP"
                im.load()
    for layer in LAYERS.split(","):
        entries = tops(site, layer)
        refs = {}
        for t in entries:
            c, r = t["channel"], t["rank"]
            refs[(c, r, "proj")] = pixels(cached_png(path, layer, f"{c}-{r}.png"))
            refs[(c, r, "patch")] = pixels(cached_png(path, layer, f"{c}-{r}-patch.png"))
        for t in entries:
            c, r = t["channel"], t["rank"]
            for kind in ("proj", "patch"):
                assert t[kind].endswith(".webp")
                got, ref = pixels(site / layer / t[kind]), refs[(c, r, kind)]
                assert got.shape == ref.shape
                # lossy (colour at half resolution), but the same picture: close to its PNG (PSNR), and
                # closer to it than to any other entry's picture of that kind that differs from it
                assert psnr(got, ref) > 22, (layer, c, r, kind, psnr(got, ref))
                others = [v for (c2, r2, k2), v in refs.items() if k2 == kind and v.shape == got.shape
                          and not np.array_equal(v, ref)]
                assert all(np.abs(got - v).mean() > np.abs(got - ref).mean() for v in others), (layer, c, r, kind)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b).astype(np.float64) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_panels_on_request(small, site, tmp_path):
    path, _ = small
    assert not list(site.rglob("*-panel.*"))  # the page shows the panel's cells, and says how to get it whole
    page = (site / "conv5" / "0.html").read_text()
    assert "atlas show ATLAS conv5 0 --out DIR" in page and "--panels" in page and "img/0-panel" not in page
    out = export(path, tmp_path / "site", layers="conv5", channels=[0, 1], progress=False, panels=True)
    assert 'src="img/0-panel.webp"' in (out / "conv5" / "0.html").read_text()
    panel = pixels(out / "conv5" / "img" / "0-panel.webp")
    assert psnr(panel, pixels(cached_png(path, "conv5", "0-panel.png"))) > 22
    assert len(list(out.rglob("*-panel.webp"))) == 2


def test_each_distinct_patch_is_in_the_site_once(small, site):
    path, _ = small
    folder = site / "img" / "patches"
    files = sorted(folder.iterdir())
    # no two files hold the same picture, and every file is shown by some page
    assert len({pixels(f).tobytes() for f in files}) == len(files)
    shown = {t["patch"] for layer in LAYERS.split(",") for t in tops(site, layer)}
    assert {f"../img/patches/{f.name}" for f in files} == shown
    # conv5: every field is the whole image, so one file per image, whichever channels and ranks show it
    top5 = raw(path, f"SELECT channel, rank, image_id, x0, y0, x1, y1 FROM read_parquet('ATLAS/top_activations"
                     f".parquet') WHERE layer = 'conv5' AND channel < {N}")
    assert {r[3:] for r in top5} == {(0, 0, 32, 32)}
    by_image: dict[int, set] = {}
    entries = {(t["channel"], t["rank"]): t["patch"] for t in tops(site, "conv5")}
    for c, rank, i, *_ in top5:
        by_image.setdefault(i, set()).add(entries[(c, rank)])
    assert all(len(v) == 1 for v in by_image.values())
    assert len({next(iter(v)) for v in by_image.values()}) == len(by_image) < len(top5)
    # and the images' own pages show that file rather than a copy of their own
    for i, v in by_image.items():
        assert json.loads((site / "images" / f"{i}.json").read_text())["picture"] == next(iter(v))
        assert not (site / "images" / "img" / f"{i}.webp").exists()


def test_a_channel_weighs_a_fraction_of_its_pngs(small, site):
    path, _ = small
    for layer in LAYERS.split(","):
        shipped = sum(p.stat().st_size for p in (site / layer / "img").glob("*.webp"))
        patches = {t["patch"] for t in tops(site, layer)}  # each distinct one once
        shipped += sum((site / layer / p).stat().st_size for p in patches)
        pngs = sum(cached_png(path, layer, f"{t['channel']}-{t['rank']}{s}.png").stat().st_size
                    for t in tops(site, layer) for s in ("", "-patch"))
        # measured: conv2 5.7 KB a channel, 0.48 of its PNGs (pixel art, partly lossless); conv5 15 KB, 0.44. PNG
        # or a file per entry would be over 1; at 224 px the ratio is far smaller (atlas/manual/site.md)
        assert shipped < 0.6 * pngs, (layer, shipped, pngs)
        assert shipped / N < 25_000, (layer, shipped / N)


def test_a_second_site_encodes_nothing_and_more_channels_encode_only_theirs(small, site, tmp_path):
    path, _ = small
    other = export(path, tmp_path / "other", layers=LAYERS, max_channels=N, progress=False)
    run = json.loads((other / STATE).read_text())["last_run"]
    assert run["pictures_rendered"] == 0 and run["webp_encoded"] == 0  # each WebP made once, in the cache
    same = lambda p: (site / p.relative_to(other)).read_bytes() == p.read_bytes()  # noqa: E731
    assert all(same(p) for p in other.rglob("*.webp"))
    # one more channel of conv5: its panel, projections and per-rank patches are drawn and encoded, no more
    export(path, other, layers=LAYERS, channels=range(N + 1), progress=False)
    run = json.loads((other / STATE).read_text())["last_run"]
    assert run["webp_encoded"] == 2 * 2 * K  # conv2 and conv5: K projections + K patches
    shared_before = set((site / "img" / "patches").iterdir())
    assert run["files_linked"] <= 2 * 2 * K
    assert len(list((other / "img" / "patches").iterdir())) >= len(shared_before)
    # unchanged: nothing written, nothing encoded
    before = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file() and p.name != STATE}
    msgs = []
    export(path, other, layers=LAYERS, channels=range(N + 1), progress=False, log=msgs.append)
    assert "up to date" in msgs[-1]
    assert before == {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file() and p.name != STATE}


def test_a_patch_drawn_without_its_image_is_redrawn_in_the_site_once_it_is_back(small, tmp_path):
    path, data = small
    first = raw(path, "SELECT t.channel, t.rank, i.path FROM read_parquet('ATLAS/top_activations.parquet') t "
                      "JOIN read_parquet('ATLAS/images.parquet') i USING (image_id) "
                      "WHERE t.layer = 'conv2' AND t.channel = 5 ORDER BY t.rank LIMIT 1")[0]
    image = data / first[2]
    kept = tmp_path / "kept"
    shutil.copy(image, kept)
    image.unlink()
    try:
        out = export(path, tmp_path / "site", layers="conv2", channels=[5], progress=False,
                     cache=tmp_path / "cache")
    finally:
        shutil.copy(kept, image)
    patch = lambda: out / "conv2" / json.loads((out / "conv2" / "5.json").read_text())["top"][0]["patch"]  # noqa: E731
    gone = pixels(patch())
    export(path, out, layers="conv2", channels=[5], progress=False, cache=tmp_path / "cache")
    back = pixels(patch())
    assert np.abs(back - gone).mean() > 10  # the placeholder is replaced by the image
    assert "Some pictures are incomplete" not in (out / "conv2" / "5.html").read_text()
