"""Correspondence of object parts across images (Zeiler & Fergus 2014, figure 8 / table 7).

The spec (JSON) names the images and, per part, the occluder box in each image:

    {"coordinates": "input",
     "images": [{"image": 12, "parts": {"left_eye": [x0, y0, x1, y1], "nose": [x0, y0, x1, y1]}},
                {"image": "dogs/beagle.jpg", "parts": {"left_eye": [...], "nose": [...]}}]}

or, equivalently, parts first, one box per image in the images' order:

    {"images": [12, "dogs/beagle.jpg"], "parts": {"left_eye": [[...], [...]], "nose": [[...], [...]]}}

An image is an image_id of the atlas (an int) or a path (relative paths are
taken from the spec's folder; images outside the dataset work). Every part
needs a box in every image. A box [x0, y0, x1, y1] is in pixels, x to the
right, y down, x1 and y1 exclusive, in

  "input"     (default) the model's input: the preprocessed, centre-cropped S x S image
              (what `atlas.preprocess.crop_image` returns; 0 <= x0 < x1 <= S);
  "original"  the original image's pixels, mapped through the preprocessing's resize and
              centre crop (rounded outwards); the box must lie inside the crop the model sees.

For each part and layer: e_i = x_i - x~_i, the difference of the layer's
features (post-ReLU, a conv map flattened) of image i and of image i with the
part occluded (its box filled grey, or the preprocessing's mean colour), and

    Delta_l = sum over ordered pairs i != j of Hamming(sign(e_i), sign(e_j))

(sign(0) = 0, so two zeros agree). The control: the same per-image box sizes
at uniformly random positions inside the image, `random` draws (numpy
default_rng(seed)); parts with the same box sizes in every image share one
control. Reported as mean and sample standard deviation (ddof=1) over the
draws. Lower Delta = the part is handled more consistently across images. The
table shows Delta / (n (n-1) dims), the mean share of feature signs that differ
per pair, so layers of different sizes compare ("mean feature sign change",
the paper's table 7); the raw Delta is in the rows.

Layers: default the top conv layer and the layer below the logits (conv5 and
fc7 for ZFNet); a model without a classifier uses the top conv layer only.
Output: ATLAS/analyses/correspondence/RUN.parquet (the SQL view
`correspondence`) and images.png (the images with their part boxes, figure 8
style) in ATLAS/analyses/correspondence/RUN/ or `out`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..pictures import charts as plotting
from ..errors import AtlasError
from ..net.runner import Runner
from ..util.progress import Progress
from ..notebook import ShowsItsFigure
from ..store.manifest import random_weights
from . import common
from .occluder import check_fill, fill_value

COORDINATES = ("input", "original")

# the table's columns, in order (common.table_schema)
COLUMNS = ("run:str spec:str model:str part:str kind:str control_for:str layer:str images:i32 dims:i64 "
           "draws:i32 seed:i64 fill:str delta:f64 delta_std:f64 delta_norm:f64 delta_norm_std:f64 "
           "deltas:list<f64>")


def sign_hamming_score(diffs: torch.Tensor | np.ndarray) -> int:
    """Delta = sum over ordered pairs i != j of the Hamming distance between sign(diffs[i]) and sign(diffs[j])."""
    s = torch.sign(torch.as_tensor(diffs).double()).to(torch.int8)
    if s.dim() != 2:
        raise ValueError("diffs must be (images, dims)")
    total = 0
    for i in range(s.shape[0]):
        for j in range(i + 1, s.shape[0]):
            total += int((s[i] != s[j]).sum())
    return 2 * total


@dataclass
class _Entry:
    ref: common.ImageRef
    boxes: dict[str, tuple[int, int, int, int]]   # part -> (x0, y0, x1, y1) in model-input px


def _where(spec: Path, i: int, ref: Any) -> str:
    return f"spec '{spec}': image {i + 1} ({ref})"


def map_box(box: Sequence[float], original_size: tuple[int, int], pre) -> tuple[float, float, float, float]:
    """A box in original image pixels -> model-input pixels (Preprocess.crop_image's resize and crop)."""
    w, h = original_size
    scale = pre.resize / min(w, h)
    W, H = (w, h)
    if (w, h) != (round(w * scale), round(h * scale)):
        W, H = max(pre.crop, round(w * scale)), max(pre.crop, round(h * scale))
    left, top = (W - pre.crop) // 2, (H - pre.crop) // 2
    sx, sy = W / w, H / h
    x0, y0, x1, y1 = box
    return x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top


def _read_spec(spec_path: Path) -> dict[str, Any]:
    """The spec file's JSON object, with its "images" list."""
    if not spec_path.is_file():
        raise AtlasError(f"spec '{spec_path}' does not exist")
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AtlasError(f"spec '{spec_path}' is not readable JSON: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("images"), list):
        raise AtlasError(f"spec '{spec_path}' must be a JSON object with an \"images\" list")
    return spec


def _image_parts(spec: dict[str, Any], spec_path: Path) -> list[tuple[Any, dict[str, Any]]]:
    """(image, {part: box}) per image, whichever of the two layouts the spec uses."""
    items = spec["images"]
    if len(items) < 2:
        raise AtlasError(f"spec '{spec_path}' lists {len(items)} image(s): the score compares pairs, give at least 2")
    top_parts = spec.get("parts")
    if top_parts is not None and not isinstance(top_parts, dict):
        raise AtlasError(f"spec '{spec_path}': \"parts\" must map part names to one box per image")
    raw: list[tuple[Any, dict[str, Any]]] = []
    for i, it in enumerate(items):
        if isinstance(it, dict):
            if "image" not in it:
                raise AtlasError(f"spec '{spec_path}': image {i + 1} has no \"image\" (an image_id or a path)")
            img, parts = it["image"], dict(it.get("parts") or {})
        else:
            img, parts = it, {}
        if top_parts is not None:
            for name, boxes in top_parts.items():
                if not isinstance(boxes, list) or len(boxes) != len(items):
                    raise AtlasError(f"spec '{spec_path}': part '{name}' needs one box per image "
                                     f"({len(items)} boxes)")
                if name in parts:
                    raise AtlasError(f"{_where(spec_path, i, img)}: part '{name}' is given twice")
                parts[name] = boxes[i]
        raw.append((img, parts))
    return raw


def _spec_image(atlas, spec_path: Path, i: int, img: Any) -> common.ImageRef:
    """Image i of the spec: an image_id, or a path (relative ones from the spec's folder)."""
    if isinstance(img, bool) or not isinstance(img, (int, str)):
        raise AtlasError(f"{_where(spec_path, i, img)}: an image is an image_id (int) or a path (string)")
    if isinstance(img, str):
        p = Path(img)
        img_arg: int | str = str(p if p.is_absolute() else spec_path.parent / p)
    else:
        img_arg = img
    try:
        return common.resolve_image(atlas, img_arg)
    except AtlasError as e:
        raise AtlasError(f"spec '{spec_path}': {e}") from None


def _input_box(atlas, ref: common.ImageRef, b: Any, coords: str, where: str) -> tuple[int, int, int, int]:
    """A part's box checked and, in model-input pixels, (x0, y0, x1, y1); original coordinates are
    mapped through the preprocessing and rounded outwards."""
    S = atlas.image_size
    if (not isinstance(b, (list, tuple)) or len(b) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
        raise AtlasError(f"{where}: a box is [x0, y0, x1, y1] (4 numbers), not {b!r}")
    x0, y0, x1, y1 = (float(v) for v in b)
    if not (x0 < x1 and y0 < y1):
        raise AtlasError(f"{where}: box {list(b)} is empty (need x0 < x1 and y0 < y1)")
    if coords == "original":
        w, h = ref.original_size
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise AtlasError(f"{where}: box {list(b)} lies outside the {w} x {h} px image")
        mx0, my0, mx1, my1 = map_box((x0, y0, x1, y1), ref.original_size, atlas.preprocess)
        box = (math.floor(mx0 + 1e-6), math.floor(my0 + 1e-6), math.ceil(mx1 - 1e-6), math.ceil(my1 - 1e-6))
        if box[0] < 0 or box[1] < 0 or box[2] > S or box[3] > S:
            raise AtlasError(f"{where}: box {list(b)} falls outside the centre crop the model sees "
                             f"(it maps to {list(box)} in the {S} x {S} px model input)")
        return box
    if any(v != int(v) for v in (x0, y0, x1, y1)):
        raise AtlasError(f"{where}: input coordinates are whole pixels, not {list(b)}")
    box = (int(x0), int(y0), int(x1), int(y1))
    if box[0] < 0 or box[1] < 0 or box[2] > S or box[3] > S:
        raise AtlasError(f"{where}: box {list(b)} lies outside the {S} x {S} px model input "
                         "(coordinates: input; use \"coordinates\": \"original\" for original pixels)")
    return box


def load_spec(atlas, spec_path: str | Path) -> tuple[list[_Entry], list[str], str]:
    """(entries, part names in order, coordinates) from a spec file, validated."""
    spec_path = Path(spec_path)
    spec = _read_spec(spec_path)
    coords = spec.get("coordinates", "input")
    if coords not in COORDINATES:
        raise AtlasError(f"spec '{spec_path}': unknown coordinates '{coords}' (use input or original)")
    raw = _image_parts(spec, spec_path)
    names = list(dict.fromkeys(n for _, parts in raw for n in parts))
    if not names:
        raise AtlasError(f"spec '{spec_path}' names no parts (e.g. \"parts\": {{\"nose\": [x0, y0, x1, y1]}})")
    entries: list[_Entry] = []
    for i, (img, parts) in enumerate(raw):
        ref = _spec_image(atlas, spec_path, i, img)
        missing = [n for n in names if n not in parts]
        if missing:
            raise AtlasError(f"{_where(spec_path, i, img)} has no box for part(s) {', '.join(missing)}: "
                             "every part needs a box in every image")
        boxes = {name: _input_box(atlas, ref, parts[name], coords, f"{_where(spec_path, i, img)} part '{name}'")
                 for name in names}
        entries.append(_Entry(ref, boxes))
    dup = common.first_repeated(e.ref.key for e in entries)
    if dup is not None:
        raise AtlasError(f"spec '{spec_path}': image {dup} is listed twice")
    return entries, names, coords


@dataclass
class CorrespondenceResult(ShowsItsFigure):
    run: str
    spec: str
    layers: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    table: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def format_table(self) -> str:
        """Table 7: rows = parts then random controls; per layer the mean feature sign change."""
        labels = list(dict.fromkeys(r["part"] for r in self.rows))
        head = ["Occlusion location"] + [f"{la}" for la in self.layers]
        body = []
        for part in labels:
            line = [part]
            for la in self.layers:
                r = next(r for r in self.rows if r["part"] == part and r["layer"] == la)
                v = f"{r['delta_norm']:.4f}"
                if r["kind"] == "random":
                    v += f" ± {r['delta_norm_std']:.4f}"
                line.append(v)
            body.append(line)
        w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        out = ["  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(head))]
        out.append("  ".join("-" * x for x in w))
        out += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(b)) for b in body]
        return "\n".join(out)

    def summary(self) -> list[str]:
        r0 = self.rows[0]
        lines = [f"mean feature sign change: Delta / (n (n-1) dims), n = {r0['images']} images; "
                 f"random: mean ± std over {max(r['draws'] for r in self.rows)} draws "
                 f"({self.seconds:.1f} s)"]
        lines += common.notes_and_table(self.notes, self.table, "correspondence", self.run)
        if self.figures:
            lines.append(f"figure: {self.figures['images']}")
        return lines


def _layers(atlas, layers: Sequence[str] | str | None, notes: list[str]) -> list[str]:
    """The layers given, else the top conv layer and the layer below the logits (a note says what
    stands in when there is none)."""
    names = [s.strip() for s in layers.split(",") if s.strip()] if isinstance(layers, str) else list(layers or [])
    if not names:
        top = atlas.lmap.conv_layers[-1].name
        deep, note = common.default_deep_layer(atlas)
        names = [top] if deep == top else [top, deep]
        if note:
            notes.append(note.replace("layer 7 replaced by", "no layer 7: only") if deep == top else note)
    return common.check_layers(atlas, names, "the correspondence score")


def _jobs(entries: list[_Entry], parts: list[str], random: int, seed: int, S: int
          ) -> tuple[list[tuple[str, int, list[tuple[int, int, int, int]]]], dict[str, list[str]]]:
    """What to occlude: (label, draw, box per image) for each part, then `random` draws of the
    control per set of box sizes; and the control labels -> the parts each stands for."""
    groups: dict[tuple, list[str]] = {}
    for p in parts:
        sizes = tuple((e.boxes[p][2] - e.boxes[p][0], e.boxes[p][3] - e.boxes[p][1]) for e in entries)
        groups.setdefault(sizes, []).append(p)
    rng = np.random.default_rng(seed)
    jobs = [(p, 0, [e.boxes[p] for e in entries]) for p in parts]
    control_labels = {}
    for sizes, ps in groups.items():
        label = "random" if len(groups) == 1 else f"random ({', '.join(ps)})"
        control_labels[label] = ps
        for r in range(random):
            boxes = []
            for (w, h) in sizes:
                x0, y0 = int(rng.integers(0, S - w + 1)), int(rng.integers(0, S - h + 1))
                boxes.append((x0, y0, x0 + w, y0 + h))
            jobs.append((label, r, boxes))
    return jobs, control_labels


def _occluded_inputs(entries: list[_Entry], jobs, fv: torch.Tensor) -> torch.Tensor:
    """The images themselves, then per job each image with its box filled."""
    xs = [e.ref.x for e in entries]
    for _, _, boxes in jobs:
        for e, (x0, y0, x1, y1) in zip(entries, boxes):
            x = e.ref.x.clone()
            x[:, y0:y1, x0:x1] = fv
            xs.append(x)
    return torch.stack(xs)


def _scores(acts: dict[str, torch.Tensor], names: list[str], jobs, n: int
            ) -> tuple[dict[tuple[str, str], list[int]], dict[str, int]]:
    """Delta per (job label, layer), one per draw, and the feature dimensions per layer."""
    results: dict[tuple[str, str], list[int]] = {}
    dims = {}
    for la in names:
        f = acts[la].double().flatten(1)
        dims[la] = f.shape[1]
        base = f[:n]
        for k, (label, _, _) in enumerate(jobs):
            occ = f[n + k * n:n + (k + 1) * n]
            results.setdefault((label, la), []).append(sign_hamming_score(base - occ))
    return results, dims


def _rows(run: str, spec_path, model: str, labels: list[str], names: list[str], control_labels, results, dims,
          n: int, seed: int, fill: str) -> list[dict[str, Any]]:
    """One table row per part or control and layer: Delta's mean (and spread over the draws), raw
    and per pair and dimension."""
    rows = []
    for label in labels:
        for la in names:
            ds = np.array(results[(label, la)], dtype=np.float64)
            norm = n * (n - 1) * dims[la]
            kind = "random" if label in control_labels else "part"
            std = float(ds.std(ddof=1)) if len(ds) > 1 else (0.0 if kind == "random" else None)
            rows.append({"run": run, "spec": str(spec_path), "model": model, "part": label, "kind": kind,
                         "control_for": ",".join(control_labels[label]) if kind == "random" else None,
                         "layer": la, "images": n, "dims": dims[la], "draws": len(ds), "seed": seed, "fill": fill,
                         "delta": float(ds.mean()), "delta_std": std, "delta_norm": float(ds.mean()) / norm,
                         "delta_norm_std": None if std is None else std / norm, "deltas": ds.tolist()})
    return rows


def correspondence(atlas, spec_path: str | Path, *, layers: Sequence[str] | str | None = None, random: int = 10,
                   seed: int = 0, fill: str = "grey", device: str = "auto", batch_size: int | None = None,
                   out: str | Path | None = None, store: bool = True, figures: bool = True,
                   progress: bool | None = None) -> CorrespondenceResult:
    """Part correspondence scores (table 7) for the images and boxes of a spec; see the module docstring.

    layers  layer names (list or comma string); default the top conv layer and the layer below the logits
    random  random-position draws of the control (0: no control)
    progress  the occluded inputs done, with a rate and an ETA, on stderr (None: on)
    """
    t0 = time.perf_counter()
    atlas = common.open_atlas(atlas)
    check_fill(fill)
    if isinstance(random, bool) or not isinstance(random, (int, np.integer)) or random < 0:
        raise AtlasError(f"--random must be a whole number of draws >= 0, not {random!r}")
    notes: list[str] = []
    names = _layers(atlas, layers, notes)
    entries, parts, coords = load_spec(atlas, spec_path)
    n = len(entries)
    jobs, control_labels = _jobs(entries, parts, random, seed, atlas.image_size)
    xs = _occluded_inputs(entries, jobs, fill_value(atlas.preprocess, fill))
    with Progress(len(xs), "correspondence", "inputs", enabled=progress) as shown:
        acts = Runner(atlas, device).extract(xs, names, batch_size, shown)
    results, dims = _scores(acts, names, jobs, n)
    spec_text = Path(spec_path).read_text()
    run = f"{common.slug(Path(spec_path).stem, 24)}-" + common.short_hash(
        {"spec": spec_text, "layers": names, "random": random, "seed": seed, "fill": fill})
    labels = parts + (list(control_labels) if random else [])
    rows = _rows(run, spec_path, atlas.manifest["model"]["name"], labels, names, control_labels, results, dims,
                 n, seed, fill)
    if coords == "original":
        notes.append("boxes given in original image pixels, mapped through the resize and centre crop")
    res = CorrespondenceResult(run, str(spec_path), names, rows, notes)
    res.warning = random_weights(atlas.manifest["model"])
    res.table, res.figures = common.keep_run(atlas, "correspondence", run, rows, COLUMNS, store=store,
                                             figures=figures, out=out,
                                             draw=lambda folder: render(entries, parts, folder))
    res.seconds = time.perf_counter() - t0
    return res


def render(entries: list[_Entry], parts: list[str], folder: Path) -> dict[str, Path]:
    """The images with their part boxes (figure 8 style), a legend of the parts."""
    from PIL import Image, ImageDraw

    S = entries[0].ref.crop.width
    D = max(1, round(160 / S))
    cols = {p: plotting.PALETTE[i % len(plotting.PALETTE)] for i, p in enumerate(parts)}
    tiles = []
    for e in entries:
        im = e.ref.crop.convert("RGB").resize((S * D, S * D), Image.NEAREST if D > 1 else Image.BILINEAR)
        d = ImageDraw.Draw(im)
        for p, (x0, y0, x1, y1) in e.boxes.items():
            d.rectangle([x0 * D, y0 * D, x1 * D - 1, y1 * D - 1], outline=cols[p], width=2)
        tiles.append(plotting.titled(im, e.ref.name[:28]))
    fig = plotting.titled(plotting.below(plotting.beside(*tiles, pad=8), plotting.legend([(cols[p], p) for p in parts], columns=4)),
                   "Correspondence (Zeiler & Fergus figure 8): the occluded parts")
    return {"images": common.save_png(folder / "images.png", plotting.margin(fig, 10))}
