"""Feature visualization: `visualize` (the image a channel wants, beside the dataset's examples)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import AtlasError
from ..util.output import render_dicts
from .base import (CONTEXT, AtLeastOne, NumberList, atlas_argument, batch_size_option, cache_option, device_option,
                   format_option, main, progress_option, seed_option, _open, _say)
from .browse import ChannelNumber, NumbersAsArguments

PREVIEW_STEPS = 64  # enough for a channel's pattern to show; an eighth of the default's time
COLUMNS = ["layer", "channel", "objective", "unit_y", "unit_x", "steps", "seed", "map_max", "dataset_max", "ratio",
           "reached", "png"]


@main.command(cls=NumbersAsArguments, context_settings=CONTEXT)
@atlas_argument
@click.argument("layer")
@click.argument("channel", type=ChannelNumber(), required=False)
@click.option("--all", "all_channels", is_flag=True, help="Every channel of the layer, as batched jobs.")
@click.option("--channels", type=NumberList(), metavar="C1,C2,A-B",
              help="Channels of the layer, numbers and ranges, e.g. 0-15,17 (instead of CHANNEL).")
@click.option("--steps", type=AtLeastOne(), default=None, metavar="N",
              help="Optimisation steps (Adam) per image  [default: 512; --preview: 64]")
@click.option("--preview", is_flag=True, help="A quick look: 64 steps instead of 512 (an eighth of the time), "
              "cached apart from the full picture.")
@click.option("--unit", metavar="centre|Y,X",
              help="Maximise one unit of the map, the centre one or the one at row Y, column X, instead of the "
              "whole channel (the mean of its map)  [default: the channel]")
@click.option("--diversity", type=AtLeastOne(), default=1, show_default=True, metavar="N",
              help="Images per channel, pushed apart (shown side by side in one picture).")
@seed_option("each channel's own random stream (its start and its transformations)")
@batch_size_option("Images optimized together, a short batch padded to it (the same size gives the same "
                   "bytes)  [default: 8 on the CPU, 64 on a GPU]")
@device_option
@click.option("--out", type=click.Path(path_type=Path),
              help="Also copy the PNG here, a file or a folder (several channels: a folder; default: only the "
              "picture cache).")
@cache_option
@progress_option
@format_option(default=None, help="Print a row per channel (the picture's path, the spatial maximum of the "
               "channel's map on the finished untransformed image and its maximum over the dataset) as an aligned "
               "table, CSV or strict JSON  [default: the PNG paths alone]")
def visualize(atlas_path, layer, channel, all_channels, channels, steps, preview, unit, diversity, seed, batch_size,
              device, out, cache, progress, fmt):
    """The image a channel wants: optimized to excite it (feature visualization, Distill 2017).

    Rendered on the first request and cached in the atlas like its projections
    (in ~/.cache/atlas/pictures when the atlas cannot be written, or --cache
    DIR). A render is --steps forward and backward passes of a padded batch of
    --batch-size images, however many channels it holds: render a layer with
    --all. With the defaults (512 steps, batches of 8) the demo's zfnet-mini
    at 64 px took 1.9 s a channel batched on a shared 2-core CPU, 13 s for one
    channel alone (`atlas help featurevis`); on a GPU a batch holds 64.
    --preview is a quick look: 64 steps, cached apart.

    \b
      atlas visualize my-atlas conv5 17
      atlas visualize my-atlas conv5 --all --format json
      atlas visualize my-atlas conv3 5 --unit centre --out unit.png
    """
    from ..pictures.visualizations import deliver, visualize as run

    chosen = [x for x in (channel is not None, all_channels, channels is not None) if x]
    if len(chosen) != 1:
        raise AtlasError("give one of CHANNEL, --channels C1,C2 or --all" if not chosen else
                         "give CHANNEL, --channels or --all, not more than one")
    if preview and steps is not None:
        raise AtlasError("give --preview (64 steps) or --steps N, not both")
    steps = PREVIEW_STEPS if preview else (steps or 512)
    a = _open(atlas_path)
    wanted = None if all_channels else ([channel] if channel is not None else channels)
    recs = run(a, layer, wanted, steps=steps, seed=seed, unit=unit, diversity=diversity, batch_size=batch_size,
               device=device, cache=cache, progress=True if progress is None else progress, log=_say)
    if out is not None:
        if len(recs) > 1 and not Path(out).is_dir():
            Path(out).mkdir(parents=True, exist_ok=True)
        for r in recs:
            r["copy"] = str(deliver(Path(r["png"]), out, layer, r["channel"], atlas=a, record=r))
    if fmt is None:
        for r in recs:
            click.echo(r["png"])
        return
    click.echo(render_dicts(recs, fmt, COLUMNS + (["copy"] if out is not None else [])))
