"""Which class the analyses chart (issue 13, point 7): the dataset's label is a class of the model only when
the model records class names that contain it; otherwise the correct class is unknown and the most probable
class is charted and said to be so. `--class` by index or name; `--format` prints the result rows."""
import csv
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from atlas.analyses import common
from atlas.analyses import invariance as IV
from atlas.analyses.occlusion import occlude
from atlas.analyses.occlusion_figure import image_caption
from atlas.cli import main
from atlas.errors import AtlasError
from atlas.facade import Atlas

SMALL = {"translate": [-3, 0, 3]}
# recorded names in an order that is NOT the dataset's (ImageFolder sorts: blue, green, red), so that
# charting by the dataset's label index would pick the wrong output
PERMUTED = ["green", "red", "blue"]
PLANTED_BIAS = [0.0, 1.0, 2.0]  # a head that ignores the image: p = softmax(bias) for every input


def _strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=no_constants)


def _image_of(atlas_path, label: str) -> int:
    return Atlas(atlas_path).rows("SELECT image_id FROM images WHERE label = ? ORDER BY image_id LIMIT 1",
                                  [label])[0]["image_id"]


def _probs(atlas_path, image_id: int) -> np.ndarray:
    a = Atlas(atlas_path)
    x, _ = a.image(image_id)
    with torch.no_grad():
        return torch.softmax(a.model.eval()(x[None]).double(), 1)[0].numpy()


def _three_class_net(planted: bool):
    from atlas.models.registry import build_model

    torch.manual_seed(3)
    net = build_model("zfnet-mini", num_classes=3)
    if planted:
        last = [m for m in net.classifier if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor(PLANTED_BIAS))
    return net


def _build(tiny_folder, out, weights):
    from atlas.build import build

    return build("zfnet-mini", str(tiny_folder), out, weights=str(weights), k=4, batch_size=8, image_size=32,
                 progress=False)


@pytest.fixture(scope="module")
def named_atlas(tmp_path_factory, tiny_folder):
    """Built from a checkpoint whose recorded class names are the dataset's, in another order."""
    d = tmp_path_factory.mktemp("named")
    net = _three_class_net(planted=True)
    ck = d / "named.pt"
    torch.save({"model_state": net.state_dict(),
                "meta": {"model": "zfnet-mini", "num_classes": 3, "classes": PERMUTED}}, ck)
    return _build(tiny_folder, d / "atlas", ck)


@pytest.fixture(scope="module")
def bare_atlas(tmp_path_factory, tiny_folder):
    """A head of the dataset's size (3 outputs) from a bare state_dict: no class names recorded."""
    d = tmp_path_factory.mktemp("bare")
    ck = d / "bare.pt"
    torch.save(_three_class_net(planted=False).state_dict(), ck)
    return _build(tiny_folder, d / "atlas", ck)


@pytest.fixture(scope="module")
def trained_atlas(tmp_path_factory, tiny_folder):
    from atlas.train import train

    d = tmp_path_factory.mktemp("trained")
    ck = train("zfnet-mini", str(tiny_folder), d / "run", epochs=1, image_size=32, batch_size=16, progress=False)
    return _build(tiny_folder, d / "atlas", ck)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------
# (a) a random head: the dataset's label is not the model's class
# ---------------------------------------------------------------------------
def test_random_head_occlusion_charts_the_most_probable_class(own_atlas):
    image = _image_of(own_atlas, "blue")
    p0 = _probs(own_atlas, image)
    top = int(p0.argmax())
    r = _cli("occlude", own_atlas, image, "--size", 8, "--stride", 4, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = _strict_json(r.stdout)
    assert len(rows) == 8 * 8
    for row in rows:
        assert row["dataset_label"] == "blue"
        assert row["class_source"] == "most_probable"
        assert row["true_class"] is None and row["true_class_index"] is None
        assert row["class_index"] == top and row["class_name"] == f"output {top}"
        assert row["probability_base"] == pytest.approx(p0[top], rel=1e-5)
        assert "blue" not in (row["class_name"], row["top_class_name"])
    # the printed lines (stderr with JSON) say the correct class is unknown and never claim a true one
    err = r.stderr
    assert "correct class is unknown" in err and f"p(output {top})" in err
    assert "true label" not in err and "true class" not in err
    # the stored Parquet table says the same
    run = rows[0]["run"]
    t = pq.read_table(own_atlas / "analyses" / "occlusion" / f"{run}.parquet").to_pylist()
    assert {(x["dataset_label"], x["class_source"], x["class_name"], x["true_class"]) for x in t} == \
        {("blue", "most_probable", f"output {top}", None)}
    assert "label_source" not in t[0] and "label" not in t[0]


def test_random_head_figure_caption_claims_no_true_label(tiny_atlas):
    res = occlude(tiny_atlas, _image_of(tiny_atlas, "red"), size=8, stride=4, store=False, figures=False)
    cap = image_caption(res)
    assert "true label" not in cap
    assert f"most probable class: {res.class_name}" in cap and "correct class unknown" in cap
    assert "dataset label: red" in cap
    assert res.class_index == res.top_class_base and res.unknown_reason and "records no class names" in \
        res.unknown_reason


def test_same_size_head_without_names_is_not_trusted(bare_atlas):
    """A 3-output head on a 3-class folder: nothing says its output k is the dataset's class k."""
    image = _image_of(bare_atlas, "red")
    assert common.recorded_classes(Atlas(bare_atlas)) is None
    assert common.class_names(Atlas(bare_atlas)) == ["output 0", "output 1", "output 2"]
    res = occlude(bare_atlas, image, size=8, stride=4, store=False, figures=False)
    p0 = _probs(bare_atlas, image)
    assert res.class_source == "most_probable" and res.true_index is None
    assert res.class_index == int(p0.argmax()) and res.class_name == f"output {int(p0.argmax())}"
    assert not any("red" in (row["class_name"], row["top_class_name"]) for row in res.rows())
    inv = IV.invariance(bare_atlas, [image], transforms="translate", amounts=SMALL, store=False, figures=False)
    assert {r["class_source"] for r in inv.rows} == {"most_probable"}
    assert {r["true_class"] for r in inv.rows} == {None}
    with pytest.raises(AtlasError, match="records no class names"):
        occlude(bare_atlas, image, label="red", store=False, figures=False)


def test_random_head_invariance_charts_the_most_probable_class(own_atlas, tmp_path):
    image = _image_of(own_atlas, "green")
    p0 = _probs(own_atlas, image)
    top = int(p0.argmax())
    res = IV.invariance(own_atlas, [image], transforms="translate", amounts=SMALL, out=tmp_path / "fig")
    rows = [r for r in res.rows if r["layer"] == res.layers[0]]
    assert {(r["class_source"], r["class_index"], r["class_name"], r["dataset_label"], r["true_class"])
            for r in rows} == {("most_probable", top, f"output {top}", "green", None)}
    ident = next(r for r in rows if r["amount"] == 0)
    assert ident["probability"] == pytest.approx(p0[top], rel=1e-5)
    text = "\n".join(res.summary())
    assert "p(true)" not in text and "true class" not in text.replace("the correct class", "")
    assert "correct class is unknown" in text
    assert res.figures["translate-probability"].is_file()


# ---------------------------------------------------------------------------
# (b) recorded class names that are the dataset's: the true class, at the model's own index
# ---------------------------------------------------------------------------
def test_recorded_names_chart_the_true_class_at_the_models_index(named_atlas):
    a = Atlas(named_atlas)
    assert common.recorded_classes(a) == PERMUTED
    want = torch.softmax(torch.tensor(PLANTED_BIAS, dtype=torch.float64), 0).numpy()
    for label in ("blue", "green", "red"):
        image = _image_of(named_atlas, label)
        k = PERMUTED.index(label)
        res = occlude(named_atlas, image, size=8, stride=4, figures=False)
        assert res.class_source == "true" and res.class_name == label and res.class_index == k
        assert res.true_index == k and res.true_class == label
        assert res.probability_base == pytest.approx(want[k], abs=1e-6)
        assert np.allclose(res.probability, want[k], atol=1e-6)
        assert res.top_class_base == 2 and {r["top_class_name"] for r in res.rows()} == {"blue"}
        assert "true label: " + label in image_caption(res)
        assert any(line.startswith(f"p({label}) [the image's true class") for line in res.summary())
        assert not any("unknown" in n for n in res.notes)
    t = pq.read_table(named_atlas / "analyses" / "occlusion" / f"{res.run}.parquet").to_pylist()
    assert {(x["class_source"], x["class_name"], x["class_index"], x["true_class"]) for x in t} == \
        {("true", "red", 1, "red")}
    inv = IV.invariance(named_atlas, [_image_of(named_atlas, "green")], transforms="translate", amounts=SMALL,
                        store=False, figures=False)
    assert {(r["class_source"], r["class_index"], r["class_name"]) for r in inv.rows} == {("true", 0, "green")}
    assert all(r["probability"] == pytest.approx(want[0], abs=1e-6) for r in inv.rows)
    assert "p(true)" in "\n".join(inv.summary())


def test_an_atlas_train_checkpoint_charts_the_true_class(trained_atlas):
    a = Atlas(trained_atlas)
    assert common.recorded_classes(a) == ["blue", "green", "red"]  # the ImageFolder's sorted order
    image = _image_of(trained_atlas, "green")
    p0 = _probs(trained_atlas, image)
    res = occlude(trained_atlas, image, size=8, stride=4, store=False, figures=False)
    assert (res.class_source, res.class_name, res.class_index) == ("true", "green", 1)
    assert res.probability_base == pytest.approx(p0[1], rel=1e-5)


# ---------------------------------------------------------------------------
# (c) --class by name and by index, and the one-line errors
# ---------------------------------------------------------------------------
def test_class_by_name_and_by_index(named_atlas, own_atlas):
    image = _image_of(named_atlas, "red")
    want = torch.softmax(torch.tensor(PLANTED_BIAS, dtype=torch.float64), 0).numpy()
    for cls in ("blue", "2"):
        r = _cli("occlude", named_atlas, image, "--size", 8, "--stride", 4, "--class", cls, "--format", "json")
        assert r.exit_code == 0, r.output
        rows = _strict_json(r.stdout)
        assert {(x["class_source"], x["class_index"], x["class_name"], x["true_class"]) for x in rows} == \
            {("given", 2, "blue", "red")}
        assert rows[0]["probability_base"] == pytest.approx(want[2], abs=1e-6)
    r = _cli("occlude", own_atlas, 0, "--size", 8, "--stride", 4, "--class", 7)
    assert r.exit_code == 0, r.output
    assert "p(output 7) [the class given]" in r.stdout
    # the old spelling still works
    r = _cli("occlude", named_atlas, image, "--size", 8, "--stride", 4, "--label", "green", "--format", "csv")
    assert r.exit_code == 0, r.output
    assert {x["class_name"] for x in csv.DictReader(io.StringIO(r.stdout))} == {"green"}


@pytest.mark.parametrize("which,cls,pattern", [
    ("named", "zebra", "class 'zebra' for image .* is not a class of the model \\(its classes: green, red, blue"),
    ("named", "3", "class 3 for image .* is out of range: the model has classes 0..2"),
    ("named", "-1", "class -1 for image .* is out of range"),
    ("random", "red", "class 'red' for image .* records no class names.*output index 0..9"),
    ("random", "10", "class 10 for image .* out of range: the model has classes 0..9"),
])
def test_class_errors_are_one_line(named_atlas, tiny_atlas, which, cls, pattern):
    import re

    path = named_atlas if which == "named" else tiny_atlas
    for cmd in (["occlude", path, 0, "--occluder-size", 8, "--stride", 4, "--class", cls],
                ["invariance", path, 0, "--transforms", "translate", "--classes", cls]):
        r = _cli(*cmd)
        assert r.exit_code == 2, r.output
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.stderr, r.stderr
        assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------------------
# --format: the result rows
# ---------------------------------------------------------------------------
def test_format_prints_the_result_rows(own_atlas, tmp_path):
    r = _cli("occlude", own_atlas, 1, "--size", 8, "--stride", 4, "--format", "csv", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 64 and {"pos_y", "pos_x", "activation", "probability", "class_source"} <= set(rows[0])
    assert str(tmp_path / "o" / "figure.png") in r.stderr  # the PNGs' paths stay available
    r = _cli("invariance", own_atlas, 1, 2, "--transforms", "translate", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = _strict_json(r.stdout)
    assert {x["image"] for x in rows} == {"id:1", "id:2"} and all("distance" in x for x in rows)
    assert "figure.png" in r.stderr
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"images": [0, 1], "parts": {"eye": [[0, 0, 8, 8], [2, 2, 10, 10]]}}))
    r = _cli("correspondence", own_atlas, "--images", spec, "--random", 2, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = _strict_json(r.stdout)
    assert {x["part"] for x in rows} == {"eye", "random"}
    assert all(isinstance(x["deltas"], list) for x in rows)
    # a control of two draws over one part: no NaN anywhere (strict JSON above), std present
    assert all(x["delta_norm_std"] is not None for x in rows if x["kind"] == "random")
    r = _cli("correspondence", own_atlas, "--images", spec, "--random", 2, "--format", "table")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].split()[:3] == ["run", "spec", "model"] and "images.png" in r.stdout
    # without --format: the summary, as before
    r = _cli("occlude", own_atlas, 1, "--size", 8, "--stride", 4)
    assert r.exit_code == 0 and r.stdout.startswith("occlusion of image 1")
