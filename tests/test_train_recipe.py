"""atlas.train: the paper's recipe, resumable runs, and bad input (small data, CPU)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import atlas
from atlas.errors import AtlasError
from atlas.models.registry import build_model, read_weights
from atlas.train import (Trainer, conv_filter_rms, crop_flip, crop_flip_gather, holdout_split, read_metrics, renormalize_filters,
                         train)

from conftest import make_image_folder

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes")


def make_shapes(root: Path, n: int, size: int = 32, seed: int = 0, classes=SHAPES) -> Path:
    """A small labelled shapes ImageFolder: a random-coloured shape on a random dark background, noise."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = classes[i % len(classes)]
        bg = tuple(int(v) for v in rng.integers(0, 120, 3))
        fg = tuple(int(v) for v in rng.integers(120, 256, 3))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        s = rng.uniform(0.4, 0.65) * size
        cx, cy = rng.uniform(s / 2 + 1, size - s / 2 - 1, 2)
        x0, y0, x1, y1 = cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2
        if c == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fg)
        elif c == "square":
            d.rectangle([x0, y0, x1, y1], fill=fg)
        elif c == "triangle":
            d.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fg)
        elif c == "cross":
            t = s / 6
            d.rectangle([cx - t, y0, cx + t, y1], fill=fg)
            d.rectangle([x0, cy - t, x1, cy + t], fill=fg)
        elif c == "ring":
            d.ellipse([x0, y0, x1, y1], outline=fg, width=max(2, int(s / 8)))
        else:
            k = max(2, int(s / 8))
            for yy in range(int(y0), int(y1), 2 * k):
                d.rectangle([x0, yy, x1, yy + k - 1], fill=fg)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (size, size, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / c / f"{i:05d}.png")
    return root


# A tiny, fast configuration for the mechanics (not for accuracy).
TINY = dict(image_size=32, batch_size=16, lr=0.02, dropout=0.5, progress=False)  # dropout on: RNG exercised


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("tshapes") / "data", n=96, size=32)


@pytest.fixture(scope="module")
def run2(tmp_path_factory, tiny_shapes) -> Path:
    """An uninterrupted 2-epoch run (the reference for the resume tests)."""
    out = tmp_path_factory.mktemp("runs") / "run2"
    train("zfnet-mini", str(tiny_shapes), out, epochs=2, snapshot_epochs=[1, 2], **TINY)
    return out


def _state(path: Path) -> dict:
    return read_weights(path)[0]


def _assert_identical(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


# ---------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------
def test_renormalization_after_a_step():
    torch.manual_seed(0)
    net = build_model("zfnet-mini", num_classes=3)
    conv1 = net.features[0]
    with torch.no_grad():
        conv1.weight[0].mul_(500.0)    # RMS far above the radius (conv1 starts at RMS 3e-3)
        conv1.weight[1].mul_(1e-3)     # far below
    before = conv_filter_rms(net)
    assert float(before["features.0"][0]) > 1.0
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    pre = {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    tr = Trainer(net, opt, torch.device("cpu"), pre, "fp32", False, 0.1)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 3, (8,))
    tr.step(tr.normalize(x), y)
    after = conv_filter_rms(net)
    for name, rms in after.items():
        assert float(rms.max()) <= 0.1 + 1e-6, name
    # the large filter was rescaled onto the radius, not just below it
    assert abs(float(after["features.0"][0]) - 0.1) < 1e-6
    # a filter under the radius is left to SGD alone (multiplied by exactly 1)
    assert float(after["features.0"][1]) < 0.1
    # and without renormalisation the same step leaves filters above the radius
    torch.manual_seed(0)
    net2 = build_model("zfnet-mini", num_classes=3)
    with torch.no_grad():
        net2.features[0].weight[0].mul_(500.0)
    tr2 = Trainer(net2, torch.optim.SGD(net2.parameters(), lr=0.01, momentum=0.9), torch.device("cpu"), pre,
                  "fp32", False, 0.0)
    tr2.step(tr2.normalize(x), y)
    assert float(conv_filter_rms(net2)["features.0"][0]) > 1.0
    # the function on its own: exact scale for one filter, identity for the others
    w = torch.nn.Conv2d(3, 2, 3)
    with torch.no_grad():
        w.weight[0].fill_(1.0)
        w.weight[1].fill_(0.01)
    keep = w.weight[1].clone()
    renormalize_filters([w], 0.1)
    assert torch.allclose(w.weight[0], torch.full_like(w.weight[0], 0.1))
    assert torch.equal(w.weight[1], keep)


def test_crop_flip_matches_slicing():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.int32).view(2, 3, 6, 6).to(torch.uint8)
    oy, ox, fl = torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([0, 1])
    for f in (crop_flip, crop_flip_gather):  # the CPU path and the CUDA path (run here on CPU)
        got = f(x, oy, ox, fl, 4)
        assert torch.equal(got[0], x[0, :, 0:4, 1:5])
        assert torch.equal(got[1], x[1, :, 2:6, 0:4].flip(-1))


def test_holdout_is_seeded_and_stratified():
    labels = [i % 3 for i in range(60)]
    tr, va = holdout_split(labels, 0.1, seed=0)
    assert sorted(tr + va) == list(range(60)) and not set(tr) & set(va)
    assert sorted(labels[i] for i in va) == [0, 0, 1, 1, 2, 2]
    assert holdout_split(labels, 0.1, seed=0) == (tr, va)
    assert holdout_split(labels, 0.1, seed=1) != (tr, va)


def test_run_outputs(run2, tiny_shapes):
    cfg = json.loads((run2 / "config.json").read_text())
    o = cfg["options"]
    assert o["momentum"] == 0.9 and o["lr_factor"] == 0.1 and o["renorm_radius"] == 0.1
    assert o["dropout"] == 0.5 and o["init"] == "default" and o["precision"] == "fp32"
    assert o["batch_size"] == 16 and o["lr"] == 0.02 and o["crop"] == 32 and o["flip"] is True
    assert cfg["validation"]["kind"] == "holdout" and cfg["validation"]["fraction"] == 0.1
    assert cfg["validation"]["images"] + cfg["train_images"] == 96
    rows = read_metrics(run2)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["val_top1_error"] <= 1 and 0 <= r["val_top5_error"] <= r["val_top1_error"]
        assert r["lr"] == 0.02 and r["images_per_s"] > 0 and np.isfinite(r["train_loss"])
    with Image.open(run2 / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1000, 420)
    assert (run2 / "snapshots" / "epoch-001.pt").is_file() and (run2 / "snapshots" / "epoch-002.pt").is_file()
    # final.pt loads through the public API with its classes and preprocessing
    net = atlas.load_model("zfnet-mini", weights=run2 / "final.pt")
    assert net.atlas_meta["classes"] == sorted(SHAPES)
    assert net.atlas_meta["preprocessing"]["crop"] == 32
    _, meta = read_weights(run2 / "final.pt")
    assert meta["model"] == "zfnet-mini" and meta["num_classes"] == 6 and meta["init"] == "default"
    assert meta["epochs"] == 2
    # renormalisation held through training: every conv filter at or under the radius
    for name, rms in conv_filter_rms(net).items():
        assert float(rms.max()) <= 0.1 + 1e-6, name
    # the last snapshot is the final model
    _assert_identical(run2 / "snapshots" / "epoch-002.pt", run2 / "final.pt")


# ---------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------
def test_resume_gives_identical_weights(run2, tiny_shapes, tmp_path):
    out = tmp_path / "split"
    train("zfnet-mini", str(tiny_shapes), out, epochs=1, snapshot_epochs=[1], **TINY)
    train("zfnet-mini", str(tiny_shapes), out, epochs=2, snapshot_epochs=[1, 2], resume=True, **TINY)
    _assert_identical(out / "final.pt", run2 / "final.pt")
    a, b = read_metrics(out), read_metrics(run2)
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss", "val_top1_error", "lr"):
            assert ra[k] == rb[k]
    # resuming a finished run does nothing and keeps the weights
    train("zfnet-mini", str(tiny_shapes), out, epochs=2, snapshot_epochs=[1, 2], resume=True, **TINY)
    _assert_identical(out / "final.pt", run2 / "final.pt")


def test_resume_after_sigkill_mid_epoch(run2, tiny_shapes, tmp_path):
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads({torch.get_num_threads()})
        import atlas.train as T
        step, calls = T.Trainer.step, [0]
        def killing_step(self, *a, **k):
            calls[0] += 1
            if calls[0] == 9:   # epoch 1 has 6 steps of 16: this is in the middle of epoch 2
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *a, **k)
        T.Trainer.step = killing_step
        T.train("zfnet-mini", {str(tiny_shapes)!r}, {str(out)!r}, epochs=2, snapshot_epochs=[1, 2],
                **{TINY!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1
    assert not (out / "final.pt").exists()
    train("zfnet-mini", str(tiny_shapes), out, epochs=2, snapshot_epochs=[1, 2], resume=True, **TINY)
    _assert_identical(out / "final.pt", run2 / "final.pt")
    _assert_identical(out / "snapshots" / "epoch-001.pt", run2 / "snapshots" / "epoch-001.pt")


def test_streaming_matches_in_memory(run2, tiny_shapes, tmp_path):
    """Streaming with DataLoader workers sees the same squares, crops and flips as the in-memory path."""
    out = tmp_path / "stream"
    train("zfnet-mini", str(tiny_shapes), out, epochs=2, snapshot_epochs=[1, 2], in_memory=False, workers=1,
          **TINY)
    assert json.loads((out / "config.json").read_text())["runtime"]["in_memory"] is False
    _assert_identical(out / "final.pt", run2 / "final.pt")


def test_random_crops_and_ten_crop_eval(tiny_shapes, tmp_path):
    final = train("zfnet-mini", str(tiny_shapes), tmp_path / "tc", epochs=1, resize=36, crop=32,
                  ten_crop_eval=True, **{k: v for k, v in TINY.items() if k != "image_size"})
    _, meta = read_weights(final)
    assert (meta["preprocessing"]["resize"], meta["preprocessing"]["crop"]) == (36, 32)
    row = read_metrics(final.parent)[0]
    assert 0 <= row["val_top1_error"] <= 1 and np.isfinite(row["val_loss"])
    cfg = json.loads((final.parent / "config.json").read_text())["options"]
    assert cfg["ten_crop_eval"] is True and cfg["resize"] == 36 and cfg["crop"] == 32


def test_unreadable_images_are_left_out(tiny_shapes, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    (data / "circle" / "zz_broken.png").write_bytes(b"not a png")
    said = []
    for in_memory in (True, False):
        final = train("zfnet-mini", str(data), tmp_path / f"run{in_memory}", epochs=1, in_memory=in_memory,
                      log=said.append, **TINY)
        assert np.isfinite(read_metrics(final.parent)[0]["train_loss"])
    assert any("unreadable" in s for s in said)


# ---------------------------------------------------------------------------
# bad input: one clear AtlasError each, before any training
# ---------------------------------------------------------------------------
def test_bad_inputs(tmp_path, tiny_shapes, run2):
    one = make_image_folder(tmp_path / "one", per_class=3, classes=("red",))
    with pytest.raises(AtlasError, match="only one class"):
        train("zfnet-mini", str(one), tmp_path / "r1", **TINY)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(AtlasError, match="no labels"):
        train("zfnet-mini", str(flat), tmp_path / "r2", **TINY)
    other = make_image_folder(tmp_path / "other", per_class=2, classes=("red", "green"))
    with pytest.raises(AtlasError, match="validation classes") as e:
        train("zfnet-mini", str(tiny_shapes), tmp_path / "r3", val=str(other), **TINY)
    assert str(other) in str(e.value) and str(tiny_shapes) in str(e.value)
    with pytest.raises(AtlasError, match="snapshot-epochs 5"):
        train("zfnet-mini", str(tiny_shapes), tmp_path / "r4", epochs=2, snapshot_epochs="1,5", **TINY)
    with pytest.raises(AtlasError, match="unknown model 'zfnet-maxi'"):
        train("zfnet-maxi", str(tiny_shapes), tmp_path / "r5", **TINY)
    with pytest.raises(AtlasError, match=r"different options: .*lr \(run: 0.02, now: 0.05\)"):
        train("zfnet-mini", str(tiny_shapes), run2, epochs=2, snapshot_epochs=[1, 2], resume=True,
              **{**TINY, "lr": 0.05})
    with pytest.raises(AtlasError, match="already holds a training run"):
        train("zfnet-mini", str(tiny_shapes), run2, epochs=2, **TINY)
    with pytest.raises(AtlasError, match="already trained 2 epochs"):
        train("zfnet-mini", str(tiny_shapes), run2, epochs=1, resume=True, snapshot_epochs=[1], **TINY)
    with pytest.raises(AtlasError, match="--lr must be positive"):
        train("zfnet-mini", str(tiny_shapes), tmp_path / "r6", **{**TINY, "lr": 0.0})
    for d in ("r1", "r2", "r3", "r4", "r5", "r6"):
        assert not (tmp_path / d / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------
# it learns
# ---------------------------------------------------------------------------
def test_zfnet_mini_learns_shapes(tmp_path):
    data = make_shapes(tmp_path / "shapes", n=1200, size=32, seed=1)
    # the model's default recipe (batch 32, lr 5e-3, no dropout, He init, renormalisation)
    final = train("zfnet-mini", str(data), tmp_path / "run", epochs=5, image_size=32, progress=False)
    o = json.loads((final.parent / "config.json").read_text())["options"]
    assert (o["batch_size"], o["lr"], o["dropout"], o["init"]) == (32, 5e-3, 0.0, "default")
    rows = read_metrics(final.parent)
    chance = 1 / len(SHAPES)
    acc = [1 - r["val_top1_error"] for r in rows]
    # far above chance: over 3x chance (6 classes: > 50 %) at its best epoch, and over 2x chance at
    # the end (a 120-image validation set at a constant lr moves by several points between epochs;
    # on the development machine the run ends at 84 %)
    assert max(acc) > 3 * chance and acc[-1] > 2 * chance, acc


def test_a_batchnorm_net_trains_with_the_recipes_batchnorm_departures(tmp_path, tiny_folder):
    """resnet18 trains (any torchvision classifier does): its own init, no filter renormalisation, no dropout
    to set; the weights reopen as the model and build an atlas."""
    run = tmp_path / "r18"
    final = atlas.train.train("resnet18", str(tiny_folder), run, epochs=1, image_size=32, batch_size=12,
                              progress=False)
    config = json.loads((run / "config.json").read_text())["options"]
    assert config["renorm_radius"] == 0.0 and config["init"] == "default" and config["dropout"] is None
    assert config["lr"] == 5e-2 and config["batch_size"] == 12  # the BatchNorm default, and the option given
    state, meta = read_weights(final)
    assert meta["model"] == "resnet18" and meta["num_classes"] == 3
    net = atlas.load_model("resnet18", weights=final)
    assert net.fc.out_features == 3 and not net.training
    with pytest.raises(AtlasError, match="resnet18' has no dropout"):
        atlas.train.train("resnet18", str(tiny_folder), tmp_path / "x", epochs=1, dropout=0.3, progress=False)
    # the paper's own nets keep the paper's recipe
    assert atlas.train.TrainOptions().resolve("alexnet", torch.device("cpu"))[0]["renorm_radius"] == 0.1
