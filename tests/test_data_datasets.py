"""The `--data` kinds besides ImageFolder: a CIFAR-10 folder in its python-pickle format, a flat folder."""
import pickle

import numpy as np
import pytest
from PIL import Image

import atlas
from atlas.build import build
from atlas.data import open_dataset
from atlas.errors import AtlasError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root, per_batch=6, seed=0):
    """A miniature cifar-10-batches-py: the real format (pickled dicts, rows of 3072 bytes, R then G then B)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    with open(d / "batches.meta", "wb") as f:
        # the official files come from Python 2: bytes keys and names once loaded with encoding="bytes"
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch}, f)
    images = {}
    for name in ("data_batch_1", "test_batch"):
        data = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data.reshape(per_batch, -1), b"labels": labels, b"batch_label": name.encode()}, f)
        images[name] = (data.transpose(0, 2, 3, 1), labels)
    return root, images


def test_cifar_folder_is_read_in_its_own_format(tmp_path):
    root, images = write_cifar(tmp_path / "cifar")
    src = open_dataset(root)
    assert src.kind == "cifar10" and len(src) == 12 and src.classes == CLASSES
    # record 7 is the second batch's second row: the pixels and label must be exactly that row's
    rec = src.records[7]
    arr, labels = images["test_batch"]
    assert np.array_equal(np.asarray(src.open_image(7).convert("RGB")), arr[1])
    assert rec.label == CLASSES[labels[1]] and rec.label_index == labels[1]


def test_build_over_cifar_and_flat_folders(tmp_path):
    root, _ = write_cifar(tmp_path / "cifar")
    out = build("zfnet-mini", str(root), tmp_path / "a-cifar", k=3, batch_size=4, image_size=32, progress=False)
    a = atlas.open(out)
    assert a.manifest["dataset"]["kind"] == "cifar10" and a.manifest["dataset"]["count"] == 12
    rows = a.sql("SELECT count(*), count(DISTINCT label), count(*) FILTER (WHERE status = 'ok') FROM images").fetchall()
    assert rows[0][0] == 12 and rows[0][2] == 12 and rows[0][1] >= 2
    assert a.sql("SELECT count(*) FROM top_activations WHERE layer = 'conv1'").fetchall()[0][0] == 3 * 32

    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(flat / f"img{i}.png")
    (flat / "notes.txt").write_text("not an image")
    out = build("zfnet-mini", str(flat), tmp_path / "a-flat", k=2, batch_size=4, image_size=32, progress=False)
    a = atlas.open(out)
    assert a.manifest["dataset"]["kind"] == "flat"
    assert a.sql("SELECT path, label FROM images ORDER BY image_id").fetchall() == \
        [(f"img{i}.png", None) for i in range(5)]


def write_py3_cifar(d):
    """Two images pickled by Python 3 (str keys), as tools that re-save CIFAR-10 write them."""
    d.mkdir()
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 5]}, f)
    return d


def test_python3_pickles_with_str_keys_are_read_too(tmp_path):
    src = open_dataset(write_py3_cifar(tmp_path / "c"))
    assert [r.label for r in src.records] == ["cat", "dog"]


@pytest.mark.parametrize("broken", ["batches.meta", "data_batch_1"])
def test_a_file_that_is_not_a_cifar_pickle_is_one_clear_error(tmp_path, broken):
    d = write_py3_cifar(tmp_path / "c")
    (d / broken).write_bytes(b"not a pickle")
    with pytest.raises(AtlasError, match=f"'{d / broken}' is not readable"):
        open_dataset(d)


@pytest.mark.parametrize("batch, message", [({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 12]},
                                             "labels outside its 10 label_names"),
                                            ({"data": np.zeros((2, 3072), np.uint8), "labels": None}, "not readable")])
def test_a_malformed_cifar_batch_is_one_clear_error(tmp_path, batch, message):
    d = write_py3_cifar(tmp_path / "c")
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(AtlasError, match=message):
        open_dataset(d)
