"""The `atlas` command line: small commands, the same option names everywhere.

Each command parses its options and calls one library function; anything a
command does, Python users can do through the same function.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import AtlasError
from .output import FORMATS, render, render_dicts

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
TUTORIAL_ORDER = ["demo", "build", "info", "layers", "channels", "top", "show", "filters", "sql", "queries",
                  "similar", "index", "export", "train", "evolution", "compare-filters", "occlude", "invariance",
                  "correspondence", "make-shapes"]


class AtlasGroup(click.Group):
    """Turns expected failures into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AtlasError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted. A build or training run continues where it stopped with --resume.", err=True)
            sys.exit(130)

    def list_commands(self, ctx):
        known = [c for c in TUTORIAL_ORDER if c in self.commands]  # the order of a first session, not A-Z
        return known + [c for c in self.commands if c not in known]


@click.group(cls=AtlasGroup, context_settings=CONTEXT)
@click.version_option(package_name="atlas")
def main():
    """Feature Atlas: what every channel of a CNN has learned, over a whole dataset.

    \b
    Start here:
      atlas demo                          make data, train a small ZFNet, build its atlas
      atlas build --model zfnet --weights zf.pt --data imgs/ --out my-atlas
      atlas info my-atlas                 what is in it
      atlas channels my-atlas conv5 --sort max --desc
      atlas top my-atlas conv5 17         the channel's strongest images
      atlas show my-atlas conv5 17        their DeconvNet projections beside the patches (figure 2)
      atlas sql my-atlas "SELECT * FROM channels WHERE max <= 0"
      atlas similar my-atlas --image-id 42
      atlas export my-atlas site/         a static site to browse and publish

    Every command explains itself: atlas COMMAND --help.
    """


# -- shared options ------------------------------------------------------------
def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                        help="Output as an aligned table, CSV or JSON.")(f)


def atlas_argument(f):
    return click.argument("atlas_path", metavar="ATLAS", type=click.Path(path_type=Path))(f)


def _open(path: Path):
    from .store import Atlas

    return Atlas(path)


def _say(msg: str) -> None:
    click.echo(msg, err=True)


# -- demo and build --------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), default=Path("atlas-demo"), show_default=True,
              help="Folder for the demo's data, training run and atlas.")
@click.option("--quick", is_flag=True, help="A small, fast version (under 30 s) for tests and a first look.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when on a terminal).")
def demo(out, quick, progress):
    """Make the `shapes` dataset, train zfnet-mini on it, and build its atlas.

    Everything is generated locally from a fixed seed; nothing is downloaded.
    At the end it prints where the atlas is and what to try next.
    """
    from .demo import run_demo

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
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, help="Image decoding processes (default: by device and cores).")
@click.option("--image-size", type=int, help="Input size, for models that take several (zfnet-mini: 32-64).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
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
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
def build(model_name, weights, data, out, k, layers, batch_size, device, workers, image_size, precision,
          no_activations, no_switches, index, index_layers, resume, overwrite, seed, chunk_size, progress):
    """Run a model over a whole dataset and write its atlas.

    For every channel of the chosen layers: the top-k activations (value,
    image, position, receptive-field box), the max-pool switches to project
    them, per-image maxima and per-channel statistics. Interrupted builds
    continue with --resume; the atlas appears only when it is complete.

    \b
    Several GPUs or machines: torchrun --nproc-per-node N -m atlas build ...
    (each rank mines its share; the atlas is identical to a one-process build).
    """
    from .build import build as run_build

    path = run_build(model_name, data, out, weights=str(weights) if weights else None, k=k, layers=layers,
                     batch_size=batch_size, device=device, workers=workers, image_size=image_size,
                     precision=precision, activations=not no_activations, switches=not no_switches,
                     resume=resume, overwrite=overwrite, seed=seed, chunk_size=chunk_size, progress=progress,
                     index=index, index_layers=index_layers, log=_say)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(str(path))


@main.command("make-shapes", context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "count", default=2000, show_default=True, help="Number of images.")
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True)
def make_shapes(out, count, size, seed):
    """Write the synthetic `shapes` dataset as an ImageFolder."""
    from .shapes import generate

    click.echo(str(generate(out, n=count, size=size, seed=seed)))


# -- querying and browsing -----------------------------------------------------
@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("query", required=False)
@click.option("--file", "sql_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the SQL from a file.")
@click.option("--query", "-q", "canned", help="Run an example query from sql/queries by name (see `atlas queries`).")
@click.option("--param", "-p", multiple=True, metavar="NAME=VALUE",
              help="Set a SQL variable, read in the query with getvariable('NAME').")
@format_option
def sql(atlas_path, query, sql_file, canned, param, fmt):
    """Query an atlas with SQL (DuckDB).

    \b
    Views: images, layers, channels, top_activations, activations.
      atlas sql my-atlas "SELECT * FROM channels ORDER BY max DESC LIMIT 5"
      atlas sql my-atlas -q class_selectivity -p label=circle
    """
    from .store import canned_queries

    sources = [s for s in (query, sql_file, canned) if s]
    if len(sources) != 1:
        raise AtlasError("give exactly one of QUERY, --file or --query")
    if canned:
        known = canned_queries()
        if canned not in known:
            raise AtlasError(f"unknown query '{canned}': known queries are {', '.join(known)}")
        query = known[canned][1]
    elif sql_file:
        query = sql_file.read_text()
    params = {}
    for p in param:
        if "=" not in p:
            raise AtlasError(f"--param '{p}' is not NAME=VALUE")
        name, value = p.split("=", 1)
        params[name] = value
    columns, rows = _open(atlas_path).fetch(query, params)
    if columns:
        click.echo(render(columns, rows, fmt))


@main.command(context_settings=CONTEXT)
@format_option
def queries(fmt):
    """List the example queries that `atlas sql --query NAME` runs."""
    from .store import canned_queries

    click.echo(render(["name", "description"], [(n, d) for n, (d, _) in canned_queries().items()], fmt))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(atlas_path, as_json):
    """Summary of an atlas: model, weights, dataset, layers, timings."""
    a = _open(atlas_path)
    m = a.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    mdl, ds, t = m["model"], m["dataset"], m["timings"]
    weights = "random init (seed %s)" % mdl.get("seed") if mdl["random_init"] else \
        f"{mdl['weights']} (sha256 {mdl['weights_sha256'][:12]}…)"
    lines = [
        f"atlas      {a.path}",
        f"model      {mdl['name']}, {weights}",
        f"dataset    {ds['spec']} ({ds['kind']}): {ds['count']} images, {ds['errors']} unreadable"
        + (f", {len(ds['classes'])} classes" if ds.get("classes") else ", unlabelled"),
        f"input      {m['preprocessing']['note']}",
        f"k          {m['k']}",
        f"layers     {', '.join(a.layer_names)}",
        f"indexes    {_describe_indexes(m.get('index'))}",
        f"built      {m['created']} with atlas {m['tool']['version']} in {t['total_s']} s "
        f"({t['images_per_s']} images/s on {m['options']['device']})",
    ]
    click.echo("\n".join(lines))


def _describe_indexes(ix) -> str:
    if not ix or not (ix.get("images") or ix.get("channels")):
        return "none (build them with `atlas index ATLAS`)"
    parts = [f"images at {name} ({e['count']} x {e['dim']}, {e['spec']['factory']})"
             for name, e in ix.get("images", {}).items()]
    if ix.get("channels"):
        parts.append(f"{ix['channels']['count']} channels")
    return "; ".join(parts)


@main.command(context_settings=CONTEXT)
@atlas_argument
@format_option
def layers(atlas_path, fmt):
    """The recorded layers with their geometry and how many channels are dead."""
    click.echo(render_dicts(_open(atlas_path).layers(), fmt))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("layer")
@click.option("--sort", default="channel", show_default=True,
              type=click.Choice(["channel", "mean", "std", "max", "fire_rate"]))
@click.option("--desc", is_flag=True, help="Largest first.")
@click.option("--limit", type=int, help="Show only the first N.")
@format_option
def channels(atlas_path, layer, sort, desc, limit, fmt):
    """A layer's channels with their statistics over the dataset."""
    rows = _open(atlas_path).channels(layer, sort, desc)
    click.echo(render_dicts(rows[:limit] if limit else rows, fmt))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("layer")
@click.argument("channel", type=int)
@format_option
def top(atlas_path, layer, channel, fmt):
    """A channel's top-k activations: image, value, position and receptive-field box."""
    rows = _open(atlas_path).top(layer, channel)
    cols = ["rank", "image_id", "value", "y", "x", "x0", "y0", "x1", "y1", "label", "path"]
    click.echo(render_dicts(rows, fmt, cols))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("layer")
@click.argument("channel", type=int)
@click.option("--rank", type=int, help="Only this top-k entry's projection (0 = strongest).")
@click.option("--mode", type=click.Choice(["unit", "map"]), default="unit", show_default=True,
              help="unit: project the one strongest position; map: the channel's whole map (reads the image).")
@click.option("--norm", type=click.Choice(["identity", "gradient"]), default="identity", show_default=True,
              help="How local response normalisation is undone: passed through (the paper) or its gradient.")
@click.option("--switches", type=click.Choice(["auto", "stored", "recompute"]), default="auto", show_default=True,
              help="Max-pool switches from the atlas, or recomputed from the image (needs the dataset).")
@click.option("--out", type=click.Path(path_type=Path), help="Also write the PNG here (a file, or a folder).")
def show(atlas_path, layer, channel, rank, mode, norm, switches, out):
    """A channel's DeconvNet projections as a PNG (the paper's figure 2); prints its path.

    The panel shows the top-k projections in a grid beside the matching image
    patches (each cell the unit's receptive field; hatched beyond the image
    border). Rendered on the first request and cached inside the atlas.

    \b
      atlas show my-atlas conv5 17                 the panel
      atlas show my-atlas conv5 17 --rank 0 --out best.png
    """
    from .projections import show as run

    click.echo(str(run(_open(atlas_path), layer, channel, rank, mode=mode, norm=norm, switches=switches, out=out,
                       log=_say)))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("layer", required=False)
@click.option("--out", type=click.Path(path_type=Path), help="Also write the PNG here (a file, or a folder).")
def filters(atlas_path, layer, out):
    """The first layer's learned filters as a grid PNG (the paper's figure 6 view); prints its path.

    \b
      atlas filters my-atlas
    """
    from .projections import filters as run

    click.echo(str(run(_open(atlas_path), layer, out=out)))


# -- training ------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.option("--model", "model_name", required=True, help="zfnet, zfnet-mini, alexnet-single, ...")
@click.option("--data", required=True, help="Labelled training images: an ImageFolder (a sub-folder per class), "
              "a CIFAR-10 folder, or `shapes`.")
@click.option("--val", help="Validation folder with the same classes (default: a seeded, per-class "
              "--val-fraction of --data is held out).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The run folder to write (RUN_DIR).")
@click.option("--epochs", type=int, help="Epochs  [default: 70, the paper's; zfnet-mini: 10]")
@click.option("--batch-size", type=int, help="Mini-batch  [default: 128; zfnet-mini: 32]")
@click.option("--lr", type=float, help="Initial learning rate  [default: 1e-2; zfnet-mini: 5e-3]")
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option("--weight-decay", default=5e-4, show_default=True, type=float,
              help="Not stated in the paper; AlexNet's value.")
@click.option("--dropout", type=float, help="Dropout in fc6/fc7  [default: 0.5; zfnet-mini: 0]")
@click.option("--init", type=click.Choice(["paper", "default"]),
              help="paper: weights N(0, 1e-2), biases 0; default: the model's own  [default: paper; "
              "zfnet-mini: default]")
@click.option("--renorm-radius", default=0.1, show_default=True, type=float,
              help="After every step a conv filter whose RMS exceeds this is rescaled to it (0: off).")
@click.option("--lr-patience", default=3, show_default=True, type=int,
              help="Epochs without a lower validation top-1 error before the lr is lowered.")
@click.option("--lr-factor", default=0.1, show_default=True, type=float, help="What lowering multiplies the lr by.")
@click.option("--resize", type=int, help="Side of the centre crop that training crops are taken from "
              "(zfnet: 256).")
@click.option("--crop", type=int, help="Side of the random training crops (zfnet: 224).")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips.")
@click.option("--ten-crop-eval", is_flag=True, help="Validate on 10 crops (corners, centre, and their flips).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Share of --data held out when there is no --val.")
@click.option("--snapshot-epochs", help="Keep these epochs' weights for `atlas evolution`, e.g. "
              "1,2,5,10,20,30,40,64 (0: the initial weights).")
@click.option("--resume", is_flag=True, help="Continue a killed run where it stopped (same options).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run at --out.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, help="Image decoding processes (default: by device and cores).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA, fp32 on CPU.")
@click.option("--in-memory/--stream", default=None, help="Keep the decoded images in memory, or stream them "
              "from disk (default: in memory when they fit in 2 GB).")
@click.option("--seed", default=0, show_default=True, help="Initialisation, data order, crops, flips, dropout.")
@click.option("--image-size", type=int, help="Input size, for models that take several (zfnet-mini: 32-64).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
def train(model_name, data, val, out, epochs, batch_size, lr, momentum, weight_decay, dropout, init,
          renorm_radius, lr_patience, lr_factor, resize, crop, flip, ten_crop_eval, val_fraction,
          snapshot_epochs, resume, overwrite, device, workers, precision, in_memory, seed, image_size, progress):
    """Train a model with the paper's recipe.

    Prints RUN_DIR/final.pt, the weights `atlas build --weights` reads. The defaults are Zeiler & Fergus's (section 3): SGD with momentum 0.9,
    batch 128, lr 1e-2 lowered 10x when the validation top-1 error stops
    falling, dropout 0.5 in fc6/fc7, weights N(0, 1e-2) and biases 0, every
    conv filter renormalised to RMS <= 0.1 after each step, random 224 crops
    of the 256 centre crop with horizontal flips. zfnet-mini (small images,
    few epochs) departs where it must; RUN_DIR/config.json records every value.

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
    from .train import train as run_train

    final = run_train(model_name, data, out, val=val, epochs=epochs, batch_size=batch_size, lr=lr,
                      momentum=momentum, weight_decay=weight_decay, dropout=dropout, init=init,
                      renorm_radius=renorm_radius, lr_patience=lr_patience, lr_factor=lr_factor, resize=resize,
                      crop=crop, flip=flip, ten_crop_eval=ten_crop_eval, val_fraction=val_fraction,
                      snapshot_epochs=snapshot_epochs, resume=resume, overwrite=overwrite, device=device,
                      workers=workers, precision=precision, in_memory=in_memory, seed=seed,
                      image_size=image_size, progress=progress, log=_say)
    click.echo(str(final))


def _table_then_path(rows, fmt, png) -> None:
    """The table on stdout; the PNG's path after it (table format) or on stderr (CSV/JSON stay parseable)."""
    click.echo(render_dicts(rows, fmt))
    click.echo(str(png), err=fmt != "table")


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=Path))
@click.option("--data", help="Images searched for each channel's strongest activation (default: the run's "
              "training data, as in the paper).")
@click.option("--layers", help="Comma-separated conv layers (default: every conv layer).")
@click.option("--channels", help="The same channels in every chosen layer, e.g. 0,5,9 (default: by --select).")
@click.option("--per-layer", default=4, show_default=True, help="Channels per layer without --channels.")
@click.option("--select", type=click.Choice(["strongest", "first"]), default="strongest", show_default=True,
              help="strongest: the channels with the largest activation at the last snapshot.")
@click.option("--epochs", help="Snapshots to show, e.g. 1,5,20 (default: all, and final.pt when later).")
@click.option("--out", type=click.Path(path_type=Path), help="The PNG (default: RUN_DIR/evolution.png); "
              "the table of every channel goes beside it (.parquet).")
@click.option("--cell", default=64, show_default=True, help="Cell side in pixels.")
@click.option("--max-images", type=int, help="Search only the first N images.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, help="Image decoding processes (default: by device and cores).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
@format_option
def evolution(run_dir, data, layers, channels, per_layer, select, epochs, out, cell, max_images, batch_size,
              device, workers, progress, fmt):
    """Feature evolution during training (the paper's figure 4).

    For each chosen channel, its strongest activation over the dataset at
    every snapshot of the run, projected to pixels: one row per channel, one
    column per snapshot. Prints each shown channel's activation per snapshot,
    then the PNG's path. An atlas built with --weights RUN_DIR/final.pt shows
    RUN_DIR/evolution.png on its exported site.

    \b
      atlas train --model zfnet --data train/ --out run --snapshot-epochs 1,2,5,10,20,30,40,64
      atlas evolution run --layers conv1,conv2,conv5 --per-layer 6
      atlas evolution run --data val/ --layers conv3 --channels 0,7,12 --epochs 1,5,64
    """
    from .analyses.evolution import evolution as run, evolution_table

    png = run(run_dir, data, layers=layers, channels=channels, per_layer=per_layer, select=select, epochs=epochs,
              out=out, cell=cell, max_images=max_images, batch_size=batch_size, device=device, workers=workers,
              progress=progress, log=_say)
    _table_then_path(evolution_table(png), fmt, png)


@main.command("compare-filters", context_settings=CONTEXT)
@click.argument("a", metavar="A", type=click.Path(path_type=Path))
@click.argument("b", metavar="B", type=click.Path(path_type=Path))
@click.option("--labels", help="Names of A and B in the table and figure, e.g. AlexNet,ZFNet "
              "(default: model and file).")
@click.option("--out", type=click.Path(path_type=Path), help="The PNG (default: compare-filters.png in A's run "
              "folder, or beside A's file).")
@click.option("--dead-fraction", default=0.01, show_default=True, type=float,
              help="A filter is dead when its RMS is below this share of the layer's largest.")
@click.option("--bands", default="0.125,0.25", show_default=True,
              help="Edges of the low / mid / high frequency bands, cycles per pixel.")
@click.option("--fft-size", default=64, show_default=True, help="Zero-padded FFT size.")
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
    from .analyses.compare_filters import compare_filters as run

    png, rows = run(a, b, out=out, labels=labels, dead_fraction=dead_fraction, bands=bands, fft_size=fft_size)
    _table_then_path(rows, fmt, png)


# -- the paper's analyses ------------------------------------------------------
def device_option(f):
    return click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")(f)


def out_option(f):
    return click.option("--out", type=click.Path(path_type=Path),
                        help="Folder for the PNGs (default: inside the atlas, under analyses/).")(f)


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
    from .analyses.occlusion import occlude as run

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
    from .analyses.invariance import invariance as run

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
    from .analyses.correspondence import correspondence as run

    r = run(_open(atlas_path), spec, layers=layers.split(",") if layers else None, random=random_draws,
            seed=seed, fill=fill, device=device, out=out)
    click.echo(r.format_table())
    click.echo("\n".join(r.summary()))


# -- similarity search -----------------------------------------------------------
@main.command("index", context_settings=CONTEXT)
@atlas_argument
@click.option("--layers", help="Comma-separated layers to index images at (default: the deepest recorded conv "
              "layer, and fc7 when the model has it).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (for layers that need a "
              "forward pass).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
@format_option
def index_cmd(atlas_path, layers, device, batch_size, progress, fmt):
    """Build (or rebuild) an atlas's similarity indexes, for `atlas similar`.

    One image index per layer (each image's per-channel maxima; fc layers'
    outputs) and one channels index over every recorded conv layer (each
    channel's responses over a fixed sample of images). Conv layers are read
    from the activations table; fc layers, and atlases built with
    --no-activations, need the dataset for a forward pass. `atlas build` does
    this already unless given --no-index.

    \b
      atlas index my-atlas --layers conv3,conv5,fc7
    """
    from .similarity import build_indexes, index_summary

    record = build_indexes(atlas_path, layers, device=device, batch_size=batch_size, progress=progress, log=_say)
    click.echo(render_dicts(index_summary(record), fmt))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.option("--image", type=click.Path(path_type=Path), help="Any image file: images the network sees alike.")
@click.option("--image-id", type=int, help="An image of the atlas: images the network sees alike.")
@click.option("--channel", help="LAYER:CHANNEL, e.g. conv5:17: channels that respond to the same images.")
@click.option("--layer", help="Image queries: the indexed layer compared at (default: the deepest conv layer). "
              "Channel queries: only channels of this layer.")
@click.option("-k", "--k", "k", default=10, show_default=True, help="How many results.")
@format_option
def similar(atlas_path, image, image_id, channel, layer, k, fmt):
    """Nearest neighbours by cosine similarity: images like an image, or channels like a channel.

    \b
      atlas similar my-atlas --image-id 42             # rank, image_id, path, label, score
      atlas similar my-atlas --image cat.jpg --layer fc7 -k 5
      atlas similar my-atlas --channel conv5:17        # rank, layer, channel, score
    The same from SQL: SELECT * FROM similar_images(42, 10) JOIN images USING (image_id).
    """
    given = [o for o, v in (("--image", image), ("--image-id", image_id), ("--channel", channel)) if v is not None]
    if len(given) != 1:
        raise AtlasError(f"give exactly one of --image, --image-id and --channel (got {', '.join(given) or 'none'})")
    a = _open(atlas_path)
    if channel is not None:
        rows = a.similar_channels(channel, k=k, layer=layer)
    else:
        rows = a.similar_images(image_id=image_id, image=image, layer=layer, k=k)
    if not rows:
        _say("no results: the query's vector is all zero (nothing fires on it), so nothing is like it")
    click.echo(render_dicts(rows, fmt, ["rank", "layer", "channel", "score"] if channel is not None else
                            ["rank", "image_id", "path", "label", "score"]))


# -- publishing ----------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("site_dir", type=click.Path(path_type=Path))
@click.option("--layers", help="Comma-separated layers to export (default: all recorded).")
@click.option("--channels", help="Channels per layer, e.g. 0-15,17 (default: all).")
@click.option("--max-channels", type=int, help="Only the first N channels of each layer.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
def export(atlas_path, site_dir, layers, channels, max_channels, progress):
    """Export the atlas as a static site that opens from file:// or any static host.

    An index page, a page per layer (channel tiles you can sort and filter)
    and a page per channel (the figure 2 panel, statistics, histogram, label
    mix, similar channels, the SQL behind its numbers), each with a JSON twin.
    Re-exporting an unchanged atlas does almost no work.
    """
    from .export import export as run_export

    root = run_export(atlas_path, site_dir, layers=layers, channels=channels, max_channels=max_channels,
                      progress=progress, log=_say)
    click.echo(str(Path(root) / "index.html"))


if __name__ == "__main__":  # pragma: no cover
    main()
