"""Datasets as the build job sees them: an ordered list of images with labels.

`--data` takes
  * `shapes`                the embedded synthetic dataset (generated on first use)
  * a folder of images in ImageFolder layout (class = sub-folder)
  * a flat folder of images (no labels)
  * a CIFAR-10 folder in its python-pickle format (or one of its batch files)
Image ids are positions in a sorted listing, so the same folder always gives
the same ids. Corrupt files are not an error of the dataset: the build records
them and goes on.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from ..errors import AtlasError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CIFAR_BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


@dataclass
class Record:
    image_id: int
    path: str            # relative to the dataset root ("batch#row" for CIFAR)
    label: str | None
    label_index: int | None


def atlas_home() -> Path:
    return Path(os.environ.get("ATLAS_HOME", Path.home() / ".cache" / "atlas"))


def content_hash(data: bytes) -> str:
    """What `images.content_hash` holds: BLAKE2b (128 bits) of an image file's bytes (a CIFAR row's pixels).
    An atlas draws an image only while its bytes still have this hash: a dataset root from a manifest
    someone else wrote then shows only the images the atlas was built on."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def safe_relative(path: str) -> bool:
    """Whether a path read from an atlas's images table stays under the dataset root: relative, no '..',
    no drive or backslash tricks. Links inside the dataset are its own business (clusters keep datasets so)."""
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        return False
    pure = PurePosixPath(path)
    return not pure.is_absolute() and ".." not in pure.parts and ":" not in pure.parts[0]


class FileBytes(io.BytesIO):
    """A file's bytes, read once (to hash and decode them), that PIL names in its errors by the file's
    path, as it would the file: a BytesIO's repr holds its address, which differs run to run, and the
    error is recorded in the atlas (images.error), whose bytes are the same on every run."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(data)
        self.path = str(path)

    def __repr__(self) -> str:
        return repr(self.path)


def read_file(path: Path) -> tuple[Image.Image, str]:
    """(the image file at `path` as RGB, the content hash of its bytes), reading it once."""
    data = path.read_bytes()
    return open_rgb(FileBytes(data, path)), content_hash(data)


# The formats PIL may read (IMAGE_EXTENSIONS' own): a file from someone else named .jpg but holding EPS would
# otherwise reach Ghostscript, which runs PostScript
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM", "MPO")


def open_rgb(path: Path | BinaryIO) -> Image.Image:
    """An image file (a path, or its bytes as a file object) as RGB, fully decoded (raises OSError/ValueError
    for a corrupt file, or one of another format than FORMATS)."""
    with Image.open(path, formats=FORMATS) as im:
        im.load()
        # convert() copies even an RGB image: a few per cent of a decoding worker's time for a JPEG
        return im if im.mode == "RGB" else im.convert("RGB")


class ImageSource:
    """An ordered, labelled list of images and a way to open each one."""

    def __init__(self, kind: str, root: Path, records: list[Record], classes: list[str] | None,
                 spec: str, arrays: dict[str, Any] | None = None):
        self.kind, self.root, self.records, self.classes, self.spec = kind, root, records, classes, spec
        self._arrays = arrays  # CIFAR: batch name -> uint8 array (N, 32, 32, 3)

    def __len__(self) -> int:
        return len(self.records)

    def open_image(self, image_id: int) -> Image.Image:
        """The image as RGB; raises OSError/ValueError for a corrupt file."""
        return self.read(image_id)[0]

    def read(self, image_id: int) -> tuple[Image.Image, str]:
        """(the image as RGB, the content hash of its bytes): the file is read once for both."""
        rec = self.records[image_id]
        if self.kind == "cifar10":
            batch, row = rec.path.split("#")
            pixels = self._load_batch(batch)[int(row)]
            return Image.fromarray(pixels), content_hash(pixels.tobytes())
        return read_file(self.root / rec.path)

    def _load_batch(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = _read_cifar_batch(self.root / name)[0]
        return self._arrays[name]

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "root": str(self.root), "count": len(self),
                "classes": self.classes}


class _Refused(pickle.UnpicklingError):
    """A pickle that names code to run: refused, and said so (a file that is no pickle is only unreadable)."""


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR-10 files hold: dicts, lists, strings, bytes, numbers and numpy
    arrays with their dtypes. A pickle can name any callable to run while loading; a folder of "CIFAR"
    files from someone else must not run code, so every other global is refused."""

    def find_class(self, module: str, name: str):
        allowed = _cifar_globals()
        if (module, name) not in allowed:
            raise _Refused(f"it names {module}.{name}, which a CIFAR-10 file never holds")
        return allowed[(module, name)]


def _cifar_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy 2 moved the reconstructors; files name the old module (pickled by numpy 1 or Python 2)
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct, scalar
    import codecs

    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
           ("_codecs", "encode"): codecs.encode}  # Python 3's protocol 2 writes bytes as _codecs.encode(str)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")], out[(mod, "scalar")] = _reconstruct, scalar
    return out


def _unpickle_cifar(path: Path, what: str) -> dict:
    """A CIFAR-10 pickle as a dict with str keys: the official files were pickled by Python 2 (bytes
    keys under encoding="bytes"), copies re-saved by Python 3 tools have str keys."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise ValueError(f"it holds a {type(d).__name__}, not a dict")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    except _Refused as e:
        raise AtlasError(f"CIFAR-10 {what} '{path}' is refused: {e}") from None
    except Exception as e:  # a CIFAR file that is not one: say which
        raise AtlasError(f"CIFAR-10 {what} '{path}' is not readable ({type(e).__name__})") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    d = _unpickle_cifar(path, "batch")
    try:
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(data), [int(v) for v in d["labels"]]
    except (KeyError, ValueError, TypeError) as e:
        raise AtlasError(f"CIFAR-10 batch '{path}' is not readable ({type(e).__name__}: {e})") from None


def read_cifar_row(root: Path, path: str) -> tuple[Image.Image, str]:
    """(RGB image, content hash) of the CIFAR-10 record `path` ("batch#row") under `root`, as an atlas's
    images table names it: only an official batch name, read with the restricted unpickler."""
    batch, _, row = path.partition("#")
    if batch not in CIFAR_BATCHES or not row.isdigit():
        raise AtlasError(f"'{path}' is not a CIFAR-10 record (BATCH#ROW, BATCH one of {', '.join(CIFAR_BATCHES)})")
    pixels = _cached_cifar_batch(str(root / batch))
    if int(row) >= len(pixels):
        raise AtlasError(f"CIFAR-10 batch '{root / batch}' has no row {row}")
    return Image.fromarray(pixels[int(row)]), content_hash(pixels[int(row)].tobytes())


@functools.lru_cache(maxsize=2)
def _cached_cifar_batch(path: str) -> np.ndarray:
    return _read_cifar_batch(Path(path))[0]


def _cifar(root: Path, spec: str) -> ImageSource:
    if root.is_file():
        names, root = [root.name], root.parent
    else:
        if (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        names = [n for n in CIFAR_BATCHES if (root / n).is_file()]
    classes = None
    if (root / "batches.meta").is_file():
        label_names = _unpickle_cifar(root / "batches.meta", "metadata").get("label_names")
        if not label_names:
            raise AtlasError(f"CIFAR-10 metadata '{root / 'batches.meta'}' has no label_names")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in label_names]
    records, arrays = [], {}
    for name in names:
        data, labels = _read_cifar_batch(root / name)
        arrays[name] = data
        if classes and any(not 0 <= lab < len(classes) for lab in labels):
            raise AtlasError(f"CIFAR-10 batch '{root / name}' has labels outside its {len(classes)} label_names")
        for row, lab in enumerate(labels):
            records.append(Record(len(records), f"{name}#{row}", classes[lab] if classes else str(lab), int(lab)))
    return ImageSource("cifar10", root, records, classes, spec, arrays)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


SHAPES_DEFAULT = 2000  # `--data shapes`; the demo makes its own 8,000 (atlas/demo.py)


def read_image_file(path: str | os.PathLike) -> Image.Image:
    """Any image file as RGB, or AtlasError naming the file and what is wrong (a query image, an
    analysis's image from outside the dataset)."""
    p = Path(path)
    if not p.is_file():
        raise AtlasError(f"image '{path}' " + ("is not a file" if p.exists() else "does not exist"))
    try:
        return open_rgb(p)
    except Exception as e:  # PIL raises many types for a file that is not an image
        raise AtlasError(f"image '{path}' cannot be read: {type(e).__name__}: {str(e)[:120]}") from None


def open_dataset(spec: str | os.PathLike) -> ImageSource:
    """Resolve a `--data` argument to an ImageSource (raises AtlasError for a bad one)."""
    spec = str(spec)
    if spec == "shapes" or spec.startswith("shapes:"):
        from . import shapes

        count = spec.split(":", 1)[1] if ":" in spec else str(SHAPES_DEFAULT)
        if not count.isdigit() or int(count) < 1:
            raise AtlasError(f"dataset '{spec}': the count after 'shapes:' must be a whole number of images")
        n = int(count)
        root = shapes.generate(atlas_home() / "datasets" / f"shapes-n{n}-s64-seed0", n=n, size=64, seed=0)
        # where the images are: generated once, kept in the user's cache, and read from there later
        sys.stderr.write(f"dataset {spec}: {n} synthetic 64 px images, cached in {root} "
                         f"(`--data shapes:N` for N images; ATLAS_HOME moves the cache)\n")
        src = open_dataset(root)
        src.spec = spec
        return src
    root = Path(spec).expanduser()
    if not root.exists():
        raise AtlasError(f"dataset '{spec}' does not exist")
    if (root.is_file() and root.name in CIFAR_BATCHES) or (root.is_dir() and (
            (root / "batches.meta").is_file() or (root / "cifar-10-batches-py").is_dir())):
        src = _cifar(root, spec)
    elif root.is_dir():
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        subdirs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
        flat = [Path(e.path) for e in entries if _is_image(Path(e.path))]
        records: list[Record] = []
        if subdirs and not flat:
            classes = [d.name for d in subdirs]
            for ci, d in enumerate(subdirs):
                for f in sorted(p for p in d.rglob("*") if _is_image(p)):
                    records.append(Record(len(records), f.relative_to(root).as_posix(), d.name, ci))
            src = ImageSource("imagefolder", root, records, classes, spec)
        else:
            for f in flat:
                records.append(Record(len(records), f.name, None, None))
            src = ImageSource("flat", root, records, None, spec)
    else:
        raise AtlasError(f"dataset '{spec}' is neither a folder of images nor a CIFAR-10 batch")
    if len(src) == 0:
        raise AtlasError(f"dataset '{spec}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return src


class Preprocess:
    """The model's own preprocessing: short side resize, centre crop, normalise."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.resize, self.crop = int(spec["resize"]), int(spec["crop"])
        self.mean = torch.tensor(spec["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(spec["std"], dtype=torch.float32).view(3, 1, 1)

    def crop_image(self, img: Image.Image) -> Image.Image:
        """The RGB image the model sees, before normalisation (for patches and display)."""
        w, h = img.size
        scale = self.resize / min(w, h)
        if (w, h) != (round(w * scale), round(h * scale)):
            img = img.resize((max(self.crop, round(w * scale)), max(self.crop, round(h * scale))),
                             Image.BILINEAR, reducing_gap=None)
        w, h = img.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        return img.crop((left, top, left + self.crop, top + self.crop))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Model input from 0..255 pixels (..., H, W, 3), uint8 or float, as float32 in that same layout:
        permuted to (..., 3, H, W) it is channels-last with no copy. One elementwise recipe for an image or
        a batch, on any device, so every caller gets the same numbers; it runs along rows of W*3 values
        (the mean and std repeated W times) because a broadcast over an innermost dimension of 3 runs an
        element at a time."""
        x = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        w = x.shape[-2]
        mean, std = (t.view(3).repeat(w).to(x.device) for t in (self.mean, self.std))
        x.view(-1, w * 3).div_(255.0).sub_(mean).div_(std)
        return x

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        return self.normalise(torch.from_numpy(np.array(img, dtype=np.uint8))).permute(2, 0, 1).contiguous()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.crop_image(img))


def decode_error(e: Exception) -> str:
    """What images.error records for an image that did not decode."""
    return f"{type(e).__name__}: {e}"[:300] or "unreadable"


def decode_crop(source: ImageSource, preprocess: Preprocess, image_id: int) -> tuple[np.ndarray | None, str, str]:
    """(the uint8 crop (H, W, 3) the model sees, "", the content hash), or (None, the error, "") for an
    image that does not decode: every cpu decoding path's one reading of an image."""
    try:
        img, digest = source.read(image_id)
        return np.array(preprocess.crop_image(img), dtype=np.uint8), "", digest
    except Exception as e:  # any decode failure is a property of the file, recorded per image
        return None, decode_error(e), ""


class DecodedImages(torch.utils.data.Dataset):
    """(model input, image_id, error, content hash) per image; a corrupt image's input is zeros and its
    error ("" when it decoded); the hash is of the bytes decoded ("" for an error). `channels_last`:
    the input as (crop, crop, 3), normalised (Preprocess.normalise), else (3, crop, crop)."""

    def __init__(self, source: ImageSource, preprocess: Preprocess, ids: list[int] | range,
                 channels_last: bool = False):
        self.source, self.preprocess, self.ids = source, preprocess, list(ids)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image_id = self.ids[i]
        px, err, digest = decode_crop(self.source, self.preprocess, image_id)
        x = self.preprocess.normalise(torch.from_numpy(px)) if px is not None else \
            torch.zeros(self.preprocess.crop, self.preprocess.crop, 3)
        return (x if self.channels_last else x.permute(2, 0, 1).contiguous()), image_id, err, digest
