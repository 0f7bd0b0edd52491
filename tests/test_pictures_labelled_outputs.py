"""Pictures a user takes to a slide carry their labels in their pixels and their PNG text: `similar --out`
(a contact sheet) and `visualize --out` (titled), and `visualize --preview` is a cheap first look."""
import json

import numpy as np
from PIL import Image

from cli_helpers import ok, one_line_error


def _top_rows_have_text(path, rows=20):
    a = np.asarray(Image.open(path).convert("RGB"))
    return (a[:rows].min(axis=-1) < 100).any()


def _red_line(path):
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return ((a[..., 0] > 150) & (a[..., 1] < 60) & (a[..., 2] < 60)).any()


def test_similar_out_is_a_titled_labelled_contact_sheet(own_atlas, tmp_path):
    rows = json.loads(ok("similar", own_atlas, "--image-id", 5, "--limit", 4, "--format", "json",
                         "--out", tmp_path / "images.png"))
    with Image.open(tmp_path / "images.png") as im:
        title, labels = im.text["atlas.title"], json.loads(im.text["atlas.labels"])
    assert "images most like image 5" in title and len(labels) == 4
    assert all(r["path"].split("/")[-1] in lab and f"{r['rank']}:" in lab for r, lab in zip(rows, labels))
    assert _top_rows_have_text(tmp_path / "images.png") and _red_line(tmp_path / "images.png")
    ok("similar", own_atlas, "--channel", "conv3:2", "--limit", 3, "--out", tmp_path / "channels.png")
    with Image.open(tmp_path / "channels.png") as im:
        assert "channels most like conv3:2" in im.text["atlas.title"] and im.width > 3 * 96


def test_visualize_preview_and_a_titled_copy(own_atlas, tmp_path):
    assert "not both" in one_line_error("visualize", own_atlas, "conv2", 1, "--preview", "--steps", 10)
    [row] = json.loads(ok("visualize", own_atlas, "conv2", 1, "--preview", "--no-progress", "--format", "json",
                          "--out", tmp_path / "v.png", "--cache", tmp_path / "c"))
    assert row["steps"] == 64
    with Image.open(tmp_path / "v.png") as im:
        assert im.text["atlas.title"].startswith("zfnet-mini  ·  conv2  ·  channel 1  ·  feature visualisation")
        assert im.height >= 320 and "atlas.featurevis.recipe" in im.text  # the cached picture's own text kept
    assert _top_rows_have_text(tmp_path / "v.png")
    with Image.open(row["png"]) as bare:  # the cached picture stays bare: the site captions it itself
        assert "atlas.title" not in bare.text


def test_one_projection_copied_out_is_titled_and_large(own_atlas, tmp_path):
    out = tmp_path / "one.png"
    ok("show", own_atlas, "conv3", 2, "--rank", 0, "--out", out)
    with Image.open(out) as im:
        title = im.text["atlas.title"]
        assert im.height >= 320 and im.text["atlas.rank"] == "0" and "RANDOM WEIGHTS" in im.text["atlas.alert"]
    assert "conv3  ·  channel 2  ·  rank 0  ·  DeconvNet" in title and "activation" in title
    assert _top_rows_have_text(out) and _red_line(out)
