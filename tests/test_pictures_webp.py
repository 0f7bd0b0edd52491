"""atlas.pictures.webp.encode, the one WebP encoder of the site and the notebook: pixel art comes back exact,
a photo-like picture lossy and close, `max_side` shrinks and never enlarges. References: the pictures made
here with numpy, PIL's own decoder, and PIL's LANCZOS shrink."""
import io

import numpy as np
from PIL import Image

from atlas import notebook
from atlas.pictures.webp import encode


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "WEBP"
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def pixel_art() -> np.ndarray:
    small = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return np.kron(small, np.ones((12, 12, 1), dtype=np.uint8))  # 96 px of 12 px squares (NEAREST)


def photo(side: int = 160) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(1)
    base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(4 * x * y)], -1) * 60 + 128
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def test_pixel_art_is_exact_where_lossless_pays():
    art = pixel_art()
    data = encode(png(art), quality=75, lossless_try=3)
    assert np.array_equal(decode(data), art)
    lossy = encode(png(art), quality=75)  # without the try: lossy, not exact
    assert not np.array_equal(decode(lossy), art)


def test_a_photo_like_picture_is_lossy_and_close():
    pic = photo()
    data = encode(png(pic), quality=75, lossless_try=3)
    got = decode(data)
    assert got.shape == pic.shape and not np.array_equal(got, pic)
    assert len(data) < len(png(pic)) / 3
    assert np.abs(got - pic).mean() < 8  # measured 5.0 (colour at half resolution)


def test_max_side_shrinks_as_lanczos_and_never_enlarges(tmp_path):
    pic = photo(160)
    path = tmp_path / "p.png"
    path.write_bytes(png(pic))
    got = decode(encode(path, quality=75, max_side=112))
    ref = np.asarray(Image.fromarray(pic).resize((112, 112), Image.LANCZOS), dtype=np.int16)
    crop = np.asarray(Image.fromarray(pic).crop((0, 0, 112, 112)), dtype=np.int16)  # the same size, not shrunk
    assert got.shape == (112, 112, 3) and np.abs(got - ref).mean() < 6  # measured 3.4
    assert np.abs(got - crop).mean() > 2 * np.abs(got - ref).mean()
    art = pixel_art()  # 96 px: below max_side, left as it is
    assert decode(encode(png(art), quality=75, lossless_try=3, max_side=112)).shape == art.shape


def test_the_notebook_uses_it_with_its_own_settings():
    pic = png(photo())
    with Image.open(io.BytesIO(pic)) as im:  # the notebook's own recipe, written out with PIL alone
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="WEBP", quality=55, method=6)
    assert notebook.web(pic) == buf.getvalue()
    assert notebook.web(None) is None
