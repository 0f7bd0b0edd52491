"""Invariance to translation, scale and rotation (Zeiler & Fergus 2014, figure 5).

Each image (the cropped model input, S x S px) is transformed by

  translate  vertical shift in px, positive = down: -60..60 in steps of 10 at 224 px (the
             paper's range), scaled to S for other inputs (e.g. -9..9 px at 32 px)
  scale      zoom about the centre by 1.0, 1.1, ..., 1.8 (resize by the factor, centre crop S)
  rotate     counter-clockwise about the centre, 0..350 degrees in steps of 10

(`amounts` overrides a range). Pixels the transformation brings in from outside
the image get the fill colour: "mean" (default), the preprocessing's mean colour,
an all-zero model input; or "grey", the mid-grey pixel. Amount 0 / 1.0 is the
untransformed image itself (distance exactly 0).

For each image, transformation and amount we record, at each layer, the
Euclidean distance between the feature vectors (the whole post-ReLU map,
flattened, for a conv layer) of the original and the transformed image, that
distance divided by the original's norm (`distance_rel`), and -- when the model
has a classifier -- the probability of one class per image: the class given in
`labels` (an output index or a recorded class name), else the image's true
class, i.e. its dataset label when that is one of the model's own recorded
class names (common.true_class), else -- the correct class being unknown --
the most probable class of the untransformed image, labelled as such
(class_source "most_probable"), never as the true class. Layers: default the paper's layer 1
and layer 7, i.e. conv1 and the fc layer below the logits (fc7 for ZFNet); for
a model without a classifier (weights file gone, or no fc layers) the last conv
layer stands in for layer 7 and the result says so.

Output: ATLAS/analyses/invariance/RUN.parquet (the SQL view `invariance`, one
row per image, transformation, amount and layer) and PNG plots, drawn with PIL:
one panel per transformation and quantity, one curve per image
(TRANSFORM-QUANTITY.png), and all of them in figure.png (rows: transformations,
columns: quantities, as in the paper), in ATLAS/analyses/invariance/RUN/ or `out`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import AtlasError
from ..util.progress import Progress
from ..notebook import ShowsItsFigure
from . import common
from ..pictures import charts as plotting
from ..net.runner import Runner
from ..choices import INVARIANCE_FILLS as FILLS
from ..store.manifest import random_weights

TRANSFORMS = ("translate", "scale", "rotate")
UNITS = {"translate": "px", "scale": "factor", "rotate": "degrees"}
TITLES = {"translate": "Vertical translation", "scale": "Scale", "rotate": "Rotation"}
XLABELS = {"translate": "vertical shift (px, + = down)", "scale": "scale factor", "rotate": "rotation (degrees)"}

# the table's columns, in order (common.table_schema)
COLUMNS = ("run:str image:str image_id:i32 path:str model:str dataset_label:str true_class_index:i32 "
           "true_class:str class_index:i32 class_name:str class_source:str transform:str amount:f64 unit:str "
           "fill:str layer:str distance:f64 distance_rel:f64 probability:f64 top_class:i32 top_class_name:str")


def default_amounts(transform: str, image_size: int) -> list[float]:
    """The paper's ranges: translation -60..60 px at 224 (proportional), scale 1.0..1.8, rotation 0..350."""
    if transform == "translate":
        return sorted({int(round(v)) for v in np.linspace(-60, 60, 13) * image_size / 224})
    if transform == "scale":
        return [round(1.0 + 0.1 * i, 2) for i in range(9)]
    if transform == "rotate":
        return [float(d) for d in range(0, 360, 10)]
    raise AtlasError(f"unknown transformation '{transform}': choose from {', '.join(TRANSFORMS)}")


def _identity(transform: str, amount: float) -> bool:
    return (transform == "scale" and amount == 1.0) or (transform != "scale" and amount == 0)


def transform_image(crop, transform: str, amount: float, fill: tuple[int, int, int]):
    """The S x S crop transformed (a new PIL image of the same size)."""
    from PIL import Image

    S = crop.width
    if _identity(transform, amount):
        return crop.copy()
    if transform == "translate":
        dy = int(round(amount))
        return crop.transform(crop.size, Image.AFFINE, (1, 0, 0, 0, 1, -dy), resample=Image.NEAREST, fillcolor=fill)
    if transform == "scale":
        m = max(1, int(round(S * amount)))
        big = crop.resize((m, m), Image.BILINEAR)
        if m >= S:
            o = (m - S) // 2
            return big.crop((o, o, o + S, o + S))
        out = Image.new("RGB", (S, S), fill)  # a factor below 1 shrinks the image into the fill colour
        o = (S - m) // 2
        out.paste(big, (o, o))
        return out
    if transform == "rotate":
        return crop.rotate(float(amount), resample=Image.BILINEAR, fillcolor=fill)
    raise AtlasError(f"unknown transformation '{transform}': choose from {', '.join(TRANSFORMS)}")


def _fill_colour(preprocess, fill: str) -> tuple[int, int, int]:
    if fill == "mean":
        return tuple(int(round(float(v) * 255)) for v in preprocess.mean.flatten())
    if fill == "grey":
        return (128, 128, 128)
    raise AtlasError(f"unknown fill '{fill}': choose one of {', '.join(FILLS)}")


def _parse_list(v, what: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return [str(s) for s in v]


@dataclass
class InvarianceResult(ShowsItsFigure):
    run: str
    images: list[str]
    layers: list[str]
    transforms: list[str]
    rows: list[dict[str, Any]] = field(repr=False)
    notes: list[str] = field(default_factory=list)
    # image -> (class index, class name, class source: given | true | most_probable), for the probability
    charted: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    table: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def curves(self, transform: str, quantity: str) -> dict[str, tuple[list[float], list[float]]]:
        """image -> (amounts, values) for quantity 'probability' or a layer name (distance)."""
        out: dict[str, tuple[list[float], list[float]]] = {}
        layer = self.layers[0] if quantity == "probability" else quantity
        for r in self.rows:
            if r["transform"] == transform and r["layer"] == layer:
                v = r["probability"] if quantity == "probability" else r["distance"]
                xs, ys = out.setdefault(r["image"], ([], []))
                xs.append(r["amount"])
                ys.append(float("nan") if v is None else v)
        return out

    def summary(self) -> list[str]:
        lines = [f"invariance of {len(self.images)} image(s) to {', '.join(self.transforms)} at layers "
                 f"{', '.join(self.layers)} ({self.seconds:.1f} s)"]
        has_p = any(r["probability"] is not None for r in self.rows)
        p_head = "p(true)" if self.charted and all(v[2] == "true" for v in self.charted.values()) else "p(class)"
        head = ["transform", "amount"] + [f"dist {la}" for la in self.layers] + ([p_head] if has_p else [])
        table = []
        for t in self.transforms:
            amounts = sorted({r["amount"] for r in self.rows if r["transform"] == t})
            for a in amounts:
                rs = [r for r in self.rows if r["transform"] == t and r["amount"] == a]
                row = [t, f"{a:g}"]
                for la in self.layers:
                    row.append(f"{np.mean([r['distance'] for r in rs if r['layer'] == la]):.4g}")
                if has_p:
                    ps = [r["probability"] for r in rs if r["layer"] == self.layers[0] and r["probability"] is not None]
                    row.append(f"{np.mean(ps):.3f}" if ps else "")
                table.append(row)
        w = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(head)]
        lines.append("mean over images:")
        lines.append("  " + "  ".join(h.rjust(w[i]) for i, h in enumerate(head)))
        for r in table:
            lines.append("  " + "  ".join(c.rjust(w[i]) for i, c in enumerate(r)))
        for key, (_, name, source) in self.charted.items():
            lines.append(f"class charted for {key}: {name} ({SOURCE_WORDS[source]})")
        lines += common.notes_and_table(self.notes, self.table, "invariance", self.run)
        if self.figures:
            lines.append(f"figures: {self.figures['figure']} (+ {len(self.figures) - 1} panels)")
        return lines


# what a charted class is, in words that claim no more than is known
SOURCE_WORDS = {"true": "the image's true class", "given": "the class given",
                "most_probable": "most probable for the untransformed image; the correct class is unknown"}


def _check_transforms(transforms: Sequence[str] | str) -> list[str]:
    transforms = _parse_list(transforms, "transforms")
    if not transforms:
        raise AtlasError("no transformations given: choose from translate, scale, rotate")
    for t in transforms:
        if t not in TRANSFORMS:
            raise AtlasError(f"unknown transformation '{t}': choose from {', '.join(TRANSFORMS)}")
    return transforms


def _given_amounts(t: str, given, S: int) -> list[float]:
    """Amounts given for transformation t, checked: numbers, a positive scale, a translation in view."""
    try:
        vals = [float(v) for v in given]
    except (TypeError, ValueError):
        raise AtlasError(f"amounts for {t} must be numbers, not {given!r}") from None
    if not vals:
        raise AtlasError(f"no amounts given for {t}")
    if t == "scale" and min(vals) <= 0:
        raise AtlasError(f"scale factors must be positive, not {min(vals)}")
    if t == "translate" and max(abs(v) for v in vals) >= S:
        big = max(abs(v) for v in vals)
        raise AtlasError(f"a translation of {big:g} px moves the {S} px image out of view")
    return vals


def _amounts(transforms: list[str], amounts: dict[str, Sequence[float]] | None, S: int) -> dict[str, list[float]]:
    """Per transformation the amounts given, else the paper's range."""
    out: dict[str, list[float]] = {}
    for t in transforms:
        given = (amounts or {}).get(t)
        out[t] = _given_amounts(t, given, S) if given is not None else default_amounts(t, S)
    return out


def _distance_layers(atlas, layers: Sequence[str] | str | None, notes: list[str]) -> list[str]:
    """The layers given, else the paper's layer 1 and layer 7 (a note says what stands in for 7)."""
    names = _parse_list(layers, "layers")
    if not names:
        deep, note = common.default_deep_layer(atlas)
        names = [atlas.lmap.conv_layers[0].name, deep]
        if note:
            notes.append(note)
    return common.check_layers(atlas, names, "the feature distance")


def _images(atlas, images, labels: Sequence | None, has_cls: bool) -> list[common.ImageRef]:
    """The images resolved with their given classes; each image once."""
    if labels is not None:
        if not has_cls:
            common.require_classifier(atlas, "the probability of a given class")
        labels = _parse_list(labels, "labels") if isinstance(labels, str) else list(labels)
    refs = common.resolve_images(atlas, images, labels)
    dup = common.first_repeated(r.key for r in refs)
    if dup is not None:
        raise AtlasError(f"image {dup} is given twice")
    return refs


def _transformed(atlas, ref: common.ImageRef, plan: list[tuple[str, float]], fillc) -> torch.Tensor:
    """The model inputs: the image itself, then one per (transformation, amount) of the plan."""
    xs = [ref.x] + [atlas.preprocess.to_tensor(transform_image(ref.crop, t, a, fillc)) for t, a in plan]
    return torch.stack(xs)


def _chart(atlas, ref: common.ImageRef, logits: torch.Tensor, cls_names: list[str],
           charted: dict[str, tuple[int, str, str]], unknown: dict[str, list[str]]) -> tuple[list, list]:
    """(probability of the image's charted class, most probable class) per input, untransformed first.

    The charted class -- given, else true, else the most probable of the untransformed image (its
    reason collected in `unknown`) -- is recorded in `charted`."""
    p = torch.softmax(logits.double(), 1)
    top = p.argmax(1).tolist()
    if ref.class_index is not None:
        ci, source = ref.class_index, ref.class_source
    else:
        ci, source = top[0], "most_probable"
        unknown.setdefault(common.unknown_class_reason(atlas, ref), []).append(ref.name)
    charted[ref.key] = (ci, cls_names[ci], source)
    return p[:, ci].tolist(), top


def _image_rows(acts: dict[str, torch.Tensor], image: dict[str, Any], layers: list[str],
                plan: list[tuple[str, float]], fill: str, probs: list | None, top: list | None,
                cls_names: list[str]) -> list[dict[str, Any]]:
    """One table row per layer and (transformation, amount): the image's columns, then the distance
    of the transformed input's features from the original's, and the class columns."""
    rows = []
    for la in layers:
        f = acts[la].double().flatten(1)
        d = (f[1:] - f[0:1]).norm(dim=1).tolist()
        norm0 = float(f[0].norm())
        for k, (t, a) in enumerate(plan):
            rows.append({
                **image, "transform": t, "amount": float(a),
                "unit": UNITS[t], "fill": fill, "layer": la, "distance": d[k],
                "distance_rel": d[k] / norm0 if norm0 > 0 else None,
                "probability": None if probs is None else probs[k + 1],
                "top_class": None if top is None else top[k + 1],
                "top_class_name": None if top is None else cls_names[top[k + 1]],
            })
    return rows


def _unknown_notes(unknown: dict[str, list[str]]) -> list[str]:
    """One note per reason a correct class is unknown, naming the images it applies to."""
    notes = []
    for reason, imgs in unknown.items():
        shown = ", ".join(imgs[:4]) + (f" and {len(imgs) - 4} more" if len(imgs) > 4 else "")
        notes.append(f"the correct class of {shown} is unknown: {reason}; charting the most probable class "
                     "of the untransformed image instead")
    return notes


def invariance(atlas, images: Sequence[int | str | Path], *, transforms: Sequence[str] | str = TRANSFORMS,
               layers: Sequence[str] | str | None = None, labels: Sequence | None = None,
               amounts: dict[str, Sequence[float]] | None = None, fill: str = "grey", device: str = "auto",
               batch_size: int | None = None, out: str | Path | None = None, store: bool = True,
               figures: bool = True, progress: bool | None = None) -> InvarianceResult:
    """Feature distance and class probability under transformations (figure 5); see the module docstring.

    images      image_ids and/or image files
    transforms  any of translate, scale, rotate (list or comma string)
    layers      layers for the distances (default: conv1 and the layer below the logits)
    labels      one class of the model (output index or recorded class name) per image, or one for all;
                default the image's true class when known, else its most probable class (said so)
    amounts     {transform: amounts} to override the paper's ranges
    progress    the inputs done (each image and its transformed copies), rate and ETA, on stderr (None: on)
    """
    t0 = time.perf_counter()
    atlas = common.open_atlas(atlas)
    transforms = _check_transforms(transforms)
    if fill not in FILLS:
        raise AtlasError(f"unknown fill '{fill}': choose one of {', '.join(FILLS)}")
    amts = _amounts(transforms, amounts, atlas.image_size)
    notes: list[str] = []
    names = _distance_layers(atlas, layers, notes)
    has_cls, why = common.classifier_status(atlas)
    refs = _images(atlas, images, labels, has_cls)
    logits_layer = atlas.lmap.layers[-1].name if has_cls else None
    if not has_cls:
        notes.append(f"no class probabilities: the model has no classifier ({why})")
    unknown: dict[str, list[str]] = {}  # reason -> images whose correct class it leaves unknown
    charted: dict[str, tuple[int, str, str]] = {}
    runner = Runner(atlas, device)
    fillc = _fill_colour(atlas.preprocess, fill)
    cls_names = common.class_names(atlas) if has_cls else []
    model_name = atlas.manifest["model"]["name"]
    want = list(dict.fromkeys(names + ([logits_layer] if logits_layer else [])))
    plan = [(t, a) for t in transforms for a in amts[t]]
    rows: list[dict[str, Any]] = []
    shown = Progress(len(refs) * (1 + len(plan)), "invariance", "inputs", enabled=progress)
    for ref in refs:
        acts = runner.extract(_transformed(atlas, ref, plan, fillc), want, batch_size, shown)
        probs = top = None
        if logits_layer:
            probs, top = _chart(atlas, ref, acts[logits_layer], cls_names, charted, unknown)
        ci, cname, source = charted.get(ref.key, (None, None, None))
        image = {"run": "", "image": ref.key, "image_id": ref.image_id, "path": ref.path, "model": model_name,
                 "dataset_label": ref.label, "true_class_index": ref.true_index if logits_layer else None,
                 "true_class": cls_names[ref.true_index] if logits_layer and ref.true_index is not None
                 else None, "class_index": ci, "class_name": cname, "class_source": source}
        rows += _image_rows(acts, image, names, plan, fill, probs, top, cls_names)
    shown.close()
    notes += _unknown_notes(unknown)
    keys = [r.key for r in refs]
    run = f"n{len(refs)}-" + common.short_hash({"images": keys, "classes": [r.given_index for r in refs],
                                                 "t": transforms, "a": amts, "layers": names, "fill": fill})
    for r in rows:
        r["run"] = run
    res = InvarianceResult(run, keys, names, transforms, rows, notes, charted)
    res.warning = random_weights(atlas.manifest["model"])
    res.table, res.figures = common.keep_run(atlas, "invariance", run, rows, COLUMNS, store=store,
                                             figures=figures, out=out, draw=lambda folder: render(res, refs, folder))
    res.seconds = time.perf_counter() - t0
    return res


def render(res: InvarianceResult, refs, folder: Path) -> dict[str, Path]:
    """One panel per transformation and quantity (a curve per image); figure.png holds them all."""
    colours = {r.key: plotting.PALETTE[i % len(plotting.PALETTE)] for i, r in enumerate(refs)}
    short = {"true": "true class", "given": "given class", "most_probable": "most probable; correct unknown"}
    names = {r.key: r.name + (f": p({res.charted[r.key][1]}), {short[res.charted[r.key][2]]}"
                              if r.key in res.charted else (f" (label {r.label})" if r.label else ""))
             for r in refs}
    has_p = any(r["probability"] is not None for r in res.rows)
    sources = {v[2] for v in res.charted.values()}
    p_what = ("the true class" if sources == {"true"} else
              "the given class" if sources == {"given"} else
              "the most probable class (correct class unknown)" if sources == {"most_probable"} else
              "each image's class (see the legend)")
    quantities = list(res.layers) + (["probability"] if has_p else [])
    files: dict[str, Path] = {}
    grid = []
    for t in res.transforms:
        row = []
        for q in quantities:
            curves = res.curves(t, q)
            series = [(names[k], colours[k], xs, ys) for k, (xs, ys) in curves.items()]
            if q == "probability":
                kw = dict(title=f"{TITLES[t]}: p(" + ("true class" if sources == {"true"} else "class") + ")",
                          ylabel="probability", ylim=(0.0, 1.0))
            else:
                kw = dict(title=f"{TITLES[t]}: {q} distance", ylabel="Euclidean distance")
            im = plotting.line_plot(series, xlabel=XLABELS[t], **kw)
            files[f"{t}-{q}"] = common.save_png(folder / f"{t}-{q}.png", plotting.margin(im, 6))
            row.append(plotting.line_plot(series, xlabel=XLABELS[t], show_legend=False, **kw))
        grid.append(plotting.beside(*row, pad=10))
    lg = plotting.legend([(colours[r.key], names[r.key]) for r in refs], columns=4, max_width=grid[0].width)
    fig = plotting.titled(plotting.below(*grid, lg, pad=10), "Invariance (Zeiler & Fergus figure 5)",
                   "distance between the feature vectors of the original and the transformed image"
                   + (f"; probability of {p_what}" if has_p else "")
                   + ("\n" + "\n".join(res.notes) if res.notes else ""))
    return {"figure": common.save_png(folder / "figure.png", plotting.margin(fig, 10)), **files}
