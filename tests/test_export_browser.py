"""The exported site in a real headless Chromium (the distribution's, driven by Playwright over CDP).

From file://: index -> layer -> channel by clicking, pictures shown (screenshot not blank), no console
errors, the sort/filter controls work, and a dataset with a file named like an <img onerror=...> tag
runs no script and opens no dialog. A layer page of many channels fetches only the pictures of the
tiles near the viewport at load, and the others as they come into view (scrolled or sorted there).
"""
import io
import json
import re
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

import atlas
from atlas.build import build
from atlas.export import export

from conftest import make_image_folder
from conftest import xss_channel

pytestmark = pytest.mark.slow  # a real browser / the whole demo: pytest -m 'not slow' skips them

ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--no-default-browser-check"]


def chromium_binary() -> str | None:
    for name in (os.environ.get("ATLAS_CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser",
                 "google-chrome"):
        if name and (shutil.which(name) or (os.path.isfile(name) and os.access(name, os.X_OK))):
            return shutil.which(name) or name
    return None


@pytest.fixture(scope="module")
def browser_site(tmp_path_factory, hostile_atlas):
    c = xss_channel(atlas.open(hostile_atlas))
    site = tmp_path_factory.mktemp("browser") / "site"
    export(hostile_atlas, site, layers="conv2", progress=False)  # a layer page lists only the exported channels
    return site, c


@pytest.fixture(scope="module")
def browser():
    exe = chromium_binary()
    if exe is None:
        pytest.skip("no Chromium binary (looked for /usr/bin/chromium, chromium, chromium-browser, google-chrome; "
                    "set ATLAS_CHROMIUM): the browser test needs one, e.g. `apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="atlas-chromium-")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=exe, headless=True, args=ARGS,
                                                   viewport={"width": 1200, "height": 900})
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def watch(page):
    ev = {"console": [], "errors": [], "dialogs": [], "failed": []}
    page.on("console", lambda m: ev["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: ev["errors"].append(str(e)))
    page.on("requestfailed", lambda r: ev["failed"].append(r.url))

    def dialog(d):
        ev["dialogs"].append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    return ev


def images_ok(page) -> tuple[int, list[str]]:
    return page.evaluate("""() => {
        const imgs = Array.from(document.images);
        return [imgs.length, imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)];
    }""")


def test_click_through_from_file_url(browser_site, browser):
    site, c = browser_site
    page = browser.new_page()
    ev = watch(page)
    page.goto((site / "index.html").as_uri())
    assert page.title().startswith("zfnet-mini")
    assert page.evaluate("window.__xss") is None

    page.click('a[href="conv2/index.html"]')
    page.wait_for_url(re.compile(r".*/conv2/index.html(#.*)?$"))
    assert page.locator("#count").inner_text().startswith("64 of 64")
    page.locator(f'.tile a.to-channel[href="{c}.html"] img').first.scroll_into_view_if_needed()
    page.hover(f'.tile a.to-channel[href="{c}.html"] >> nth=0')

    page.click(f'.tile a.to-channel[href="{c}.html"] >> nth=0')
    page.wait_for_url(f"**/conv2/{c}.html")
    page.wait_for_load_state("load")
    n, broken = images_ok(page)
    assert n >= 8 and not broken, broken  # a projection + patch per rank
    assert "onerror=window.__xss=1" in page.locator(".ranks").inner_text()  # shown as text
    for el in page.locator(".path, .lab").all():
        el.hover()
    shot = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    px = np.asarray(shot, dtype=np.float64)
    assert px.std() > 20, "the channel page looks blank"
    # The pictures themselves are not blank either.
    panel = Image.open(io.BytesIO(page.locator(".ranks").screenshot())).convert("L")
    assert np.asarray(panel, dtype=np.float64).std() > 5

    page.click("button.copy >> nth=0")
    page.wait_for_timeout(100)
    assert page.locator("button.copy").first.inner_text() in ("copied", "select and copy", "copy")

    page.click('a[rel="up"]')
    page.wait_for_url(re.compile(r".*/conv2/index.html(#.*)?$"))
    page.click('a[href="../index.html"]')
    page.wait_for_url("**/site/index.html")

    assert page.evaluate("window.__xss") is None
    assert not ev["dialogs"], ev["dialogs"]
    assert not ev["errors"], ev["errors"]
    assert not [m for m in ev["console"] if m[0] in ("error", "warning")], ev["console"]
    assert not ev["failed"], ev["failed"]
    page.close()


def test_sort_and_filter_in_the_page(browser_site, browser, hostile_atlas):
    site, c = browser_site
    page = browser.new_page()
    ev = watch(page)
    page.goto((site / "conv2" / "index.html").as_uri())

    def visible_channels():
        return page.evaluate("""() => Array.from(document.querySelectorAll('#tiles .tile'))
            .filter(t => !t.classList.contains('hidden')).map(t => +t.dataset.channel)""")

    a = atlas.open(hostile_atlas)  # the atlas the site was exported from
    stats = a.rows("SELECT channel, max, fire_rate FROM channels WHERE layer = 'conv2'")
    page.select_option("#sort", "-max")
    by_max = [s["channel"] for s in sorted(stats, key=lambda s: (-s["max"], s["channel"]))]
    assert visible_channels() == by_max
    page.select_option("#sort", "fire")
    assert visible_channels()[0] == min(stats, key=lambda s: (s["fire_rate"], s["channel"]))["channel"]

    page.select_option("#dead", "dead")
    dead = sorted(s["channel"] for s in stats if s["max"] <= 0)
    assert sorted(visible_channels()) == dead
    page.select_option("#dead", "all")

    page.fill("#minfire", "99")
    assert sorted(visible_channels()) == sorted(s["channel"] for s in stats if s["fire_rate"] >= 0.99)
    page.fill("#minfire", "0")

    # the hostile label is an option like any other, and selecting it keeps the channels whose tile shows
    # it: the most frequent label of the top-k (ties: the first label by name)
    label = a.rows("SELECT label FROM images WHERE path LIKE '%onerror%'")[0]["label"]
    page.select_option("#label", label)
    want = {r["channel"] for r in a.rows(
        "SELECT channel, label AS top FROM (SELECT channel, label, row_number() OVER (PARTITION BY channel "
        "ORDER BY n DESC, label) AS r FROM (SELECT t.channel, coalesce(i.label, '(unlabelled)') AS label, "
        "count(*) AS n FROM top_activations t JOIN images i USING (image_id) WHERE t.layer = 'conv2' "
        "GROUP BY ALL)) WHERE r = 1") if r["top"] == label}
    assert set(visible_channels()) == want and want
    assert page.locator("#count").inner_text() == f"{len(want)} of 64 channels"

    # the view is kept in the address: reload restores it
    page.reload()
    assert page.input_value("#label") == label and set(visible_channels()) == want

    assert page.evaluate("window.__xss") is None
    assert not ev["dialogs"] and not ev["errors"], ev
    assert not [m for m in ev["console"] if m[0] == "error"], ev["console"]
    page.close()


# ---------------------------------------------------------------------------
# a layer page of many channels loads its pictures lazily, from file://
# ---------------------------------------------------------------------------
WIDE = 160  # conv1 channels of the widened zfnet-mini: a page of 160 tiles, most of them off-screen


@pytest.fixture(scope="module")
def wide_site(tmp_path_factory):
    import torch

    from atlas.models.registry import load_model

    root = tmp_path_factory.mktemp("wide")
    data = make_image_folder(root / "data", per_class=2)
    model = load_model("zfnet-mini", width=WIDE)
    torch.save({"model_state": model.state_dict(), "meta": {"model": "zfnet-mini", "width": WIDE}}, root / "w.pt")
    # conv1 only, k = 1: its projections need no unpooling, so 160 channels export in seconds
    path = build("zfnet-mini", str(data), root / "atlas", weights=str(root / "w.pt"), k=1, batch_size=6,
                 image_size=32, layers="conv1", index=False, progress=False)
    return export(path, root / "site", progress=False)


def test_many_channels_load_only_the_pictures_near_the_viewport(wide_site, browser):
    page = browser.new_page()
    page.set_viewport_size({"width": 1000, "height": 700})
    ev = watch(page)
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url))
    page.goto((wide_site / "conv1" / "index.html").as_uri())
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)

    def pictures() -> set[str]:
        return {u.rsplit("/", 1)[-1] for u in fetched if "/conv1/img/" in u or "/img/patches/" in u}

    margin = int(page.evaluate("document.documentElement.dataset.lazyMargin").rstrip("px"))
    # where each tile picture is, relative to the viewport (nothing scrolled yet)
    tops = page.evaluate("""() => Array.from(document.querySelectorAll('#tiles img')).map(i =>
        [i.getAttribute('data-src') || i.getAttribute('src'), i.getBoundingClientRect().top])""")
    assert len(tops) == 2 * WIDE
    near = {src.rsplit("/", 1)[-1] for src, top in tops if top < 700 + margin - 2}
    # (a patch file may be shared by a near tile and a far one: it is near then)
    far = {src.rsplit("/", 1)[-1] for src, top in tops if top > 700 + margin + 2} - near
    at_load = pictures()
    assert near and near <= at_load, sorted(near - at_load)[:5]   # the first screens' pictures are there
    assert len(far) > WIDE and not (far & at_load), sorted(far & at_load)[:5]  # off-screen tiles: not fetched
    assert len(at_load) < WIDE  # fewer than half of the 320 pictures

    # scrolling to the end fetches the last tiles' pictures, and they show
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    last = f"{WIDE - 1}-0.webp"
    page.wait_for_function(f"() => {{ const i = document.querySelector('#tiles img[src=\"img/{last}\"]');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    patch = json.loads((wide_site / "conv1" / f"{WIDE - 1}.json").read_text())["top"][0]["patch"]  # shared
    assert last in pictures() and patch.rsplit("/", 1)[-1] in pictures()

    # sorting brings other tiles to the top: their pictures load there, once
    page.evaluate("window.scrollTo(0, 0)")
    page.select_option("#sort", "-max")
    first = page.evaluate("() => Array.from(document.querySelectorAll('#tiles .tile')).slice(0, 5)"
                          ".map(t => +t.dataset.channel)")
    for c in first:
        page.wait_for_function(f"() => {{ const i = document.querySelector('#tiles .tile[data-channel=\"{c}\"] img');"
                               " return i.complete && i.naturalWidth > 0 && !i.hasAttribute('data-src'); }")
    names = [u.rsplit("/", 1)[-1] for u in fetched if "/conv1/img/" in u or "/img/patches/" in u]
    assert len(names) == len(set(names))  # no picture fetched twice
    assert not ev["errors"] and not ev["failed"], ev
    assert not [m for m in ev["console"] if m[0] == "error"], ev["console"]
    page.close()
