"""The paper's analyses on an atlas: `occlude`, `invariance`, `correspondence`."""
from __future__ import annotations

from pathlib import Path

import click

from .base import CONTEXT, atlas_argument, device_option, main, out_option, _open


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("image")
@click.option("--size", type=int, help="Occluder side in input pixels (default 50 at 224 px, proportional below).")
@click.option("--stride", type=int, help="Step between occluder positions (default 8 at 224 px).")
@click.option("--fill", type=click.Choice(["grey", "mean"]), default="grey", show_default=True)
@click.option("--label", help="The class whose probability is mapped (default: the image's label, else the "
              "predicted class).")
@click.option("--layer", help="The conv layer whose strongest map is followed (default: the top one).")
@click.option("--method", type=click.Choice(["incremental", "full"]), default="incremental", show_default=True,
              help="incremental recomputes only the window the square changes (exact).")
@click.option("--batch-size", type=int, help="Occluded images per forward pass (default: by memory).")
@device_option
@out_option
def occlude(atlas_path, image, size, stride, fill, label, layer, method, batch_size, device, out):
    """Occlusion sensitivity (the paper's figure 7) for one image.

    IMAGE is an image id of the atlas or any image file. A square slides over
    the image; at each position: the total activation of the top layer's
    strongest map, its projection, the probability of the class and the most
    probable class. PNGs plus the raw maps (SQL view `occlusion`).
    """
    from ..analyses.occlusion import occlude as run

    r = run(_open(atlas_path), image, size=size, stride=stride, fill=fill, label=label, layer=layer,
            method=method, batch_size=batch_size, device=device, out=out)
    click.echo("\n".join(r.summary()))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("images", nargs=-1, required=True)
@click.option("--transforms", default="translate,scale,rotate", show_default=True)
@click.option("--layers", help="Layers whose feature distance is measured (default: conv1 and fc7).")
@click.option("--labels", help="True classes of the images, comma-separated (default: their dataset labels).")
@click.option("--fill", type=click.Choice(["mean", "grey"]), default="mean", show_default=True)
@device_option
@out_option
def invariance(atlas_path, images, transforms, layers, labels, fill, device, out):
    """Invariance to translation, scale and rotation (the paper's figure 5).

    For each image and transformation amount: the Euclidean distance between
    the features of the original and the transformed image per layer, and the
    probability of the true class. Curves as PNG; numbers in SQL view `invariance`.
    """
    from ..analyses.invariance import invariance as run

    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    r = run(_open(atlas_path), list(images), transforms=tuple(split(transforms)), layers=split(layers),
            labels=split(labels), fill=fill, device=device, out=out)
    click.echo("\n".join(r.summary()))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.option("--images", "spec", required=True, type=click.Path(path_type=Path),
              help="JSON spec: images and, per part, the occluder box in each.")
@click.option("--layers", help="Layers compared (default: the top conv layer and fc7).")
@click.option("--random", "random_draws", default=10, show_default=True, help="Random-occluder control draws.")
@click.option("--seed", default=0, show_default=True)
@click.option("--fill", type=click.Choice(["grey", "mean"]), default="grey", show_default=True)
@device_option
@out_option
def correspondence(atlas_path, spec, layers, random_draws, seed, fill, device, out):
    """Correspondence of object parts across images (figure 8 / table 7).

    For each part occluded in every image, the sum over image pairs of the
    Hamming distance between the signs of the feature changes; lower means the
    part is handled more consistently. Random occluders give the control.
    """
    from ..analyses.correspondence import correspondence as run

    r = run(_open(atlas_path), spec, layers=layers.split(",") if layers else None, random=random_draws,
            seed=seed, fill=fill, device=device, out=out)
    click.echo(r.format_table())
    click.echo("\n".join(r.summary()))
