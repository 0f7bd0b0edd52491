"""Similarity search through an atlas: `atlas build` / `atlas index` indexes, `atlas similar`, the SQL macros.

Small atlases (36 images of 32 px, zfnet-mini), real FAISS indexes on disk, checked against numpy brute force.
"""
import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error
import torch
from click.testing import CliRunner


import atlas  # noqa: E402
from atlas.search import indexing, similarity  # noqa: E402
from atlas.build import build  # noqa: E402
from atlas.cli import main  # noqa: E402
from atlas.data import DecodedImages, Preprocess, open_dataset  # noqa: E402

OPTS = dict(k=4, batch_size=8, image_size=32, progress=False)
DUP, SRC, DEAD = 40, 7, 12  # conv5 filter DUP is a copy of filter SRC; filter DEAD never fires


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


def cli_json(*args):
    return json.loads(cli(*args, "--format", "json"))


def matrix(a, layer):
    """Brute force: the layer's activations table as an (images, channels) matrix, rows by image id."""
    rows = a.sql(f"SELECT image_id, channel, value FROM activations WHERE layer = '{layer}'").fetchnumpy()
    x = np.zeros((rows["image_id"].max() + 1, rows["channel"].max() + 1), np.float64)
    x[rows["image_id"], rows["channel"]] = rows["value"]
    return x


def cosine(x):
    n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    return n @ n.T


def index_bytes(path):
    return {f.name: f.read_bytes() for f in sorted((Path(path) / "index").iterdir())}


@pytest.fixture(scope="module")
def dup_atlas(tmp_path_factory, tiny_folder):
    """An atlas of a model whose conv5 has two identical filters and a dead one, built through the CLI."""
    tmp = tmp_path_factory.mktemp("dup")
    model = atlas.load_model("zfnet-mini", seed=3)
    state = model.state_dict()
    conv5 = [k for k in state if k.startswith("features.") and k.endswith(".weight") and state[k].ndim == 4][-1]
    bias = conv5.replace("weight", "bias")
    with torch.no_grad():
        state[conv5][DUP] = state[conv5][SRC]
        state[bias][DUP] = state[bias][SRC]
        state[conv5][DEAD] = 0
        state[bias][DEAD] = -1
    weights = tmp / "dup.pt"
    torch.save(state, weights)
    out = tmp / "dup-atlas"
    cli("build", "--model", "zfnet-mini", "--weights", weights, "--data", tiny_folder, "--out", out, "--k", 4,
        "--batch-size", 8, "--image-size", 32, "--no-progress", "--index-layers", "conv4,conv5,fc7")
    return out


@pytest.fixture(scope="module")
def no_index_atlas(tmp_path_factory, tiny_folder):
    return build("zfnet-mini", str(tiny_folder), tmp_path_factory.mktemp("noidx") / "a", index=False, **OPTS)


def test_build_records_the_indexes(tiny_atlas, dup_atlas, no_index_atlas):
    rec = atlas.open(tiny_atlas).manifest["index"]
    assert rec["layers"] == ["conv5", "fc7"]  # default: the deepest conv layer and fc7
    assert rec["images"]["conv5"]["source"] == "activations" and rec["images"]["fc7"]["source"] == "build"
    assert rec["images"]["fc7"]["dtype"] == "float16" and rec["images"]["fc7"]["dim"] == 256
    for r in [*rec["images"].values(), rec["channels"]]:
        assert r["spec"]["kind"] == "flat" and r["count"] > 0 and (tiny_atlas / r["file"]).is_file()
    assert rec["channels"]["count"] == 32 + 64 + 96 + 96 + 64 and rec["channels"]["dim"] == 36
    assert atlas.open(dup_atlas).manifest["index"]["layers"] == ["conv4", "conv5", "fc7"]
    assert "index" not in atlas.open(no_index_atlas).manifest and not (no_index_atlas / "index").exists()


def test_exact_search_agrees_with_brute_force(tiny_atlas):
    a = atlas.open(tiny_atlas)
    sim = cosine(matrix(a, "conv5"))
    n = len(sim)
    for i in range(n):
        rows = a.similar_images(image_id=i, k=n)
        assert [r["rank"] for r in rows] == list(range(n))  # from 0, as top_activations ranks
        got_ids = np.array([r["image_id"] for r in rows])
        got = np.array([r["score"] for r in rows])
        np.testing.assert_allclose(got, np.sort(sim[i])[::-1], atol=1e-5)
        np.testing.assert_allclose(got, sim[i][got_ids], atol=1e-5)  # each id carries its own score


def test_each_image_is_its_own_nearest_neighbour_and_ids_map_back(tiny_atlas):
    a = atlas.open(tiny_atlas)
    images = {r["image_id"]: r for r in a.rows("SELECT image_id, path, label FROM images")}
    for layer in ("conv5", "fc7"):
        for i in images:
            top = a.similar_images(image_id=i, layer=layer, k=3)
            assert top[0]["image_id"] == i and top[0]["score"] == pytest.approx(1, abs=1e-5)
            for r in top:
                assert (r["path"], r["label"]) == (images[r["image_id"]]["path"], images[r["image_id"]]["label"])
    rows = cli_json("similar", tiny_atlas, "--image-id", 5, "-k", 4)
    assert [r["rank"] for r in rows] == [0, 1, 2, 3] and rows[0]["image_id"] == 5
    assert rows[0]["path"] == images[5]["path"] and set(rows[0]) == {"rank", "image_id", "path", "label", "score"}


def test_an_image_file_finds_itself(tiny_atlas, tiny_folder):
    a = atlas.open(tiny_atlas)
    for image_id in (0, 17, 35):
        path = a.rows("SELECT path FROM images WHERE image_id = ?", [image_id])[0]["path"]
        for layer in ("conv5", "fc7"):
            rows = cli_json("similar", tiny_atlas, "--image", tiny_folder / path, "--layer", layer, "-k", 3)
            assert rows[0]["image_id"] == image_id and rows[0]["path"] == path
            assert rows[0]["score"] == pytest.approx(1, abs=1e-3)


def test_fc7_index_matches_a_forward_pass(tiny_atlas):
    a = atlas.open(tiny_atlas)
    src = open_dataset(a.manifest["dataset"]["root"])
    ds = DecodedImages(src, Preprocess(a.manifest["preprocessing"]), range(len(src)))
    with torch.no_grad():
        fc7 = a.lmap.extract(torch.stack([ds[i][0] for i in range(len(src))]), ["fc7"])["fc7"]
    sim = cosine(fc7.half().double().numpy())
    for i in (0, 13, 30):
        rows = a.similar_images(image_id=i, layer="fc7", k=8)
        np.testing.assert_allclose([r["score"] for r in rows], np.sort(sim[i])[::-1][:8], atol=1e-4)


def test_the_planted_duplicate_channel_is_found_first(dup_atlas):
    for q, want in ((SRC, DUP), (DUP, SRC)):
        rows = cli_json("similar", dup_atlas, "--channel", f"conv5:{q}", "-k", 5)
        assert (rows[0]["layer"], rows[0]["channel"]) == ("conv5", want)
        assert rows[0]["score"] == pytest.approx(1, abs=1e-5) and rows[1]["score"] < 0.9999
        assert ("conv5", q) not in [(r["layer"], r["channel"]) for r in rows]  # the channel itself is left out
        assert len({r["layer"] for r in atlas.open(dup_atlas).similar_channels(f"conv5:{q}", k=60)}) > 1
    only = atlas.open(dup_atlas).similar_channels(("conv5", SRC), k=10, layer="conv3")
    assert len(only) == 10 and {r["layer"] for r in only} == {"conv3"}
    scores = [r["score"] for r in only]
    assert scores == sorted(scores, reverse=True)
    res = CliRunner().invoke(main, ["similar", str(dup_atlas), "--channel", f"conv5:{DEAD}"])
    assert res.exit_code == 0 and "all zero" in res.stderr and res.stdout.splitlines()[0].split() == [
        "rank", "layer", "channel", "score"] and "conv" not in res.stdout


@pytest.mark.determinism
def test_same_inputs_same_index_files(tmp_path, tiny_folder, tiny_atlas, tiny_atlas_again, no_index_atlas,
                                      interrupt_build):
    ref = index_bytes(tiny_atlas)
    assert set(ref) == {"channels.faiss", "channels.faiss.json", "images-conv5.faiss", "images-conv5.faiss.json",
                        "images-fc7.faiss", "images-fc7.faiss.json"}
    assert index_bytes(tiny_atlas_again) == ref
    # no activations table: the chunks keep conv5 and the profile sample; the same index files
    noact = build("zfnet-mini", str(tiny_folder), tmp_path / "noact", activations=False, chunk_size=16, **OPTS)
    assert index_bytes(noact) == ref
    # `atlas index` afterwards (conv5 from the table, fc7 by a forward pass): the same files as the build's
    later = tmp_path / "later"
    shutil.copytree(no_index_atlas, later)
    cli("index", later, "--no-progress")
    assert index_bytes(later) == ref
    # interrupted after two chunks, then resumed
    out = interrupt_build("zfnet-mini", str(tiny_folder), tmp_path / "resumed", after=2, chunk_size=8, **OPTS)
    build("zfnet-mini", str(tiny_folder), out, chunk_size=8, resume=True, **OPTS)
    assert index_bytes(out) == ref


def test_atlas_index_replaces_the_set_and_loads_lazily(tmp_path, tiny_atlas):
    path = tmp_path / "a"
    shutil.copytree(tiny_atlas, path)
    out = cli("index", path, "--layers", "conv3", "--format", "csv", "--no-progress")
    assert out.splitlines()[0] == "index,layer,vectors,dim,type,source,file"
    assert sorted(f.name for f in (path / "index").glob("*.faiss")) == ["channels.faiss", "images-conv3.faiss"]
    a = atlas.open(path)
    assert a.manifest["index"]["layers"] == ["conv3"]
    a.sql("SELECT count(*) FROM images").fetchall()
    assert not similarity._STATE.get(a, {}).get("indexes")  # plain SQL loads no index
    a.similar_channels("conv2:1", k=2)
    assert [f for f, _ in similarity._STATE[a]["indexes"]] == ["index/channels.faiss"]
    assert a.similar_images(image_id=4, k=1)[0]["image_id"] == 4  # the default layer is the indexed one
    assert len(similarity._STATE[a]["indexes"]) == 2


def test_approximate_index_through_the_atlas(tmp_path, tiny_atlas):
    path = tmp_path / "ivf"
    shutil.copytree(tiny_atlas, path)
    rec = indexing.build_indexes(path, exact_max=0)
    assert rec["images"]["conv5"]["spec"]["kind"] == "ivf" and rec["channels"]["spec"]["kind"] == "ivf"
    a = atlas.open(path)
    assert a.manifest["index"]["images"]["conv5"]["spec"]["nprobe"] >= 1
    for i in range(36):
        assert a.similar_images(image_id=i, k=1)[0]["image_id"] == i


def test_sql_macros_join_with_the_other_tables(tiny_atlas, dup_atlas):
    a = atlas.open(tiny_atlas)
    rows = a.rows("SELECT s.rank, s.image_id, i.path, s.score FROM similar_images(3, 5) s "
                  "JOIN images i USING (image_id) ORDER BY s.rank")
    api = a.similar_images(image_id=3, k=5)
    assert [(r["rank"], r["image_id"], r["path"]) for r in rows] == [(r["rank"], r["image_id"], r["path"])
                                                                     for r in api]
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in api], atol=1e-6)
    fc7 = a.sql("SELECT image_id FROM similar_images(3, 4, layer := 'fc7') ORDER BY rank").fetchall()
    assert [r[0] for r in fc7] == [r["image_id"] for r in a.similar_images(image_id=3, layer="fc7", k=4)]
    d = atlas.open(dup_atlas)
    top = d.sql(f"SELECT s.layer, s.channel, c.fire_rate FROM similar_channels('conv5', {SRC}, 3) s "
                "JOIN channels c USING (layer, channel) ORDER BY s.rank").fetchall()
    assert top[0][:2] == ("conv5", DUP) and top[0][2] is not None
    # a relation may outlive its Atlas (as in `atlas sql`); an Atlas that used the macros is still freed
    rel = atlas.open(tiny_atlas).sql("SELECT image_id FROM similar_images(9, 2) ORDER BY rank")
    assert rel.fetchall()[0] == (9,)
    gone = weakref.ref(d)
    del d
    gc.collect()
    assert gone() is None
    out = cli_json("sql", tiny_atlas, "-q", "similar_images", "-p", "image_id=7", "-p", "k=3")
    assert [r["image_id"] for r in out][0] == 7 and len(out) == 3 and out[0]["same_label"] is True


def test_bad_input_gives_one_clear_line(tmp_path, tiny_folder, tiny_atlas, no_index_atlas, dup_atlas):
    t = tiny_atlas
    (tmp_path / "junk.png").write_text("not an image")
    assert "cannot be read" in one_line_error("similar", t, "--image", tmp_path / "junk.png")
    assert "does not exist" in one_line_error("similar", t, "--image", tmp_path / "missing.png")
    assert "unknown layer 'conv9'" in one_line_error("similar", t, "--image-id", 1, "--layer", "conv9")
    msg = one_line_error("similar", t, "--image-id", 1, "--layer", "conv2")
    assert "no image index" in msg and "atlas index" in msg
    assert "unknown layer 'conv9'" in one_line_error("similar", t, "--channel", "conv9:1")
    assert "out of range" in one_line_error("similar", t, "--channel", "conv5:64")
    assert "LAYER:CHANNEL" in one_line_error("similar", t, "--channel", "conv5")
    assert "exactly one of" in one_line_error("similar", t)
    assert "exactly one of" in one_line_error("similar", t, "--image-id", 1, "--channel", "conv1:0")
    assert "0..35" in one_line_error("similar", t, "--image-id", 36)
    assert "at least 1" in one_line_error("similar", t, "--image-id", 1, "-k", 0)
    for args in (("similar", no_index_atlas, "--image-id", 1), ("similar", no_index_atlas, "--channel", "conv5:1"),
                 ("sql", no_index_atlas, "SELECT * FROM similar_images(1)")):
        assert f"run `atlas index {no_index_atlas}`" in one_line_error(*args)
    assert "unknown layer 'fc9'" in one_line_error("index", t, "--layers", "fc9")
    msg = one_line_error("build", "--model", "zfnet-mini", "--data", tiny_folder, "--out", tmp_path / "x",
                         "--layers", "conv5", "--index-layers", "conv3")
    assert "'conv3' is not recorded" in msg and not (tmp_path / "x.partial").exists()  # checked before mining
    # an index built for another model: conv4's file in conv5's place
    wrong = tmp_path / "wrong"
    shutil.copytree(dup_atlas, wrong)
    for suffix in (".faiss", ".faiss.json"):
        shutil.copy(wrong / "index" / f"images-conv4{suffix}", wrong / "index" / f"images-conv5{suffix}")
    msg = one_line_error("similar", wrong, "--image-id", 1, "--layer", "conv5")
    assert "96-dimensional" in msg and "64" in msg and "atlas index" in msg
    # fc layers need the classifier (weights file gone) or the dataset (gone) for a forward pass
    nocls = tmp_path / "nocls"
    shutil.copytree(dup_atlas, nocls)
    mf = json.loads((nocls / "manifest.json").read_text())
    mf["model"]["weights"] = str(tmp_path / "gone.pt")
    (nocls / "manifest.json").write_text(json.dumps(mf))
    assert "classifier" in one_line_error("index", nocls, "--layers", "conv5,fc7")
    nodata = tmp_path / "nodata"
    shutil.copytree(no_index_atlas, nodata)
    mf = json.loads((nodata / "manifest.json").read_text())
    mf["dataset"]["root"] = str(tmp_path / "gone")
    (nodata / "manifest.json").write_text(json.dumps(mf))
    msg = one_line_error("index", nodata)
    assert "fc7 needs a forward pass" in msg and "is gone" in msg
    cli("index", nodata, "--layers", "conv5")  # conv layers come from the activations table: no dataset needed


@pytest.mark.determinism
def test_a_profile_sample_smaller_than_the_dataset_reads_the_same_through_every_path(tmp_path, tiny_folder,
                                                                                     monkeypatch):
    # A 16-image profile sample of 36 images: the build's chunks keep the sample's rows of every conv
    # layer; `atlas index` over the same atlas keeps them by its forward pass. Same files either way.
    monkeypatch.setattr(indexing, "PROFILE_SAMPLE", 16)
    built = build("zfnet-mini", str(tiny_folder), tmp_path / "noact", activations=False, chunk_size=16, **OPTS)
    ref = index_bytes(built)
    meta = json.loads((built / "index" / "channels.faiss.json").read_text())
    assert meta["sample"]["images"] == 16
    later = tmp_path / "later"
    shutil.copytree(built, later)
    indexing.build_indexes(later, progress=False)
    assert atlas.open(later).manifest["index"]["images"]["conv5"]["source"] == "forward"
    assert index_bytes(later) == ref
