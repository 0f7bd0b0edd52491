"""Commands that make things from data: `demo`, `build`, `make-shapes`."""
from __future__ import annotations

import os
from pathlib import Path

import click

from ..choices import DECODERS

from ..errors import AtlasError
from .base import (CONTEXT, CommaList, batch_size_option, contrast_norm_option, device_option, image_size_option,
                   keep_freed_memory_when_own, layers_option, main, progress_option, seed_option, workers_option, _say)


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), default=Path("atlas-demo"), show_default=True,
              help="Folder for the demo's data, training run and atlas.")
@click.option("--model", "model_name", default="zfnet-mini", show_default=True, metavar="NAME",
              help="The model to train: zfnet-mini, or a modern net such as resnet18 (any torchvision "
              "classification model), trained at 64 px on the same images.")
@click.option("--quick", is_flag=True, help="A small, fast version (under 30 s) for tests and a first look.")
@progress_option
def demo(out, model_name, quick, progress):
    """Make the `shapes` dataset, train a model on it, and build its atlas.

    Everything is generated locally from a fixed seed; nothing is downloaded.
    At the end it prints where the atlas is and what to try next.

    \b
      atlas demo                      # zfnet-mini, the paper's net made small
      atlas demo --model resnet18     # a trained ResNet seen end to end
    """
    from ..demo import run_demo

    run_demo(out, quick=quick, progress=progress, log=_say, model=model_name)


class Floats(click.ParamType):
    """Three numbers, one per RGB channel, as a comma list: `0.485,0.456,0.406`."""

    name = "R,G,B"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) != 3:
            raise AtlasError(f"{param.opts[0] if param else 'the value'} takes three numbers, one per RGB channel, "
                             f"like 0.485,0.456,0.406 (got '{value}')")
        return numbers


@main.command(context_settings=CONTEXT)
@click.option("--model", "model_name", required=True, metavar="NAME",
              help="The model: zfnet, zfnet-mini, alexnet-single; any torchvision classification model by its "
              "name (resnet50, vgg16_bn, googlenet, densenet121, inception_v3, ...); timm:NAME (with timm "
              "installed); or your own code, FILE.py:FACTORY or package.module:FACTORY (a function returning "
              "an nn.Module). Nothing is downloaded: weights come from --weights.")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights file: a state_dict (.pt, .pth, as "
              "torchvision writes them, or .safetensors), a training script's checkpoint or an `atlas train` one. "
              "Without it the model is randomly initialised (--seed), and the manifest says so.")
@click.option("--data", required=True, metavar="DATA",
              help="The images: an image folder (ImageFolder or flat), a CIFAR-10 folder, or `shapes`.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The atlas folder to write.")
@click.option("--k", type=int, default=9, show_default=True, metavar="N",
              help="Top activations kept per channel (the top-k of the atlas).")
@layers_option("Layers to record: conv1..conv5 for the 2012-2014 nets, module paths otherwise (layer3, "
               "features.8). Default: the model's own, each conv layer of a 2012-2014 net after its ReLU, each "
               "stage of a modern net (a ResNet's maxpool, layer1..layer4).")
@batch_size_option("Images per forward pass.", default=64)
@device_option
@workers_option
@image_size_option
@click.option("--mean", type=Floats(), metavar="R,G,B",
              help="The mean subtracted from each channel of the [0,1] image (default: the model's own).")
@click.option("--std", type=Floats(), metavar="R,G,B",
              help="What each channel is divided by after the mean (default: the model's own).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast, faster on a GPU; near-ties in a ranking may swap (about 2 % of top-9 images "
              "on the demo).")
@click.option("--decode", type=click.Choice(DECODERS), default="auto", show_default=True,
              help="Where JPEGs are decoded: cpu (PIL, in --workers processes or threads) or device (torchvision on "
              "--device: nvjpeg on a GPU). auto: device on a GPU, else cpu; a resumed build keeps its own.")
@click.option("--no-activations", is_flag=True, help="Skip the per-image activations table (huge datasets).")
@click.option("--no-switches", is_flag=True, help="Skip the max-pool switches (no projections from the atlas alone).")
@click.option("--index/--no-index", default=True, show_default=True,
              help="Build the similarity indexes (`atlas similar`); without, `atlas index` builds them later.")
@click.option("--index-layers", type=CommaList(), metavar="L1,L2,...",
              help="Layers with an image index (default: the deepest recorded conv layer, and fc7 when the model "
              "has it).")
@click.option("--resume", is_flag=True, help="Continue an interrupted build of the same atlas.")
@click.option("--overwrite", is_flag=True, help="Replace an existing atlas at --out.")
@seed_option("a randomly initialised model (without --weights)")
@click.option("--chunk-size", type=int, metavar="N", help="Images per resumable chunk (default: about 1024, a "
              "multiple of --batch-size).")
@contrast_norm_option
@progress_option
def build(model_name, weights, data, out, k, layers, batch_size, device, workers, image_size, mean, std, precision,
          decode, no_activations, no_switches, index, index_layers, resume, overwrite, seed, chunk_size,
          contrast_norm, progress):
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

    keep_freed_memory_when_own()
    path = run_build(model_name, data, out, weights=str(weights) if weights else None, k=k, layers=layers,
                     batch_size=batch_size, device=device, workers=workers, image_size=image_size, mean=mean,
                     std=std, precision=precision, decode=decode, activations=not no_activations,
                     switches=not no_switches, resume=resume, overwrite=overwrite, seed=seed,
                     chunk_size=chunk_size, progress=progress,
                     index=index, index_layers=index_layers, contrast_norm=contrast_norm, log=_say)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(str(path))


@main.command("make-shapes", context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "count", type=int, default=2000, show_default=True, metavar="N", help="Number of images.")
@click.option("--side", type=int, default=64, show_default=True, metavar="PIXELS",
              help="Side of each image in pixels (at least 8).")
@seed_option("the images")
@progress_option
def make_shapes(out, count, side, seed, progress):
    """Write the synthetic `shapes` dataset as an ImageFolder; prints its folder.

    12 classes (shapes, stripes at four orientations, checkerboards, dots...),
    from a fixed seed: the same options give the same files.

    \b
      atlas make-shapes shapes/ --n 8000 --side 64
    """
    from ..data.shapes import generate

    click.echo(str(generate(out, n=count, size=side, seed=seed, progress=progress)))
