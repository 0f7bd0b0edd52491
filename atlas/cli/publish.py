"""Publishing: `export`."""
from __future__ import annotations

from pathlib import Path

import click

from ..choices import DEFAULT_DISPLAY, DISPLAYS, METHODS
from .base import (CONTEXT, NumberList, atlas_argument, cache_option, layers_option, main, progress_option,
                   term_help, _say)


def display_option(f):
    return click.option("--display", type=click.Choice(DISPLAYS), default=DEFAULT_DISPLAY, show_default=True,
                        help=term_help("--display"))(f)


def method_option(f):
    return click.option("--method", type=click.Choice(METHODS), default=METHODS[0], show_default=True,
                        help=term_help("--method"))(f)


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("site_dir", type=click.Path(path_type=Path))
@layers_option("Layers to export, e.g. conv1,conv5 (default: every recorded layer).")
@click.option("--channels", type=NumberList(), metavar="C1,C2,A-B",
              help="Channels of each chosen layer, numbers and ranges, e.g. 0-15,17 (default: all).")
@click.option("--max-channels", type=int, metavar="N", help="Only the first N channels of each layer (default: "
              "all).")
@cache_option
@display_option
@click.option("--feature-vis", "feature_vis", is_flag=True,
              help="Also render the missing feature visualizations (an image optimized to excite each channel, "
              "shown beside its figure 2 panel and in its tile; `atlas visualize`), 512 steps, batched. Cost per "
              "channel: about 1.9 s on a 2-core CPU for the demo's zfnet-mini at 64 px (more for a bigger model or "
              "input). Without it the pages show those already cached and draw none.")
@click.option("--compare", "compare_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="A comparison of this atlas with another (`atlas compare ... --out DIR`): the site gets a page "
              "with each unit beside its counterpart, and each channel page links to it (default: none).")
@click.option("--panels", is_flag=True,
              help="Also put each channel's figure-2 panel on its page as one picture (WebP; about 60 KB a "
              "channel at 224 px, seven times its other pictures). The page shows the panel's cells either way.")
@progress_option
def export(atlas_path, site_dir, layers, channels, max_channels, cache, display, feature_vis, compare_dir, panels,
           progress):
    """Export the atlas as a static site that opens from file:// or any static host.

    An index page, a page per layer (channel tiles you can sort and filter)
    and a page per channel (the figure 2 panel's cells, statistics, histogram, label
    mix, similar channels, the SQL behind its numbers), each with a JSON twin.
    A page per image in an exported top-k: its strongest channels per layer.
    Pictures are WebP, each image patch once (a resnet50 layer4 channel's page,
    JSON and pictures: ~23 KB; the whole layer's site ~55 MB);
    `atlas show ATLAS LAYER CHANNEL --out DIR` gives its panel as PNG for a slide.
    The site is what was asked, no more: re-exporting with fewer channels or
    other layers removes the pages that are no longer asked for (never a file
    the export did not write), and re-exporting an unchanged atlas does almost
    no work. One export of a site at a time.
    """
    from ..export import export as run_export

    root = run_export(atlas_path, site_dir, layers=layers, channels=channels, max_channels=max_channels,
                      cache=cache, progress=progress, log=_say, display=display, feature_vis=feature_vis,
                      compare=compare_dir, panels=panels)
    click.echo(str(Path(root) / "index.html"))
