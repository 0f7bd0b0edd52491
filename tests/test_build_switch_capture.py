"""One-pass switches (atlas/build/capture.py): captured while mining and cropped after the merge, they are the
switches the two-pass path records by decoding and forwarding the final top-k's images again."""
from __future__ import annotations

import json
import zipfile

import pyarrow.parquet as pq
import pytest

import atlas.build as b
import atlas.build.capture as cap
from atlas.build import build
from conftest import make_image_folder


def _switch_rows(out):
    return pq.read_table(out / "switches.parquet").to_pylist()


def _two_pass(monkeypatch):
    monkeypatch.setattr(b, "one_pass_wins", lambda *a, **kw: False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("capture") / "data", per_class=10, size=(44, 36))


@pytest.mark.parametrize("model,size", [("zfnet-mini", 32), ("resnet18", 32)])
def test_one_pass_switches_equal_the_two_pass_ones(tmp_path, folder, monkeypatch, model, size):
    # chunks of 8 over 30 images: later chunks beat fewer running k-th entries, and earlier captures are pruned
    opts = dict(k=3, batch_size=4, chunk_size=8, image_size=size, progress=False, index=False)
    one = build(model, str(folder), tmp_path / "one", **opts)
    assert json.loads((one / "manifest.json").read_text())["switches"]["passes"] == 1
    _two_pass(monkeypatch)
    two = build(model, str(folder), tmp_path / "two", **opts)
    assert json.loads((two / "manifest.json").read_text())["switches"]["passes"] == 2
    rows = _switch_rows(one)
    assert rows and rows == _switch_rows(two)
    assert pq.read_table(one / "top_activations.parquet").equals(pq.read_table(two / "top_activations.parquet"))


def test_captures_are_pruned_to_the_running_top_k(tmp_path, folder, monkeypatch):
    """The work files hold the images still in the running top-k (and at most as many again): those
    fallen out are deleted as chunks finish, and every final top-k image is still there."""
    seen = {}
    real = b.BuildJob.merge

    def look(self):
        files = sorted(self.work.glob("sw-*.zip"))
        seen["held"] = {int(i) for f in files for i in json.loads(zipfile.ZipFile(f).read(cap.BOXES))}
        seen["alive"] = self.capture.alive()
        return real(self)

    monkeypatch.setattr(b.BuildJob, "merge", look)
    out = build("zfnet-mini", str(folder), tmp_path / "a", k=1, batch_size=2, chunk_size=2, image_size=32,
                layers="conv2", progress=False, index=False)
    finals = {r["image_id"] for r in pq.read_table(out / "switches.parquet").to_pylist()}
    assert finals <= seen["alive"] and finals <= seen["held"]
    assert len(seen["held"]) < 30 and len(seen["held"] - seen["alive"]) <= len(seen["alive"]) + 2


def test_the_rule_keeps_two_passes_where_the_top_k_is_a_small_share():
    class L:
        def __init__(self, channels, pools):
            self.channels, self.pools_below = channels, pools

    assert cap.one_pass_wins([L(96, ["pool1"])], 9, 4096)
    assert not cap.one_pass_wins([L(96, ["pool1"])], 9, 100_000)
    assert not cap.one_pass_wins([L(96, [])], 9, 10)  # no pool below: nothing to capture


def test_the_colour_sample_kept_while_mining_equals_the_images_read_again(tmp_path, folder):
    """The manifest's colour statistics come from the mining pass's input (no image decoded twice), and
    are those of the crops read from the files again."""
    from atlas import open as open_atlas
    from atlas.data import Preprocess, open_dataset
    from atlas.pictures.visualizations import estimate_colour

    out = build("zfnet-mini", str(folder), tmp_path / "a", k=2, batch_size=8, image_size=64, progress=False,
                index=False)
    a = open_atlas(out)
    pre, src = Preprocess(a.manifest["preprocessing"]), open_dataset(str(folder))
    again = estimate_colour(list(range(len(src))), lambda i: pre.crop_image(src.open_image(i)), 64)
    assert a.manifest["colour"] == again and again["images"] == len(src)


def test_the_bf16_hint_needs_a_measured_twofold_gain(monkeypatch):
    import torch

    import atlas.util.device as d

    monkeypatch.setattr(d, "cpu_bf16_kernels", lambda: "avx512_bf16")
    cpu = torch.device("cpu")
    assert "2.3x faster" in d.bf16_hint(cpu, "fp32", 2.3)
    assert d.bf16_hint(cpu, "fp32", 1.6) is None and d.bf16_hint(cpu, "fp32", None) is None
    assert d.bf16_hint(cpu, "bf16", 3.0) is None
    monkeypatch.setattr(d, "cpu_bf16_kernels", lambda: None)
    assert d.bf16_hint(cpu, "fp32", 3.0) is None


def test_a_long_fp32_build_measures_bf16_on_one_batch(tmp_path, folder, monkeypatch):
    import atlas.util.device as d

    monkeypatch.setattr(b, "PROBE_MIN_BATCHES", 2)
    monkeypatch.setattr(b, "cpu_bf16_kernels", lambda: "avx512_bf16")
    monkeypatch.setattr(d, "cpu_bf16_kernels", lambda: "avx512_bf16")
    measured = []
    real = b.bf16_speedup
    monkeypatch.setattr(b, "bf16_speedup", lambda *a: measured.append(real(*a)) or 2.5)
    lines = []
    build("zfnet-mini", str(folder), tmp_path / "a", k=2, batch_size=4, image_size=32, progress=False,
          index=False, log=lines.append)
    assert len(measured) == 1 and measured[0] > 0  # one batch, timed for real
    assert any("2.5x faster" in line for line in lines)


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5], [0, 2, 3, 5], [1, 4, 5], [4], [5, 1], [5, 0, 3]],
                         ids=["all", "most", "half", "one", "reordered-few", "reordered-half"])
def test_the_codes_of_some_rows_are_those_of_the_rows_alone(rows):
    """codes_of_rows takes the batch's rows two ways (at least half: codes of every row, then picked; fewer:
    the rows' indices picked first); either is window_codes of those rows' own indices, in their order."""
    import torch
    import torch.nn.functional as F

    from atlas.deconv.switches import window_codes
    from atlas.net import Geometry

    geom = Geometry(kernel=3, stride=2, padding=0, in_size=13, out_size=6, rf_size=3, jump=2, offset=0)
    x = torch.randn(6, 4, 13, 13, generator=torch.Generator().manual_seed(0))
    _, idx = F.max_pool2d(x, 3, 2, return_indices=True)
    want = window_codes(idx[rows].clone(), geom)
    got = cap.codes_of_rows(idx.clone(), rows, geom)
    assert got.shape == (len(rows), 4, 6, 6) and (got == want).all()
