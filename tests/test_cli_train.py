"""`atlas train`, `atlas evolution` and `atlas compare-filters` through the real CLI (small data, CPU).

The recipe, resume exactness and learning are asserted at library level in test_train_recipe.py; here: the
flags reach train(), the files a run leaves, the commands' output, and one line per bad input."""
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from atlas.analyses.evolution import read_grid
from atlas.cli import main
from atlas.models.registry import build_model, read_weights
from atlas.data.shapes import generate

from conftest import make_image_folder

FAST = ["--model", "zfnet-mini", "--image-size", "32", "--batch-size", "16", "--no-progress"]


def cli(*args, ok: bool = True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def one_error_line(res, *needles: str) -> None:
    """A bad input: non-zero exit, one line on stderr, naming what is wrong, no traceback."""
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output  # not an uncaught error
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    # 12 classes x 10 images at 32 px: the held-out 10 % is one image per class
    return generate(tmp_path_factory.mktemp("cli_shapes") / "shapes", n=120, size=32, seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes) -> Path:
    out = tmp_path_factory.mktemp("cli_runs") / "run"
    res = cli("train", *FAST, "--data", shapes, "--out", out, "--epochs", 2, "--snapshot-epochs", "0,1,2")
    assert res.stdout.strip().splitlines()[-1] == str(out / "final.pt")
    return out


def test_train_writes_the_run(run, shapes):
    for f in ("config.json", "metrics.csv", "curves.png", "checkpoint.pt", "final.pt"):
        assert (run / f).is_file(), f
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["epoch-000.pt", "epoch-001.pt", "epoch-002.pt"]
    cfg = json.loads((run / "config.json").read_text())
    o = cfg["options"]
    # the CLI's defaults are the recipe's, written out in full (zfnet-mini's departures included)
    assert (o["momentum"], o["weight_decay"], o["renorm_radius"], o["lr_patience"], o["lr_factor"]) == \
        (0.9, 5e-4, 0.1, 3, 0.1)
    assert (o["flip"], o["ten_crop_eval"], o["val_fraction"], o["precision"], o["seed"]) == \
        (True, False, 0.1, "fp32", 0)
    assert (o["lr"], o["dropout"], o["init"], o["batch_size"], o["epochs"]) == (5e-3, 0.0, "default", 16, 2)
    assert o["snapshot_epochs"] == [0, 1, 2]
    assert cfg["defaults"]["paper"] == {"epochs": 70, "batch_size": 128, "lr": 1e-2, "dropout": 0.5,
                                        "init": "paper", "renorm_radius": 0.1}
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["val_top1_error"]) <= 1 and float(r["images_per_s"]) > 0 for r in rows)
    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_every_recipe_flag_reaches_the_run(shapes, tmp_path):
    out = tmp_path / "flags"
    cli("train", "--model", "zfnet-mini", "--data", shapes, "--out", out, "--epochs", 1, "--batch-size", 8,
        "--lr", 0.002, "--momentum", 0.8, "--weight-decay", 0, "--dropout", 0.2, "--init", "paper",
        "--renorm-radius", 0.2, "--lr-patience", 1, "--lr-factor", 0.5, "--resize", 36, "--crop", 32,
        "--no-flip", "--ten-crop-eval", "--val-fraction", 0.2, "--seed", 3, "--stream", "--precision", "fp32",
        "--workers", 0, "--device", "cpu", "--image-size", 32, "--no-progress")
    cfg = json.loads((out / "config.json").read_text())
    o = cfg["options"]
    assert {k: o[k] for k in ("batch_size", "lr", "momentum", "weight_decay", "dropout", "init", "renorm_radius",
                              "lr_patience", "lr_factor", "resize", "crop", "flip", "ten_crop_eval",
                              "val_fraction", "seed", "precision")} == {
        "batch_size": 8, "lr": 0.002, "momentum": 0.8, "weight_decay": 0.0, "dropout": 0.2, "init": "paper",
        "renorm_radius": 0.2, "lr_patience": 1, "lr_factor": 0.5, "resize": 36, "crop": 32, "flip": False,
        "ten_crop_eval": True, "val_fraction": 0.2, "seed": 3, "precision": "fp32"}
    assert cfg["runtime"]["in_memory"] is False and cfg["runtime"]["device"] == "cpu"
    assert cfg["validation"]["images"] == 24  # 20 % of 10 per class, 12 classes


def test_resume_through_the_cli(run, shapes, tmp_path):
    out = tmp_path / "resumed"
    cli("train", *FAST, "--data", shapes, "--out", out, "--epochs", 1, "--snapshot-epochs", "0,1")
    res = cli("train", *FAST, "--data", shapes, "--out", out, "--epochs", 2, "--snapshot-epochs", "0,1,2",
              "--resume")
    assert "resuming" in res.stderr
    a, b = read_weights(out / "final.pt")[0], read_weights(run / "final.pt")[0]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.fixture(scope="module")
def run_atlas(run, shapes, tmp_path_factory) -> Path:
    """An atlas of the run's final weights, built through the CLI (conv1 only: all the tests below read)."""
    res = cli("build", "--model", "zfnet-mini", "--weights", run / "final.pt", "--data", shapes,
              "--out", tmp_path_factory.mktemp("cli_atlas") / "atlas", "--k", 2, "--image-size", 32,
              "--layers", "conv1", "--no-progress")
    return Path(res.stdout.strip())


def test_build_loads_the_final_weights(run, run_atlas):
    m = json.loads((run_atlas / "manifest.json").read_text())
    assert m["model"]["weights"] == str((run / "final.pt").resolve()) and not m["model"]["random_init"]


def test_evolution_grid_and_table(run):
    png = run / "evo.png"
    res = cli("evolution", run, "--layers", "conv1,conv2", "--per-layer", 2, "--cell", 24, "--out", png,
              "--format", "json", "--no-progress")
    table = json.loads(res.stdout)
    assert res.stderr.strip().splitlines()[-1] == str(png)
    g = read_grid(png)
    # one row per channel, one column per snapshot
    assert (g["rows"], g["cols"]) == (4, 3)
    assert g["col_labels"] == ["epoch 0", "epoch 1", "epoch 2"]
    assert [f"{r['layer']} ch {r['channel']}" for r in table] == g["row_labels"]
    assert all(list(r)[2:] == g["col_labels"] for r in table)
    with Image.open(png) as im:
        assert im.size == (g["width"], g["height"])
        assert g["x0"] + 3 * g["pitch_x"] <= im.size[0] and g["y0"] + 4 * g["pitch_y"] <= im.size[1]
    # table format: the aligned table, then the PNG's path
    out = cli("evolution", run, "--layers", "conv1", "--channels", "0,3", "--snapshot-epochs", "0,2", "--cell", 24,
              "--out", png, "--no-progress").stdout.strip().splitlines()
    assert out[0].split() == ["layer", "channel", "epoch", "0", "epoch", "2"] and len(out) == 5
    assert out[-1] == str(png) and read_grid(png)["rows"] == 2


def test_the_exported_site_shows_the_linked_runs_evolution(run, run_atlas, tmp_path):
    atlas_dir = run_atlas
    site = tmp_path / "site"
    cli("export", atlas_dir, site, "--max-channels", 1, "--no-progress")
    assert "analyses/evolution.html" not in (site / "index.html").read_text()  # no figure yet
    cli("evolution", run, "--layers", "conv1", "--per-layer", 1, "--cell", 24, "--no-progress")
    cli("export", atlas_dir, site, "--max-channels", 1, "--no-progress")  # the new figure is picked up
    assert 'href="analyses/evolution.html"' in (site / "index.html").read_text()
    page = json.loads((site / "analyses" / "evolution.json").read_text())
    pics = [p for r in page["runs"] for p in r["pictures"]]
    assert page["runs"][0]["name"] == run.name and pics[0]["name"] == "evolution.png"
    assert (site / "analyses" / pics[0]["src"]).read_bytes() == (run / "evolution.png").read_bytes()


def test_compare_filters_table_and_png(run, tmp_path):
    torch.manual_seed(0)
    alex = build_model("alexnet-single", num_classes=12)
    with torch.no_grad():
        alex.features[0].weight[:10] = 0.0  # 10 dead filters
    wfile = tmp_path / "alex.pt"
    torch.save({"model_state": alex.state_dict(), "meta": {"model": "alexnet-single", "num_classes": 12}}, wfile)
    png = tmp_path / "cmp.png"
    res = cli("compare-filters", run, wfile, "--labels", "ZF-mini,AlexNet", "--out", png, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["model"] for r in rows] == ["ZF-mini", "AlexNet"]
    assert [(r["filters"], r["kernel"], r["stride"]) for r in rows] == [("32", "5", "2"), ("96", "11", "4")]
    assert rows[1]["dead"] == "10"
    for r in rows:
        assert float(r["low_share"]) + float(r["mid_share"]) + float(r["high_share"]) == pytest.approx(1, abs=1e-4)
    assert res.stderr.strip().splitlines()[-1] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 900
    text = cli("compare-filters", run, wfile, "--out", png).stdout.strip().splitlines()
    assert text[0].split()[:4] == ["model", "filters", "kernel", "dead"] and text[-1] == str(png)


def test_bad_inputs_one_line_each(run, shapes, tmp_path):
    one = make_image_folder(tmp_path / "one", per_class=3, classes=("red",))
    other = make_image_folder(tmp_path / "other", per_class=2, classes=("red", "green"))
    cases = [
        (["train", *FAST, "--data", one, "--out", tmp_path / "r1"], ["only one class", str(one)]),
        (["train", *FAST, "--data", shapes, "--val", other, "--out", tmp_path / "r2"],
         ["validation classes", str(other), str(shapes)]),
        (["train", *FAST, "--data", shapes, "--out", tmp_path / "r3", "--epochs", 2, "--snapshot-epochs", "1,5"],
         ["--snapshot-epochs 5", "1..2"]),
        (["train", *FAST, "--data", shapes, "--out", run, "--epochs", 2, "--snapshot-epochs", "0,1,2",
          "--lr", 0.05, "--resume"], ["different options", "lr (run: 0.005, now: 0.05)"]),
        (["train", "--model", "zfnet-maxi", "--data", shapes, "--out", tmp_path / "r4"], ["unknown model 'zfnet-maxi'"]),
        (["train", *FAST, "--data", tmp_path / "nope", "--out", tmp_path / "r5"], ["does not exist"]),
        (["evolution", run, "--snapshot-epochs", "1,7"], ["no snapshot of epoch 7"]),
        (["compare-filters", run, tmp_path / "nope.pt"], ["nope.pt", "do not exist"]),
    ]
    for args, needles in cases:
        one_error_line(cli(*args, ok=False), *needles)
    # a missing required option: click's usage error, whose one Error line names it
    res = cli("train", "--model", "zfnet-mini", "--out", tmp_path / "r6", ok=False)
    assert res.exit_code == 2 and "Error: Missing option '--data'" in res.stderr and "Traceback" not in res.output
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 7))
