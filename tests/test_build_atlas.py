import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import cli_helpers
import pytest
import torch
from click.testing import CliRunner

import atlas
from atlas.build import build
from atlas.cli import main
from atlas.data import DecodedImages, Preprocess, open_dataset
from atlas.deconv.switches import SwitchRegion, decode

from conftest import make_image_folder

TABLES = ["images.parquet", "layers.parquet", "channels.parquet", "top_activations.parquet", "switches.parquet"]


def all_activations(a):
    """Brute force: every activation of every image, straight from the model."""
    src = open_dataset(a.manifest["dataset"]["root"])
    ds = DecodedImages(src, Preprocess(a.manifest["preprocessing"]), range(len(src)))
    x = torch.stack([ds[i][0] for i in range(len(src))])
    if a.manifest["options"].get("memory_format") == "channels_last":  # the atlas's kernels, which round alike
        x = x.contiguous(memory_format=torch.channels_last)
        a.model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        return a.lmap.extract(x, a.layer_names)


def test_topk_against_brute_force(tiny_atlas):
    a = atlas.open(tiny_atlas)
    acts = all_activations(a)
    k = a.manifest["k"]
    for la in a.manifest["layers"]:
        name, w = la["layer"], la["width"]
        maps = acts[name].flatten(2)
        vals, pos = maps.max(2)
        got = a.rows("SELECT channel, rank, image_id, value, y, x, x0, y0, x1, y1 FROM top_activations "
                     "WHERE layer = ? ORDER BY channel, rank", [name])
        assert len(got) == la["channels"] * k
        layer = a.lmap.by_name[name]
        for r in got:
            c = r["channel"]
            order = sorted(range(len(vals)), key=lambda i: (-vals[i, c].item(), i))
            i = order[r["rank"]]
            assert r["image_id"] == i
            assert r["value"] == pytest.approx(vals[i, c].item(), rel=1e-5, abs=1e-6)
            assert (r["y"], r["x"]) == divmod(pos[i, c].item(), w)
            assert (r["x0"], r["y0"], r["x1"], r["y1"]) == layer.box(r["y"], r["x"], a.image_size)
        stats = a.rows("SELECT * FROM channels WHERE layer = ? ORDER BY channel", [name])
        v = vals.double().numpy()
        assert np.allclose([s["mean"] for s in stats], v.mean(0), rtol=1e-5, atol=1e-6)
        assert np.allclose([s["max"] for s in stats], v.max(0), rtol=1e-6)
        assert np.allclose([s["fire_rate"] for s in stats], (v > 0).mean(0))
        n_rows = a.sql(f"SELECT count(*) FROM activations WHERE layer = '{name}'").fetchall()[0][0]
        assert n_rows == len(vals) * la["channels"]


def test_switches_reproduce_the_forward_pooling(tiny_atlas):
    a = atlas.open(tiny_atlas)
    src = open_dataset(a.manifest["dataset"]["root"])
    ds = DecodedImages(src, Preprocess(a.manifest["preprocessing"]), range(len(src)))
    rows = a.rows("SELECT * FROM read_parquet('switches.parquet')")
    assert rows and {r["pool"] for r in rows} == {"pool1", "pool2"}
    assert {r["image_id"] for r in rows} == {r["image_id"] for r in a.rows("SELECT image_id FROM top_activations "
                                                                             "WHERE layer <> 'conv1'")}
    # the forward pass in the build's batches (README, Determinism): every image's pools' switches
    n, bs = len(src), a.manifest["options"]["batch_size"]
    forward = {}
    with torch.no_grad():
        for b0 in range(0, n, bs):
            x = torch.stack([ds[i][0] for i in range(b0, min(b0 + bs, n))])
            _, sw = a.lmap.extract(x, ["conv5"], pool_indices=True, batch_size=bs)
            forward.update({b0 + j: {p: s[j:j + 1] for p, s in sw.items()} for j in range(len(x))})
    for r in rows:
        sw = forward[r["image_id"]]
        pool = a.lmap.pool_by_name[r["pool"]]
        reg = SwitchRegion(r["pool"], r["y0"], r["x0"], r["h"], r["w"])
        dec = decode(r["data"], pool.channels, pool.geometry, reg)
        box = (slice(None), slice(reg.y0, reg.y0 + reg.h), slice(reg.x0, reg.x0 + reg.w))
        assert torch.equal(dec[box], sw[r["pool"]][0][box])
    # Every top-k unit's receptive field lies inside its image's stored box.
    from atlas.deconv.switches import regions_below

    boxes = {(r["image_id"], r["pool"]): r for r in rows}
    for t in a.rows("SELECT * FROM top_activations WHERE layer <> 'conv1'"):
        regions = regions_below(a.lmap, a.lmap.by_name[t["layer"]], t["y"], t["x"])
        assert {reg.pool for reg in regions} == set(a.lmap.by_name[t["layer"]].pools_below)
        for reg in regions:
            b = boxes[(t["image_id"], reg.pool)]  # a stored box for each pool below, for every unit
            assert b["y0"] <= reg.y0 and reg.y0 + reg.h <= b["y0"] + b["h"]
            assert b["x0"] <= reg.x0 and reg.x0 + reg.w <= b["x0"] + b["w"]
    # ... and the reader hands them out (a unit per layer and rank: each call reads the table again)
    for t in a.rows("SELECT DISTINCT ON (layer, rank) layer, channel, rank FROM top_activations "
                    "WHERE layer <> 'conv1' ORDER BY layer, rank, channel"):
        assert set(a.switches(t["layer"], t["channel"], t["rank"])) == set(a.lmap.by_name[t["layer"]].pools_below)


def test_ties_break_by_image_id(tmp_path):
    data = make_image_folder(tmp_path / "dup", per_class=3, classes=("red",))
    first = data / "red" / "red_000.png"
    for i in (1, 2):  # identical images -> identical activations
        shutil.copy(first, data / "red" / f"red_{i:03d}.png")
    out = build("zfnet-mini", str(data), tmp_path / "a", k=3, image_size=32, progress=False)
    ranks = atlas.open(out).rows("SELECT channel, list(image_id ORDER BY rank) AS ids FROM top_activations "
                                 "GROUP BY layer, channel")
    assert all(r["ids"] == [0, 1, 2] for r in ranks)


def test_corrupt_files_are_recorded_and_skipped(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=4)
    (data / "red" / "zero.png").write_bytes(b"")
    (data / "green" / "text.jpg").write_text("not an image")
    good = (data / "blue" / "blue_000.png").read_bytes()
    (data / "blue" / "truncated.png").write_bytes(good[: len(good) // 2])
    out = build("zfnet-mini", str(data), tmp_path / "a", k=2, image_size=32, progress=False)
    a = atlas.open(out)
    bad = a.rows("SELECT path, status, error FROM images WHERE status = 'error' ORDER BY path")
    assert [r["path"] for r in bad] == ["blue/truncated.png", "green/text.jpg", "red/zero.png"]
    assert all(r["error"] for r in bad)
    assert a.manifest["dataset"]["errors"] == 3 and a.manifest["dataset"]["ok"] == 12
    ids = {r["image_id"] for r in a.rows("SELECT image_id FROM images WHERE status = 'error'")}
    used = {r["image_id"] for r in a.rows("SELECT DISTINCT image_id FROM top_activations")}
    used |= {r["image_id"] for r in a.rows("SELECT DISTINCT image_id FROM activations")}
    assert not ids & used


def assert_same_atlas(p, q):
    for t in TABLES + ["activations/layer=conv3/part-0.parquet"]:
        assert pq.read_table(p / t).equals(pq.read_table(q / t)), t
    assert (p / "model" / "features.pt").read_bytes() == (q / "model" / "features.pt").read_bytes()


@pytest.mark.determinism
def test_same_inputs_same_atlas(tiny_atlas, tiny_atlas_again):
    again = tiny_atlas_again
    assert_same_atlas(tiny_atlas, again)


@pytest.mark.determinism
def test_interrupted_build_resumes_to_the_same_atlas(tmp_path, tiny_folder, interrupt_build):
    ref = build("zfnet-mini", str(tiny_folder), tmp_path / "ref", k=4, batch_size=4, chunk_size=8,
                image_size=32, progress=False)
    out = interrupt_build("zfnet-mini", str(tiny_folder), tmp_path / "a", after=2, k=4, batch_size=4,
                          chunk_size=8, image_size=32, progress=False)
    assert not out.exists() and (tmp_path / "a.partial").is_dir()
    from atlas.errors import AtlasError

    with pytest.raises(AtlasError, match="--resume"):
        build("zfnet-mini", str(tiny_folder), out, k=4, batch_size=4, chunk_size=8, image_size=32, progress=False)
    with pytest.raises(AtlasError, match="other options"):
        build("zfnet-mini", str(tiny_folder), out, k=5, batch_size=4, chunk_size=8, image_size=32,
              progress=False, resume=True)
    build("zfnet-mini", str(tiny_folder), out, k=4, batch_size=4, chunk_size=8, image_size=32, progress=False,
          resume=True)
    assert not (tmp_path / "a.partial").exists()
    assert_same_atlas(ref, out)


KILLABLE = """
import sys, time
import atlas.build as b
real = b._flush_chunk
def slow(*a, **k):
    real(*a, **k)
    time.sleep(0.3)
b._flush_chunk = slow
b.build("zfnet-mini", sys.argv[1], sys.argv[2], k=4, batch_size=4, chunk_size=4, image_size=32, progress=False)
"""


def test_kill_9_then_resume_gives_the_same_atlas(tmp_path, tiny_folder):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(tiny_folder), str(out)])
    work = tmp_path / "killed.partial" / "work"
    deadline = time.time() + 60
    while time.time() < deadline and not (work / "chunk-00002.npz").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (work / "chunk-00002.npz").exists() and not out.exists()
    assert not (work / "chunk-00008.npz").exists()  # it really was killed mid-way
    build("zfnet-mini", str(tiny_folder), out, k=4, batch_size=4, chunk_size=4, image_size=32, progress=False,
          resume=True)
    ref = build("zfnet-mini", str(tiny_folder), tmp_path / "ref", k=4, batch_size=4, chunk_size=4, image_size=32,
                progress=False)
    assert_same_atlas(ref, out)


def one_line_error(args):
    return cli_helpers.one_line_error(*args)


def test_bad_input_gives_one_clear_line(tmp_path, tiny_folder, tiny_atlas):
    out = str(tmp_path / "x")
    assert "does not exist" in one_line_error(["build", "--model", "zfnet-mini", "--data", str(tmp_path / "nope"),
                                               "--out", out])
    (tmp_path / "empty").mkdir()
    assert "holds no images" in one_line_error(["build", "--model", "zfnet-mini", "--data", str(tmp_path / "empty"),
                                                "--out", out])
    assert "unknown model 'zfnet9'" in one_line_error(["build", "--model", "zfnet9", "--data", str(tiny_folder),
                                                       "--out", out])
    msg = one_line_error(["build", "--model", "zfnet-mini", "--data", str(tiny_folder), "--out", out,
                          "--layers", "conv9"])
    assert "conv9" in msg and "conv1, conv2, conv3, conv4, conv5" in msg
    bad = tmp_path / "w.pt"
    torch.save(atlas.load_model("zfnet-mini", width=8).state_dict(), bad)
    assert "does not fit model 'zfnet-mini'" in one_line_error(
        ["build", "--model", "zfnet-mini", "--weights", str(bad), "--data", str(tiny_folder), "--out", out])
    (tmp_path / "junk.pt").write_text("hello")
    assert "not a PyTorch weights file" in one_line_error(
        ["build", "--model", "zfnet-mini", "--weights", str(tmp_path / "junk.pt"), "--data", str(tiny_folder),
         "--out", out])
    assert "not an atlas" in one_line_error(["info", str(tiny_folder)])
    old = tmp_path / "old"
    shutil.copytree(tiny_atlas, old)
    mf = (old / "manifest.json").read_text().replace('"format_version": 2', '"format_version": 0')
    (old / "manifest.json").write_text(mf)
    assert "format version 0" in one_line_error(["layers", str(old)])
    assert "already exists" in one_line_error(["build", "--model", "zfnet-mini", "--data", str(tiny_folder),
                                               "--out", str(tiny_atlas)])
    assert "out of range" in one_line_error(["top", str(tiny_atlas), "conv1", "999"])
    assert "SQL error" in one_line_error(["sql", str(tiny_atlas), "SELECT nonsense FROM nowhere"])
    # an error that shows only while the query runs is one line too
    assert "Conversion Error" in one_line_error(["sql", str(tiny_atlas), "SELECT path::INTEGER FROM images"])


def test_an_atlas_without_activations_answers_sql(tiny_atlas_without_activations):
    out = tiny_atlas_without_activations
    assert not (out / "activations").exists()
    res = CliRunner().invoke(main, ["sql", str(out), "SELECT (SELECT count(*) FROM activations) AS acts, "
                                    "(SELECT count(*) FROM top_activations) AS tops", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1] == f"0,{2 * (32 + 64 + 96 + 96 + 64)}"
    # naming a function without calling it (an alias here) needs no index; calling it says how to build one
    res = CliRunner().invoke(main, ["sql", str(out), "SELECT count(*) AS similar_images FROM images"])
    assert res.exit_code == 0 and "36" in res.output, res.output
    assert "atlas index" in one_line_error(["sql", str(out), "SELECT * FROM similar_images (0, 3)"])


def test_cli_browsing_and_sql(tiny_atlas):
    r = CliRunner()
    res = r.invoke(main, ["info", str(tiny_atlas)])
    assert res.exit_code == 0 and "zfnet-mini" in res.output and "random init" in res.output
    assert "images at conv5 (36 x 64" in res.output and "images at fc7" in res.output
    res = r.invoke(main, ["layers", str(tiny_atlas), "--format", "csv"])
    assert res.output.splitlines()[0].startswith("layer,kind,channels") and len(res.output.splitlines()) == 6
    res = r.invoke(main, ["channels", str(tiny_atlas), "conv2", "--sort", "max", "--desc", "--format", "json"])
    import json

    rows = json.loads(res.output)
    assert len(rows) == 64 and rows[0]["max"] >= rows[-1]["max"]
    res = r.invoke(main, ["top", str(tiny_atlas), "conv5", "3"])
    assert res.exit_code == 0 and len(res.output.splitlines()) == 2 + 4
    for q in ["dead_channels", "class_selectivity", "cofiring", "topk_label_mix", "busy_images", "layer_summary"]:
        res = r.invoke(main, ["sql", str(tiny_atlas), "--query", q, "--format", "json"])
        assert res.exit_code == 0, (q, res.output)
        json.loads(res.output)
    res = r.invoke(main, ["sql", str(tiny_atlas), "--query", "class_selectivity", "-p", "label=red", "--format",
                          "json"])
    assert {row["label"] for row in json.loads(res.output)} == {"red"}
