"""The paper's analyses on an atlas: `occlude`, `invariance`, `correspondence`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .base import (CONTEXT, CommaList, atlas_argument, batch_size_option, device_option, fill_option,
                   format_option, layers_option, main, out_option, progress_option, seed_option, _open)

# Without --format an analysis prints its summary (a few lines), not every row (an occlusion run has one per
# square position, 784 at 224 px); with it, the rows of its Parquet table, then the summary.
rows_format_option = format_option(default=None, help="Print the result's rows (its Parquet table) as an aligned "
                                   "table, CSV or strict JSON, then the summary with the paths (on stderr with CSV "
                                   "and JSON, so stdout stays parseable)  [default: the summary alone]")


def _plain(v):
    """A value strict JSON (and CSV) can hold: NaN and infinities become null, numpy scalars Python ones."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def emit(rows: list[dict], summary: list[str], fmt: str | None, warning: str | None = None) -> None:
    """The summary alone (no --format), or the rows, then the summary (stderr for CSV and JSON); an atlas of
    random weights says so first, on stderr."""
    if warning:
        click.echo(warning, err=True)
    if fmt is None:
        click.echo("\n".join(summary))
        return
    from ..util.output import render_dicts

    rows = [{k: _plain(v) for k, v in r.items()} for r in rows]
    if fmt == "json":
        # render_dicts would turn a list cell (correspondence's per-draw deltas) into a string
        click.echo(json.dumps(rows, indent=2, allow_nan=False))
    else:
        click.echo(render_dicts(rows, fmt))
    click.echo("\n".join(summary), err=fmt != "table")


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("image")
@click.option("--occluder-size", type=int, metavar="PIXELS", help="The occluding square's side in model-input "
              "pixels (default: 50 at 224 px, proportional below).")
@click.option("--stride", type=int, metavar="PIXELS", help="Step between the square's positions (default: 8 at "
              "224 px, proportional below).")
@fill_option
@click.option("--class", "class_name", metavar="CLASS",
              help="The class whose probability is mapped: an output index of the model, or one of its class "
              "names (recorded by `atlas train`). Default: the image's true class when the model's recorded "
              "class names contain its label, else the most probable class (the correct one is unknown).")
@click.option("--layer", metavar="LAYER", help="The conv layer whose strongest map is followed (default: the top "
              "one).")
@click.option("--forward", "method", type=click.Choice(["incremental", "full"]), default="incremental",
              show_default=True, help="incremental recomputes only the window the square changes (exact); "
              "full: the whole net.")
@batch_size_option("Occluded images per forward pass (default: by memory).")
@device_option
@out_option
@rows_format_option
@progress_option
def occlude(atlas_path, image, occluder_size, stride, fill, class_name, layer, method, batch_size, device, out,
            fmt, progress):
    """Occlusion sensitivity (the paper's figure 7) for one image.

    IMAGE is an image id of the atlas or any image file. A square slides over
    the image; at each position: the total activation of the top layer's
    strongest map, its projection, the probability of a class and the most
    probable class. The class is the image's true class only when the model
    records class names that contain its label; otherwise the most probable
    class is charted and said to be so. PNGs plus the raw maps (SQL view
    `occlusion`).
    """
    from ..analyses.occlusion import occlude as run

    r = run(_open(atlas_path), image, size=occluder_size, stride=stride, fill=fill, label=class_name, layer=layer,
            method=method, batch_size=batch_size, device=device, out=out, progress=progress)
    emit(r.rows(), r.summary(), fmt, r.warning)


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("images", nargs=-1, required=True)
@click.option("--transforms", type=CommaList(), default="translate,scale,rotate", show_default=True,
              metavar="T1,T2,...", help="Any of translate (vertical), scale and rotate, over the paper's ranges.")
@layers_option("Layers whose feature distance is measured, e.g. conv1,conv5 (default: conv1 and fc7, or the "
               "layer below the logits).")
@click.option("--classes", type=CommaList(), metavar="C1,C2,...",
              help="The class charted per image, comma-separated, or one for all: output indices or the "
              "model's class names. Default: each image's true class when the model's recorded class names "
              "contain its label, else its most probable class (the correct one is unknown).")
@fill_option
@device_option
@out_option
@rows_format_option
@progress_option
def invariance(atlas_path, images, transforms, layers, classes, fill, device, out, fmt, progress):
    """Invariance to translation, scale and rotation (the paper's figure 5).

    For each image and transformation amount: the Euclidean distance between
    the features of the original and the transformed image per layer, and the
    probability of the image's class (the true one when known, else the most
    probable, said so). Curves as PNG; numbers in SQL view `invariance`.
    """
    from ..analyses.invariance import invariance as run

    r = run(_open(atlas_path), list(images), transforms=tuple(transforms), layers=layers, labels=classes, fill=fill,
            device=device, out=out, progress=progress)
    emit(r.rows, r.summary(), fmt, r.warning)


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.option("--images", "spec", required=True, type=click.Path(path_type=Path), metavar="SPEC.json",
              help="JSON spec: images and, per part, the occluder box in each (the format is above).")
@layers_option("Layers compared, e.g. conv5,fc7 (default: the top conv layer and fc7, or the layer below the "
               "logits).")
@click.option("--random", "random_draws", type=int, default=10, show_default=True, metavar="N",
              help="Random-occluder control draws (0: no control).")
@seed_option("the random occluders")
@fill_option
@device_option
@out_option
@rows_format_option
@progress_option
def correspondence(atlas_path, spec, layers, random_draws, seed, fill, device, out, fmt, progress):
    """Correspondence of object parts across images (figure 8 / table 7).

    For each part occluded in every image, the sum over image pairs of the
    Hamming distance between the signs of the feature changes; lower means the
    part is handled more consistently. Random occluders give the control.

    \b
    The spec (--images), one box [x0, y0, x1, y1] per part and image, in
    model-input pixels ("coordinates": "original" for the original image's):
      {"images": [12, "dogs/beagle.jpg"],
       "parts": {"left_eye": [[x0, y0, x1, y1], [...]], "nose": [[...], [...]]}}
    An image is an image id of the atlas or a path (relative to the spec's folder).
    """
    from ..analyses.correspondence import correspondence as run

    r = run(_open(atlas_path), spec, layers=layers, random=random_draws, seed=seed, fill=fill, device=device,
            out=out, progress=progress)
    emit(r.rows, [r.format_table(), *r.summary()] if fmt is None else r.summary(), fmt, r.warning)
