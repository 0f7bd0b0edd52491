"""Similarity search: `index`, `similar`."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import AtlasError
from ..util.output import render_dicts
from .base import (CONTEXT, AtLeastOne, LayerChannel, atlas_argument, device_option, format_option,
                   keep_freed_memory_when_own, layers_option, main, progress_option, _open, _say)
from .browse import scale_option


@main.command("index", context_settings=CONTEXT)
@atlas_argument
@layers_option("Layers to index images at, e.g. conv3,conv5,fc7 (default: the deepest recorded conv layer, and "
               "fc7 when the model has it).")
@device_option
@progress_option
@format_option
def index_cmd(atlas_path, layers, device, progress, fmt):
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
    from ..search.indexing import build_indexes, index_summary

    keep_freed_memory_when_own()
    record = build_indexes(atlas_path, layers, device=device, progress=progress, log=_say)
    click.echo(render_dicts(index_summary(record), fmt))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.option("--image", type=click.Path(path_type=Path), help="Any image file: images the network sees alike.")
@click.option("--image-id", type=int, metavar="ID", help="An image of the atlas: images the network sees alike.")
@click.option("--channel", type=LayerChannel(), help="A channel, e.g. conv5:17: channels that respond to the "
              "same images.")
@click.option("--layer", metavar="LAYER", help="Image queries: the indexed layer compared at (default: the deepest "
              "indexed conv layer).")
@click.option("--of-layer", metavar="LAYER", help="Channel queries: only channels of this layer (default: of every "
              "recorded conv layer).")
@click.option("--limit", type=AtLeastOne(), default=10, show_default=True, metavar="N",
              help="How many results (N >= 1).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Also draw the results as a PNG contact sheet here: each image (or each channel's strongest "
              "image) with its rank and score, under a title.")
@scale_option
@format_option
def similar(atlas_path, image, image_id, channel, layer, of_layer, limit, out, scale, fmt):
    """Nearest neighbours by cosine similarity: images like an image, or channels like a channel.

    Ranks count from 0, as top-k ranks do: an image query's rank 0 is the
    image itself (score 1); a channel query leaves the channel out.

    \b
      atlas similar my-atlas --image-id 42             # rank, image_id, path, label, score
      atlas similar my-atlas --image cat.jpg --layer fc7 --limit 5
      atlas similar my-atlas --channel conv5:17        # rank, layer, channel, score
      atlas similar my-atlas --channel conv5:17 --of-layer conv4
      atlas similar my-atlas --image-id 42 --out like-42.png   # and a contact sheet
    The same from SQL: SELECT * FROM similar_images(42, 10) JOIN images USING (image_id).
    """
    given = [o for o, v in (("--image", image), ("--image-id", image_id), ("--channel", channel)) if v is not None]
    if len(given) != 1:
        raise AtlasError(f"give exactly one of --image, --image-id and --channel (got {', '.join(given) or 'none'})")
    if channel is not None and layer is not None:  # the deprecated spelling of --of-layer moved it (base.py)
        raise AtlasError("--layer is for image queries (--image, --image-id): a channel query takes --of-layer")
    if channel is None and of_layer is not None:
        raise AtlasError("--of-layer is for channel queries (--channel): an image query compares at --layer")
    a = _open(atlas_path)
    if channel is not None:
        rows = a.similar_channels(channel, k=limit, layer=of_layer)
    else:
        rows = a.similar_images(image_id=image_id, image=image, layer=layer, k=limit)
    if not rows:
        _say("no results: the query's vector is all zero (nothing fires on it), so nothing is like it")
    if out is not None:
        from ..search.similarity import contact_sheet

        query = (f"{channel[0]}:{channel[1]}" if channel is not None else
                 f"image {image_id}" if image_id is not None else Path(image).name)
        _say(f"contact sheet: {contact_sheet(a, rows, out, query=query, layer=layer, scale=scale)}")
    click.echo(render_dicts(rows, fmt, ["rank", "layer", "channel", "score"] if channel is not None else
                            ["rank", "image_id", "path", "label", "score"]))
