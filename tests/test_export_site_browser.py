"""The site in a real headless Chromium (tests/test_export_browser.py's): the label filter keeps exactly the
tiles that show the label, and a patch leads to its image's page, whose pictures load and whose channels
lead back to channel pages."""
import re

import pytest

from atlas.build import build
from atlas.export import export

from conftest import make_image_folder
from test_export_browser import browser, images_ok, watch  # noqa: F401 - the fixture and helpers

pytestmark = pytest.mark.slow

N = 24  # conv2 channels exported: enough for several labels to lead a tile


@pytest.fixture(scope="module")
def label_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    data = make_image_folder(root / "data", per_class=6)
    path = build("zfnet-mini", str(data), root / "atlas", k=5, batch_size=16, image_size=32, progress=False)
    return path, export(path, root / "site", layers="conv2", max_channels=N, progress=False)


def leading_labels(a) -> dict[int, str]:
    """channel -> the most frequent label of its top-k (ties: the first by name), by DuckDB."""
    return {r["channel"]: r["label"] for r in a.rows(
        "SELECT channel, label FROM (SELECT channel, label, row_number() OVER (PARTITION BY channel "
        "ORDER BY n DESC, label) AS r FROM (SELECT t.channel, coalesce(i.label, '(unlabelled)') AS label, "
        "count(*) AS n FROM top_activations t JOIN images i USING (image_id) WHERE t.layer = 'conv2' "
        "GROUP BY ALL)) WHERE r = 1") if r["channel"] < N}


def test_the_label_filter_keeps_the_tiles_that_show_the_label(label_site, browser):  # noqa: F811
    import atlas

    path, site = label_site
    lead = leading_labels(atlas.open(path))
    page = browser.new_page()
    ev = watch(page)
    page.goto((site / "conv2" / "index.html").as_uri())
    assert "most frequent top-k label" in page.locator("#controls").inner_text()
    options = [o for o in page.eval_on_selector_all("#label option", "os => os.map(o => o.value)") if o]
    assert sorted(options) == sorted(set(lead.values()))
    # the premise: some channel's top-k holds a label it does not lead with, which the old filter kept
    a = atlas.open(path)
    held = {(r["channel"], r["label"]) for r in a.rows(
        "SELECT DISTINCT t.channel, i.label FROM top_activations t JOIN images i USING (image_id) "
        "WHERE t.layer = 'conv2'") if r["channel"] < N}
    assert any(lead[c] != lab for c, lab in held)
    for lab in options:
        page.select_option("#label", lab)
        shown = page.evaluate("""() => Array.from(document.querySelectorAll('#tiles .tile'))
            .filter(t => !t.classList.contains('hidden'))
            .map(t => [+t.dataset.channel, t.querySelector('.lab').firstChild.textContent.trim()])""")
        assert sorted(c for c, _ in shown) == sorted(c for c, v in lead.items() if v == lab)
        assert all(text == lab for _, text in shown)  # what the tile shows is what was asked
        assert page.locator("#count").inner_text() == f"{len(shown)} of {N} channels"
    assert not ev["errors"] and not [m for m in ev["console"] if m[0] == "error"], ev
    page.close()


def test_a_patch_leads_to_its_image_page_and_back(label_site, browser):  # noqa: F811
    path, site = label_site
    page = browser.new_page()
    ev = watch(page)
    page.goto((site / "conv2" / "0.html").as_uri())
    first = page.locator("a.to-image").first
    href = first.get_attribute("href")
    first.click()
    page.wait_for_url(re.compile(r".*/images/\d+\.html$"))
    assert page.url.endswith(href.replace("../", "/"))
    assert page.locator("img.whole").evaluate("i => i.complete && i.naturalWidth > 0")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_function("() => !document.querySelector('img[data-src]')")
    n, broken = images_ok(page)
    assert n >= 3 and not broken, broken  # the image, and a projection + patch of the channel it came from
    # its strongest conv2 channels lead to their pages where exported
    links = page.locator('tr[data-layer="conv2"] td a')
    assert links.count() > 0
    link = links.first
    target = link.get_attribute("href")
    assert re.fullmatch(r"\.\./conv2/\d+\.html", target)
    link.click()
    page.wait_for_url(f"**/conv2/{target.rsplit('/', 1)[1]}")
    assert not ev["errors"] and not ev["failed"], ev
    assert not [m for m in ev["console"] if m[0] in ("error", "warning")], ev["console"]
    page.close()
