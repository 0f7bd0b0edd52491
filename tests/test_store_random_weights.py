"""An atlas of a randomly initialised model says so, loudly, wherever one looks at it: the build's log,
`atlas info`, the pictures, every site page and the notebook displays; a trained one says nothing."""
import json

import atlas
from atlas.build import build
from atlas.export import export
from atlas.store.manifest import random_weights
from atlas.pictures.drawing import read_text
from cli_helpers import run


def test_the_line_names_the_seed_and_only_random_weights_have_one():
    line = random_weights({"name": "resnet18", "random_init": True, "seed": 3})
    assert line.startswith("RANDOM WEIGHTS") and "seed 3" in line and "resnet18" in line
    assert random_weights({"name": "resnet18", "random_init": False, "weights": "w.pt"}) is None


def test_build_says_it_with_its_result(tiny_folder, tmp_path):
    lines = []
    build("zfnet-mini", str(tiny_folder), tmp_path / "a", k=2, batch_size=8, image_size=32, progress=False,
          layers="conv1", index=False, log=lines.append)
    loud = [n for n, ln in enumerate(lines) if ln.startswith("RANDOM WEIGHTS")]
    written = [n for n, ln in enumerate(lines) if ln.startswith("atlas written")]
    assert len(loud) == 1 and loud[0] == written[0] + 1 and "--weights" in lines[loud[0]]


def test_info_puts_it_first_and_keeps_machine_formats_clean(tiny_atlas):
    res, _ = run("info", tiny_atlas)
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("RANDOM WEIGHTS")
    res, _ = run("info", tiny_atlas, "--format", "json")
    assert json.loads(res.stdout)["model"]["random_init"] is True and "RANDOM WEIGHTS" in res.stderr


def test_pictures_site_pages_and_notebook_carry_it(own_atlas, tmp_path):
    a = atlas.open(own_atlas)
    assert read_text(a.show("conv2", 1))["alert"].startswith("RANDOM WEIGHTS")
    assert "RANDOM WEIGHTS" in a._repr_html_() and "RANDOM WEIGHTS" in a.channel("conv2", 1)._repr_html_()
    site = export(own_atlas, tmp_path / "site", layers="conv1", channels="0", progress=False)
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 2
    for p in pages:
        html = p.read_text()
        body = html[html.index("<body"):]
        assert 'class="random-weights"' in body and body.index("random-weights") < body.index("<main>"), p
