"""atlas.search.faiss_index: cosine search (exact and IVF), files, channel profiles. Small synthetic data, a few seconds."""
import json

import faiss
import numpy as np
import pytest

from atlas.errors import AtlasError  # noqa: E402
from atlas.search.faiss_index import EXACT_MAX, build_index, channel_keys, channel_profiles, choose_index, load_index, profile_rows, reconstruct, save_index, search, sidecar_path, split_channel_keys


def clustered(n, d=32, clusters=20, seed=0, separation=2.0):
    """Non-negative clustered vectors, like post-ReLU channel maxima."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * separation
    x = centres[rng.integers(clusters, size=n)] + rng.standard_normal((n, d))
    return np.maximum(x, 0).astype(np.float32)


def brute_force(x, q, k):
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    s = qn.astype(np.float64) @ xn.T.astype(np.float64)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture(scope="module")
def data():
    x = clustered(3000, seed=1)
    ids = np.random.default_rng(2).choice(10**9, len(x), replace=False).astype(np.int64) * 7 + 3  # non-contiguous
    return x, ids


def test_choose_index_by_size():
    assert choose_index(50_000, 256)["kind"] == "flat"
    assert choose_index(EXACT_MAX, 256)["kind"] == "flat"
    spec = choose_index(1_000_000, 256)
    assert spec["kind"] == "ivf" and spec["nlist"] == 1024 and spec["nprobe"] == 32
    assert spec["metric"] == "cosine"
    json.dumps(spec)  # goes into the manifest
    assert choose_index(20_000, 64, exact_max=0)["kind"] == "ivf"


def test_exact_search_agrees_with_brute_force(data):
    x, ids = data
    q = clustered(50, seed=9)
    index = build_index(x, ids)
    assert index.ntotal == len(x)
    scores, got = search(index, q, 10)
    want_s, want_rows = brute_force(x, q, 10)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    # ids agree wherever the scores are not tied
    same = got == ids[want_rows]
    assert same.mean() > 0.99
    assert np.all(np.abs(scores[~same] - want_s[~same]) < 1e-5)


def test_nearest_neighbour_is_itself_and_ids_map_back(data):
    x, ids = data
    index = build_index(x, ids)
    scores, got = search(index, x[:200], 1)
    assert np.array_equal(got[:, 0], ids[:200])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    # one vector as a 1-d query, and k above the index size is capped
    s, i = search(index, x[5], 10_000)
    assert i.shape == (1, len(x)) and i[0, 0] == ids[5]
    assert set(i[0]) == set(ids)


def test_zero_vectors_score_zero_not_nan():
    x = np.vstack([np.zeros((1, 8), np.float32), np.eye(8, dtype=np.float32)])
    index = build_index(x, np.arange(9) + 100)
    s, i = search(index, np.zeros((1, 8), np.float32), 3)
    assert np.isfinite(s).all() and np.all(s == 0)
    s, i = search(index, np.eye(8, dtype=np.float32)[:1], 1)
    assert i[0, 0] == 101 and s[0, 0] == pytest.approx(1.0)


def test_channel_keys_roundtrip():
    keys = np.concatenate([channel_keys(0, 96), channel_keys(4, [0, 255])])
    layer, ch = split_channel_keys(keys)
    assert layer.tolist() == [0] * 96 + [4, 4] and ch.tolist() == list(range(96)) + [0, 255]


def test_channel_profiles_find_planted_duplicates():
    rng = np.random.default_rng(0)
    n, c = 6000, 64
    latent = rng.standard_normal((n, 8))
    acts = np.maximum(latent @ rng.standard_normal((8, c)) + rng.standard_normal((n, c)), 0).astype(np.float32)
    acts[:, 10] = acts[:, 3]                      # an exact copy
    acts[:, 40] = 3 * acts[:, 7] + 5.0            # same channel, other scale and offset
    acts[:, 50] = 0.0                             # dead channel
    acts[:, 51] = 2.5                             # constant channel
    prof = channel_profiles(acts, sample=4096, seed=0)
    assert prof.shape == (c, 4096) and prof.dtype == np.float32
    assert np.isfinite(prof).all()
    assert np.all(prof[50] == 0) and np.all(prof[51] == 0)
    np.testing.assert_allclose(np.linalg.norm(prof[[0, 3, 7]], axis=1), 1.0, atol=1e-5)
    # cosine of profiles = Pearson correlation over the sampled rows
    rows = profile_rows(n, 4096, 0)
    r = np.corrcoef(acts[rows][:, 0].astype(np.float64), acts[rows][:, 1].astype(np.float64))[0, 1]
    assert float(prof[0] @ prof[1]) == pytest.approx(r, abs=1e-5)

    keys = channel_keys(2, c)
    index = build_index(prof, keys)
    s, got = search(index, prof[[3, 10, 7, 40]], 2)
    for row, (a, twin) in zip(got, [(3, 10), (10, 3), (7, 40), (40, 7)]):
        others = [g for g in row if g != keys[a]]  # itself scores 1 too: leave it out
        assert others[0] == keys[twin]             # the planted twin is rank 1
    np.testing.assert_allclose(s, 1.0, atol=1e-5)
    # a dead channel scores 0 against everything, and is found by nobody in particular
    s, _ = search(index, prof[[50]], 5)
    assert np.all(s == 0)


def test_profile_rows_are_a_fixed_sample():
    a = profile_rows(100_000, 4096, seed=0)
    assert len(a) == 4096 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, profile_rows(100_000, 4096, seed=0))
    assert not np.array_equal(a, profile_rows(100_000, 4096, seed=1))
    assert np.array_equal(profile_rows(300, 4096), np.arange(300))


def test_save_load_roundtrip_atomic(tmp_path, data):
    x, ids = data
    spec = choose_index(len(x), x.shape[1])
    index = build_index(x, ids, spec)
    path = tmp_path / "index" / "conv5.faiss"
    side = save_index(index, path, {"spec": spec, "seed": 0, "ids": "image_id", "layer": "conv5"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["conv5.faiss", "conv5.faiss.json"]  # no temp files
    on_disk = json.loads(sidecar_path(path).read_text())
    assert on_disk == side
    assert on_disk["dim"] == 32 and on_disk["count"] == len(x) and on_disk["metric"] == "cosine"
    assert on_disk["ids"] == "image_id" and on_disk["spec"] == spec and on_disk["bytes"] == path.stat().st_size
    loaded, meta = load_index(path)
    assert meta == side
    q = x[:20] + 0.1
    for a, b in zip(search(index, q, 5), search(loaded, q, 5)):
        assert np.array_equal(a, b)
    # overwriting leaves no temp files either
    save_index(index, path, {"spec": spec, "ids": "image_id"})
    assert len(list(path.parent.iterdir())) == 2


def test_failed_write_leaves_old_index_and_no_temp(tmp_path, data, monkeypatch):
    x, ids = data
    spec = choose_index(len(x), x.shape[1])
    path = tmp_path / "conv5.faiss"
    save_index(build_index(x, ids, spec), path, {"spec": spec, "ids": "image_id"})
    before = path.read_bytes()

    def boom(index, fname):
        open(fname, "wb").write(b"half an index")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(RuntimeError):
        save_index(build_index(x[:100], ids[:100], spec), path, {"spec": spec, "ids": "image_id"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv5.faiss", "conv5.faiss.json"]


def test_missing_index_names_the_command(tmp_path):
    with pytest.raises(AtlasError, match=r"atlas index"):
        load_index(tmp_path / "nope.faiss")


def test_mismatched_sidecar_is_an_atlas_error(tmp_path, data):
    x, ids = data
    spec = choose_index(len(x), x.shape[1])
    path = tmp_path / "a.faiss"
    save_index(build_index(x, ids, spec), path, {"spec": spec, "ids": "image_id"})
    faiss.write_index(build_index(x[:10], ids[:10], spec), str(path))  # index replaced, sidecar not
    with pytest.raises(AtlasError, match=r"atlas index"):
        load_index(path)
    sidecar_path(path).unlink()
    with pytest.raises(AtlasError, match=r"atlas index"):
        load_index(path)


def test_dimension_mismatch_is_one_line(data):
    x, ids = data
    index = build_index(x, ids)
    with pytest.raises(AtlasError) as e:
        search(index, np.ones((2, 16), np.float32), 5)
    assert "\n" not in str(e.value) and "16" in str(e.value) and "32" in str(e.value)


def test_same_inputs_same_bytes(data):
    x, ids = data
    flat = [faiss.serialize_index(build_index(x, ids)).tobytes() for _ in range(2)]
    assert flat[0] == flat[1]
    spec = choose_index(len(x), x.shape[1], exact_max=0)
    ivf = [faiss.serialize_index(build_index(x, ids, spec, seed=3)).tobytes() for _ in range(2)]
    assert ivf[0] == ivf[1]
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = faiss.serialize_index(build_index(x, ids, spec, seed=3)).tobytes()
    finally:
        faiss.omp_set_num_threads(threads)
    assert one == ivf[0]
    other_seed = faiss.serialize_index(build_index(x, ids, spec, seed=4)).tobytes()
    assert other_seed != ivf[0]


def test_approximate_index_recall():
    # overlapping clusters: one probed list finds ~80% of the true top 10, so the test can fail
    x = clustered(20_300, d=64, clusters=200, seed=5, separation=1.0)
    held = np.random.default_rng(6).choice(len(x), 300, replace=False)  # queries: held out, same mixture
    keep = np.setdiff1d(np.arange(len(x)), held)
    q, x = x[held], x[keep]
    ids = keep.astype(np.int64) * 11
    spec = choose_index(len(x), 64, exact_max=0)
    assert spec["kind"] == "ivf"
    approx = build_index(x, ids, spec)
    exact = build_index(x, ids, choose_index(len(x), 64))
    _, got = search(approx, q, 10)
    _, want = search(exact, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.9, recall
    # nprobe from the spec, and per call: probing every list is exact
    _, every = search(approx, q, 10, spec={"nprobe": spec["nlist"]})
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(every, want)]) > 0.99
    assert faiss.extract_index_ivf(approx).nprobe == spec["nprobe"]


def test_batched_add_changes_nothing(data, monkeypatch):
    import atlas.search.faiss_index as ai

    x, ids = data
    spec = choose_index(len(x), x.shape[1], exact_max=0)
    whole = faiss.serialize_index(build_index(x, ids, spec)).tobytes()
    monkeypatch.setattr(ai, "_ADD_BATCH", 700)
    assert faiss.serialize_index(build_index(x, ids, spec)).tobytes() == whole


def test_bad_inputs(data):
    x, ids = data
    bad = x.copy()
    bad[17, 3] = np.nan
    with pytest.raises(AtlasError, match="NaN"):
        build_index(bad, ids)
    with pytest.raises(ValueError, match="unique"):
        build_index(x[:3], np.array([1, 1, 2]))
    with pytest.raises(AtlasError, match="NaN"):
        channel_profiles(bad)


def test_reconstruct_gives_the_indexed_vectors_back_by_id(data):
    x, ids = data
    rows = x[[5, 0, 2999]].astype(np.float64)
    want = rows / np.linalg.norm(rows, axis=1, keepdims=True)  # cosine search keeps unit vectors, by hand
    for spec in (None, choose_index(len(x), x.shape[1], exact_max=0)):
        index = build_index(x, ids, spec)
        got = reconstruct(index, ids[[5, 0, 2999]])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 if spec else 1e-6)  # IVF: fp16 codes; flat: fp32
        assert search(index, got[:1], 1)[1][0, 0] == ids[5]
        with pytest.raises(AtlasError, match="not in the index"):
            reconstruct(index, [ids.max() + 1])
