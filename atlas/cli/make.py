"""Commands that make things from data: `demo`, `build`, `make-shapes`."""
from __future__ import annotations

import os
from pathlib import Path

import click

from .base import CONTEXT, contrast_norm_option, device_option, main, progress_option, _say


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), default=Path("atlas-demo"), show_default=True,
              help="Folder for the demo's data, training run and atlas.")
@click.option("--quick", is_flag=True, help="A small, fast version (under 30 s) for tests and a first look.")
@progress_option
def demo(out, quick, progress):
    """Make the `shapes` dataset, train zfnet-mini on it, and build its atlas.

    Everything is generated locally from a fixed seed; nothing is downloaded.
    At the end it prints where the atlas is and what to try next.
    """
    from ..demo import run_demo

    run_demo(out, quick=quick, progress=progress, log=_say)


@main.command(context_settings=CONTEXT)
@click.option("--model", "model_name", required=True, help="zfnet, zfnet-mini, alexnet-single, alexnet, vgg16, ...")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights file (state_dict or `atlas train` "
              "checkpoint). Without it the model is randomly initialised, and the manifest says so.")
@click.option("--data", required=True, help="Image folder (ImageFolder or flat), CIFAR-10 folder, or `shapes`.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The atlas folder to write.")
@click.option("--k", default=9, show_default=True, help="Top activations kept per channel.")
@click.option("--layers", help="Comma-separated layers to record (default: every conv layer, after its ReLU).")
@click.option("--batch-size", default=64, show_default=True)
@device_option
@click.option("--workers", type=int, help="Image decoding processes (default: by device and cores).")
@click.option("--image-size", type=int, help="Input size, for models that take several (zfnet-mini: 32-64).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast, faster on a GPU; near-ties in a ranking may swap (about 2 % of top-9 images "
              "on the demo).")
@click.option("--decode", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="Where JPEGs are decoded: cpu (PIL in --workers processes) or device (torchvision on "
              "--device: nvjpeg on a GPU). auto: device on a GPU, else cpu; a resumed build keeps its own.")
@click.option("--no-activations", is_flag=True, help="Skip the per-image activations table (huge datasets).")
@click.option("--no-switches", is_flag=True, help="Skip the max-pool switches (no projections from the atlas alone).")
@click.option("--index/--no-index", default=True, show_default=True,
              help="Build the similarity indexes (`atlas similar`); without, `atlas index` builds them later.")
@click.option("--index-layers", help="Layers with an image index (default: the deepest recorded conv layer, "
              "and fc7 when the model has it).")
@click.option("--resume", is_flag=True, help="Continue an interrupted build of the same atlas.")
@click.option("--overwrite", is_flag=True, help="Replace an existing atlas at --out.")
@click.option("--seed", default=0, show_default=True, help="Seed of a randomly initialised model.")
@click.option("--chunk-size", type=int, help="Images per resumable chunk (default: about 1024).")
@contrast_norm_option
@progress_option
def build(model_name, weights, data, out, k, layers, batch_size, device, workers, image_size, precision, decode,
          no_activations, no_switches, index, index_layers, resume, overwrite, seed, chunk_size, contrast_norm,
          progress):
    """Run a model over a whole dataset and write its atlas.

    For every channel of the chosen layers: the top-k activations (value,
    image, position, receptive-field box), the max-pool switches to project
    them, per-image maxima and per-channel statistics. Interrupted builds
    continue with --resume; the atlas appears only when it is complete.

    \b
    Several GPUs or machines: torchrun --nproc-per-node N -m atlas build ...
    (each rank mines its share; the atlas is identical to a one-process build).
    """
    from ..build import build as run_build

    path = run_build(model_name, data, out, weights=str(weights) if weights else None, k=k, layers=layers,
                     batch_size=batch_size, device=device, workers=workers, image_size=image_size,
                     precision=precision, decode=decode, activations=not no_activations, switches=not no_switches,
                     resume=resume, overwrite=overwrite, seed=seed, chunk_size=chunk_size, progress=progress,
                     index=index, index_layers=index_layers, contrast_norm=contrast_norm, log=_say)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(str(path))


@main.command("make-shapes", context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "count", default=2000, show_default=True, help="Number of images.")
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True)
def make_shapes(out, count, size, seed):
    """Write the synthetic `shapes` dataset as an ImageFolder."""
    from ..shapes import generate

    click.echo(str(generate(out, n=count, size=size, seed=seed)))
