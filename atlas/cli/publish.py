"""Publishing: `export`."""
from __future__ import annotations

from pathlib import Path

import click

from .base import CONTEXT, NumberList, atlas_argument, cache_option, layers_option, main, progress_option, _say


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("site_dir", type=click.Path(path_type=Path))
@layers_option("Layers to export, e.g. conv1,conv5 (default: every recorded layer).")
@click.option("--channels", type=NumberList(), metavar="C1,C2,A-B",
              help="Channels of each chosen layer, numbers and ranges, e.g. 0-15,17 (default: all).")
@click.option("--max-channels", type=int, metavar="N", help="Only the first N channels of each layer (default: "
              "all).")
@cache_option
@progress_option
def export(atlas_path, site_dir, layers, channels, max_channels, cache, progress):
    """Export the atlas as a static site that opens from file:// or any static host.

    An index page, a page per layer (channel tiles you can sort and filter)
    and a page per channel (the figure 2 panel, statistics, histogram, label
    mix, similar channels, the SQL behind its numbers), each with a JSON twin.
    The site is what was asked, no more: re-exporting with fewer channels or
    other layers removes the pages that are no longer asked for (never a file
    the export did not write), and re-exporting an unchanged atlas does almost
    no work. One export of a site at a time.
    """
    from ..export import export as run_export

    root = run_export(atlas_path, site_dir, layers=layers, channels=channels, max_channels=max_channels,
                      cache=cache, progress=progress, log=_say)
    click.echo(str(Path(root) / "index.html"))
