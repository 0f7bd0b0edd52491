import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from atlas.data import shapes
from atlas.errors import AtlasError
from atlas.data.shapes import CLASSES, generate, render


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in _files(root)}


def test_classes():
    assert len(CLASSES) >= 12 and len(set(CLASSES)) == len(CLASSES)
    assert all(c.isidentifier() for c in CLASSES)


def test_render_is_rgb_of_the_asked_size_and_deterministic():
    for size in (32, 64, 96):
        im = render(3, np.random.default_rng(7), size)
        assert im.mode == "RGB" and im.size == (size, size)
    a = np.asarray(render(5, np.random.default_rng([1, 2])))
    b = np.asarray(render(5, np.random.default_rng([1, 2])))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        render(len(CLASSES), np.random.default_rng(0))


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", n=36, seed=3)
    b = generate(tmp_path / "b", n=36, seed=3)
    c = generate(tmp_path / "c", n=36, seed=4)
    sa, sb, sc = _snapshot(a), _snapshot(b), _snapshot(c)
    assert sa == sb
    assert sa.keys() == sc.keys()
    pngs = [k for k in sa if k.suffix == ".png"]
    assert all(sa[k] != sc[k] for k in pngs)


def test_parallel_generation_writes_the_same_files(tmp_path):
    one = generate(tmp_path / "one", n=300, size=32, seed=1, workers=1)
    two = generate(tmp_path / "two", n=300, size=32, seed=1, workers=2)
    assert _snapshot(one) == _snapshot(two)


def test_layout_balance_and_manifest(tmp_path):
    n, k = 50, len(CLASSES)
    out = generate(tmp_path / "ds", n=n, size=48, seed=0)
    assert out == tmp_path / "ds"
    assert sorted(p.name for p in out.iterdir()) == sorted([*CLASSES, "shapes.json"])
    for ci, name in enumerate(CLASSES):
        names = sorted(p.name for p in (out / name).iterdir())
        assert names == [f"{name}_{i:05d}.png" for i in range(ci, n, k)]
    counts = [len(list((out / c).iterdir())) for c in CLASSES]
    assert sum(counts) == n and max(counts) - min(counts) <= 1
    meta = json.loads((out / "shapes.json").read_text())
    assert (meta["n"], meta["size"], meta["seed"], meta["classes"]) == (n, 48, 0, list(CLASSES))
    assert not list(tmp_path.glob("ds.partial-*"))
    # each file is a valid PNG holding exactly the image render() draws from rng (seed, i)
    for i in (0, 7, 49):
        name = CLASSES[i % k]
        with Image.open(out / name / f"{name}_{i:05d}.png") as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (48, 48)
            got = np.asarray(im)
        want = np.asarray(render(i % k, np.random.default_rng([0, i]), 48))
        assert np.array_equal(got, want)


def _edge_descriptor(im: Image.Image) -> np.ndarray:
    """Where and in which direction the edges are: |d/dx|, |d/dy| and both diagonals, pooled 4x4."""
    g = np.asarray(im.convert("L"), dtype=np.float32)
    maps = [np.abs(np.diff(g, axis=1))[:-1], np.abs(np.diff(g, axis=0))[:, :-1],
            np.abs(g[1:, 1:] - g[:-1, :-1]), np.abs(g[1:, :-1] - g[:-1, 1:])]
    s = maps[0].shape[0] // 4
    pooled = [m[: 4 * s, : 4 * s].reshape(4, s, 4, s).mean(axis=(1, 3)) for m in maps]
    d = np.concatenate([p.ravel() for p in pooled])
    return d / (np.linalg.norm(d) + 1e-6)


def test_every_class_is_non_blank_and_the_classes_are_distinct():
    per, size = 16, 48
    desc = np.zeros((len(CLASSES), per, 64))
    means = []
    for c in range(len(CLASSES)):
        imgs = [render(c, np.random.default_rng([99, c, j]), size) for j in range(per)]
        for j, im in enumerate(imgs):
            a = np.asarray(im, dtype=np.float32)
            assert a.std() > 15, (CLASSES[c], j)                        # not blank: a clear object on it
            desc[c, j] = _edge_descriptor(im)
        means.append(np.mean([np.asarray(im, dtype=np.float32) for im in imgs], axis=0))
    # the mean images differ across classes
    for i in range(len(CLASSES)):
        for j in range(i):
            assert np.abs(means[i] - means[j]).mean() > 1.0, (CLASSES[i], CLASSES[j])
    # and a nearest-class-mean rule on edge descriptors, fitted on half, tells the other half apart far
    # better than chance (1/12): the classes differ in shape/texture, not only in random colours
    centroids = desc[:, : per // 2].mean(axis=1)
    test = desc[:, per // 2:]
    pred = np.argmin(((test[:, :, None, :] - centroids[None, None]) ** 2).sum(-1), axis=-1)
    acc = (pred == np.arange(len(CLASSES))[:, None]).mean()
    assert acc > 0.4, acc


def test_existing_complete_dataset_is_returned_untouched(tmp_path):
    out = generate(tmp_path / "ds", n=24, seed=0)
    before = {p: p.stat().st_mtime_ns for p in _files(out)}
    dir_mtime = out.stat().st_mtime_ns
    assert generate(tmp_path / "ds", n=24, seed=0) == out
    assert {p: p.stat().st_mtime_ns for p in _files(out)} == before
    assert out.stat().st_mtime_ns == dir_mtime
    assert not list(tmp_path.glob("ds.partial-*"))


@pytest.mark.parametrize("other", [{"n": 36}, {"seed": 1}, {"size": 32}])
def test_existing_dataset_with_other_parameters_is_an_error(tmp_path, other):
    out = generate(tmp_path / "ds", n=24, seed=0)
    with pytest.raises(AtlasError, match="ds"):
        generate(out, **{"n": 24, "seed": 0, **other})


def test_foreign_folder_is_an_error_and_left_alone(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not mine")
    with pytest.raises(AtlasError) as e:
        generate(out, n=12)
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]
    assert not list(tmp_path.glob("photos.partial-*"))
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(AtlasError, match="afile"):
        generate(f, n=12)


def test_incomplete_dataset_is_an_error(tmp_path):
    out = generate(tmp_path / "ds", n=24, seed=0)
    (out / CLASSES[0] / f"{CLASSES[0]}_00000.png").unlink()
    with pytest.raises(AtlasError, match="ds"):
        generate(out, n=24, seed=0)


def test_empty_folder_is_filled(tmp_path):
    (tmp_path / "ds").mkdir()
    out = generate(tmp_path / "ds", n=12)
    assert len(list(out.rglob("*.png"))) == 12


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    real, calls = shapes.render, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return real(*a, **kw)

    monkeypatch.setattr(shapes, "render", flaky)
    with pytest.raises(RuntimeError):
        generate(tmp_path / "ds", n=24, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_of_a_dead_process_is_removed(tmp_path):
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(p.stdout)
    stale = tmp_path / f"ds.partial-{dead}"
    (stale / "circle").mkdir(parents=True)
    live = tmp_path / f"ds.partial-{os.getppid()}"   # a running process: not ours to remove
    live.mkdir()
    generate(tmp_path / "ds", n=12)
    assert not stale.exists() and live.exists()
