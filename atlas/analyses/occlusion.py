"""Occlusion sensitivity (Zeiler & Fergus 2014, figure 7): which part of one image the model's
strongest map and its class decision depend on.

A square (atlas.analyses.occluder) is slid over the model input; at each position the occluded
image runs through the model and we record

  (a) the total activation (sum over the map) of the top conv layer's feature
      map -- the channel whose largest activation on the UNoccluded image is the
      largest (ties: the lowest channel) -- or of `layer`'s;
  (b) (once, for the unoccluded image) the DeconvNet projection of that whole
      map (atlas.deconv, mode "map");
  (c) the probability of one class of the model: `label` if given (an output
      index, or one of the model's recorded class names); else the image's true
      class -- its dataset label, when that is one of the model's own recorded
      class names (an `atlas train` checkpoint records them; see
      common.true_class); else the correct class is unknown and the most
      probable class of the unoccluded image is charted, labelled as such
      (class_source "most_probable"), never as the true label;
  (d) the most probable class.

This module is the run: it checks the options, reads the unoccluded image, chooses the map and the
class, and stores what it found. The passes over the positions (batched, and windowed where the
square cannot change a map: atlas.analyses.occlusion_forward) are where the time goes, so they are
a module of their own; so are the result with its table rows (occlusion_result) and figure 7
(occlusion_figure).

Output: ATLAS/analyses/occlusion/RUN.parquet (the SQL view `occlusion`: one row per position with
the raw maps; dataset_label is the image's label, true_class the model's class that is it (null:
the correct class is unknown), class_index / class_name / class_source the class whose probability
is charted) and the figure panels as PNGs (figure.png, and image.png, activation.png,
projection.png, probability.png, top_class.png) in ATLAS/analyses/occlusion/RUN/ or `out`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import AtlasError
from ..net.runner import Runner
from ..util.progress import Progress
from ..store.manifest import random_weights
from . import common
from .occluder import check_fill, default_geometry, fill_rgb, fill_value, positions
from .occlusion_figure import render
from .occlusion_forward import check_method, occlusion_forward
from .occlusion_result import COLUMNS, OcclusionResult


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class _Unoccluded:
    """What the unoccluded image gives: the followed layer's maps, the strongest one, and the class
    probabilities (None without a classifier)."""

    maps: torch.Tensor                  # (C, H, W)
    channel: int
    activation: float                   # the channel's total activation
    probabilities: np.ndarray | None    # (K,)


@dataclass
class _Charted:
    """The class whose probability is charted, and why that one."""

    index: int
    source: str                         # given | true | most_probable
    reason: str | None                  # why the correct class is unknown, when it is
    probability: float                  # its probability for the unoccluded image
    top: int                            # the most probable class of the unoccluded image


def _geometry(S: int, size: int | None, stride: int | None) -> tuple[int, int]:
    """The square's size and stride: the defaults for an S px input, or the ones given, checked."""
    dsize, dstride = default_geometry(S)
    size = dsize if size is None else int(size)
    stride = dstride if stride is None else int(stride)
    if not 1 <= size <= S:
        raise AtlasError(f"occluder size {size} px does not fit the {S} x {S} px model input (use 1..{S})")
    if not 1 <= stride <= S:
        raise AtlasError(f"stride {stride} px is out of range for the {S} x {S} px model input (use 1..{S})")
    return size, stride


def _followed_layer(lmap, layer: str | None) -> str:
    """The conv layer whose strongest map is followed: the one given, else the top conv layer."""
    convs = lmap.conv_layers
    if layer is None:
        return convs[-1].name
    lmap.resolve([layer])  # unknown -> AtlasError listing the layers
    if lmap.by_name[layer].kind != "conv":
        raise AtlasError(f"occlusion follows a conv layer's feature map; '{layer}' is a fc layer "
                         f"(use one of {', '.join(c.name for c in convs)})")
    return layer


def _unoccluded(runner: Runner, ref: common.ImageRef, layer: str, has_cls: bool) -> _Unoccluded:
    """The unoccluded image through the model: its strongest map of `layer`, its probabilities."""
    logits_layer = runner.lmap.layers[-1].name
    with torch.no_grad():
        base = runner.extract(ref.x[None], [layer] + ([logits_layer] if has_cls else []))
    amap = base[layer][0]
    channel = int(torch.argmax(amap.flatten(1).max(1).values))
    probs = softmax(base[logits_layer][0].double().numpy()[None])[0] if has_cls else None
    return _Unoccluded(amap, channel, float(amap[channel].sum()), probs)


def _charted_class(atlas, ref: common.ImageRef, p0: np.ndarray, names: list[str], notes: list[str]) -> _Charted:
    """The given class, else the true one, else (saying so in a note) the most probable one."""
    top = int(p0.argmax())
    reason = None
    if ref.class_index is not None:
        index, source = ref.class_index, ref.class_source
    else:
        reason = common.unknown_class_reason(atlas, ref)
        index, source = top, "most_probable"
        notes.append(f"the correct class is unknown: {reason}; charting the most probable class of the "
                     f"unoccluded image ({names[top]}) instead")
    return _Charted(index, source, reason, float(p0[index]), top)


def _map_projection(atlas, ref: common.ImageRef, base: _Unoccluded, layer: str, notes: list[str]):
    """(b) the DeconvNet projection of the whole followed map of the unoccluded image, or None (with
    a note) when the model cannot be projected."""
    try:
        from ..deconv import Request, project_images

        yx = int(torch.argmax(base.maps[base.channel]))
        H = base.maps.shape[-1]
        req = Request(0, layer, base.channel, yx // H, yx % H)
        return project_images(atlas.lmap, ref.x[None], [req], mode="map").images[0].detach().float().cpu()
    except AtlasError as e:
        notes.append(f"no projection: {e}")
        return None


def _add_class_maps(res: OcclusionResult, logits: np.ndarray, charted: _Charted, ref: common.ImageRef) -> None:
    """(c) and (d): the charted class's probability and the most probable class at each position."""
    n = res.n
    probs = softmax(logits)
    res.probability = probs[:, charted.index].reshape(n, n)
    res.top_class = probs.argmax(1).reshape(n, n)
    res.probability_base, res.top_class_base = charted.probability, charted.top
    res.class_index, res.class_source, res.unknown_reason = charted.index, charted.source, charted.reason
    res.true_index = ref.true_index


def occlude(atlas, image, *, size: int | None = None, stride: int | None = None, fill: str = "grey",
            label: int | str | None = None, layer: str | None = None, batch_size: int | None = None,
            device: str = "auto", out: str | Path | None = None, method: str = "incremental",
            store: bool = True, figures: bool = True, progress: bool | None = None) -> OcclusionResult:
    """Occlusion sensitivity maps of one image (figure 7); see the module docstring.

    image   an image_id of the atlas (int, or a string of digits) or a path to any image file
    size, stride   in model-input pixels (default: 50 / 8 at 224 px, proportional otherwise)
    label   the class whose probability is mapped: an output index, or one of the model's recorded
            class names; default the image's true class when known (its dataset label is one of the
            model's recorded class names), else the most probable class (the correct one is unknown)
    layer   the conv layer whose strongest map is followed (default: the top conv layer)
    out     folder for the PNGs (default ATLAS/analyses/occlusion/RUN/); the table is always
            written into the atlas
    progress  the positions done, with a rate and an ETA, on stderr (None: on; atlas.util.progress.Progress)
    """
    atlas = common.open_atlas(atlas)
    S = atlas.image_size
    check_fill(fill)
    check_method(method)
    size, stride = _geometry(S, size, stride)
    layer = _followed_layer(atlas.lmap, layer)
    has_cls, why = common.classifier_status(atlas)
    if label is not None and not has_cls:
        common.require_classifier(atlas, "the probability map of a given class")
    ref = common.resolve_image(atlas, image, label)
    notes: list[str] = []
    names = common.class_names(atlas) if has_cls else []
    runner = Runner(atlas, device)
    base = _unoccluded(runner, ref, layer, has_cls)
    charted = _charted_class(atlas, ref, base.probabilities, names, notes) if has_cls else None
    if not has_cls:
        notes.append(f"no probability or class maps: the model has no classifier ({why}); "
                     "the activation maps are still made")
    n, boxes = positions(S, size, stride)
    with Progress(len(boxes), "occlude", "positions", enabled=progress) as shown:
        maps = occlusion_forward(runner, ref.x, boxes, layer=layer, channel=base.channel,
                                 fill=fill_value(atlas.preprocess, fill), method=method,
                                 batch_size=batch_size, logits=has_cls, progress=shown)
    projection = _map_projection(atlas, ref, base, layer, notes)
    res = OcclusionResult(
        run="", image=ref.key, image_id=ref.image_id, path=ref.path, model=atlas.manifest["model"]["name"],
        image_size=S, layer=layer, channel=base.channel, size=size, stride=stride, fill=fill, n=n, boxes=boxes,
        activation=maps.activation.reshape(n, n), activation_base=base.activation, notes=notes, method=method,
        batch=maps.batch, device=str(runner.device), seconds=maps.seconds, plan=maps.plan.describe(),
        projection=projection, class_names=names, fill_rgb=fill_rgb(atlas.preprocess, fill))
    if charted is not None:
        _add_class_maps(res, maps.logits, charted, ref)
    res.warning = random_weights(atlas.manifest["model"])
    res.dataset_label = ref.label
    lab = f"-{common.slug(str(label), 16)}" if label is not None else ""
    res.run = f"{ref.slug}-{layer}-s{size}-t{stride}-{fill}{lab}"
    res.table, res.figures = common.keep_run(atlas, "occlusion", res.run, res.rows() if store else [], COLUMNS,
                                             store=store, figures=figures, out=out,
                                             draw=lambda folder: render(res, ref.crop, folder))
    return res
