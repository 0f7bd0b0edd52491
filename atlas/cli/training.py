"""Training with the paper's recipe and what needs training runs: `train`, `evolution`, `compare-filters`."""
from __future__ import annotations

from pathlib import Path

import click

from ..util.output import render_dicts
from .base import (CONTEXT, AtLeastOne, CommaList, NumberList, batch_size_option, contrast_norm_option,
                   device_option, format_option, image_size_option, layers_option, main, progress_option,
                   seed_option, workers_option, _say)

MEMORY_LIMIT_MB = 2048  # atlas/train/pipeline.py MEMORY_LIMIT, in MB


@main.command(context_settings=CONTEXT)
@click.option("--model", "model_name", required=True, metavar="NAME",
              help="The architecture: zfnet, zfnet-mini, alexnet-single, alexnet, vgg11/13/16/19.")
@click.option("--data", required=True, metavar="DATA", help="Labelled training images: an ImageFolder (a "
              "sub-folder per class), a CIFAR-10 folder, or `shapes`.")
@click.option("--val", metavar="DATA", help="Validation images with the same classes (default: a seeded, "
              "per-class --val-fraction of --data is held out).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The run folder to write (RUN_DIR).")
@click.option("--epochs", type=int, metavar="N", help="Epochs to train  [default: 70, the paper's; a BatchNorm net: 10; zfnet-mini: 10]")
@batch_size_option("Images per SGD step  [default: 128; a BatchNorm net: 64; zfnet-mini: 32]")
@click.option("--lr", type=float, metavar="RATE", help="Initial learning rate  [default: 1e-2; a BatchNorm net: "
              "5e-2; zfnet-mini: 5e-3]")
@click.option("--momentum", default=0.9, show_default=True, type=float, help="SGD momentum.")
@click.option("--weight-decay", default=5e-4, show_default=True, type=float,
              help="Not stated in the paper; AlexNet's value.")
@click.option("--dropout", type=float, help="Dropout before the classifier, for models that have it  [default: "
              "0.5; zfnet-mini: 0]")
@click.option("--init", type=click.Choice(["paper", "default"]),
              help="paper: weights N(0, 1e-2), biases 0; default: the model's own  [default: paper; "
              "a BatchNorm net and zfnet-mini: default]")
@click.option("--renorm-radius", type=float,
              help="After every step a conv filter whose RMS exceeds this is rescaled to it (0: off)  [default: "
              "0.1; a BatchNorm net: 0]")
@click.option("--lr-patience", default=3, show_default=True, type=int,
              help="Epochs without a lower validation top-1 error before the lr is lowered.")
@click.option("--lr-factor", default=0.1, show_default=True, type=float, help="What lowering multiplies the lr by.")
@click.option("--resize", type=int, metavar="PIXELS", help="Side of the centre crop that training crops are "
              "taken from (default: the model's; zfnet: 256).")
@click.option("--crop", type=int, metavar="PIXELS", help="Side of the random training crops (default: the "
              "model's; zfnet: 224).")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips.")
@click.option("--ten-crop-eval", is_flag=True, help="Validate on 10 crops (corners, centre, and their flips).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Share of --data held out when there is no --val.")
@click.option("--snapshot-epochs", type=NumberList(), metavar="E1,E2,...", help="Keep these epochs' weights for "
              "`atlas evolution`, e.g. 1,2,5,10,20,30,40,64 (0: the initial weights; default: none).")
@click.option("--resume", is_flag=True, help="Continue a killed run where it stopped (same options).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run at --out.")
@device_option
@workers_option
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA, fp32 on CPU.")
@click.option("--in-memory/--stream", default=None, help="Keep the decoded images in memory, or stream them "
              "from disk (default: in memory when they fit in --memory-limit).")
@click.option("--memory-limit", type=AtLeastOne(), default=MEMORY_LIMIT_MB, show_default=True, metavar="MB",
              help="Without --in-memory or --stream: keep the decoded images in memory when they fit in this.")
@seed_option("the initialisation, data order, crops, flips and dropout")
@image_size_option
@contrast_norm_option
@progress_option
def train(model_name, data, val, out, epochs, batch_size, lr, momentum, weight_decay, dropout, init,
          renorm_radius, lr_patience, lr_factor, resize, crop, flip, ten_crop_eval, val_fraction,
          snapshot_epochs, resume, overwrite, device, workers, precision, in_memory, memory_limit, seed, image_size,
          contrast_norm, progress):
    """Train a model with the paper's recipe.

    Prints RUN_DIR/final.pt, the weights `atlas build --weights` reads. The
    defaults are Zeiler & Fergus's (section 3): SGD with momentum 0.9, batch
    128, lr 1e-2 lowered 10x when the validation top-1 error stops
    falling, dropout 0.5 in fc6/fc7, weights N(0, 1e-2) and biases 0, every
    conv filter renormalised to RMS <= 0.1 after each step, random 224 crops
    of the 256 centre crop with horizontal flips. Any torchvision classifier
    trains too; a net with BatchNorm (resnet18, vgg16_bn, mobilenet_v2...)
    departs where BatchNorm does the job: its own init, no renormalisation, lr
    5e-2, batch 64, 10 epochs. zfnet-mini (small images, few epochs) departs
    where it must; RUN_DIR/config.json records every value.

    \b
    RUN_DIR: config.json, metrics.csv (per epoch: lr, loss, top-1/top-5 error,
    images/s), curves.png, checkpoint.pt (every epoch), snapshots/, final.pt.
    \b
    Examples:
      atlas train --model zfnet --data train/ --val val/ --out run \\
                  --snapshot-epochs 1,2,5,10,20,30,40,64
      atlas train --model zfnet-mini --data shapes-4000/ --out run --epochs 3
      atlas train --model zfnet --data train/ --val val/ --out run --resume
      atlas build --model zfnet --weights run/final.pt --data imgs/ --out my-atlas
    """
    from ..train import train as run_train

    final = run_train(model_name, data, out, val=val, epochs=epochs, batch_size=batch_size, lr=lr,
                      momentum=momentum, weight_decay=weight_decay, dropout=dropout, init=init,
                      renorm_radius=renorm_radius, lr_patience=lr_patience, lr_factor=lr_factor, resize=resize,
                      crop=crop, flip=flip, ten_crop_eval=ten_crop_eval, val_fraction=val_fraction,
                      snapshot_epochs=snapshot_epochs, resume=resume, overwrite=overwrite, device=device,
                      workers=workers, precision=precision, in_memory=in_memory, memory_limit=memory_limit << 20,
                      seed=seed, image_size=image_size, contrast_norm=contrast_norm, progress=progress, log=_say)
    click.echo(str(final))


def _table_then_path(rows, fmt, png) -> None:
    """The table on stdout; the PNG's path after it (table format) or on stderr (CSV/JSON stay parseable)."""
    click.echo(render_dicts(rows, fmt))
    click.echo(str(png), err=fmt != "table")


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=Path))
@click.option("--data", metavar="DATA", help="Images searched for each channel's strongest activation (default: the "
              "run's training data, as in the paper).")
@layers_option("Conv layers, e.g. conv1,conv2,conv5 (default: every conv layer).")
@click.option("--channels", type=NumberList(), metavar="C1,C2,A-B", help="The same channels in every chosen layer, "
              "e.g. 0,5,9 or 0-3 (default: chosen by --select).")
@click.option("--per-layer", type=int, default=4, show_default=True, metavar="N",
              help="Channels per layer without --channels.")
@click.option("--select", type=click.Choice(["strongest", "first"]), default="strongest", show_default=True,
              help="strongest: the channels with the largest activation at the last snapshot; first: channels "
              "0, 1, ...")
@click.option("--snapshot-epochs", type=NumberList(), metavar="E1,E2,...", help="The snapshots to show, e.g. 1,5,20 "
              "(default: all, and final.pt when later).")
@click.option("--out", type=click.Path(path_type=Path), help="The PNG (default: RUN_DIR/evolution.png); "
              "the table of every channel goes beside it (.parquet).")
@click.option("--cell", type=int, default=64, show_default=True, metavar="PIXELS", help="Cell side in pixels.")
@click.option("--max-images", type=AtLeastOne(), metavar="N", help="Search only the first N images (default: "
              "all).")
@click.option("--follow", type=click.Choice(["channel", "matched"]), default="channel", show_default=True,
              help="channel: a row is one channel number at every snapshot; matched: a row follows the unit shown "
              "at the last snapshot back through the one-to-one matches of consecutive snapshots (the correlation "
              "of their per-image maxima, as `atlas compare`), says how well each step matched, and writes the "
              "matches beside the PNG (.matches.parquet).")
@batch_size_option("Images per forward pass.", default=64)
@device_option
@workers_option
@progress_option
@format_option
def evolution(run_dir, data, layers, channels, per_layer, select, snapshot_epochs, out, cell, max_images,
              follow, batch_size, device, workers, progress, fmt):
    """Feature evolution during training (the paper's figure 4).

    For each chosen channel, its strongest activation over the dataset at
    every snapshot of the run, projected to pixels: one row per channel, one
    column per snapshot. Prints each shown channel's activation per snapshot,
    then the PNG's path. An atlas built with --weights RUN_DIR/final.pt shows
    RUN_DIR/evolution.png on its exported site.

    \b
      atlas train --model zfnet --data train/ --out run --snapshot-epochs 1,2,5,10,20,30,40,64
      atlas evolution run --layers conv1,conv2,conv5 --per-layer 6
      atlas evolution run --data val/ --layers conv3 --channels 0,7,12 --snapshot-epochs 1,5,64
      atlas evolution run --layers conv1,conv3 --follow matched
    """
    from ..analyses.evolution import evolution as run, evolution_table

    png = run(run_dir, data, layers=layers, channels=channels, per_layer=per_layer, select=select,
              epochs=snapshot_epochs, out=out, cell=cell, max_images=max_images, batch_size=batch_size,
              device=device, workers=workers, progress=progress, log=_say, follow=follow)
    _table_then_path(evolution_table(png), fmt, png)


@main.command("compare-filters", context_settings=CONTEXT)
@click.argument("a", metavar="A", type=click.Path(path_type=Path))
@click.argument("b", metavar="B", type=click.Path(path_type=Path))
@click.option("--labels", type=CommaList(), metavar="A_NAME,B_NAME",
              help="Names of A and B in the table and figure, e.g. AlexNet,ZFNet (default: model and file).")
@click.option("--out", type=click.Path(path_type=Path), help="The PNG (default: compare-filters.png in A's run "
              "folder, or beside A's file).")
@click.option("--dead-fraction", default=0.01, show_default=True, type=float,
              help="A filter is dead when its RMS is below this share of the layer's largest.")
@click.option("--bands", default="0.125,0.25", show_default=True, metavar="LOW,HIGH",
              help="Edges of the low / mid / high frequency bands, cycles per pixel.")
@click.option("--fft-size", type=int, default=64, show_default=True, metavar="N", help="Zero-padded FFT size.")
@format_option
def compare_filters(a, b, labels, out, dead_fraction, bands, fft_size, fmt):
    """Compare two models' conv1 filters (the paper's figure 6).

    A and B are training runs (their final.pt) or weights files. The filter
    grids side by side, and per model: dead filters (near-zero RMS) and how
    the live filters' spectral energy splits into low, mid and high
    frequencies. Prints the table, then the PNG's path.

    \b
      atlas train --model alexnet-single --data train/ --val val/ --out run-alex
      atlas train --model zfnet --data train/ --val val/ --out run-zf
      atlas compare-filters run-alex run-zf --labels AlexNet,ZFNet
    """
    from ..analyses.compare_filters import compare_filters as run

    png, rows = run(a, b, out=out, labels=labels, dead_fraction=dead_fraction, bands=bands, fft_size=fft_size)
    _table_then_path(rows, fmt, png)
