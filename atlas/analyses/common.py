"""What the figure analyses (occlusion, invariance, correspondence) share, so that each says the
same thing the same way.

- images: `resolve_image` turns an image_id (int, or a string of digits that is
  not a file) or a path (any image file, inside the dataset or not) into the
  model input the atlas's own preprocessing makes of it, with its label
  (`first_repeated` finds an image given twice);
- classes: `class_names`, `recorded_classes`, `given_class`, `true_class`,
  `classifier_status` (a model "without a classifier": its weights file is gone, or
  the model has no fc layers). A dataset label is a class of the model only when
  the model records its own class names and the label is one of them: see
  `true_class`;
- layers: `check_layers`, `default_deep_layer` (the paper's "layer 7");
- storage: `store_table` writes ATLAS/analyses/NAME/RUN.parquet atomically (the
  SQL view NAME in `atlas sql`) with the columns `table_schema` reads from a compact
  "name:type ..." list, `figure_dir` the folder for a run's PNGs, `save_png` a PNG;
  `keep_run` does both as a run was asked to, and `notes_and_table` closes a summary
  with the notes and where the table went.

The model itself runs through `atlas.net.runner.Runner`; the drawing is `atlas.pictures.charts`.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..data import read_image_file
from ..errors import AtlasError


def open_atlas(atlas):
    """An Atlas, or a path to one."""
    if isinstance(atlas, (str, Path)):
        from ..facade import Atlas

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


def slug(text: str, n: int = 40) -> str:
    """A file-name-safe form of text, at most n characters (never empty)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[:n] or "x"


def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def resolve_image(atlas, image: int | str | Path, label: int | str | None = None) -> ImageRef:
    """An image of the atlas by id (int, or digits that name no file) or any image file by path."""
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
    rgb = read_image_file(p)
    crop = atlas.preprocess.crop_image(rgb)
    x = atlas.preprocess.to_tensor(crop)
    full = str(p.resolve())
    ref = ImageRef(str(p), None, str(p), None, None, x, crop, rgb.size, f"{slug(p.stem, 24)}-{short_hash(full, 6)}")
    if label is not None:
        ref.given_index = given_class(atlas, label, where=f"image '{image}'")
    return ref


def first_repeated(keys: Iterable[str]) -> str | None:
    """The first key (in order) that occurs more than once, or None."""
    keys = list(keys)
    return next((k for k in keys if keys.count(k) > 1), None)


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


def classifier_status(atlas) -> tuple[bool, str]:
    """(has a usable classifier, why not)."""
    fcs = [la for la in atlas.lmap.layers if la.kind == "fc"]
    if not fcs:
        return False, f"model '{atlas.manifest['model']['name']}' has no fc layers"
    if not atlas.has_classifier:
        w = atlas.manifest["model"].get("weights")
        return False, (f"its weights file '{w}' is gone or changed since the build" if w else "the atlas records no classifier weights")
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
# storage
# ---------------------------------------------------------------------------
def analysis_dir(atlas, name: str) -> Path:
    return Path(atlas.path) / "analyses" / name


def table_schema(columns: str):
    """The pyarrow schema of a table's columns, given in order as "name:type ..." (types: str, i32,
    i64, f64, list<f64>): one compact line per few columns in each analysis, pyarrow imported only here."""
    import pyarrow as pa

    types = {"str": pa.string(), "i32": pa.int32(), "i64": pa.int64(), "f64": pa.float64(),
             "list<f64>": pa.list_(pa.float64())}
    return pa.schema([(name, types[kind]) for name, kind in (c.split(":", 1) for c in columns.split())])


def store_table(atlas, name: str, run: str, rows: list[dict[str, Any]], columns: str) -> Path:
    """Write rows as ATLAS/analyses/NAME/RUN.parquet (atomically) with the given columns (see
    `table_schema`); NAME becomes a SQL view."""
    import pyarrow as pa

    from ..util.files import atomic_write_parquet

    table = pa.Table.from_pylist(rows, schema=table_schema(columns))
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


def keep_run(atlas, name: str, run: str, rows: list[dict[str, Any]], columns: str, *, store: bool, figures: bool,
             out: str | Path | None, draw: Callable[[Path], dict[str, Path]]) -> tuple[Path | None, dict[str, Path]]:
    """What a run leaves, as asked: (its table, `store_table`, or None; its figures, drawn by `draw`
    into `figure_dir`, or none)."""
    table = store_table(atlas, name, run, rows, columns) if store else None
    files = draw(figure_dir(atlas, name, run, out)) if figures else {}
    return table, files


def notes_and_table(notes: Sequence[str], table: Path | None, view: str, run: str) -> list[str]:
    """A result summary's closing lines: its notes, then where its table went (the SQL view)."""
    return [f"note: {n}" for n in notes] + ([f"table: {table} (SQL view {view}, run '{run}')"] if table else [])


def save_png(path: Path, im) -> Path:
    from ..util.files import atomic_write_bytes

    buf = io.BytesIO()
    im.save(buf, "PNG")
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise AtlasError(f"cannot write '{path}': {e}") from None
    return path
