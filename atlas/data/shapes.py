"""`shapes`: the embedded synthetic dataset, generated deterministically from a seed.

Twelve classes -- six solid shapes and six high-contrast textures::

    circle square triangle star cross ring
    stripes_h stripes_v stripes_d45 stripes_d135 checkerboard dots

Each image is one large shape (or one large textured tile, or a texture filling
the whole frame) in a random colour over a textured background: a smooth
two-colour gradient, a few faint blobs and low-amplitude noise. Position, scale,
rotation, colours and shading vary; the class signal stays strong (the object
covers a good part of the frame, foreground and background always differ by a
clear colour distance), so a small CNN learns colour and edge detectors in its
first layer and shape parts (corners, arcs, stripe ends) above it. Checked once
(not in the test suite): zfnet-mini (546 k parameters, Adam 1e-3, batch 64) on
4,000 images (seed 0) reaches 21 / 34 / 53 % accuracy on 1,200 others (seed 1)
after epochs 1 / 2 / 3, chance being 8 %.

Edges are anti-aliased: shapes (and the tiles textures sit on) are drawn with PIL
ImageDraw at 4x and box-filtered down (`Image.reduce`, an exact 16-sample box
average); the stripe/check/dot patterns get their pixel coverage analytically from
their signed distance (the box filter's limit, exact for straight edges).

`generate(out, n, size, seed)` writes an ImageFolder, `out/<class>/<class>_<i:05d>.png`,
image i being of class `i % 12` and drawn from its own generator
`numpy.random.default_rng([seed, i])`, so the files are byte-identical whatever
the order or parallelism. The folder appears atomically (written beside it as
`out.partial-<pid>`, then renamed) with a `shapes.json` recording n/size/seed/classes;
calling again with the same parameters returns the existing folder untouched.

`generate` spreads the drawing over one forked process per CPU; the files do not depend on how many.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import struct
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import AtlasError

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring",
    "stripes_h", "stripes_v", "stripes_d45", "stripes_d135", "checkerboard", "dots",
)
FORMAT_VERSION = 1
MANIFEST = "shapes.json"
SHAPE_SS = 4      # supersampling factor for the ImageDraw shapes
MIN_CONTRAST = 110.0  # least RGB distance between an object colour and what it lies on


# -- small helpers ------------------------------------------------------------------
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x right, y down), float32, shape (size, size)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    X, Y = np.meshgrid(t, t)  # contiguous: arithmetic on broadcast views is several times slower
    X.flags.writeable = Y.flags.writeable = False
    return X, Y


@lru_cache(maxsize=8)
def _pixel_grid(size: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the ss-times supersampled grid, in output pixels, origin at the top-left corner."""
    t = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    X, Y = np.meshgrid(t, t)
    X.flags.writeable = Y.flags.writeable = False
    return X, Y


def _colour(rng: np.random.Generator) -> np.ndarray:
    h = rng.random()
    s = rng.uniform(0.0, 1.0) ** 0.7          # some greys, mostly saturated
    v = rng.uniform(0.15, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32).reshape(3, 1, 1) * 255


def _contrasting(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random colour at least MIN_CONTRAST away from `against` (the farthest of a few tries otherwise)."""
    best, best_d = None, -1.0
    for _ in range(24):
        c = _colour(rng)
        d = float(np.linalg.norm(c - against))
        if d >= MIN_CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    # `against` is mid-grey-ish and nothing drawn was far enough: push the best one away from it
    lum = float(against.mean())
    return np.full((3, 1, 1), 15.0 if lum > 128 else 240.0, dtype=np.float32) if best_d < MIN_CONTRAST * 0.6 else best


def _reduce(mask: np.ndarray | Image.Image, ss: int) -> np.ndarray:
    """Box-filter a 0/255 supersampled mask down by `ss`; float32 alpha in [0, 1]."""
    img = mask if isinstance(mask, Image.Image) else Image.fromarray(mask)
    return np.asarray(img.reduce(ss), dtype=np.float32) * (1 / 255)


def _over(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite `colour` (3, 1, 1) or (3, H, W) over `base` (3, H, W) with coverage `alpha` (H, W)."""
    return base + (colour - base) * alpha


# -- background ---------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(3, size, size) float32: a smooth two-colour gradient, 0-3 faint blobs, low-amplitude noise.

    Channel-first, because numpy broadcasting over a trailing axis of 3 is ~10x slower than over whole
    planes; the gradient and the blobs are separable (outer sums / products of 1-D profiles) and are mixed
    into the three channels by one small matrix product."""
    t = (np.arange(size, dtype=np.float32) + 0.5) * (2 / size) - 1      # pixel centres in [-1, 1]
    c1 = _colour(rng).reshape(3, 1)
    c2 = np.clip(c1 + rng.normal(0, 35, (3, 1)), 0, 255).astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    nb = int(rng.integers(0, 4))
    maps = np.empty((1 + nb, size, size), np.float32)
    np.add.outer(t * (0.5 * math.sin(a)) + 0.5, t * (0.5 * math.cos(a)), out=maps[0])  # gradient in [0, 1]
    cols = [c2 - c1]
    for j in range(nb):                                                 # faint blobs
        cx, cy = rng.uniform(-1, 1, 2)
        k = -1 / rng.uniform(0.04, 0.25)
        np.multiply.outer(np.exp(k * (t - cy) ** 2), np.exp(k * (t - cx) ** 2), out=maps[j + 1])
        cols.append(rng.normal(0, 14, (3, 1)).astype(np.float32))
    bg = (np.concatenate(cols, axis=1) @ maps.reshape(1 + nb, -1) + c1).reshape(3, size, size)
    sigma = rng.uniform(1.5, 7.0)                   # low-amplitude noise: uniform with std sigma
    bg += (rng.random((size, size), dtype=np.float32) - 0.5) * (3.46 * sigma)
    return bg


def _shade(rng: np.random.Generator, colour: np.ndarray, size: int) -> np.ndarray:
    """The object colour with a gentle lighting gradient over it, (3, size, size)."""
    X, Y = _grid(size)
    a = rng.uniform(0, 2 * math.pi)
    k = rng.uniform(0.0, 0.18)
    light = 1 + k * (X * math.cos(a) + Y * math.sin(a))
    return colour * light


# -- shapes (ImageDraw at SHAPE_SS x) ------------------------------------------------
def _regular(cx: float, cy: float, radii: list[float], theta: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(theta + 2 * math.pi * k / n), cy + r * math.sin(theta + 2 * math.pi * k / n))
            for k, r in enumerate(radii)]


def _shape_mask(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    ss = SHAPE_SS
    S = size * ss
    r = rng.uniform(0.28, 0.44) * S
    slack = max(0.0, 0.5 * S - r) * 0.8
    cx, cy = S / 2 + rng.uniform(-slack, slack, 2)
    theta = rng.uniform(0, 2 * math.pi)
    img = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(img)
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * rng.uniform(0.45, 0.65)
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif name == "square":
        d.polygon(_regular(cx, cy, [r * 0.95] * 4, theta), fill=255)
    elif name == "triangle":
        d.polygon(_regular(cx, cy, [r * 1.05] * 3, theta), fill=255)
    elif name == "star":
        inner = r * rng.uniform(0.38, 0.5)
        d.polygon(_regular(cx, cy, [r * 1.05, inner] * 5, theta), fill=255)
    elif name == "cross":
        w = r * rng.uniform(0.26, 0.36)
        c, s = math.cos(theta), math.sin(theta)
        pts = [(r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w),
               (r, -w)]
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=255)
    else:  # pragma: no cover - guarded by render()
        raise ValueError(name)
    return _reduce(img, ss)


# -- textures (numpy at TEXTURE_SS x) ------------------------------------------------
_STRIPE_ANGLE = {"stripes_h": 0.0, "stripes_v": 90.0, "stripes_d45": 45.0, "stripes_d135": 135.0}


def _coverage(signed_px: np.ndarray) -> np.ndarray:
    """Pixel coverage from a signed distance in output pixels (positive inside): the box-filtered edge."""
    return np.clip(signed_px + 0.5, 0.0, 1.0, out=signed_px)


def _band(u: np.ndarray, period: float, duty: float) -> np.ndarray:
    """Anti-aliased square wave across `u` (pixels): 1 on bands `duty * period` wide, 0 between."""
    t = u * (1 / period)
    t -= np.floor(t + 0.5)                          # position within the period, in [-0.5, 0.5)
    return _coverage(period * (0.5 * duty - np.abs(t)))


def _texture_masks(name: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(region alpha or None for the whole frame, pattern alpha): the tile the texture is painted on, and the
    pattern on it. The tile is drawn at SHAPE_SS x and box-filtered; the pattern's coverage is computed
    analytically from its signed distance (exact for straight edges, like infinite supersampling, and 10x
    cheaper than a 2x numpy raster)."""
    kind = rng.choice(3, p=[0.4, 0.4, 0.2])
    region = None
    if kind:
        ss = SHAPE_SS
        S = size * ss
        img = Image.new("L", (S, S), 0)
        d = ImageDraw.Draw(img)
        if kind == 1:   # a rotated rectangle
            hw, hh = rng.uniform(0.32, 0.48, 2) * S
            cx, cy = S / 2 + rng.uniform(-0.08, 0.08, 2) * S
            t = rng.uniform(-0.35, 0.35)
            c, s = math.cos(t), math.sin(t)
            pts = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
            d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=255)
        else:           # a disc
            r = rng.uniform(0.36, 0.48) * S
            cx, cy = S / 2 + rng.uniform(-0.06, 0.06, 2) * S
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        region = _reduce(img, ss)
    # the pattern, in output pixels; angles counter-clockwise on screen (y points down)
    px, py = _pixel_grid(size, 1)
    ox, oy = rng.uniform(0, 64, 2)                  # random phase
    if name in _STRIPE_ANGLE:
        a = math.radians(_STRIPE_ANGLE[name] + rng.uniform(-10, 10))
        period = rng.uniform(7.0, 13.0) * size / 64
        # stripes run along (cos a, -sin a); u is the distance across them
        u = (px + ox) * math.sin(a) + (py + oy) * math.cos(a)
        pattern = _band(u, period, rng.uniform(0.4, 0.6))
    elif name == "checkerboard":
        a = math.radians(rng.uniform(-20, 20))
        cell = rng.uniform(6.0, 11.0) * size / 64
        c, s = math.cos(a), math.sin(a)
        x, y = px + ox, py + oy
        p = _band(x * c + y * s, 2 * cell, 0.5)
        q = _band(y * c - x * s, 2 * cell, 0.5)
        pattern = p + q - 2 * p * q                 # XOR of the two square waves
    elif name == "dots":
        a = rng.uniform(0, math.pi / 2)
        spacing = rng.uniform(9.0, 14.0) * size / 64
        rad = rng.uniform(0.24, 0.34) * spacing
        c, s = math.cos(a), math.sin(a)
        x, y = px + ox, py + oy
        u = (x * c + y * s) * (1 / spacing)
        v = (y * c - x * s) * (1 / spacing)
        u -= np.floor(u + 0.5)
        v -= np.floor(v + 0.5)
        pattern = _coverage(rad - spacing * np.sqrt(u * u + v * v))
    else:  # pragma: no cover - guarded by render()
        raise ValueError(name)
    if region is not None:
        pattern = pattern * region
    return region, pattern


# -- public API ------------------------------------------------------------------------
def render(class_index: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB image of class `CLASSES[class_index]`, drawn from `rng`."""
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class_index must be in [0, {len(CLASSES)}), got {class_index}")
    name = CLASSES[class_index]
    img = _background(rng, size)
    bg_mean = img.mean(axis=(1, 2), keepdims=True)
    if class_index < 6:
        fg = _contrasting(rng, bg_mean)
        img = _over(img, _shade(rng, fg, size), _shape_mask(name, rng, size))
    else:
        region, pattern = _texture_masks(name, rng, size)
        tile = bg_mean if region is None else _contrasting(rng, bg_mean)
        ink = _contrasting(rng, tile)
        if region is not None:
            img = _over(img, _shade(rng, tile, size), region)
        img = _over(img, _shade(rng, ink, size), pattern)
    return Image.fromarray(np.clip(img.transpose(1, 2, 0) + 0.5, 0, 255).astype(np.uint8), "RGB")


def _manifest(n: int, size: int, seed: int) -> dict:
    return {"dataset": "shapes", "n": n, "size": size, "seed": seed, "classes": list(CLASSES)}


def _is_complete(out: Path, want: dict) -> bool:
    """True if `out` holds exactly the dataset `want` describes (manifest matches, every class has its files)."""
    try:
        have = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(have, dict) or any(have.get(k) != v for k, v in want.items()):
        return False
    n, k = want["n"], len(CLASSES)
    for ci, name in enumerate(CLASSES):
        expected = len(range(ci, n, k))
        try:
            count = sum(1 for e in os.scandir(out / name) if e.name.endswith(".png"))
        except OSError:
            return False
        if count != expected:
            return False
    return True


def _clean_stale_partials(out: Path) -> None:
    """Remove `out.partial-<pid>` folders left by generators that are no longer running."""
    prefix = out.name + ".partial-"
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(prefix) or not e.name[len(prefix):].isdigit():
            continue
        pid = int(e.name[len(prefix):])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still alive: somebody is generating it right now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(e.path, ignore_errors=True)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(img: Image.Image) -> bytes:
    """A plain 8-bit RGB PNG: the "Up" filter on every row, then Huffman-only deflate. Same files as any
    encoder would decode to; ~3x faster than PIL's `save(compress_level=1)` (its adaptive row filters and
    LZ77 matching buy little on noisy 64 px images: 7.4 KB an image against 6.4 KB)."""
    a = np.asarray(img, dtype=np.uint8)
    h, w = a.shape[:2]
    rows = a.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), np.uint8)
    raw[:, 0] = 2                                   # filter type Up
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # modulo 256, as PNG wants
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
    idat = z.compress(raw.tobytes()) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _write_range(tmp: Path, start: int, stop: int, size: int, seed: int) -> int:
    k = len(CLASSES)
    for i in range(start, stop):
        name = CLASSES[i % k]
        data = _png_bytes(render(i % k, np.random.default_rng([seed, i]), size))
        with open(tmp / name / f"{name}_{i:05d}.png", "wb") as f:
            f.write(data)
    return stop - start


def _workers(n: int, workers: int | None) -> int:
    if workers is not None:
        return max(1, int(workers))
    if n < 600 or not sys.platform.startswith("linux"):  # fork is cheap on Linux only; small n is not worth it
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _write_all(tmp: Path, n: int, size: int, seed: int, workers: int, update) -> None:
    """Write images 0..n-1 into `tmp`, in `workers` forked processes when more than one."""
    chunk = 250
    ranges = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    if workers <= 1 or len(ranges) == 1:
        for a, b in ranges:
            update(_write_range(tmp, a, b, size, seed))
        return
    import multiprocessing as mp
    import warnings
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() in a threaded process (torch may have started threads);
        # the children only run numpy and PIL, as torch's own DataLoader workers do.
        warnings.simplefilter("ignore", DeprecationWarning)
        with ProcessPoolExecutor(min(workers, len(ranges)), mp_context=mp.get_context("fork")) as pool:
            futures = [pool.submit(_write_range, tmp, a, b, size, seed) for a, b in ranges]
            try:
                for f in as_completed(futures):
                    update(f.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def generate(out_dir: str | os.PathLike, n: int = 2000, size: int = 64, seed: int = 0,
             progress: bool = False, workers: int | None = None) -> Path:
    """Write `n` images as an ImageFolder at `out_dir` and return its path (see the module doc).

    `workers`: processes to render with (default: one per CPU, up to 8, for n >= 600 on Linux; else 1).
    The files are the same whatever it is.
    """
    out = Path(out_dir).expanduser()
    n, size, seed = int(n), int(size), int(seed)
    if n < 1:
        raise AtlasError(f"shapes: n must be at least 1, got {n}")
    if size < 8:
        raise AtlasError(f"shapes: size must be at least 8 px, got {size}")
    if seed < 0:
        raise AtlasError(f"shapes: seed must be non-negative, got {seed}")
    want = _manifest(n, size, seed)
    if out.exists():
        if _is_complete(out, want):
            return out
        if not (out.is_dir() and not any(out.iterdir())):
            raise AtlasError(f"'{out}' already exists and is not a shapes dataset with n={n}, size={size}, "
                             f"seed={seed}; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for name in CLASSES:
            (tmp / name).mkdir(parents=True)
        from ..util.progress import Progress

        with Progress(n, "shapes", unit="images", enabled=progress) as bar:
            _write_all(tmp, n, size, seed, _workers(n, workers), bar.update)
        (tmp / MANIFEST).write_text(json.dumps({**want, "version": FORMAT_VERSION}, indent=2) + "\n")
        try:
            os.replace(tmp, out)  # also takes the place of an empty folder
        except OSError:
            # someone else published it first (or put something there meanwhile)
            if _is_complete(out, want):
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise AtlasError(f"'{out}' appeared meanwhile and is not a shapes dataset with n={n}, size={size}, "
                             f"seed={seed}; remove it or choose another folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
