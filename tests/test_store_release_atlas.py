"""An atlas made by the release before the one engine (67e6fd6: the chain engine and its layer walk for
the 2012-2014 nets) opens and projects as it did. tests/data/release-atlas was built by that release
(zfnet-mini, width 8, contrast normalisation on, 3 classes, seed 0, 32 px, k = 2) and
release-atlas-projections.npz holds the projections that release drew from its stored switches (pool1,
pool2). Its weights file (0.6 MB) is left out: the model is rebuilt from the same seed, its state written
where the atlas keeps it, and passed in."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from atlas import open as open_atlas
from atlas.models import load_model
from atlas.pictures.projections import project

DATA = Path(__file__).parent / "data"


def test_an_atlas_of_the_release_opens_and_projects_as_before(tmp_path):
    path = tmp_path / "atlas"
    shutil.copytree(DATA / "release-atlas", path)
    net = load_model("zfnet-mini", width=8, contrast_norm=True, num_classes=3)
    (path / "model").mkdir()
    torch.save({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path / "model" / "state.pt")
    a = open_atlas(path, model=net)
    assert a.layer_names == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    pools = {r["pool"] for r in a.rows("SELECT DISTINCT pool FROM read_parquet('switches.parquet')")}
    assert pools == {"pool1", "pool2"}
    assert a.lmap.by_name["conv5"].pools_below == ["pool1", "pool2"]
    want = np.load(DATA / "release-atlas-projections.npz")
    for key in want.files:
        layer, channel = key.split(".")
        got = project(a, layer, int(channel), switches="stored").images
        ref = torch.from_numpy(want[key])
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), key
