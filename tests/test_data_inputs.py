"""The input pipeline: the device decoder gives the cpu decoder's pictures, and a build through it is exact."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import atlas
from atlas.build import build
from atlas.cli import main
from atlas.data import DecodedImages, Preprocess, open_dataset
from atlas.errors import AtlasError
from atlas.data.inputs import InputBatches, choose_decoder
from atlas.models import preprocessing_for
from atlas.deconv.switches import SwitchRegion, decode

from test_data_datasets import write_cifar

PRE = preprocessing_for("zfnet-mini", 32)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Photos-like JPEGs of two sizes (both downscaled), grey and CMYK JPEGs, a PNG, and three broken files."""
    root = tmp_path_factory.mktemp("jpegs") / "data"
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:90, 0:120]
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            f = rng.uniform(0.05, 0.3, 2)
            base = np.stack([np.sin(xx * f[0] + ch + c) * np.cos(yy * f[1] - ch) for ch in range(3)], -1)
            img = (127 + 100 * base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)
            if i % 2:
                img = img[:70, :55]  # portrait, another size: resized apart from the others
            Image.fromarray(img).save(root / cls / f"{i:02d}.jpg", quality=90)
    Image.fromarray(img).convert("L").save(root / "a" / "grey.jpg", quality=90)
    Image.fromarray(img).convert("CMYK").save(root / "a" / "cmyk.jpg", quality=90)
    Image.fromarray(img).save(root / "b" / "lossless.png")
    (root / "b" / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    (root / "b" / "empty.png").write_bytes(b"")
    whole = (root / "a" / "00.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    return root


def test_device_decoder_gives_the_cpu_decoders_pictures(jpeg_folder, monkeypatch):
    import atlas.data.inputs

    src = open_dataset(jpeg_folder)
    pre = Preprocess(PRE)
    ref = DecodedImages(src, pre, range(len(src)))
    batches = [list(range(b, min(len(src), b + 5))) for b in range(0, len(src), 5)]
    got = {}
    for x, ids, errs, _ in InputBatches(src, pre, torch.device("cpu"), "device", workers=0)(batches):
        for xi, i, e in zip(x, ids.tolist(), errs):
            got[i] = (xi, e)
    # images of one size are resized in slices under a memory cap: any slicing, the same pixels
    monkeypatch.setattr(atlas.data.inputs, "RESIZE_BYTES", 1)
    one_by_one = torch.cat([x for x, _, _, _ in InputBatches(src, pre, torch.device("cpu"), "device", 0)(batches)])
    assert torch.equal(one_by_one, torch.stack([got[i][0] for i in range(len(src))]))
    assert sorted(got) == list(range(len(src)))
    names = {r.image_id: r.path for r in src.records}
    broken = {i for i, n in names.items() if n.endswith(("garbage.jpg", "empty.png", "truncated.jpg"))}
    assert len(broken) == 3
    for i in range(len(src)):
        want, _, want_err, _ = ref[i]
        x, err = got[i]
        assert bool(err) == bool(want_err) == (i in broken), names[i]
        # one grey level at most: back in 0-255 units through the normalisation
        diff = ((x - want) * pre.std * 255).abs().max().item()
        assert diff <= 1.0 + 1e-3, (names[i], diff)
        if names[i].endswith(".png"):  # not a JPEG: cropped by PIL in the worker, the reference itself
            assert torch.equal(x, want), names[i]
        if i in broken:
            assert torch.count_nonzero(x) == 0


@pytest.fixture(scope="module")
def device_built(jpeg_folder, tmp_path_factory):
    """The JPEG folder's atlas through the device decoder (read only by the tests that take it)."""
    return build("zfnet-mini", str(jpeg_folder), tmp_path_factory.mktemp("device") / "a", k=3, batch_size=4,
                 image_size=32, decode="device", workers=1, index=False, progress=False)


def test_a_build_through_the_device_decoder_is_exact_on_its_own_pixels(jpeg_folder, device_built):
    a = atlas.open(device_built)
    assert a.manifest["options"]["decode"] == "device"
    assert a.sql("SELECT count(*) FROM images WHERE status = 'error'").fetchall()[0][0] == 3
    # brute force over every image as the device decoder sees it
    src = open_dataset(jpeg_folder)
    x = torch.cat([b[0] for b in InputBatches(src, Preprocess(PRE), torch.device("cpu"), "device", 0)(
        [list(range(len(src)))])])
    ok = torch.tensor([r["status"] == "ok" for r in a.rows("SELECT status FROM images ORDER BY image_id")])
    with torch.no_grad():  # in the build's batches of 4: the same numbers, switches included (README, Determinism)
        parts = [a.lmap.extract(x[b:b + 4], a.layer_names, pool_indices=True, batch_size=4)
                 for b in range(0, len(x), 4)]
    feats = {n: torch.cat([f[n] for f, _ in parts]) for n in parts[0][0]}
    sw = {n: torch.cat([s[n] for _, s in parts]) for n in parts[0][1]}
    for name in a.layer_names:
        vals = feats[name].flatten(2).max(2).values
        vals[~ok] = -np.inf
        top = vals.topk(3, dim=0)
        got = a.rows("SELECT channel, rank, image_id, value FROM top_activations WHERE layer = ? "
                     "ORDER BY channel, rank", [name])
        for r in got:
            assert r["value"] == pytest.approx(top.values[r["rank"], r["channel"]].item(), rel=1e-5, abs=1e-6)
    # the switches pass saw the same pixels
    rows = a.rows("SELECT * FROM read_parquet('switches.parquet')")
    assert rows
    for r in rows:
        pool = a.lmap.pool_by_name[r["pool"]]
        reg = SwitchRegion(r["pool"], r["y0"], r["x0"], r["h"], r["w"])
        box = (slice(None), slice(reg.y0, reg.y0 + reg.h), slice(reg.x0, reg.x0 + reg.w))
        assert torch.equal(decode(r["data"], pool.channels, pool.geometry, reg)[box], sw[r["pool"]][r["image_id"]][box])


def test_decoders_agree_on_the_ranking_within_tolerance(jpeg_folder, device_built, tmp_path):
    cpu = build("zfnet-mini", str(jpeg_folder), tmp_path / "cpu", k=3, batch_size=4, image_size=32, decode="cpu",
                index=False, progress=False)
    runs = {"cpu": atlas.open(cpu), "device": atlas.open(device_built)}
    top = {d: {(r["layer"], r["channel"], r["image_id"]) for r in a.rows("SELECT * FROM top_activations")}
           for d, a in runs.items()}
    kept = len(top["cpu"] & top["device"]) / len(top["cpu"])
    assert kept >= 0.85, kept
    assert runs["cpu"].manifest["options"]["decode"] == "cpu"


def test_choosing_a_decoder(jpeg_folder, tmp_path):
    cpu = torch.device("cpu")
    src = open_dataset(jpeg_folder)
    assert choose_decoder("auto", src, cpu) == "cpu"  # on a CPU the worker processes decode
    assert choose_decoder("device", src, cpu) == "device"
    cifar = open_dataset(write_cifar(tmp_path / "cifar")[0])
    assert choose_decoder("auto", cifar, cpu) == "cpu"
    with pytest.raises(AtlasError, match="reads image files"):
        choose_decoder("device", cifar, cpu)
    with pytest.raises(AtlasError, match="unknown decoder 'gpu'"):
        choose_decoder("gpu", src, cpu)


def test_decode_option_errors_are_one_line(tmp_path):
    root, _ = write_cifar(tmp_path / "cifar")
    r = CliRunner().invoke(main, ["build", "--model", "zfnet-mini", "--data", str(root), "--out",
                                  str(tmp_path / "x"), "--image-size", "32", "--decode", "device"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0 and "--decode device reads image files" in r.output


def test_a_resumed_build_keeps_its_decoder(jpeg_folder, tmp_path, interrupt_build):
    opts = dict(k=3, batch_size=4, chunk_size=8, image_size=32, index=False, progress=False)
    out = interrupt_build("zfnet-mini", str(jpeg_folder), tmp_path / "a", after=1, decode="device", **opts)
    with pytest.raises(AtlasError, match=r"other options \(decode\)"):
        build("zfnet-mini", str(jpeg_folder), out, decode="cpu", resume=True, **opts)
    build("zfnet-mini", str(jpeg_folder), out, resume=True, **opts)  # --decode auto: the build's own
    assert atlas.open(out).manifest["options"]["decode"] == "device"


def test_a_build_started_before_decoders_existed_resumes(tiny_folder, tmp_path, interrupt_build):
    opts = dict(k=3, batch_size=4, chunk_size=8, image_size=32, index=False, progress=False)
    out = interrupt_build("zfnet-mini", str(tiny_folder), tmp_path / "a", after=1, **opts)
    cfg = tmp_path / "a.partial" / "work" / "config.json"
    old = json.loads(cfg.read_text())
    del old["decode"]  # what an older version wrote
    cfg.write_text(json.dumps(old))
    build("zfnet-mini", str(tiny_folder), out, resume=True, **opts)
    assert atlas.open(out).manifest["options"]["decode"] == "cpu"


@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_batches_are_the_normalised_crops_in_the_builds_layout(jpeg_folder, channels_last):
    """The workers' (H, W, 3) inputs, stacked and permuted, are each crop's (v / 255 - mean) / std computed
    by hand in float64 (to float32 rounding), in the layout asked for; unreadable images are zeros."""
    src = open_dataset(str(jpeg_folder))
    pre = Preprocess(PRE)
    ids = list(range(len(src)))
    got = list(InputBatches(src, pre, torch.device("cpu"), "cpu", 0, channels_last=channels_last)([ids]))
    x, got_ids, errs, _ = got[0]
    assert got_ids.tolist() == ids
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt) and x.dtype == torch.float32
    mean, std = np.array(PRE["mean"]), np.array(PRE["std"])
    assert sum(bool(e) for e in errs) == 3  # garbage, empty, truncated
    for i, e in enumerate(errs):
        if e:
            assert not x[i].any()
            continue
        crop_u8 = np.asarray(pre.crop_image(src.open_image(i)), dtype=np.uint8)  # (H, W, 3)
        want = ((crop_u8 / 255.0 - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(x[i].numpy(), want, rtol=0, atol=1e-6)
        # bit for bit the recipe atlases were built with before (float32, in this order): an atlas resumed
        # or rendered across versions sees the same input
        before = (torch.from_numpy(crop_u8.copy()).permute(2, 0, 1).float().div_(255.0) - pre.mean) / pre.std
        assert torch.equal(x[i], before)
        # one recipe: the per-image input the renderer and the analyses use is the same numbers exactly
        assert torch.equal(x[i], pre.to_tensor(pre.crop_image(src.open_image(i))))
