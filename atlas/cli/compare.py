"""Comparing two atlases: `compare` makes a comparison folder, `matches` reads one (`sql` queries one too)."""
from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..util.output import render_dicts
from .base import CONTEXT, CommaList, format_option, layers_option, main, progress_option, _say
from .browse import ChannelNumber
from .publish import display_option

PAIR_COLUMNS = ["layer_a", "layer_b", "images", "live_a", "live_b", "matched", "mean_one_to_one",
                "median_one_to_one", "mean_best_a", "mean_best_b", "mutual_best"]


def _rows_then(rows, fmt, columns, tail: str) -> None:
    """The rows on stdout; a closing line (a path) after them, or on stderr (CSV and JSON stay parseable)."""
    click.echo(render_dicts(rows, fmt, columns))
    click.echo(tail, err=fmt != "table")


@main.command(context_settings=CONTEXT)
@click.argument("a", metavar="A", type=click.Path(path_type=Path))
@click.argument("b", metavar="B", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The comparison folder to write (DIR): matches.parquet, layer_pairs.parquet, "
              "correlations.parquet, comparison.json, quality.png. It appears whole or not at all.")
@layers_option("Layers both atlases have by name, e.g. conv1,conv5 (default: every layer both have, unless "
               "--pairs is given).")
@click.option("--pairs", type=CommaList(), metavar="A_LAYER:B_LAYER,...",
              help="Layer pairs with different names, e.g. conv5:layer4 (A's layer first; default: none).")
@click.option("--overwrite", is_flag=True, help="Replace the comparison --out holds.")
@progress_option
@format_option
def compare(a, b, out, layers, pairs, overwrite, progress, fmt):
    """Compare two atlases unit by unit: which unit of B is each unit of A.

    For each layer pair, the correlation of every unit of A with every unit
    of B over the images both atlases read (paired by content hash when
    both record one, else by path in the same dataset), from the per-image
    statistics the builds stored (each image's spatial maximum per channel;
    an atlas built with --no-activations is refused). Then one-to-one
    matches (an optimal assignment, Li et al. 2016) and each unit's best
    match. Dead units get no match; ties go to the smaller channel. Prints
    the match quality per layer pair, then the folder.

    \b
      atlas compare run1-atlas run2-atlas --out cmp
      atlas compare zf-atlas alex-atlas --pairs conv5:conv5,conv4:conv3 --out cmp2
      atlas matches cmp conv3 5                    a unit, its counterpart, both panels
      atlas sql cmp -q unmatched_units             units with no counterpart
    """
    from ..compare import compare as run

    c = run(a, b, out, layers=layers, pairs=pairs, overwrite=overwrite, progress=progress, log=_say)
    _rows_then(list(c.layer_pairs), fmt, PAIR_COLUMNS, str(c.path))


@main.command(context_settings=CONTEXT)
@click.argument("comparison", metavar="DIR", type=click.Path(path_type=Path))
@click.argument("layer", required=False)
@click.argument("channel", type=ChannelNumber(), required=False)
@click.option("--kind", type=click.Choice(["one-to-one", "best"]), default="one-to-one", show_default=True,
              help="one-to-one: the optimal assignment; best: each unit's most correlated counterpart.")
@click.option("--atlas", "side", type=click.Choice(["a", "b"]), default="a", show_default=True,
              help="Whose unit LAYER and CHANNEL name: atlas A's (a) or B's (b).")
@display_option
@click.option("--out", type=click.Path(path_type=Path),
              help="Also write the PNG here, a file or a folder (default: only DIR/pictures, or DIR/quality.png).")
@format_option
def matches(comparison, layer, channel, kind, side, display, out, fmt):
    """Read a comparison made by `atlas compare`: its layers, a layer's matches, a unit's counterpart.

    \b
      atlas matches cmp                  match quality per layer pair; the chart's path
      atlas matches cmp conv3            conv3's matches; its match-quality chart's path
      atlas matches cmp conv3 5          conv3 channel 5 of A and its counterpart in B: the row,
                                         then a PNG of both figure-2 panels side by side
      atlas matches cmp conv3 5 --atlas b --kind best
    Rows print as a table (or --format csv|json); the PNG's path after them
    (on stderr with CSV and JSON).
    """
    from ..compare import Comparison

    c = Comparison(comparison)
    if layer is None:
        pic = c.quality()
        rows, cols = list(c.layer_pairs), PAIR_COLUMNS
    elif channel is None:
        rows = list(c.matches(layer, kind))
        cols = ["layer_a", "channel_a", "layer_b", "channel_b", "corr", "kind", "side"]
        pic = c.quality(layer, side)
    else:
        rows = [c.counterpart(layer, channel, kind, side)]
        cols = ["layer_a", "channel_a", "layer_b", "channel_b", "corr", "kind", "side"]
        pic = c.pair(layer, channel, kind=kind, side=side, display=display)
    png = Path(pic.path)
    if out is not None:
        target = out / png.name if out.is_dir() else out
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
        png = target
    _rows_then(rows, fmt, cols, str(png))
