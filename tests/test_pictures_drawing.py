"""Rendering: display normalisation, the figure 2 panel, filter grids, atomic PNG files."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from atlas import deconv as D
from atlas.pictures import drawing as R
from atlas.net import LayerMap
from atlas.models import load_model


def _rgb(im):
    return np.asarray(im.convert("RGB"))


def _is_hatch(px):
    return np.all(px == R.HATCH[0], axis=-1) | np.all(px == R.HATCH[1], axis=-1)


# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------
def test_normalisation_is_centred_on_grey_and_symmetric():
    # the max display (the percentile one, the default, is tested in test_pictures_display.py)
    v = np.zeros((3, 2, 3), np.float32)
    v[0, 0, 0], v[1, 0, 1], v[2, 1, 2] = 4.0, -4.0, 1.0
    out = R.normalise(v, display="max")
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 255 and out[0, 1, 1] == 0
    assert out[1, 0, 0] == 128  # zero is mid-grey
    assert out[1, 2, 2] == round((1 / 8 + 0.5) * 255)
    assert np.all(R.normalise(np.zeros((3, 4, 4)), display="max") == 128)  # an all-zero projection is plain grey
    # the scale comes from the region only (the receptive field inside the image)
    region = np.array([[False, True, False], [False, False, True]])
    out = R.normalise(v, region, display="max")
    assert out[0, 1, 1] == 0 and out[0, 0, 0] == 255  # 4 / (2 * 4) + .5 = 1 -> clipped at white
    assert out[1, 2, 2] == round((1 / 8 + 0.5) * 255)


def test_normalise_accepts_tensors():
    t = torch.tensor([[[1.0, -1.0]]]).repeat(3, 1, 1)
    assert R.normalise(t, display="max")[0, 0].tolist() == [255, 255, 255]


# ---------------------------------------------------------------------------
# panels
# ---------------------------------------------------------------------------
def _dot_case(size=16, box=(2, 3, 9, 10), dot=(5, 7)):
    """A projection with one bright pixel and an image with one white pixel at the same place."""
    proj = np.zeros((3, size, size), np.float32)
    proj[:, dot[0], dot[1]] = 1.0
    img = np.full((size, size, 3), 40, np.uint8)
    img[dot[0], dot[1]] = 255
    return proj, img


def test_panel_patch_and_projection_line_up_pixel_for_pixel():
    size, box = 16, (2, 3, 9, 10)
    cases = [(4, 5), (3, 2), (9, 8), (5, 5)]
    projs, imgs = zip(*[_dot_case(size, box, d) for d in cases])
    im = R.panel(list(projs), list(imgs), boxes=[box] * 4, image_size=size, upscale=3, gap=2)
    a = _rgb(im)
    cell = 7 * 3
    cols = 2
    left_w = cols * cell + (cols - 1) * 2
    sep = max(3 * 2, 6)
    assert a.shape == (2 * cell + 2, 2 * left_w + sep, 3)
    for i, (dy, dx) in enumerate(cases):
        r, c = divmod(i, cols)
        oy, ox = r * (cell + 2), c * (cell + 2)
        pc = a[oy:oy + cell, ox:ox + cell]
        ic = a[oy:oy + cell, left_w + sep + ox:left_w + sep + ox + cell]
        hot_p = np.argwhere(pc[..., 0] == 255)
        hot_i = np.argwhere(ic[..., 0] == 255)
        assert len(hot_p) == 9 and np.array_equal(hot_p, hot_i)  # one pixel, enlarged 3x3, same place
        assert tuple(hot_p[0]) == ((dy - box[1]) * 3, (dx - box[0]) * 3)
        assert np.all(pc[..., 0][pc[..., 0] != 255] == 128)  # the rest of the projection: grey


def test_border_units_are_hatched_beyond_the_image_in_both_cells():
    size, box = 16, (-2, -1, 5, 6)  # a border unit: its field starts outside the image (less than half)
    proj, img = _dot_case(size, box, (1, 1))
    im = R.panel([proj], [img], boxes=[box], image_size=size, upscale=1, gap=2)
    a = _rgb(im)
    left, right = a[:7, :7], a[:7, 7 + 6:7 + 6 + 7]
    for cell in (left, right):
        hatch = _is_hatch(cell)
        assert hatch[:1, :].all() and hatch[:, :2].all()   # rows y < 0 and columns x < 0
        assert not hatch[1:, 2:].any()                     # the image part is not marked
    assert right[1 + 1, 2 + 1].tolist() == [255, 255, 255] and left[2, 3].tolist() == [255, 255, 255]


def test_fields_mostly_beyond_the_image_show_only_their_part_inside():
    size = 16
    # a corner unit whose field is mostly outside, and a field larger than the whole image
    assert R.shown_box((-5, -4, 4, 5), size) == (0, 0, 4, 5)
    assert R.shown_box((-10, -12, 30, 28), size) == (0, 0, 16, 16)
    assert R.shown_box((2, 3, 9, 10), size) == (2, 3, 9, 10)
    proj, img = _dot_case(size, None, (1, 1))
    im = R.panel([proj], [img], boxes=[(-10, -12, 30, 28)], image_size=size, upscale=2, gap=2)
    a = _rgb(im)
    assert a.shape == (32, 32 + 6 + 32, 3)   # the whole image, no border around it
    assert not _is_hatch(a).any()
    assert a[2, 32 + 6 + 2].tolist() == [255, 255, 255] and a[2, 2].tolist() == [255, 255, 255]


def test_large_fields_are_shrunk_and_the_panel_is_labelled():
    size, k = 224, 9
    g = np.random.default_rng(0)
    projs = [g.normal(size=(3, size, size)).astype(np.float32) for _ in range(k)]
    imgs = [g.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(k)]
    meta_boxes = [(-105, -105, 330, 330)] * k   # a ResNet's layer4 field: 435 px, twice the input
    names = [f"cats/photo_{i:03d}.jpg" for i in range(k)]

    class P:  # the Projections interface a panel reads
        image_size = size
        meta = [{"rank": i, "value": 5.0 - i / 3, "image_id": i, "mode": "unit", "rf_box": meta_boxes[i],
                 "layer": "layer4", "channel": 17} for i in range(k)]

        def crop(self, i, b):
            return R._crop_pad(projs[i], b)

    im = R.panel(P(), imgs, title="resnet18 · layer4 · channel 17 · DeconvNet", alert="RANDOM WEIGHTS: ...",
                 names=names)
    assert im.width <= 1000 and im.height <= 650   # cells shrunk to MAX_CELL, not 435 px of border
    labels = json.loads(im.info["atlas.labels"])
    assert labels[0][0].startswith("rank 0: 5") and labels[1][3] == "cats/photo_003.jpg"
    assert im.info["atlas.title"].startswith("resnet18") and "RANDOM" in im.info["atlas.alert"]
    a = _rgb(im)
    dark = (a.min(axis=-1) < 100).any(axis=1)
    assert dark[:20].any()                       # the title's text in the top rows
    red = (a[..., 0] > 150) & (a[..., 1] < 60) & (a[..., 2] < 60)
    assert red[:70].any()                        # the random-weights line, in red, above the grids
    big = R.panel(P(), imgs, names=names, scale=2)
    assert abs(big.width - 2 * R.panel(P(), imgs, names=names).width) < 20


def test_missing_image_gives_a_placeholder_patch():
    size, box = 16, (2, 3, 9, 10)
    proj, img = _dot_case(size, box, (5, 5))
    im = R.panel([proj, proj], [img, None], boxes=[box, box], image_size=size, upscale=12, gap=2)
    a = _rgb(im)
    cell = 84
    left_w = 2 * cell + 2
    right = a[:cell, left_w + 6:]
    second = right[:, cell + 2:]
    assert np.mean(np.all(second == 236, axis=-1)) > 0.5  # the placeholder's light fill
    assert not np.any(np.all(right[:, :cell] == 236, axis=-1))


def test_panel_from_real_projections_small_fields_enlarged_and_captioned():
    model = load_model("zfnet-mini", seed=0)
    lm = LayerMap(model, 64)
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(9, 3, 64, 64, generator=g) * 255).to(torch.uint8)
    x = imgs.float() / 255 - 0.5
    rec = D.record(lm, x, ["conv1"])
    act = rec.activations["conv1"]
    ch = int(act.amax(dim=(2, 3)).sum(0).argmax())
    reqs = []
    for i in range(9):
        y, xx = divmod(int(act[i, ch].flatten().argmax()), act.shape[-1])
        reqs.append(D.Request(i, "conv1", ch, y, xx))
    P = D.project(lm, reqs, rec.switches, activations=rec.activations)
    pats = [imgs[i].permute(1, 2, 0).numpy() for i in range(9)]
    rf = lm.by_name["conv1"].geometry.rf_size  # 5
    plain = R.panel(P, pats)
    up = R.upscale_for(rf)
    assert up > 1 and plain.height == 3 * rf * up + 2 * 2
    assert plain.width == 2 * (3 * rf * up + 2 * 2) + 6
    capt = R.panel(P, pats, caption="conv1 channel 3\ntop 9")
    assert capt.width == plain.width and capt.height > plain.height + 20
    assert plain.info["atlas.layer"] == "conv1" and plain.info["atlas.mode"] == "unit"
    assert plain.info["atlas.normalisation"] == R.NORMALISATION


def test_panel_patch_may_be_the_clipped_crop():
    size, box = 16, (-3, -2, 4, 5)
    proj, img = _dot_case(size, box, (1, 1))
    full = R.panel([proj], [img], boxes=[box], image_size=size, upscale=2)
    crop = R.panel([proj], [img[0:5, 0:4]], boxes=[box], image_size=size, upscale=2)
    assert np.array_equal(_rgb(full), _rgb(crop))
    with pytest.raises(ValueError):
        R.panel([proj], [img[:3, :3]], boxes=[box], image_size=size)


# ---------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------
def test_filter_grid_normalises_each_filter():
    w = torch.zeros(5, 3, 3, 3)
    w[0, 0, 1, 1] = 0.01   # tiny filter: still full contrast
    w[1, 2, 0, 0] = -7.0
    im = R.filter_grid(w, cols=3, upscale=2, gap=1)
    a = _rgb(im)
    assert a.shape == (2 * 6 + 1 + 2, 3 * 6 + 2 + 2, 3)
    f0 = a[1:7, 1:7]
    assert f0[2, 2].tolist() == [255, 128, 128] and f0[0, 0].tolist() == [128, 128, 128]
    f1 = a[1:7, 1 + 7:7 + 7]
    assert f1[0, 0].tolist() == [128, 128, 0]
    assert im.info["atlas.normalisation"] == R.FILTER_NORMALISATION


def test_filter_grid_of_zfnet_conv1_and_grey_filters():
    model = load_model("zfnet", seed=0)
    im = R.filter_grid(model.features[0].weight)  # 96 filters 7x7: 10 columns
    up = R.upscale_for(7, minimum=R.FILTER_CELL, cap=12)
    assert im.width == 10 * 7 * up + 9 + 2 and im.height == 10 * 7 * up + 9 + 2
    titled = R.filter_grid(model.features[0].weight, title="zfnet  ·  conv1", alert="RANDOM WEIGHTS", scale=2)
    assert titled.width == 10 * 7 * up * 2 + 9 * 2 + 4 and titled.height > titled.width + 40
    a = _rgb(titled)
    assert (a[:20].min(axis=-1) < 100).any() and titled.info["atlas.title"] == "zfnet  ·  conv1"
    grey = R.filter_grid(torch.randn(4, 1, 5, 5), cols=2, upscale=1)
    a = _rgb(grey)
    assert np.array_equal(a[..., 0], a[..., 1])
    with pytest.raises(ValueError):
        R.filter_grid(torch.randn(4, 2, 5, 5))


# ---------------------------------------------------------------------------
# PNG files
# ---------------------------------------------------------------------------
def test_projection_png_carries_its_metadata(tmp_path):
    model = load_model("zfnet-mini", seed=0)
    lm = LayerMap(model, 64)
    x = torch.randn(1, 3, 64, 64)
    P = D.project_images(lm, x, [D.Request(0, "conv3", 1, 0, 7)])
    im = R.projection_image(P, 0, rank=4)
    p = R.write_png(tmp_path / "c" / "p.png", im, text={"image_id": 17})
    t = R.read_text(p)
    assert t["layer"] == "conv3" and t["channel"] == "1" and t["rank"] == "4"
    assert t["mode"] == "unit" and t["norm"] == "identity" and t["image_id"] == "17"
    assert t["normalisation"] == R.NORMALISATION and t["outside"] == R.OUTSIDE and t["display"] == "percentile"
    assert float(t["value"]) == pytest.approx(P.meta[0]["value"])
    rf = lm.by_name["conv3"].geometry.rf_size
    with Image.open(p) as back:
        # a unit at the top edge: more than half of its field is beyond the image, so only the part inside
        x0, y0, x1, y1 = json.loads(t["box"])
        assert (x0, y0) == (max(x0, 0), 0) and y1 - y0 < rf and R.shown_box(P.meta[0]["rf_box"], 64) == (x0, y0, x1, y1)
        up = R.upscale_for(rf)   # the field's scale, as in its panel
        assert back.size == ((x1 - x0) * up, (y1 - y0) * up)
        assert np.array_equal(np.asarray(back.convert("RGB")), _rgb(im))


def test_write_png_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    R.write_png(target, Image.new("RGB", (4, 4), (1, 2, 3)), text={"layer": "conv1"})
    before = target.read_bytes()

    def boom(self, fp, *a, **k):
        fp.write(b"\x89PNG half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        R.write_png(target, Image.new("RGB", (4, 4)))
    monkeypatch.undo()
    assert target.read_bytes() == before  # the old picture is still whole
    assert sorted(os.listdir(tmp_path)) == ["x.png"]  # no temp file left behind
    assert R.read_text(target) == {"layer": "conv1"}
