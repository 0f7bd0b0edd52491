"""The determinism promise (README, "Determinism"), exactly as stated and no further.

Same inputs, model, weights, options and machine give the same bytes, whichever path computed them: a
build, a resumed build, `atlas index` afterwards, at any thread count. Identical images get identical
values wherever they sit in the batches, so the tie rule (ties go to the smaller image id) holds. Nothing
here asserts equality across --batch-size, device, precision or decoder: those may move near ties.

CI runs this file a second time with the CPU kernels held to AVX2 (.ci/run), a stand-in for an older
processor than the one it runs on.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import atlas
from atlas.search import indexing
from atlas.build import build

pytestmark = pytest.mark.determinism

COPIES = (0, 5, 8)  # a copy in the first batch, one in the second, one alone in the last batch (of a chunk)


@pytest.fixture(scope="module")
def copies_folder(tmp_path_factory):
    """9 images of 64 px, of which COPIES are byte-identical files."""
    root = tmp_path_factory.mktemp("copies") / "data"
    root.mkdir()
    rng = np.random.default_rng(5)
    same = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for i in range(9):
        arr = same if i in COPIES else rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img_{i:02d}.png")
    return root


def _tables(path: Path) -> dict[str, bytes]:
    """Every data file of an atlas, by relative path (the manifest holds timings: not data)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != "manifest.json"}


def test_identical_images_get_identical_values_and_tie_by_image_id(tmp_path, copies_folder):
    # batch 4, chunk 8: batches [0-3] [4-7] | [8]: the third copy is computed alone in a short batch
    out = build("zfnet-mini", str(copies_folder), tmp_path / "a", k=9, batch_size=4, chunk_size=8,
                progress=False)
    a = atlas.open(out)
    acts = a.sql("SELECT layer, channel, image_id, value FROM activations WHERE image_id IN (0, 5, 8) "
                 "ORDER BY layer, channel, image_id").fetchall()
    by_unit: dict[tuple, list] = {}
    for layer, channel, image_id, value in acts:
        by_unit.setdefault((layer, channel), []).append(value)
    assert len(by_unit) == sum(la["channels"] for la in a.manifest["layers"])
    differ = [u for u, v in by_unit.items() if len(set(v)) != 1]
    assert not differ, f"{len(differ)} channels give identical images different values, e.g. {differ[:3]}"
    # k = 9 of 9 images: every channel ranks every image, and the copies sit in image-id order
    top = a.sql("SELECT layer, channel, rank, image_id, value FROM top_activations "
                "ORDER BY layer, channel, rank").fetchall()
    for (layer, channel), _ in by_unit.items():
        ranks = [(r, i) for la, ch, r, i, _ in top if (la, ch) == (layer, channel) and i in COPIES]
        assert [i for _, i in ranks] == list(COPIES), (layer, channel, ranks)
        # and nothing ranks between two copies unless it has the very same value
        rs = [r for r, _ in ranks]
        between = [v for la, ch, r, i, v in top if (la, ch) == (layer, channel) and rs[0] < r < rs[-1]
                   and i not in COPIES]
        assert all(v == by_unit[(layer, channel)][0] for v in between)
    # the fc7 vectors kept for the index: the same for the three copies
    index = a.manifest["index"]["images"]
    assert "fc7" in index
    from atlas.search.faiss_index import load_index, reconstruct

    fc7, _ = load_index(out / index["fc7"]["file"])
    v = reconstruct(fc7, [0, 5, 8])
    assert np.array_equal(v[0], v[1]) and np.array_equal(v[0], v[2])


def test_thread_count_does_not_change_the_atlas(tmp_path, copies_folder):
    """A torchrun rank gets cores // local ranks threads: the thread count must not reach the numbers."""
    before = torch.get_num_threads()
    built = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            built[threads] = build("zfnet-mini", str(copies_folder), tmp_path / f"t{threads}", k=3,
                                   batch_size=4, chunk_size=8, progress=False)
    finally:
        torch.set_num_threads(before)
    assert _tables(built[1]) == _tables(built[2])


@pytest.fixture(scope="module")
def folder_with_a_broken_file(tmp_path_factory, copies_folder):
    root = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(copies_folder, root)
    (root / "img_03.png").write_bytes(b"not a picture")
    for i in range(9, 14):  # 14 images: batches of 4 per chunk of 8, so both chunks end short
        shutil.copy(root / "img_01.png", root / f"img_{i:02d}.png")
    return root


def test_atlas_index_afterwards_equals_the_builds_index(tmp_path, folder_with_a_broken_file, monkeypatch):
    # The build keeps fc7 and the profile sample per chunk; `atlas index` later computes them by its own
    # forward pass, in the build's batches (an unreadable image as the build's zeros), not in its own.
    monkeypatch.setattr(indexing, "PROFILE_SAMPLE", 6)  # a sample smaller than the dataset
    opts = dict(k=3, batch_size=4, chunk_size=8, progress=False)
    built = build("zfnet-mini", str(folder_with_a_broken_file), tmp_path / "a", activations=False, **opts)
    assert atlas.open(built).manifest["dataset"]["errors"] == 1
    later = tmp_path / "later"
    shutil.copytree(built, later)
    for f in (later / "index").iterdir():
        f.unlink()
    indexing.build_indexes(later, progress=False)
    record = atlas.open(later).manifest["index"]
    assert {r["source"] for r in record["images"].values()} == {"forward"}
    assert {f.name: f.read_bytes() for f in (later / "index").iterdir()} == \
        {f.name: f.read_bytes() for f in (built / "index").iterdir()}


def test_a_resumed_build_equals_an_uninterrupted_one_with_short_batches(tmp_path, folder_with_a_broken_file,
                                                                        interrupt_build):
    opts = dict(k=3, batch_size=4, chunk_size=8, progress=False)
    ref = build("zfnet-mini", str(folder_with_a_broken_file), tmp_path / "ref", **opts)
    out = interrupt_build("zfnet-mini", str(folder_with_a_broken_file), tmp_path / "a", after=1, **opts)
    build("zfnet-mini", str(folder_with_a_broken_file), out, resume=True, **opts)
    assert _tables(ref) == _tables(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["batch_size"] == 4
    assert manifest["switches"]["passes"] == 1  # captured while mining, across the interruption (atlas/capture.py)


def test_short_batches_are_padded_to_the_full_batch_size(copies_folder):
    """The mechanism itself: a short batch runs at the full size, so its images get the numbers they get
    in a full batch."""
    model = atlas.load_model("zfnet-mini", seed=1)
    from atlas.net import LayerMap

    lmap = LayerMap(model, 64)
    x = torch.randn(4, 3, 64, 64)
    names = [la.name for la in lmap.layers]
    with torch.inference_mode():
        full = lmap.extract(x, names)
        alone = lmap.extract(x[3:], names, batch_size=4)
        out, sw = lmap.extract(x[2:], names, pool_indices=True, batch_size=4)
        _, sw_full = lmap.extract(x, names, pool_indices=True)
    for n in names:
        assert alone[n].shape[0] == 1 and torch.equal(alone[n][0], full[n][3])
        assert out[n].shape[0] == 2 and torch.equal(out[n], full[n][2:])
    for p in sw:
        assert torch.equal(sw[p], sw_full[p][2:])


def test_atlas_index_afterwards_equals_the_builds_index_in_bf16(tmp_path, folder_with_a_broken_file):
    opts = dict(k=3, batch_size=4, chunk_size=8, progress=False, precision="bf16")
    built = build("zfnet-mini", str(folder_with_a_broken_file), tmp_path / "a", activations=False, **opts)
    later = tmp_path / "later"
    shutil.copytree(built, later)
    for f in (later / "index").iterdir():
        f.unlink()
    indexing.build_indexes(later, progress=False)
    files = {f.name: f.read_bytes() for f in (built / "index").iterdir()}
    assert any(n.endswith(".faiss") for n in files)  # an index was built to compare with
    assert atlas.open(built).manifest["options"]["precision"] == "bf16"
    assert {f.name: f.read_bytes() for f in (later / "index").iterdir()} == files
