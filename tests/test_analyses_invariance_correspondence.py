"""Invariance (figure 5) and correspondence (figure 8 / table 7): zero transformation = zero distance,
the sign-Hamming score by hand, identical images give zero, stored tables, bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atlas.analyses import correspondence as CO
from atlas.analyses import invariance as IV
from atlas.errors import AtlasError
from atlas.facade import Atlas
from conftest import without_classifier as _without_classifier

SMALL = {"translate": [-3, 0, 3], "scale": [1.0, 1.3], "rotate": [0, 90, 180]}




# ---------------------------------------------------------------------------
# invariance
# ---------------------------------------------------------------------------
def test_zero_transformation_gives_zero_distance(own_atlas, tiny_folder, tmp_path):
    outside = tmp_path / "outside.png"  # an image that is not in the dataset
    Image.open(tiny_folder / "red" / "red_003.png").transpose(Image.FLIP_LEFT_RIGHT).save(outside)
    res = IV.invariance(own_atlas, [0, "14", str(outside)], amounts=SMALL, out=tmp_path / "fig")
    assert res.layers == ["conv1", "fc7"]
    ident = [r for r in res.rows if (r["transform"] == "scale" and r["amount"] == 1.0)
             or (r["transform"] != "scale" and r["amount"] == 0)]
    assert len(ident) == 3 * 3 * 2
    assert all(r["distance"] == 0.0 for r in ident)
    assert all(r["distance"] > 0 for r in res.rows if r not in ident)
    # a random head: no image's correct class is known, so each charts its most probable class
    assert all(0 <= r["probability"] <= 1 for r in res.rows)
    assert {r["class_source"] for r in res.rows} == {"most_probable"}
    # the same numbers from a plain forward pass
    a = Atlas(own_atlas)
    x, crop = a.image(0)
    shifted = a.preprocess.to_tensor(IV.transform_image(crop, "translate", 3, (128, 128, 128)))
    with torch.no_grad():
        f = a.lmap.extract(torch.stack([x, shifted]), ["fc7"])["fc7"].double()
    want = float((f[1] - f[0]).norm())
    got = next(r["distance"] for r in res.rows if r["image_id"] == 0 and r["layer"] == "fc7"
               and r["transform"] == "translate" and r["amount"] == 3)
    assert got == pytest.approx(want, rel=1e-5)
    n = a.sql(f"SELECT count(*) FROM invariance WHERE run = '{res.run}'").fetchall()[0][0]
    assert n == len(res.rows) == 3 * 8 * 2
    for name in ("figure", "translate-conv1", "scale-fc7", "rotate-probability"):
        assert res.figures[name].is_file() and res.figures[name].parent == tmp_path / "fig"


def test_transforms_move_pixels_as_said():
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[4, 7] = 255
    im = Image.fromarray(arr)
    down = np.asarray(IV.transform_image(im, "translate", 3, (9, 9, 9)))
    assert down[7, 7, 0] == 255 and down[4, 7, 0] == 0
    assert (down[:3] == 9).all()  # the band brought in from outside has the fill colour
    assert np.array_equal(np.asarray(IV.transform_image(im, "rotate", 0, (0, 0, 0))), arr)
    assert np.array_equal(np.asarray(IV.transform_image(im, "scale", 1.0, (0, 0, 0))), arr)
    assert IV.default_amounts("translate", 224) == list(range(-60, 61, 10))
    assert IV.default_amounts("translate", 32)[0] == -9 and 0 in IV.default_amounts("translate", 32)
    assert IV.default_amounts("rotate", 32) == [float(d) for d in range(0, 360, 10)]
    assert IV.default_amounts("scale", 32) == [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]


def test_invariance_without_classifier_uses_last_conv(tiny_atlas, tmp_path):
    path = _without_classifier(tiny_atlas, tmp_path)
    res = IV.invariance(path, [1], transforms="translate", amounts={"translate": [0, 2]}, figures=False)
    assert res.layers == ["conv1", "conv5"]
    assert any("replaced by conv5" in n and "gone.pt" in n for n in res.notes)
    assert all(r["probability"] is None for r in res.rows)
    with pytest.raises(AtlasError, match="fc7 needs the model's classifier"):
        IV.invariance(path, [1], layers="conv1,fc7", store=False, figures=False)
    with pytest.raises(AtlasError, match="classifier"):
        IV.invariance(path, [1], labels=["red"], store=False, figures=False)


def test_invariance_bad_input(tiny_atlas, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    cases = [
        (dict(images=[str(bad)]), "cannot be read"),
        (dict(images=[0], layers="conv1,conv77"), "unknown layer 'conv77'"),
        (dict(images=[0], transforms="shear"), "unknown transformation 'shear'"),
        (dict(images=[]), "no images"),
        (dict(images=[0, 0]), "given twice"),
        (dict(images=[0], amounts={"scale": [0.0]}), "positive"),
        (dict(images=[0, 1], labels=["red", "blue", "green"]), "3 labels for 2 images"),
        (dict(images=[0], fill="pink"), "unknown fill"),
    ]
    for kw, pattern in cases:
        images = kw.pop("images")
        with pytest.raises(AtlasError, match=pattern):
            IV.invariance(tiny_atlas, images, store=False, figures=False, **kw)


# ---------------------------------------------------------------------------
# correspondence
# ---------------------------------------------------------------------------
def test_sign_hamming_score_by_hand():
    e = np.array([[1.0, -1.0, 0.0],
                  [2.0, 3.0, 0.0],
                  [-1.0, 0.5, 7.0]])
    # signs: (+ - 0), (+ + 0), (- + +); Hamming: (1,2) 1, (1,3) 3, (2,3) 2; ordered pairs count twice
    assert CO.sign_hamming_score(e) == 2 * (1 + 3 + 2)
    assert CO.sign_hamming_score(np.tile(e[:1], (4, 1))) == 0
    assert CO.sign_hamming_score(np.zeros((3, 5))) == 0


def _spec(tmp_path: Path, obj) -> Path:
    p = tmp_path / f"spec{len(list(tmp_path.glob('spec*.json')))}.json"
    p.write_text(json.dumps(obj))
    return p


def test_identical_images_and_boxes_score_zero(own_atlas, tiny_folder, tmp_path):
    for name in ("a.png", "b.png", "c.png"):  # the same picture under three names (outside the dataset)
        shutil.copy(tiny_folder / "green" / "green_002.png", tmp_path / name)
    box = {"eye": [4, 6, 12, 14], "nose": [16, 16, 24, 24]}  # same size: one random control
    spec = _spec(tmp_path, {"images": [{"image": n, "parts": box} for n in ("a.png", "b.png", "c.png")]})
    res = CO.correspondence(own_atlas, spec, random=3, seed=1, figures=False)
    parts = [r for r in res.rows if r["kind"] == "part"]
    assert {r["part"] for r in parts} == {"eye", "nose"} and {r["layer"] for r in parts} == {"conv5", "fc7"}
    assert all(r["delta"] == 0 for r in parts)
    # the random control moves the boxes independently per image: not zero
    rnd = [r for r in res.rows if r["kind"] == "random"]
    assert {r["part"] for r in rnd} == {"random"} and all(r["draws"] == 3 for r in rnd)
    assert all(r["delta"] > 0 for r in rnd)
    assert "Occlusion location" in res.format_table() and " ± " in res.format_table()


def test_correspondence_matches_a_direct_computation(own_atlas, tmp_path):
    spec = _spec(tmp_path, {"images": [0, 13, 30],
                            "parts": {"corner": [[0, 0, 8, 8], [2, 2, 10, 10], [20, 20, 28, 28]]}})
    res = CO.correspondence(own_atlas, spec, layers="conv3,fc7", random=4, seed=7, fill="mean")
    a = Atlas(own_atlas)
    xs, occ = [], []
    for image_id, (x0, y0, x1, y1) in zip([0, 13, 30], [[0, 0, 8, 8], [2, 2, 10, 10], [20, 20, 28, 28]]):
        x, _ = a.image(image_id)
        xo = x.clone()
        xo[:, y0:y1, x0:x1] = 0.0  # "mean" fill = an all-zero model input
        xs.append(x)
        occ.append(xo)
    with torch.no_grad():
        f = a.lmap.extract(torch.stack(xs + occ), ["conv3", "fc7"])
    for la in ("conv3", "fc7"):
        v = f[la].double().flatten(1)
        e = v[:3] - v[3:]
        s = torch.sign(e)
        want = sum(int((s[i] != s[j]).sum()) for i in range(3) for j in range(3) if i != j)
        row = next(r for r in res.rows if r["part"] == "corner" and r["layer"] == la)
        assert row["delta"] == want
        assert row["delta_norm"] == pytest.approx(want / (6 * v.shape[1]))
    back = a.sql(f"SELECT part, layer, delta FROM correspondence WHERE run = '{res.run}' ORDER BY ALL").fetchall()
    assert len(back) == 4
    # seeded: the same call gives the same control
    again = CO.correspondence(own_atlas, spec, layers="conv3,fc7", random=4, seed=7, fill="mean",
                              store=False, figures=False)
    assert [r["deltas"] for r in again.rows] == [r["deltas"] for r in res.rows]
    assert res.figures["images"].is_file()


def test_original_coordinates_map_through_the_crop(tiny_atlas, tmp_path):
    a = Atlas(tiny_atlas)
    pre = a.preprocess  # short side 32, centre crop 32
    assert CO.map_box([8, 8, 24, 24], (64, 64), pre) == (4, 4, 12, 12)
    # 96 x 64: resized to 48 x 32, 8 px cut on the left
    assert CO.map_box([24, 0, 48, 16], (96, 64), pre) == (4, 0, 16, 8)
    rng = np.random.default_rng(0)
    for n in ("w1.png", "w2.png"):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / n)
    spec = _spec(tmp_path, {"coordinates": "original", "images": ["w1.png", "w2.png"],
                            "parts": {"p": [[24, 0, 48, 16], [30, 10, 50, 30]]}})
    entries, parts, coords = CO.load_spec(a, spec)
    assert coords == "original" and entries[0].boxes["p"] == (4, 0, 16, 8)
    assert entries[1].boxes["p"] == (7, 5, 17, 15)
    cut = _spec(tmp_path, {"coordinates": "original", "images": ["w1.png", "w2.png"],
                           "parts": {"p": [[0, 0, 10, 10], [30, 10, 50, 30]]}})
    with pytest.raises(AtlasError, match="outside the centre crop"):
        CO.load_spec(a, cut)


def test_correspondence_bad_input(tiny_atlas, tmp_path):
    good = {"eye": [0, 0, 4, 4]}
    (tmp_path / "broken.png").write_text("no image")
    cases = [
        ("{not json", "not readable JSON"),
        ({"images": [{"image": 0, "parts": good}]}, "at least 2"),
        ({"images": [{"image": 0, "parts": good}, {"image": 1, "parts": {"eye": [0, 0, 40, 4]}}]},
         "image 2 \\(1\\) part 'eye': box \\[0, 0, 40, 4\\] lies outside the 32 x 32"),
        ({"images": [{"image": 0, "parts": good}, {"image": 1, "parts": {"eye": [5, 0, 4, 4]}}]}, "empty"),
        ({"images": [{"image": 0, "parts": good}, {"image": 1, "parts": {"eye": [0, 0, 4]}}]}, "4 numbers"),
        ({"images": [{"image": 0, "parts": good}, {"image": 1, "parts": {"nose": [0, 0, 4, 4]}}]},
         "no box for part\\(s\\) nose"),
        ({"images": [{"image": 0, "parts": good}, {"image": "broken.png", "parts": good}]}, "cannot be read"),
        ({"images": [{"image": 0, "parts": good}, {"image": 99999, "parts": good}]}, "not in atlas"),
        ({"images": [{"image": 0, "parts": good}, {"image": 0, "parts": good}]}, "listed twice"),
        ({"images": [0, 1], "parts": {"eye": [[0, 0, 4, 4]]}}, "one box per image"),
        ({"coordinates": "polar", "images": [0, 1]}, "unknown coordinates"),
        ({"images": [0, 1]}, "names no parts"),
    ]
    for spec, pattern in cases:
        p = tmp_path / "spec.json"
        p.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        with pytest.raises(AtlasError, match=pattern):
            CO.correspondence(tiny_atlas, p, random=1, store=False, figures=False)
    ok = _spec(tmp_path, {"images": [0, 1], "parts": {"eye": [[0, 0, 4, 4], [1, 1, 5, 5]]}})
    with pytest.raises(AtlasError, match="unknown layer 'conv8'"):
        CO.correspondence(tiny_atlas, ok, layers="conv8", store=False, figures=False)
    with pytest.raises(AtlasError, match="does not exist"):
        CO.correspondence(tiny_atlas, tmp_path / "nope.json", store=False, figures=False)
    nocls = _without_classifier(tiny_atlas, tmp_path)
    with pytest.raises(AtlasError, match="fc7 needs the model's classifier"):
        CO.correspondence(nocls, ok, layers="conv5,fc7", store=False, figures=False)
    res = CO.correspondence(nocls, ok, random=2, store=False, figures=False)
    assert res.layers == ["conv5"] and any("gone.pt" in n for n in res.notes)
