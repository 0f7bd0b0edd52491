"""Publishing: `export`."""
from __future__ import annotations

from pathlib import Path

import click

from .base import CONTEXT, atlas_argument, main, progress_option, _say


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("site_dir", type=click.Path(path_type=Path))
@click.option("--layers", help="Comma-separated layers to export (default: all recorded).")
@click.option("--channels", help="Channels per layer, e.g. 0-15,17 (default: all).")
@click.option("--max-channels", type=int, help="Only the first N channels of each layer.")
@progress_option
def export(atlas_path, site_dir, layers, channels, max_channels, progress):
    """Export the atlas as a static site that opens from file:// or any static host.

    An index page, a page per layer (channel tiles you can sort and filter)
    and a page per channel (the figure 2 panel, statistics, histogram, label
    mix, similar channels, the SQL behind its numbers), each with a JSON twin.
    Re-exporting an unchanged atlas does almost no work.
    """
    from ..export import export as run_export

    root = run_export(atlas_path, site_dir, layers=layers, channels=channels, max_channels=max_channels,
                      progress=progress, log=_say)
    click.echo(str(Path(root) / "index.html"))
