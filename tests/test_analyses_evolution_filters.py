"""Figure 4 (feature evolution over snapshots) and figure 6 (conv1 filter comparison)."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import atlas
from atlas.analyses.compare_filters import compare_filters, dead_filters, filter_spectra
from atlas.analyses.evolution import evolution, read_grid
from atlas.data import Preprocess, open_dataset
from atlas.errors import AtlasError
from atlas.net import LayerMap
from atlas.train import train

from conftest import make_image_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    data = make_image_folder(tmp_path_factory.mktemp("evo") / "data", per_class=10, size=(36, 32))
    out = tmp_path_factory.mktemp("evo_runs") / "run"
    train("zfnet-mini", str(data), out, epochs=2, image_size=32, batch_size=8, snapshot_epochs=[0, 1, 2],
          progress=False)
    return out


def test_evolution_grid_geometry(run):
    png = evolution(run, layers="conv1,conv3", per_layer=3, cell=40, progress=False)
    assert png == run / "evolution.png"
    g = read_grid(png)
    # one row per channel (3 per layer x 2 layers), one column per snapshot (epochs 0, 1, 2;
    # final.pt is epoch 2, already a snapshot, so not repeated)
    assert (g["rows"], g["cols"]) == (6, 3)
    assert g["col_labels"] == ["epoch 0", "epoch 1", "epoch 2"]
    assert [lab.split(" ch ")[0] for lab in g["row_labels"]] == ["conv1"] * 3 + ["conv3"] * 3
    with Image.open(png) as im:
        assert im.size == (g["width"], g["height"])
        a = np.asarray(im.convert("RGB")).astype(int)
    assert g["width"] >= g["x0"] + g["cols"] * g["pitch_x"] and g["height"] >= g["y0"] + g["rows"] * g["pitch_y"]
    white = np.array([255, 255, 255])
    for r in range(g["rows"]):
        for c in range(g["cols"]):
            x, y = g["x0"] + c * g["pitch_x"], g["y0"] + r * g["pitch_y"]
            tile = a[y:y + g["cell"], x:x + g["cell"]]
            assert tile.shape[:2] == (g["cell"], g["cell"])
            assert not (tile == white).all(axis=2).any(), (r, c)  # every cell is filled (no white)
            # the gap right of the cell is background
            assert (a[y + g["cell"] // 2, x + g["cell"] + 2] == white).all()
    # the table: every channel of the chosen layers at every snapshot
    t = pq.read_table(run / "evolution.parquet").to_pydict()
    net = atlas.load_model("zfnet-mini", weights=run / "final.pt")
    lmap = LayerMap(net, 32)
    per_snapshot = lmap.by_name["conv1"].channels + lmap.by_name["conv3"].channels
    assert len(t["epoch"]) == 3 * per_snapshot
    assert sorted(set(t["epoch"])) == [0, 1, 2]
    assert sum(t["shown"]) == 6 * 3
    assert set(t) >= {"epoch", "layer", "channel", "image_id", "value", "y", "x"}


def test_evolution_maxima_match_brute_force(run):
    evolution(run, layers="conv3", channels="0,1", out=run / "e2.png", cell=32, progress=False)
    tab = pq.read_table(run / "e2.parquet").to_pydict()
    assert sum(tab["shown"]) == 2 * 3
    assert {c for c, s in zip(tab["channel"], tab["shown"]) if s} == {0, 1}
    net = atlas.load_model("zfnet-mini", weights=run / "snapshots" / "epoch-001.pt")
    src = open_dataset(json.loads((run / "config.json").read_text())["data_root"])
    pre = Preprocess(net.atlas_meta["preprocessing"])
    x = torch.stack([pre(src.open_image(i)) for i in range(len(src))])
    with torch.no_grad():
        act = LayerMap(net, 32).extract(x, ["conv3"])["conv3"]
    for ch in (0, 5):
        rows = [i for i in range(len(tab["epoch"])) if tab["epoch"][i] == 1 and tab["channel"][i] == ch]
        assert len(rows) == 1
        i = rows[0]
        a = act[:, ch]
        assert tab["value"][i] == pytest.approx(float(a.max()), abs=1e-5)
        assert float(a[tab["image_id"][i], tab["y"][i], tab["x"][i]]) == pytest.approx(float(a.max()), abs=1e-5)


def test_evolution_bad_input(run, tmp_path):
    with pytest.raises(AtlasError, match="no snapshot of epoch 7"):
        evolution(run, epochs="1,7", progress=False)
    with pytest.raises(AtlasError, match="conv1 has channels 0..31, not 99"):
        evolution(run, layers="conv1", channels=[99], out=tmp_path / "x.png", progress=False)
    with pytest.raises(AtlasError, match="unknown layer 'conv9'"):
        evolution(run, layers="conv9", out=tmp_path / "x.png", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AtlasError, match="no snapshots"):
        evolution(empty, progress=False)


# ---------------------------------------------------------------------------
# compare_filters on planted filters
# ---------------------------------------------------------------------------
def _planted(k: int = 7) -> torch.Tensor:
    y, x = np.mgrid[0:k, 0:k] - (k - 1) / 2
    fs = [
        np.zeros((k, k)),                                                   # 0 dead (exactly 0)
        np.ones((k, k)) * 0.05,                                             # 1 flat: low
        0.08 * (-1.0) ** (x + y),                                           # 2 checkerboard: high
        0.08 * np.cos(2 * np.pi * 0.18 * x),                                # 3 period 5.6 px: mid
        0.08 * np.exp(-(x ** 2 + y ** 2) / (2 * 1.5 ** 2)),                 # 4 smooth blob: low
        1e-5 * np.random.default_rng(0).standard_normal((k, k)),            # 5 near zero: dead
    ]
    return torch.tensor(np.stack([np.stack([f, f, f]) for f in fs]), dtype=torch.float32)


def test_compare_filters_planted(tmp_path, run):
    w = _planted()
    shares, _ = filter_spectra(w)
    dom = shares.argmax(1)
    assert dom[1] == 0 and dom[4] == 0      # low
    assert dom[3] == 1                       # mid
    assert dom[2] == 2 and shares[2, 2] > 0.95  # high
    assert dead_filters(w).tolist() == [True, False, False, False, False, True]
    a = tmp_path / "planted.pt"
    torch.save({"features.0.weight": w, "features.0.bias": torch.zeros(6)}, a)
    png, rows = compare_filters(a, run, out=tmp_path / "cmp.png", labels="planted,mini")
    assert png == tmp_path / "cmp.png" and Image.open(png).size[0] >= 900
    r = rows[0]
    assert r["model"] == "planted" and r["filters"] == 6 and r["kernel"] == 7 and r["dead"] == 2
    assert r["low_dominated"] == pytest.approx(0.5) and r["mid_dominated"] == pytest.approx(0.25)
    assert r["high_dominated"] == pytest.approx(0.25)
    assert r["low_share"] + r["mid_share"] + r["high_share"] == pytest.approx(1.0)
    m = rows[1]
    assert m["model"] == "mini" and m["filters"] == 32 and m["kernel"] == 5 and m["stride"] == 2
    # band edges move filters between bands
    _, rows2 = compare_filters(a, a, out=tmp_path / "cmp2.png", bands="0.2,0.3")
    assert rows2[0]["mid_dominated"] == 0.0
    with pytest.raises(AtlasError, match="--bands"):
        compare_filters(a, a, out=tmp_path / "x.png", bands="0.3,0.1")
    with pytest.raises(AtlasError, match="do not exist"):
        compare_filters(tmp_path / "nope.pt", a, out=tmp_path / "x.png")


def test_evolution_follows_matched_units_to_their_permuted_twins(run, tmp_path):
    """Snapshot 1 is snapshot 0 with every conv layer's channels permuted (the same function): followed by
    their matches, the units shown at snapshot 1 are their twins at snapshot 0, and every step says how well
    it matched."""
    import shutil

    from permute import conv_and_linear_names, permuted

    twin_run = tmp_path / "run"
    shutil.copytree(run, twin_run)
    saved = torch.load(twin_run / "snapshots" / "epoch-000.pt", weights_only=True)
    convs, linear = conv_and_linear_names(atlas.load_model("zfnet-mini", weights=run / "final.pt"))
    state, perms = permuted(saved["model_state"], convs, linear)
    torch.save({"model_state": state, "meta": {**saved["meta"], "epochs": 1, "epoch": 1}},
               twin_run / "snapshots" / "epoch-001.pt")
    said = []
    png = evolution(twin_run, layers="conv1,conv3", per_layer=3, epochs="0,1", cell=32, progress=False,
                    follow="matched", log=said.append)
    matches = pq.read_table(png.with_suffix(".matches.parquet")).to_pylist()
    for n, layer in ((0, "conv1"), (2, "conv3")):
        live = [m for m in matches if m["layer"] == layer and m["channel_b"] is not None]
        assert live and all(perms[n][m["channel_b"]] == m["channel_a"] and m["corr"] > 0.9999 for m in live)
    from atlas.analyses.evolution import evolution_table

    rows = evolution_table(png)
    assert len(rows) == 6
    for r in rows:
        n = 0 if r["layer"] == "conv1" else 2
        assert r["channel 0"] == perms[n][r["channel 1"]] and r["channel"] == r["channel 1"]
        assert r["epoch 0"] == pytest.approx(r["epoch 1"], rel=1e-4)  # the same unit: the same maximum
    assert any("epoch 0 -> 1" in s and "conv1 1.000" in s for s in said)
    with pytest.raises(AtlasError, match="--follow"):
        evolution(twin_run, follow="numbers", progress=False)
