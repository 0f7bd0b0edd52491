import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_image_folder(root: Path, per_class: int = 12, size=(48, 40), classes=("red", "green", "blue"),
                      seed: int = 0) -> Path:
    """A tiny labelled ImageFolder: coloured rectangles on noise, distinct per class."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for ci, c in enumerate(classes):
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
            y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
            arr[y:y + size[1] // 2, x:x + size[0] // 2] = colours.get(c, (200, 200, 200))
            Image.fromarray(arr).save(d / f"{c}_{i:03d}.png")
    return root


XSS_FILE = "<img src=x onerror=window.__xss=1>.png"
XSS_LABEL = "Tom's \"cats\" & <dogs onmouseover=window.__xss=2>"


def make_hostile_folder(root: Path, per_class: int = 8, size=(40, 36)) -> Path:
    """A tiny ImageFolder whose names are attacks: a label with quotes, ampersand and a tag, a file named
    like an <img> with an onerror handler. The hostile images are bright so they rank high."""
    rng = np.random.default_rng(1)
    classes = {"plain": (40, 200, 60), XSS_LABEL: (230, 230, 30), "b&w": (200, 200, 200)}
    for ci, (name, colour) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
            y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
            arr[y:y + size[1] // 2, x:x + size[0] // 2] = colour
            Image.fromarray(arr).save(d / f"img_{i:02d}.png")
    arr = np.full((size[1], size[0], 3), 255, np.uint8)
    arr[::2, ::2] = 0
    Image.fromarray(arr).save(root / XSS_LABEL / XSS_FILE)
    return root


def xss_channel(a, layer="conv2"):
    """A channel of `layer` whose top-k holds the hostile file (there is one: the file is a loud pattern)."""
    rows = a.rows("SELECT t.channel FROM top_activations t JOIN images i USING (image_id) "
                  "WHERE t.layer = ? AND i.path LIKE ? ORDER BY t.rank, t.channel", [layer, "%onerror%"])
    assert rows, "the hostile image is in no top-k"
    return rows[0]["channel"]


def copy_atlas(src: Path, dst: Path, data: Path | None = None) -> Path:
    """A copy of the atlas `src` at `dst` without the pictures and analyses other tests drew into it, for a
    test that writes into its atlas. With `data`, the atlas's dataset folder is copied too, next to it, and the
    copy's manifest names that copy: for a test that deletes or changes images."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache", "analyses"))
    if data is not None:
        own = shutil.copytree(data, dst.parent / "data")
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["dataset"]["root"] = manifest["dataset"]["spec"] = str(own.resolve())
        (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


# Read-only tests share the atlases below, each built once per session into its own folder. A test that
# writes into an atlas (draws pictures into its cache, stores an analysis run, plants, changes or deletes a
# file) or into its images takes a copy: own_atlas, copy_atlas(...), small_atlas. The exception is
# hostile_atlas, which the site tests (test_export_site.py, test_export_browser.py) export from: they share
# its picture cache, as two exports of one atlas do.
def without_classifier(src: Path, tmp_path: Path) -> Path:
    """A copy of the atlas `src` whose model's weights file is gone: a trained atlas whose classifier
    cannot be had (the analyses then say so instead of charting a class)."""
    import json
    import shutil

    dst = tmp_path / "nocls"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("analyses"))
    mf = json.loads((dst / "manifest.json").read_text())
    mf["model"].update({"random_init": False, "weights": str(tmp_path / "gone.pt")})
    (dst / "manifest.json").write_text(json.dumps(mf))
    return dst


def randomised_model(name: str):
    """A model of the registry in eval mode, random weights (seed 0) and randomised BatchNorm statistics
    and affine terms: what the fidelity tests project through, so BN's scale is not the identity."""
    from atlas.models import load_model

    torch.manual_seed(0)
    return randomise_bn(load_model(name))


def randomise_bn(m):
    """`m` in eval mode with its BatchNorm statistics and affine terms drawn at random (torch's generator)."""
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory, tiny_folder) -> Path:
    """zfnet-mini (random weights) over the 36 images of `tiny_folder` at 32 px, k = 4, with its indexes."""
    from atlas.build import build

    out = tmp_path_factory.mktemp("atlases") / "tiny"
    return build("zfnet-mini", str(tiny_folder), out, k=4, batch_size=8, image_size=32, progress=False)


@pytest.fixture(scope="session")
def tiny_atlas_again(tmp_path_factory, tiny_folder) -> Path:
    """The tiny atlas built a second time, into another folder: what the determinism tests compare with it."""
    from atlas.build import build

    out = tmp_path_factory.mktemp("atlases") / "again"
    return build("zfnet-mini", str(tiny_folder), out, k=4, batch_size=8, image_size=32, progress=False)


@pytest.fixture(scope="session")
def tiny_atlas_without_activations(tmp_path_factory, tiny_folder) -> Path:
    """The tiny folder built with --no-activations and --no-index (k = 2): the per-image table left out."""
    from atlas.build import build

    out = tmp_path_factory.mktemp("atlases") / "noact"
    return build("zfnet-mini", str(tiny_folder), out, k=2, batch_size=8, image_size=32, activations=False,
                 index=False, progress=False)


@pytest.fixture
def own_atlas(tiny_atlas, tmp_path) -> Path:
    """A copy of the tiny atlas for a test that writes into it (its dataset is still the shared tiny folder)."""
    return copy_atlas(tiny_atlas, tmp_path / "atlas")


@pytest.fixture(scope="session")
def _small_built(tmp_path_factory) -> tuple[Path, Path]:
    from atlas.build import build

    root = tmp_path_factory.mktemp("small")
    data = make_image_folder(root / "data", per_class=4)
    return build("zfnet-mini", str(data), root / "atlas", k=3, batch_size=16, image_size=32, progress=False), data


@pytest.fixture
def small_atlas(_small_built, tmp_path) -> tuple[Path, Path]:
    """(atlas, data): a copy of a small atlas (12 images, k = 3) and of its own dataset folder, the copy's
    manifest naming the copied folder: the test may delete or change images."""
    path, data = _small_built
    atlas = copy_atlas(path, tmp_path / "atlas", data=data)
    return atlas, tmp_path / "data"


@pytest.fixture(scope="session")
def hostile_atlas(tmp_path_factory) -> Path:
    """zfnet-mini over `make_hostile_folder`'s images (file and class names that are attacks), k = 4."""
    from atlas.build import build

    root = tmp_path_factory.mktemp("hostile")
    data = make_hostile_folder(root / "data")
    return build("zfnet-mini", str(data), root / "atlas", k=4, batch_size=16, image_size=32, progress=False)


@pytest.fixture
def interrupt_build():
    """`interrupt_build(model, data, out, after=N, **options)`: atlas.build.build stopped by Ctrl-C
    (KeyboardInterrupt) right after its Nth chunk reaches the disk (0: before the first), as a user's
    interrupt would stop it; returns `out`, whose `.partial` folder a resume continues. Builds after it run
    normally. Every resume and build-safety test starts here, so a change to how the build stores its
    chunks is mended in one place."""
    import atlas.build as b

    def interrupted(*args, after: int = 1, **options):
        real, done = b._flush_chunk, []

        def flush(*a, **kw):
            if after == 0:
                raise KeyboardInterrupt
            real(*a, **kw)
            done.append(1)
            if len(done) == after:
                raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as m:
            m.setattr(b, "_flush_chunk", flush)
            with pytest.raises(KeyboardInterrupt):
                b.build(*args, **options)
        return Path(args[2])

    return interrupted
