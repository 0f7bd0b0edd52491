"""Every notebook display of an atlas of random weights says so first, once: tables (similar images and
channels, a channel's top-k, an analysis's rows), an analysis, an analysis's result; and the analysis
commands say it on stderr. A trained atlas's displays say nothing of the kind."""
import torch

import atlas
from atlas.analyses.occlusion import occlude
from atlas.build import build
from atlas.models import registry
from cli_helpers import run

LOUD = "RANDOM WEIGHTS"


def _first_and_once(html: str) -> None:
    assert html.count(LOUD) == 1, html.count(LOUD)
    body = html[html.index('<div class="atlas-nb'):]
    assert body.index(LOUD) < min(i for i in (body.find("<table"), body.find("<img"), body.find("<h3"))
                                  if i >= 0)


def test_tables_and_displays_say_it_first_and_once(own_atlas):
    a = atlas.open(own_atlas)
    _first_and_once(a.similar_images(image_id=0, k=3)._repr_html_())
    _first_and_once(a.similar_channels("conv2:1", k=3)._repr_html_())
    ch = a.channel("conv2", 1)
    _first_and_once(ch.top._repr_html_())
    _first_and_once(ch._repr_html_())  # the top-k inside it does not say it again
    _first_and_once(a._repr_html_())   # nor does its layers table

    res = occlude(a, 0, size=8, stride=8, store=True, figures=True)
    assert res.warning and res.warning.startswith(LOUD)
    _first_and_once(res._repr_html_())
    an = a.analysis("occlusion")
    _first_and_once(an._repr_html_())
    _first_and_once(an.table._repr_html_())


def test_the_analysis_commands_say_it_on_stderr(own_atlas):
    res, _ = run("occlude", own_atlas, "0", "--occluder-size", "8", "--stride", "8", "--format", "csv")
    assert res.exit_code == 0, res.output
    said = [ln for ln in res.stderr.splitlines() if not ln.startswith("occlude: ")]  # past the progress lines
    assert said[0].startswith(LOUD) and res.stderr.count(LOUD) == 1
    assert LOUD not in res.stdout  # the rows stay parseable


def test_a_trained_atlas_says_nothing(tiny_folder, tmp_path):
    torch.manual_seed(1)
    weights = tmp_path / "trained.pt"
    torch.save(registry.build_model("zfnet-mini", num_classes=3).state_dict(), weights)
    path = build("zfnet-mini", str(tiny_folder), tmp_path / "a", weights=str(weights), k=2, batch_size=8,
                 image_size=32, progress=False, layers="conv1,conv2", index=True)
    a = atlas.open(path)
    shown = [a._repr_html_(), a.channel("conv2", 0)._repr_html_(),
             a.similar_images(image_id=0, k=2)._repr_html_(), occlude(a, 0, size=8, stride=8)._repr_html_()]
    assert not any(LOUD in h for h in shown)
