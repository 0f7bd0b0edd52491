"""Shared helpers of the figure analyses (occlusion, invariance, correspondence).

- images: `resolve_image` turns an image_id (int, or a string of digits that is
  not a file) or a path (any image file, inside the dataset or not) into the
  model input the atlas's own preprocessing makes of it, with its label;
- classes: `class_names`, `recorded_classes`, `given_class`, `true_class`,
  `classifier_status` (a model "without a classifier": its weights file is gone, or
  the model has no fc layers). A dataset label is a class of the model only when
  the model records its own class names and the label is one of them: see
  `true_class`;
- the model for a run: `Runner` (a copy on the chosen device, memory budgets);
- storage: `store_table` writes ATLAS/analyses/NAME/RUN.parquet atomically (the
  SQL view NAME in `atlas sql`), `figure_dir` the folder for a run's PNGs;
- plotting with PIL only (matplotlib is not a dependency): colour maps, heat maps
  with a colour scale, label maps with a legend, line plots with axes and legend.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import AtlasError

# CPU memory an analysis may use for one batch of activations (at most a quarter of the memory
# available; GPU: a share of what is free).
CPU_BUDGET_BYTES = 2 << 30
GPU_BUDGET_SHARE = 0.5


def open_atlas(atlas):
    """An Atlas, or a path to one."""
    if isinstance(atlas, (str, Path)):
        from ..store import Atlas

        return Atlas(atlas)
    return atlas


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------
@dataclass
class ImageRef:
    """One image, resolved and preprocessed the atlas's way."""

    key: str                    # "id:12" or the file's path
    image_id: int | None        # set for images of the atlas's dataset
    path: str                   # dataset-relative path, or the file path
    label: str | None           # the image's label in the atlas's dataset (None: outside it, or unlabelled)
    true_index: int | None      # the model's class that is `label`, when the model's classes are known to be
                                # the dataset's (see true_class); else None: the correct class is unknown
    x: torch.Tensor = field(repr=False)       # (3, S, S) model input
    crop: Any = field(repr=False)             # the cropped RGB PIL image the model sees
    original_size: tuple[int, int] = (0, 0)   # (width, height) before preprocessing
    slug: str = ""                            # a file-name-safe name for run ids
    given_index: int | None = None            # the model class the caller asked for, if any

    @property
    def name(self) -> str:
        """A short display name."""
        return f"#{self.image_id} {Path(self.path).name}" if self.image_id is not None else Path(self.path).name

    @property
    def class_index(self) -> int | None:
        """The model class to chart when one is known: the given one, else the true one."""
        return self.given_index if self.given_index is not None else self.true_index

    @property
    def class_source(self) -> str | None:
        """'given', 'true', or None (no class known: an analysis charts the most probable one)."""
        return "given" if self.given_index is not None else ("true" if self.true_index is not None else None)


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[:n] or "x"


def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def resolve_image(atlas, image: int | str | Path, label: int | str | None = None) -> ImageRef:
    """An image of the atlas by id (int, or digits that name no file) or any image file by path."""
    from PIL import Image

    if isinstance(image, bool):
        raise AtlasError(f"image {image!r} is neither an image id nor a path")
    image_id = None
    if isinstance(image, (int, np.integer)):
        image_id = int(image)
    elif isinstance(image, str) and image.strip().isdigit() and not Path(image).exists():
        image_id = int(image.strip())
    if image_id is not None:
        if image_id < 0:
            raise AtlasError(f"image id {image_id} is negative")
        original = atlas.original(image_id)  # AtlasError names the image when it is unknown or unreadable
        crop = atlas.preprocess.crop_image(original)
        x = atlas.preprocess.to_tensor(crop)
        row = atlas.rows("SELECT path, label FROM images WHERE image_id = ?", [image_id])[0]
        ref = ImageRef(f"id:{image_id}", image_id, row["path"], row["label"], true_class(atlas, row["label"]),
                       x, crop, original.size, f"id{image_id}")  # the size before preprocessing maps boxes
        if label is not None:
            ref.given_index = given_class(atlas, label, where=f"image {image_id}")
        return ref
    p = Path(image)
    if not p.exists():
        raise AtlasError(f"image '{image}' does not exist (and is not an image id of the atlas)")
    if not p.is_file():
        raise AtlasError(f"image '{image}' is not a file")
    try:
        with Image.open(p) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a file that is not an image
        raise AtlasError(f"image '{image}' cannot be read: {type(e).__name__}: {str(e)[:120]}") from None
    crop = atlas.preprocess.crop_image(rgb)
    x = atlas.preprocess.to_tensor(crop)
    full = str(p.resolve())
    ref = ImageRef(str(p), None, str(p), None, None, x, crop, rgb.size, f"{_slug(p.stem, 24)}-{short_hash(full, 6)}")
    if label is not None:
        ref.given_index = given_class(atlas, label, where=f"image '{image}'")
    return ref


def resolve_images(atlas, images: Iterable[int | str | Path], labels: Sequence | None = None) -> list[ImageRef]:
    images = list(images)
    if not images:
        raise AtlasError("no images given")
    if labels is not None and len(labels) not in (1, len(images)):
        raise AtlasError(f"{len(labels)} labels for {len(images)} images: give one label per image, or one for all")
    out = []
    for i, im in enumerate(images):
        lab = None if labels is None else labels[0 if len(labels) == 1 else i]
        out.append(resolve_image(atlas, im, lab))
    return out


# ---------------------------------------------------------------------------
# classes and the classifier
# ---------------------------------------------------------------------------
def num_classes(atlas) -> int | None:
    return atlas.lmap.classes()


def recorded_classes(atlas) -> list[str] | None:
    """The model's own class names, one per output in output order, or None when it records none.

    Only a checkpoint of `atlas train` records them (its meta "classes", copied into the manifest's
    model.classes by `atlas build`): the names of the folders it was trained on, in the order of its
    labels, so output k IS class names[k]. A list whose length is not the head's size does not
    describe this head and is not used."""
    n = num_classes(atlas)
    names = atlas.manifest.get("model", {}).get("classes")
    if not n or not names or len(names) != n:
        return None
    return [str(c) for c in names]


def class_names(atlas) -> list[str]:
    """A display name per output of the model: its recorded class names, else 'output K'.

    The dataset's class names are never lent to a head that does not record its own: an ImageNet
    head on a 3-class folder would call output 1 'green' (or 'scenes'), and a random head's output
    k is no class at all."""
    names = recorded_classes(atlas)
    return names if names is not None else [f"output {k}" for k in range(num_classes(atlas) or 0)]


def true_class(atlas, label: str | None) -> int | None:
    """The model's class index of a dataset label, or None when the correct class is unknown.

    Only recorded names count: the label must be one of the model's own class names. A head of the
    dataset's size without names is not taken on trust: nothing says it was trained on this dataset,
    nor in this class order (ImageFolder sorts the folder names; another trainer may not), so its
    output k is not known to be the dataset's class k. A label is a name, never an index, even when it
    is made of digits."""
    if label is None:
        return None
    names = recorded_classes(atlas)
    if names is None or str(label) not in names:
        return None
    return names.index(str(label))


def unknown_class_reason(atlas, ref: ImageRef) -> str:
    """Why the image's correct class among the model's outputs is unknown (for a note)."""
    n = num_classes(atlas) or 0
    if recorded_classes(atlas) is None:
        return f"the model records no class names, so its {n} outputs are not known to be the dataset's classes"
    if ref.label is None:
        return ("the image is not in the atlas's dataset, so it has no label" if ref.image_id is None
                else "the image has no label in the dataset")
    return f"the image's label '{ref.label}' is not one of the model's {n} classes"


def given_class(atlas, label, *, where: str = "the request") -> int:
    """A class of the model named by the caller: an output index (int, or digits that are not a
    recorded name) or a recorded class name. Anything else is one AtlasError line."""
    names = recorded_classes(atlas)
    n = num_classes(atlas) or 0
    if isinstance(label, bool):
        raise AtlasError(f"class {label!r} for {where} is neither a class index nor a class name")
    if isinstance(label, (int, np.integer)):
        idx = int(label)
    elif isinstance(label, str) and re.fullmatch(r"\s*[+-]?\d+\s*", label) and label.strip() not in (names or []):
        idx = int(label.strip())
    else:
        name = str(label).strip()
        if names is not None and name in names:
            return names.index(name)
        if names is None:
            raise AtlasError(f"class '{name}' for {where} is not a class of the model: it records no class "
                             f"names (only a checkpoint of `atlas train` does), so give an output index "
                             f"0..{n - 1}")
        shown = ", ".join(names[:12]) + (", ..." if n > 12 else "")
        raise AtlasError(f"class '{name}' for {where} is not a class of the model (its classes: {shown}; "
                         f"or an index 0..{n - 1})")
    if not 0 <= idx < n:
        raise AtlasError(f"class {idx} for {where} is out of range: the model has classes 0..{n - 1}")
    return idx


def class_index(atlas, label) -> int:
    return given_class(atlas, label)


def classifier_status(atlas) -> tuple[bool, str]:
    """(has a usable classifier, why not)."""
    fcs = [la for la in atlas.lmap.layers if la.kind == "fc"]
    if not fcs:
        return False, f"model '{atlas.manifest['model']['name']}' has no fc layers"
    if not atlas.has_classifier:
        w = atlas.manifest["model"].get("weights")
        return False, (f"its weights file '{w}' is gone" if w else "the atlas records no classifier weights")
    return True, ""


def require_classifier(atlas, what: str) -> None:
    ok, why = classifier_status(atlas)
    if not ok:
        raise AtlasError(f"{what} needs the model's classifier, and atlas '{atlas.path}' has none ({why})")


def check_layers(atlas, names: Sequence[str], what: str) -> list[str]:
    """Validate layer names (unknown -> AtlasError listing the valid ones; fc needs the classifier)."""
    layers = atlas.lmap.resolve(list(names), kinds=("conv", "fc"))
    ok, why = classifier_status(atlas)
    for la in layers:
        if la.kind == "fc" and not ok:
            raise AtlasError(f"{what} at layer {la.name} needs the model's classifier, and atlas '{atlas.path}' "
                             f"has none ({why}); use conv layers ({', '.join(c.name for c in atlas.lmap.conv_layers)})")
    # keep the caller's order, without duplicates
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def default_deep_layer(atlas) -> tuple[str, str | None]:
    """The paper's 'layer 7': the fc layer before the logits; for a model without a classifier (or
    with fewer than two fc layers) the last conv layer, with a note saying so."""
    fcs = [la.name for la in atlas.lmap.layers if la.kind == "fc"]
    top_conv = atlas.lmap.conv_layers[-1].name
    ok, why = classifier_status(atlas)
    if ok and len(fcs) >= 2:
        return fcs[-2], None
    reason = why if not ok else "the model has no fc layer below its logits"
    return top_conv, f"layer 7 replaced by {top_conv}, the last conv layer: {reason}"


# ---------------------------------------------------------------------------
# the model for a run
# ---------------------------------------------------------------------------
class Runner:
    """The atlas's model on a device, for batched forward passes.

    On a GPU the model is a copy on that device. Conv models run in the channels-last memory
    layout (the same numbers; 2-3x faster on CPU for ZFNet) on a private copy, so the atlas's
    own model is never changed.
    """

    def __init__(self, atlas, device: str = "auto", channels_last: bool = True):
        from ..device import resolve_device
        from ..layers import LayerMap

        self.device = resolve_device(device)
        model = copy.deepcopy(atlas.model).eval()
        model = model.to(self.device)
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.lmap = LayerMap(model, atlas.image_size)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def budget_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_BUDGET_SHARE)
        try:  # never more than a quarter of the memory available now
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return max(64 << 20, min(CPU_BUDGET_BYTES, avail // 4))
        except (ValueError, OSError, AttributeError):
            return CPU_BUDGET_BYTES

    def per_image_bytes(self, start: int = 0) -> int:
        """Peak bytes of one image's activations in a forward pass from features[start] on
        (two consecutive levels alive at once, x2 for temporaries)."""
        return 8 * feature_peak_floats(self.lmap, start) + 8 * classifier_floats(self.lmap)

    def chunk(self, n: int, per_image: int, batch_size: int | None = None) -> int:
        if batch_size is not None:
            if batch_size < 1:
                raise AtlasError(f"batch size must be at least 1, not {batch_size}")
            return min(n, batch_size)
        return max(1, min(n, self.budget_bytes() // max(per_image, 1)))

    def extract(self, x: torch.Tensor, names: list[str], batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """lmap.extract over x (N, 3, S, S) in memory-sized chunks; results on the CPU, float32."""
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        bs = self.chunk(len(x), self.per_image_bytes(), batch_size)
        with torch.no_grad():
            for i in range(0, len(x), bs):
                acts = self.lmap.extract(self.prepare(x[i:i + bs]), names)
                for n in names:
                    out[n].append(acts[n].float().cpu().contiguous())
        return {n: torch.cat(v) for n, v in out.items()}


def feature_peak_floats(lmap, start: int = 0) -> int:
    """Largest in+out float count of one image over features[start:]."""
    from torch import nn

    size, ch = lmap.image_size, 3
    sizes = []  # (channels, size) at each module's output
    for i, m in enumerate(lmap.model.features):
        if i in lmap.geoms:
            size = lmap.geoms[i].out_size
        if isinstance(m, nn.Conv2d):
            ch = m.out_channels
        sizes.append((ch, size))
    prev = 3 * lmap.image_size ** 2
    peak = prev
    for i, (c, s) in enumerate(sizes):
        cur = c * s * s
        if i >= start:
            peak = max(peak, prev + cur)
        prev = cur
    return peak


def classifier_floats(lmap) -> int:
    fcs = [la.channels for la in lmap.layers if la.kind == "fc"]
    return 2 * max(fcs) + lmap.feature_channels * 64 if fcs else 0


# ---------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------
def analysis_dir(atlas, name: str) -> Path:
    return Path(atlas.path) / "analyses" / name


def store_table(atlas, name: str, run: str, rows: list[dict[str, Any]], schema) -> Path:
    """Write rows as ATLAS/analyses/NAME/RUN.parquet (atomically); NAME becomes a SQL view."""
    import pyarrow as pa

    from ..fsutil import atomic_write_parquet

    table = pa.Table.from_pylist(rows, schema=schema)
    path = analysis_dir(atlas, name) / f"{run}.parquet"
    try:
        atomic_write_parquet(path, table)
    except OSError as e:
        raise AtlasError(f"cannot write the {name} table into atlas '{atlas.path}': {e}") from None
    # a cached connection has not seen a new view yet
    atlas.__dict__.pop("con", None)
    return path


def figure_dir(atlas, name: str, run: str, out: str | Path | None) -> Path:
    d = Path(out) if out is not None else analysis_dir(atlas, name) / run
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AtlasError(f"cannot create the figure folder '{d}': {e}") from None
    if not d.is_dir():
        raise AtlasError(f"figure folder '{d}' is not a folder")
    return d


def save_png(path: Path, im) -> Path:
    from ..fsutil import atomic_write_bytes

    buf = io.BytesIO()
    im.save(buf, "PNG")
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise AtlasError(f"cannot write '{path}': {e}") from None
    return path


# ---------------------------------------------------------------------------
# plotting with PIL
# ---------------------------------------------------------------------------
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (120, 120, 120)

# the paper's figures use a jet-like colour map: blue (low) .. red (high)
_JET = [(0.0, (0, 0, 128)), (0.125, (0, 0, 255)), (0.375, (0, 255, 255)), (0.625, (255, 255, 0)),
        (0.875, (255, 0, 0)), (1.0, (128, 0, 0))]

# tab20-like distinct colours for curves and class labels
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229)]


@lru_cache(maxsize=8)
def font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def text_size(text: str, f=None) -> tuple[int, int]:
    from PIL import Image, ImageDraw

    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=f or font())
    return x1 - x0, y1 - y0


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (jet-like)."""
    v = np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0), 0.0, 1.0)
    xs = np.array([p for p, _ in _JET])
    out = np.empty(v.shape + (3,), np.uint8)
    for c in range(3):
        out[..., c] = np.round(np.interp(v, xs, [col[c] for _, col in _JET]))
    return out


def fmt_num(v: float, digits: int = 4) -> str:
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        return f"{v:.{max(digits - 2, 2)}e}"
    if a >= 1:
        out = f"{v:.{max(digits - int(math.floor(math.log10(a))) - 1, 0)}f}"
        return out.rstrip("0").rstrip(".") if "." in out else out
    return f"{v:.{digits}g}"


def tick_labels(values: Sequence[float]) -> list[str]:
    """Labels for tick values: the fewest significant digits (3..9) that keep them apart."""
    for p in range(3, 10):
        labs = [fmt_num(v, p) for v in values]
        if len(set(labs)) == len(set(float(v) for v in values)):
            return labs
    return labs


def heatmap(arr: np.ndarray, vmin: float, vmax: float, cell: int):
    """A 2-D array as a jet heat map, each entry a cell x cell square."""
    from PIL import Image

    a = np.asarray(arr, dtype=np.float64)
    span = vmax - vmin
    norm = (a - vmin) / span if span > 0 else np.zeros_like(a)
    im = Image.fromarray(colormap(norm))
    return im.resize((a.shape[1] * cell, a.shape[0] * cell), Image.NEAREST)


def colorbar(vmin: float, vmax: float, height: int, width: int = 12, ticks: int = 5):
    """A vertical colour scale with tick labels, high at the top."""
    from PIL import Image, ImageDraw

    f = font(10)
    labels = [vmin + (vmax - vmin) * i / (ticks - 1) for i in range(ticks)]
    texts = tick_labels(labels)
    tw = max(text_size(t, f)[0] for t in texts)
    im = Image.new("RGB", (width + 6 + tw + 2, height + 10), WHITE)
    ramp = colormap(np.linspace(1, 0, height)[:, None].repeat(width, 1))
    im.paste(Image.fromarray(ramp), (0, 5))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 5, width - 1, 5 + height - 1], outline=BLACK)
    for i, v in enumerate(labels):
        y = 5 + round((height - 1) * (1 - i / (ticks - 1)))
        d.line([width, y, width + 3, y], fill=BLACK)
        d.text((width + 6, y), texts[i], fill=BLACK, font=f, anchor="lm")
    return im


def titled(im, title: str, subtitle: str | None = None, width: int | None = None):
    """im with a title (and a smaller subtitle) above it, on white."""
    from PIL import Image, ImageDraw

    ft, fs = font(13), font(11)
    lines = [(title, ft)] + ([(s, fs) for s in subtitle.split("\n")] if subtitle else [])
    hs = [text_size(t, f)[1] + 5 for t, f in lines]
    W = max([im.width, width or 0] + [text_size(t, f)[0] + 4 for t, f in lines])
    out = Image.new("RGB", (W, sum(hs) + 6 + im.height), WHITE)
    d = ImageDraw.Draw(out)
    y = 2
    for (t, f), h in zip(lines, hs):
        d.text((2, y), t, fill=BLACK if f is ft else (60, 60, 60), font=f)
        y += h
    out.paste(im, (0, y + 4))
    return out


def beside(*ims, pad: int = 6, bg=WHITE):
    """Images side by side, top-aligned."""
    from PIL import Image

    ims = [i for i in ims if i is not None]
    W = sum(i.width for i in ims) + pad * (len(ims) - 1)
    H = max(i.height for i in ims)
    out = Image.new("RGB", (W, H), bg)
    x = 0
    for i in ims:
        out.paste(i, (x, 0))
        x += i.width + pad
    return out


def below(*ims, pad: int = 6, bg=WHITE):
    """Images one under the other, left-aligned."""
    from PIL import Image

    ims = [i for i in ims if i is not None]
    W = max(i.width for i in ims)
    H = sum(i.height for i in ims) + pad * (len(ims) - 1)
    out = Image.new("RGB", (W, H), bg)
    y = 0
    for i in ims:
        out.paste(i, (0, y))
        y += i.height + pad
    return out


def margin(im, m: int = 10, bg=WHITE):
    from PIL import Image

    out = Image.new("RGB", (im.width + 2 * m, im.height + 2 * m), bg)
    out.paste(im, (m, m))
    return out


def legend(entries: Sequence[tuple[tuple[int, int, int], str]], columns: int = 1, max_width: int | None = None):
    """Colour swatches with names, in columns."""
    from PIL import Image, ImageDraw

    f = font(11)
    if not entries:
        return Image.new("RGB", (1, 1), WHITE)
    sw, gap = 12, 4
    names = [n for _, n in entries]
    cw = max(text_size(n, f)[0] for n in names) + sw + 3 * gap
    if max_width:
        columns = max(1, min(columns, max_width // max(cw, 1)))
    rows = -(-len(entries) // columns)
    lh = max(text_size("Ag", f)[1], sw) + 5
    im = Image.new("RGB", (columns * cw, rows * lh + 2), WHITE)
    d = ImageDraw.Draw(im)
    for i, (col, name) in enumerate(entries):
        r, c = i % rows, i // rows
        x, y = c * cw, r * lh + 1
        d.rectangle([x, y + 1, x + sw - 1, y + sw], fill=tuple(col), outline=BLACK)
        d.text((x + sw + gap, y + sw // 2 + 1), name, fill=BLACK, font=f, anchor="lm")
    return im


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - step * 1e-6:
        ticks.append(round(t, 12))
    return ticks


def line_plot(series: Sequence[tuple[str, tuple[int, int, int], Sequence[float], Sequence[float]]], *,
              title: str, xlabel: str, ylabel: str, size: tuple[int, int] = (380, 250),
              ylim: tuple[float, float] | None = None, show_legend: bool = True, note: str | None = None):
    """Curves (name, colour, xs, ys) on axes with ticks, axis labels and a legend below.

    NaN values break a curve (the point is not drawn).
    """
    from PIL import Image, ImageDraw

    W, H = size
    L, R, T, B = 62, 12, 26, 44
    f, fl = font(10), font(11)
    xs_all = [float(x) for _, _, xs, _ in series for x in xs]
    ys_all = [float(y) for _, _, _, ys in series for y in ys if y is not None and math.isfinite(float(y))]
    xlo, xhi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if ylim is not None:
        ylo, yhi = ylim
    else:
        ylo, yhi = (min(ys_all + [0.0]), max(ys_all)) if ys_all else (0.0, 1.0)
        if yhi <= ylo:
            yhi = ylo + 1.0
    xt, yt = nice_ticks(xlo, xhi, 6), nice_ticks(ylo, yhi, 5)
    xlo, xhi = min(xt[0], xlo), max(xt[-1], xhi)
    if ylim is None:
        ylo, yhi = yt[0], yt[-1]
    im = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(im)
    pw, ph = W - L - R, H - T - B

    def px(x: float) -> float:
        return L + (x - xlo) / ((xhi - xlo) or 1.0) * pw

    def py(y: float) -> float:
        return T + ph - (y - ylo) / ((yhi - ylo) or 1.0) * ph

    d.text((L + pw / 2, 4), title, fill=BLACK, font=font(12), anchor="mt")
    for t in yt:
        if ylo - 1e-12 <= t <= yhi + 1e-12:
            y = py(t)
            d.line([L, y, L + pw, y], fill=(232, 232, 232))
            d.line([L - 4, y, L, y], fill=BLACK)
            d.text((L - 6, y), fmt_num(t), fill=BLACK, font=f, anchor="rm")
    for t in xt:
        if xlo - 1e-12 <= t <= xhi + 1e-12:
            x = px(t)
            d.line([x, T + ph, x, T + ph + 4], fill=BLACK)
            d.text((x, T + ph + 6), fmt_num(t), fill=BLACK, font=f, anchor="mt")
    d.rectangle([L, T, L + pw, T + ph], outline=BLACK)
    d.text((L + pw / 2, H - 4), xlabel, fill=BLACK, font=fl, anchor="mb")
    # the y label, rotated
    tw, th = text_size(ylabel, fl)
    lab = Image.new("RGB", (tw + 4, th + 6), WHITE)
    ImageDraw.Draw(lab).text((2, 1), ylabel, fill=BLACK, font=fl)
    lab = lab.rotate(90, expand=True)
    im.paste(lab, (2, int(T + ph / 2 - lab.height / 2)))
    for name, col, xs, ys in series:
        run: list[tuple[float, float]] = []
        pts = []
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(float(y)):
                if len(run) > 1:
                    d.line(run, fill=tuple(col), width=2)
                run = []
                continue
            p = (px(float(x)), py(min(max(float(y), ylo), yhi)))
            run.append(p)
            pts.append(p)
        if len(run) > 1:
            d.line(run, fill=tuple(col), width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=tuple(col))
    if note:
        d.text((L + 4, T + 3), note, fill=GREY, font=f)
    if show_legend and series:
        lg = legend([(c, n) for n, c, _, _ in series], columns=3, max_width=W - 8)
        return below(im, margin(lg, 4))
    return im


def label_colours(n: int) -> list[tuple[int, int, int]]:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def projection_image(p: torch.Tensor):
    """A signed projection (3, h, w) as RGB: zero is mid-grey, scaled by its largest |value|
    (the convention of the atlas's other projection images)."""
    from PIL import Image

    a = p.detach().float().cpu().numpy().transpose(1, 2, 0)
    m = float(np.abs(a).max()) or 1.0
    return Image.fromarray((a / m * 127.5 + 127.5).clip(0, 255).astype("uint8"))
