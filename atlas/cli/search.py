"""Similarity search: `index`, `similar`."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import AtlasError
from ..output import render_dicts
from .base import CONTEXT, atlas_argument, device_option, format_option, main, progress_option, _open, _say


@main.command("index", context_settings=CONTEXT)
@atlas_argument
@click.option("--layers", help="Comma-separated layers to index images at (default: the deepest recorded conv "
              "layer, and fc7 when the model has it).")
@device_option
@click.option("--batch-size", type=int, hidden=True)  # before 0.1: its own batch size; now the build's (below)
@progress_option
@format_option
def index_cmd(atlas_path, layers, device, batch_size, progress, fmt):
    """Build (or rebuild) an atlas's similarity indexes, for `atlas similar`.

    One image index per layer (each image's per-channel maxima; fc layers'
    outputs) and one channels index over every recorded conv layer (each
    channel's responses over a fixed sample of images). Conv layers are read
    from the activations table; fc layers, and atlases built with
    --no-activations, need the dataset for a forward pass. `atlas build` does
    this already unless given --no-index. A forward pass runs in the build's
    own batches (its recorded --batch-size), so it gives the numbers the build
    would have given.

    \b
      atlas index my-atlas --layers conv3,conv5,fc7
    """
    from ..similarity import build_indexes, index_summary

    if batch_size is not None:
        _say("warning: --batch-size is ignored: a forward pass of `atlas index` runs in the build's own batches, "
             "so it computes the build's numbers")
    record = build_indexes(atlas_path, layers, device=device, progress=progress, log=_say)
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

    Ranks count from 0, as top-k ranks do: an image query's rank 0 is the
    image itself (score 1); a channel query leaves the channel out.

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
