"""Figure 7 of Zeiler & Fergus 2014 drawn from an occlusion result: the image with the square,
the activation map, the projection of the followed map, the probability map and the label map,
each a PNG and all of them side by side in figure.png.

The input panel's caption claims "true label" only for a class known to be the image's own (see
common.true_class); otherwise it says which class is charted and that the correct one is unknown.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..choices import OCCLUSION_PANELS
from ..pictures import charts as plotting
from ..pictures.drawing import normalise
from . import common
from .occlusion_result import OcclusionResult


def image_caption(res: OcclusionResult) -> str:
    """The input panel's caption: what the charted class is, claiming "true label" only for a class
    known to be the image's own (see common.true_class)."""
    sub = f"{Path(res.path).name}\n{res.size} px {res.fill} square (one position shown), stride {res.stride}"
    if res.class_index is not None:
        if res.class_source == "true":
            sub += f"\ntrue label: {res.class_name} (p = {res.probability_base:.3f})"
        elif res.class_source == "given":
            sub += f"\ngiven class: {res.class_name} (p = {res.probability_base:.3f})"
            if res.true_index is not None and res.true_index != res.class_index:
                sub += f"\ntrue label: {res.true_class}"
        else:
            sub += f"\nmost probable class: {res.class_name} (p = {res.probability_base:.3f})"
            sub += "\ncorrect class unknown"
        if res.dataset_label is not None and res.true_index is None:
            sub += f"\ndataset label: {res.dataset_label} (not a known class of the model)"
    return sub


PROBABILITY_WHAT = {"true": "probability of the true class", "given": "probability of the given class",
                    "most_probable": "probability of the most probable class (correct class unknown)"}


def _scale(res: OcclusionResult) -> int:
    """The display scale: panels about 200 px wide."""
    return max(1, round(200 / res.image_size))


def _map_area(res: OcclusionResult, arr: np.ndarray, vmin: float, vmax: float):
    """A heat map over the positions, one stride-sized cell each, cut to the image's extent."""
    D = _scale(res)
    W = res.image_size * D
    return plotting.heatmap(arr, vmin, vmax, res.stride * D).crop((0, 0, W, W))


def _image_panel(res: OcclusionResult, crop):
    """(a) the image, with the occluder drawn at one position (the centre), and the caption."""
    from PIL import Image, ImageDraw

    D = _scale(res)
    W = res.image_size * D
    img = crop.convert("RGB").resize((W, W), Image.NEAREST if D > 1 else Image.BILINEAR)
    d = ImageDraw.Draw(img)
    k = (res.n // 2) * res.n + res.n // 2
    y0, x0, y1, x1 = res.boxes[k].tolist()
    d.rectangle([x0 * D, y0 * D, x1 * D - 1, y1 * D - 1], fill=tuple(res.fill_rgb), outline=(255, 255, 255), width=1)
    return plotting.titled(img, "(a) input image", image_caption(res), width=W)


def _activation_panel(res: OcclusionResult):
    """(b) the followed map's total activation over the positions."""
    W = res.image_size * _scale(res)
    lo, hi = float(res.activation.min()), float(res.activation.max())
    hm = _map_area(res, res.activation, lo, hi)
    return plotting.titled(plotting.beside(hm, plotting.colorbar(lo, hi, W), pad=4),
                           f"(b) {res.layer} feature map {res.channel}",
                           f"total activation vs square position\nunoccluded: {res.activation_base:.4g}")


def _projection_panel(res: OcclusionResult):
    """(c) the DeconvNet projection of the whole followed map of the unoccluded image."""
    from PIL import Image

    D = _scale(res)
    W = res.image_size * D
    # the atlas's display rule (zero mid-grey, the 99.5th percentile of |v|): panel (c) reads like its other
    # projection pictures
    pim = Image.fromarray(normalise(res.projection)).resize((W, W), Image.NEAREST if D > 1 else Image.BILINEAR)
    return plotting.titled(pim, f"(c) projection of {res.layer} map {res.channel}",
                           "DeconvNet, unoccluded image\n(grey = 0, scaled by max |value|)")


def _probability_panel(res: OcclusionResult):
    """(d) the charted class's probability over the positions, in the map's own range (a flat map:
    0..max), so that small changes show; the scale gives the values."""
    W = res.image_size * _scale(res)
    plo, phi = float(res.probability.min()), float(res.probability.max())
    if phi - plo <= 1e-12:
        plo = 0.0
    hp = _map_area(res, res.probability, plo, max(phi, 1e-12))
    return plotting.titled(plotting.beside(hp, plotting.colorbar(plo, max(phi, 1e-12), W), pad=4),
                           f"(d) p({res.class_name})", PROBABILITY_WHAT[res.class_source] + "\nvs square position")


def _label_map_panel(res: OcclusionResult):
    """(e) the most probable class at each position: the ten commonest in colours, the rest grey."""
    from PIL import Image

    D = _scale(res)
    W = res.image_size * D
    vals, counts = np.unique(res.top_class, return_counts=True)
    order = [int(vals[i]) for i in np.argsort(-counts, kind="stable")]
    shown = order[:10]
    cols = {c: plotting.PALETTE[i % len(plotting.PALETTE)] for i, c in enumerate(shown)}
    other = (60, 60, 60)
    rgb = np.zeros(res.top_class.shape + (3,), np.uint8)
    for c in order:
        rgb[res.top_class == c] = cols.get(c, other)
    lm = Image.fromarray(rgb).resize((res.n * res.stride * D,) * 2, Image.NEAREST).crop((0, 0, W, W))
    entries = [(cols[c], res.class_names[c] + (" (true)" if c == res.true_index else "")) for c in shown]
    if len(order) > len(shown):
        entries.append((other, f"{len(order) - len(shown)} other classes"))
    return plotting.titled(plotting.below(lm, plotting.legend(entries, columns=1, max_width=W)),
                           "(e) most probable class", "label map vs square position")


# The panels (a) to (e), in the paper's order: the order figure.png sets them side by side and the order
# the exported page lists their files in (atlas/export/gather.py repeats it, so that the export does not
# import torch for it; tests/test_pictures_display.py holds the two equal).
PANELS = OCCLUSION_PANELS


def render(res: OcclusionResult, crop, folder: Path) -> dict[str, Path]:
    """The panels as PNGs (figure.png holds them all, in the paper's order: PANELS)."""
    made: dict[str, Any] = {"image": _image_panel(res, crop), "activation": _activation_panel(res)}
    if res.projection is not None:
        made["projection"] = _projection_panel(res)
    if res.probability is not None:
        made["probability"] = _probability_panel(res)
        made["top_class"] = _label_map_panel(res)
    panels = {name: made[name] for name in PANELS if name in made}
    folder = Path(folder)
    files = {}
    for name, im in panels.items():
        files[name] = common.save_png(folder / f"{name}.png", plotting.margin(im, 6))
    shown = Path(res.path).name if res.image_id is None else f"image {res.image_id} ({Path(res.path).name})"
    head = plotting.titled(plotting.beside(*panels.values(), pad=14), f"Occlusion sensitivity: {res.model}, {shown}",
                           "Zeiler & Fergus figure 7: a square slid over the image; each map is indexed by the "
                           "square's centre")
    return {"figure": common.save_png(folder / "figure.png", plotting.margin(head, 10)), **files}
