"""Reading an atlas: `sql`, `queries`, `info`, `layers`, `channels`, `top`, `show`, `filters`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import AtlasError
from ..output import render, render_dicts
from .base import CONTEXT, atlas_argument, format_option, main, _open, _say


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
    from ..store import canned_queries

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
    from ..store import canned_queries

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
    from ..projections import show as run

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
    from ..projections import filters as run

    click.echo(str(run(_open(atlas_path), layer, out=out)))
