import os
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


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory, tiny_folder) -> Path:
    from atlas.build import build

    out = tmp_path_factory.mktemp("atlases") / "tiny"
    return build("zfnet-mini", str(tiny_folder), out, k=4, batch_size=8, image_size=32, progress=False)


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
