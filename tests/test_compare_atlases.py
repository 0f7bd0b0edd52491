"""Comparing two atlases (atlas.compare, `atlas compare`, `atlas matches`, `atlas sql` on a comparison).

Ground truth: a model and the same model with the channels of every conv layer permuted (and each next
layer's inputs permuted to match) compute the same function, so every live unit's one-to-one match must be
its permuted twin, at every layer. The algorithms are checked against independent references: the streamed
float64 correlation against numpy.corrcoef of the whole matrix, the assignment against brute force.
"""
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from atlas.build import build
from atlas.compare import Comparison, compare
from atlas.compare.stats import CoMoments, best, one_to_one
from atlas.errors import AtlasError
from cli_helpers import ok, one_line_error, run
from permute import conv_and_linear_names, permuted


# ---------------------------------------------------------------------------------------------------------
# the numbers
# ---------------------------------------------------------------------------------------------------------
def test_streamed_correlation_is_numpys_on_the_whole_matrix():
    rng = np.random.default_rng(0)
    n, ca, cb = 997, 7, 5
    base = rng.normal(size=(n, 3))
    # large offsets with small spread: summing x*y directly would lose the digits that matter
    x = 1e4 + base @ rng.normal(size=(3, ca)) + 0.3 * rng.normal(size=(n, ca))
    y = -5e3 + base @ rng.normal(size=(3, cb)) + 0.3 * rng.normal(size=(n, cb))
    x[:, 2] = 7.25  # a dead unit: no variance
    x32 = x.astype(np.float32)  # what an atlas stores
    m = CoMoments(ca, cb)
    for lo, hi in ((0, 1), (1, 130), (130, 131), (131, 600), (600, n)):  # uneven blocks, one of a single image
        m.add(x32[lo:hi], y[lo:hi])
    got = m.corr()
    with np.errstate(invalid="ignore", divide="ignore"):  # the dead unit's row: NaN in both
        ref = np.corrcoef(np.hstack([x, y]).T)[:ca, ca:]
        ref32 = np.corrcoef(np.hstack([x32.astype(np.float64), y]).T)[:ca, ca:]
    live = np.arange(ca) != 2
    assert np.all(np.isnan(got[2]))
    np.testing.assert_allclose(got[live], ref32[live], rtol=0, atol=1e-11)
    m64 = CoMoments(ca, cb)
    for lo in range(0, n, 100):
        m64.add(x[lo:lo + 100], y[lo:lo + 100])
    np.testing.assert_allclose(m64.corr()[live], ref[live], rtol=0, atol=1e-11)  # float64 throughout
    assert m64.n == n and list(m64.live()[0]) == list(live)


def _brute(corr: np.ndarray) -> float:
    """The best total correlation over every one-to-one matching of the live rows and columns."""
    rows = [i for i in range(corr.shape[0]) if not np.all(np.isnan(corr[i]))]
    cols = [j for j in range(corr.shape[1]) if not np.all(np.isnan(corr[:, j]))]
    k = min(len(rows), len(cols))
    best_total = -np.inf
    for rs in itertools.combinations(rows, k):
        for cs in itertools.permutations(cols, k):
            best_total = max(best_total, sum(corr[r, c] for r, c in zip(rs, cs)))
    return best_total


@pytest.mark.parametrize("shape,dead_row,dead_col", [((5, 5), None, None), ((4, 6), 1, None), ((6, 4), None, 3)])
def test_one_to_one_is_the_optimal_assignment(shape, dead_row, dead_col):
    rng = np.random.default_rng(sum(shape))
    corr = rng.uniform(-1, 1, shape)
    if dead_row is not None:
        corr[dead_row] = np.nan
    if dead_col is not None:
        corr[:, dead_col] = np.nan
    got = one_to_one(corr)
    pairs = [(i, j) for i, j in enumerate(got) if j >= 0]
    assert len({j for _, j in pairs}) == len(pairs)  # one-to-one
    assert sum(corr[i, j] for i, j in pairs) == pytest.approx(_brute(corr), abs=1e-9)
    if dead_row is not None:
        assert got[dead_row] == -1
    if dead_col is not None:
        assert dead_col not in got
    b = best(corr)
    for i in range(shape[0]):
        if np.all(np.isnan(corr[i])):
            assert b[i] == -1
        else:
            assert b[i] == int(np.nanargmax(corr[i]))


def test_ties_go_to_the_smaller_channel():
    corr = np.full((3, 3), 0.5)
    assert list(one_to_one(corr)) == [0, 1, 2]
    assert list(best(corr)) == [0, 0, 0]
    corr = np.array([[0.9, 0.9], [0.9, 0.9], [0.2, 0.2]])
    assert list(one_to_one(corr)) == [0, 1, -1]


# ---------------------------------------------------------------------------------------------------------
# ground truth: a model and its permuted twin
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twins(tmp_path_factory, tiny_folder):
    from atlas.models import load_model

    root = tmp_path_factory.mktemp("twins")
    net = load_model("zfnet-mini", None, seed=5)
    assert not any(isinstance(m, torch.nn.LocalResponseNorm) for m in net.modules())  # LRN mixes channels
    convs, linear = conv_and_linear_names(net)
    state = net.state_dict()
    twin_state, perms = permuted(state, convs, linear)
    torch.save(state, root / "a.pt")
    torch.save(twin_state, root / "b.pt")
    twin = load_model("zfnet-mini", str(root / "b.pt"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-4, atol=1e-5)  # the same function
    a = build("zfnet-mini", str(tiny_folder), root / "A", weights=str(root / "a.pt"), k=3, batch_size=12,
              image_size=32, progress=False, index=False)
    b = build("zfnet-mini", str(tiny_folder), root / "B", weights=str(root / "b.pt"), k=3, batch_size=12,
              image_size=32, progress=False, index=False)
    return root, a, b, perms


def test_every_live_unit_matches_its_permuted_twin(twins):
    root, a, b, perms = twins
    c = compare(a, b, root / "cmp", progress=False)
    layers = [r["layer_a"] for r in c.layer_pairs]
    assert layers == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    rows = pq.read_table(root / "cmp" / "matches.parquet").to_pylist()
    for n, layer in enumerate(layers):
        inverse = np.argsort(perms[n])  # A's channel i is B's channel inverse[i]
        mine = [r for r in rows if r["layer_a"] == layer and r["kind"] == "one-to-one" and r["side"] == "a"]
        live = [r for r in mine if r["channel_b"] is not None]
        assert len(live) >= 0.9 * len(mine) and len(mine) == len(perms[n])
        assert all(r["channel_b"] == inverse[r["channel_a"]] for r in live), layer  # 100 %
        assert min(r["corr"] for r in live) > 0.9999
        dead = {r["channel_a"] for r in mine if r["channel_b"] is None}
        best_dead = {r["channel_a"] for r in rows if r["layer_a"] == layer and r["kind"] == "best"
                     and r["side"] == "a" and r["channel_b"] is None}
        assert dead == best_dead  # only a dead unit goes without a counterpart here
        bests = [r for r in rows if r["layer_a"] == layer and r["kind"] == "best" and r["side"] == "b"
                 and r["channel_a"] is not None]
        assert all(r["channel_a"] == perms[n][r["channel_b"]] for r in bests)


def test_images_pair_by_content_hash_across_differently_named_datasets(twins, tmp_path, tiny_folder):
    """B is built over a copy of the dataset whose files are named (and so ordered) in reverse: without
    content hashes nothing pairs them; with them every image finds itself and every unit its twin."""
    root, a, _, perms = twins
    files = sorted(p for p in tiny_folder.rglob("*.png"))
    copy = tmp_path / "copy"
    for n, f in enumerate(files):
        d = copy / f.parent.name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, d / f"{len(files) - n:04d}.png")
    b2 = build("zfnet-mini", str(copy), tmp_path / "B2", weights=str(root / "b.pt"), k=3, batch_size=12,
               image_size=32, progress=False, index=False)
    # atlases from before content hashes: only paths could pair them, and no path is shared
    a_old, b_old = tmp_path / "A_old", tmp_path / "B_old"
    for src, dst in ((a, a_old), (b2, b_old)):
        shutil.copytree(src, dst)
        t = pq.read_table(dst / "images.parquet")
        pq.write_table(t.drop(["content_hash"]), dst / "images.parquet")
    with pytest.raises(AtlasError, match="share no images"):
        compare(a_old, b_old, tmp_path / "none", progress=False)
    a2 = a  # the build records each image's hash: they pair by content
    c = compare(a2, b2, tmp_path / "cmp", layers="conv1,conv5", progress=False)
    assert c.record["images"] == {"shared": len(files), "paired_by": "content_hash"}
    for n, layer in ((0, "conv1"), (4, "conv5")):
        inverse = np.argsort(perms[n])
        live = c.rows("SELECT channel_a, channel_b, corr FROM matches WHERE layer_a = ? AND kind = 'one-to-one' "
                      "AND side = 'a' AND channel_b IS NOT NULL", [layer])
        assert live and all(r["channel_b"] == inverse[r["channel_a"]] and r["corr"] > 0.9999 for r in live)


def test_an_atlas_without_per_image_statistics_is_refused(twins, tmp_path, tiny_atlas_without_activations):
    root, a, _, _ = twins
    bare = tiny_atlas_without_activations  # the same images, built with --no-activations
    with pytest.raises(AtlasError, match="no per-image statistics for conv1 .*--no-activations"):
        compare(a, bare, tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------------------------------------------------
# the folder, SQL, pictures, the command line
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comparison(twins):
    root, a, b, _ = twins
    return compare(a, b, root / "cmp-cli", layers=["conv2"], pairs="conv1:conv3", progress=False)


def test_sql_beside_both_atlases_and_named_queries(comparison):
    c = comparison
    assert {(r["layer_a"], r["layer_b"]) for r in c.layer_pairs} == {("conv2", "conv2"), ("conv1", "conv3")}
    # a match joins both units' statistics in their own atlases (schemas a and b)
    res = c.query("SELECT m.channel_a, ca.max AS max_a, cb.max AS max_b FROM matches m "
                  "JOIN a.channels ca ON ca.layer = m.layer_a AND ca.channel = m.channel_a "
                  "JOIN b.channels cb ON cb.layer = m.layer_b AND cb.channel = m.channel_b "
                  "WHERE m.layer_a = 'conv2' AND m.kind = 'one-to-one'")
    rows = res[0].rows
    assert rows and all(abs(r[1] - r[2]) < 1e-4 for r in rows)  # twins: the same maximum
    quality = {r["layer_a"]: r for r in json.loads(ok("sql", c.path, "-q", "match_quality", "--format", "json"))}
    assert quality["conv2"]["mean_corr"] > 0.9999 and quality["conv1"]["matched"] > 0
    unmatched = json.loads(ok("sql", c.path, "-q", "unmatched_units", "--format", "json"))
    assert all(r["why"] in ("dead", "left over") for r in unmatched)
    line = one_line_error("sql", c.path, "SELECT * FROM read_csv('/etc/passwd')")
    assert "refused" in line


def test_cli_compare_and_matches(twins, tmp_path):
    root, a, b, perms = twins
    out = ok("compare", a, b, "--out", tmp_path / "c", "--layers", "conv1", "--no-progress", "--format", "json")
    assert json.loads(out)[0]["mean_one_to_one"] > 0.9999
    line = one_line_error("compare", a, b, "--out", tmp_path / "c", "--no-progress")
    assert "already exists" in line and "--overwrite" in line
    ok("compare", a, b, "--out", tmp_path / "c", "--layers", "conv2", "--overwrite", "--no-progress")
    assert [p["layer_a"] for p in Comparison(tmp_path / "c").layer_pairs] == ["conv2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    res, _ = run("matches", tmp_path / "c", "conv2", "3", "--format", "json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)[0]
    assert row["channel_b"] == np.argsort(perms[1])[3]
    png = Path(res.stderr.strip().splitlines()[-1])
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 2 * im.height  # two panels side by side
    for args, words in ((("compare", a, tmp_path / "nope", "--out", tmp_path / "x"), "does not exist"),
                        (("compare", a, b, "--out", tmp_path / "x", "--pairs", "conv1"), "A_LAYER:B_LAYER"),
                        (("compare", a, b, "--out", tmp_path / "x", "--layers", "conv9"), "unknown layer"),
                        (("matches", tmp_path / "x"), "does not exist"),
                        (("matches", a), "not a comparison"),
                        (("matches", tmp_path / "c", "conv4"), "no layer pair with conv4")):
        assert words in one_line_error(*args), args


def test_a_comparison_shows_itself(comparison):
    html = comparison._repr_html_()
    assert "data:image/png;base64," in html and "conv2" in html
    pic = comparison.pair("conv1", 0, kind="best")
    assert pic.array().shape[2] == 3 and "correlation" not in pic.title
    assert comparison.quality("conv2").array().ndim == 3
    assert comparison.counterpart("conv3", 1, "best", side="b")["layer_a"] == "conv1"


def test_the_site_links_each_unit_to_its_counterpart(twins, comparison, tmp_path):
    from atlas.export import export

    root, a, b, perms = twins
    site = export(a, tmp_path / "site", layers="conv2", channels="0-3", compare=comparison.path)
    page = (site / "compare.html").read_text()
    twin = int(np.argsort(perms[1])[2])
    assert 'href="conv2/2.html"' in page and f"conv2/{twin}<" in page  # exported unit linked, counterpart named
    assert (site / "img" / "compare-quality.png").is_file() and 'href="compare.html"' in (site / "index.html").read_text()
    channel = (site / "conv2" / "2.html").read_text()
    assert f"conv2/{twin} (one-to-one" in channel and "../compare.html#conv2-2" in channel
    data = json.loads((site / "compare.json").read_text())
    assert [p["layer"] for p in data["pairs"]] == ["conv1", "conv2"]  # as compared: --pairs, then --layers
    with pytest.raises(AtlasError, match="not this atlas"):
        other = tmp_path / "other"
        shutil.copytree(a, other)
        export(other, tmp_path / "site2", compare=comparison.path)
