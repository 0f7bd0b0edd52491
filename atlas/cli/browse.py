"""Reading an atlas: `sql`, `queries`, `info`, `layers`, `channels`, `top`, `show`, `filters`."""
from __future__ import annotations

import re
import time
from pathlib import Path

import click

from ..errors import AtlasError
from ..util.output import render, render_dicts
from .base import (CONTEXT, AtLeastOne, AtlasCommand, atlas_argument, cache_option, format_option, main, _open,
                   _say, progress_option)
from .publish import display_option, method_option


class NumbersAsArguments(AtlasCommand):
    """A command whose arguments may be negative numbers: `atlas top ATLAS conv1 -1` reaches the channel
    check (one line with the layer's range) instead of click's "No such option '-1'"."""

    def parse_args(self, ctx, args):
        if any(re.fullmatch(r"-\d+", a) for a in args):
            ctx.ignore_unknown_options = True  # click then passes "-1" on as an argument
        return super().parse_args(ctx, args)


class ChannelNumber(click.ParamType):
    """A channel number; its range (0..N-1 of the layer) is the atlas's to check (Atlas.check_channel)."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise AtlasError(f"channel '{value}' is not a channel number (a whole number, 0..N-1 for a layer "
                             "of N channels: see `atlas layers ATLAS`)") from None


scale_option = click.option(
    "--scale", type=click.FloatRange(0.25, 8), default=1.0, show_default=True, metavar="FACTOR",
    help="Draw the picture this many times larger, cells and text alike (2: for a slide at full width).")


def picture_options(f):
    """What every command that draws one picture takes: where else to write it, its scale, the cache, and how
    to print what it drew."""
    for option in reversed((
            click.option("--out", type=click.Path(path_type=Path),
                         help="Also write the PNG here, a file or a folder (default: only the picture cache)."),
            scale_option, cache_option,
            format_option(default=None, help="Print a row describing the picture, with its path, as an aligned "
                          "table, CSV or strict JSON  [default: the PNG's path alone]"))):
        f = option(f)
    return f


DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_ROWS = 1000


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("query", required=False)
@click.option("--file", "sql_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the SQL from a file (instead of QUERY).")
@click.option("--query", "-q", "canned", metavar="NAME",
              help="Run an example query from sql/queries by name (see `atlas queries`).")
@click.option("--param", "-p", multiple=True, metavar="NAME=VALUE",
              help="Set a SQL variable, read in the query with getvariable('NAME'); repeat for more.")
@click.option("--timeout", type=click.FloatRange(min=0), default=DEFAULT_TIMEOUT, show_default=True,
              metavar="SECONDS", help="Interrupt the SQL after this long (0: no limit). The limit is checked "
              "between the vectors (up to 2,048 rows) that DuckDB hands deconv_png, similar_images and "
              "similar_channels, which run Python: a vector being rendered or searched finishes first.")
@click.option("--max-rows", type=int, default=DEFAULT_MAX_ROWS, show_default=True, metavar="N",
              help="Print at most N rows of each result, and say so on stderr when there were more (0: every "
              "row, within --timeout).")
@click.option("--unsafe-full-duckdb", "unsafe", is_flag=True,
              help="Run the SQL with DuckDB's full access: any statement (COPY ... TO, ATTACH, CREATE, SET, "
              "INSTALL/LOAD), any file you can read or write, extensions and the network. Without it the SQL "
              "reads the atlas folder only and writes nothing.")
@format_option
def sql(atlas_path, query, sql_file, canned, param, timeout, max_rows, unsafe, fmt):
    """Query an atlas with SQL (DuckDB), read-only.

    The SQL reads the atlas and nothing else: read-only statements only (SELECT,
    WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, PIVOT, read-only PRAGMAs,
    SET VARIABLE), no file outside the atlas folder, no writes, no extensions;
    --unsafe-full-duckdb lifts all of it. Several statements (separated by ;)
    show each result in order: tables and CSV one after another with a blank
    line between, JSON as one list holding each statement's list of rows.

    ATLAS may also be a comparison folder (`atlas compare --out DIR`): views matches,
    layer_pairs and correlations, and each atlas's views in schemas a and b
    (a.channels, b.top_activations, ...); its named queries are sql/compare's.

    \b
    Views: images, layers, channels, top_activations, activations (and analyses, once run).
      atlas sql my-atlas "SELECT * FROM channels ORDER BY max DESC LIMIT 5"
      atlas sql my-atlas -q class_selectivity -p label=circle
    """
    from ..compare import Comparison, is_comparison
    from ..util.output import render_results
    from ..store import canned_queries

    sources = [s for s in (query, sql_file, canned) if s]
    if len(sources) != 1:
        raise AtlasError("give exactly one of QUERY, --file or --query")
    comparing = is_comparison(atlas_path)  # a folder `atlas compare` made: its views, and both atlases'
    if canned:
        known = canned_queries("compare" if comparing else "queries")
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
    started = time.monotonic()

    def tick():  # the limit covers the whole statement: running, fetching and printing
        if timeout and time.monotonic() - started > timeout:
            raise AtlasError(f"query interrupted after {timeout:g} s (--timeout) while printing its rows")

    target = Comparison(atlas_path) if comparing else _open(atlas_path)
    results = target.query(query, params, confined=not unsafe, timeout=timeout or None, max_rows=max_rows or None)
    if results:
        click.echo(render_results(results, fmt, tick))
    for n, r in enumerate(results, 1):
        if r.truncated:
            which = f"result {n}" if len(results) > 1 else "the result"
            click.echo(f"atlas sql: {which} has more rows than the {max_rows} printed (--max-rows N for more, "
                       "0 for all)", err=True)


@main.command(context_settings=CONTEXT)
@format_option
def queries(fmt):
    """List the example queries that `atlas sql --query NAME` runs: an atlas's, and a comparison's
    (`atlas sql DIR --query NAME` on a folder `atlas compare` made), with the parameters each reads
    (set with -p NAME=VALUE) and its whole description.

    \b
      atlas sql my-atlas -q cofiring -p layer=conv2
    """
    from ..store import canned_queries, query_parameters

    rows = [(n, which, ", ".join(query_parameters(q)) or "-", d)
            for which, folder in (("atlas", "queries"), ("comparison", "compare"))
            for n, (d, q) in canned_queries(folder).items()]
    click.echo(render(["name", "for", "parameters", "description"], rows, fmt))


@main.command(context_settings=CONTEXT)
@atlas_argument
@format_option(help="Print the summary as an aligned table or CSV (field, value), or the whole manifest as "
               "strict JSON.")
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
def info(atlas_path, fmt, as_json):
    """Summary of an atlas: model, weights, dataset, layers, timings.

    A table (or CSV) of the summary's fields; --format json (or --json) prints the
    whole manifest.json, as strict JSON.
    """
    from ..util.output import json_text

    from ..store.manifest import random_weights

    a = _open(atlas_path)
    m = a.manifest
    alert = random_weights(m["model"])
    if alert and (as_json or fmt in ("json", "csv")):  # machine formats stay parseable: the line goes to stderr
        click.echo(f"atlas info: {alert}", err=True)
    if as_json or fmt == "json":
        click.echo(json_text(m))
        return
    # a manifest's optional fields may be absent (an older atlas, one edited by hand): each read with a default
    mdl, ds, t = m["model"], m["dataset"], m.get("timings") or {}
    weights = ("random init (seed %s)" % mdl.get("seed")) if mdl.get("random_init") else \
        f"{mdl.get('weights')} (sha256 {str(mdl.get('weights_sha256'))[:12]}…)"
    tool, options = m.get("tool") or {}, m.get("options") or {}
    rate = f"{t['images_per_s']} images/s" if t.get("images_per_s") else "no images mined in a recorded run"
    fields = [
        ("atlas", str(a.path)),
        ("model", f"{mdl['name']}, {weights}"),
        ("dataset", f"{ds['root']} ({ds['kind']}): {ds['count']} images, {ds.get('errors', 0)} "
         "unreadable" + (f", {len(ds['classes'])} classes" if ds.get("classes") else ", unlabelled")),
        ("images", "each checked against the content hash it had at build time before it is drawn"
         if a.hashes_images else "not hashed (built before content hashes): pictures draw whatever is at the "
         "dataset's paths now"),
        ("input", m["preprocessing"].get("note") or ""),
        ("k", str(m["k"])),
        ("layers", ", ".join(a.layer_names)),
        ("indexes", _describe_indexes(m.get("index"))),
        ("built", f"{m.get('created')} with atlas {tool.get('version')} in {t.get('total_s')} s (" + rate
         + (f" over {len(t['runs'])} runs" if t.get("resumed") and isinstance(t.get("runs"), list) else "")
         + f" on {options.get('device')})"),
    ]
    if fmt == "csv":
        click.echo(render(["field", "value"], fields, "csv"))
    else:
        click.echo("\n".join(([alert] if alert else []) + [f"{k:<10} {v}" for k, v in fields]))


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
@click.option("--all", "all_", is_flag=True, help="Every candidate layer of the model (what --layers of `atlas "
              "build` takes), with its shape and receptive field, and whether this atlas recorded it.")
@format_option
def layers(atlas_path, all_, fmt):
    """The recorded layers with their geometry and how many channels are dead (--all: every candidate).

    \b
      atlas layers my-atlas
      atlas layers my-atlas --all      module paths of a ResNet: conv1, layer3.1, layer4, fc, ...
    """
    a = _open(atlas_path)
    if all_:
        click.echo(render_dicts(a.lmap.candidates(a.layer_names), fmt))
        return
    click.echo(render_dicts(a.layers(), fmt))


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("layer")
@click.option("--sort", default="channel", show_default=True,
              type=click.Choice(["channel", "mean", "std", "max", "fire_rate"]), help="The column to order by.")
@click.option("--desc", is_flag=True, help="Largest first.")
@click.option("--limit", type=AtLeastOne(), metavar="N", help="Show only the first N (N >= 1; default: all).")
@format_option
def channels(atlas_path, layer, sort, desc, limit, fmt):
    """A layer's channels with their statistics over the dataset."""
    rows = _open(atlas_path).channels(layer, sort, desc)
    click.echo(render_dicts(rows if limit is None else rows[:limit], fmt))


@main.command(cls=NumbersAsArguments, context_settings=CONTEXT)
@atlas_argument
@click.argument("layer")
@click.argument("channel", type=ChannelNumber())
@format_option
def top(atlas_path, layer, channel, fmt):
    """A channel's top-k activations: image, value, position and receptive-field box."""
    rows = _open(atlas_path).top(layer, channel)
    cols = ["rank", "image_id", "value", "y", "x", "x0", "y0", "x1", "y1", "label", "path"]
    click.echo(render_dicts(rows, fmt, cols))


@main.command(cls=NumbersAsArguments, context_settings=CONTEXT)
@atlas_argument
@click.argument("layer")
@click.argument("channel", type=ChannelNumber())
@click.option("--rank", type=int, metavar="R", help="Only this top-k entry's projection (0 = strongest; default: "
              "the panel of every entry).")
@click.option("--mode", type=click.Choice(["unit", "map"]), default="unit", show_default=True,
              help="unit: project the one strongest position; map: the channel's whole map (reads the image).")
@click.option("--norm", type=click.Choice(["identity", "gradient"]), default="identity", show_default=True,
              help="How local response normalisation is undone: passed through (the paper) or its gradient.")
@click.option("--switches", type=click.Choice(["auto", "stored", "recompute"]), default="auto", show_default=True,
              help="Max-pool switches from the atlas, or recomputed from the image (needs the dataset).")
@display_option
@method_option
@picture_options
@progress_option
def show(atlas_path, layer, channel, rank, mode, norm, switches, display, method, out, scale, cache, fmt, progress):
    """A channel's DeconvNet projections as a PNG (the paper's figure 2); prints its path (or a row, --format).

    The panel shows the top-k projections in a grid beside the matching image
    patches (each cell the unit's receptive field; light grey with thin lines
    beyond the image border), each projection scaled by --display. Rendered on the first request and cached inside the atlas (in
    ~/.cache/atlas/pictures when the atlas cannot be written, or --cache DIR).

    \b
      atlas show my-atlas conv5 17                 the panel
      atlas show my-atlas conv5 17 --rank 0 --out best.png
      atlas show my-atlas conv5 17 --format json   {"layer": ..., "png": ...}
    """
    from ..pictures.projections import show as run

    png = run(_open(atlas_path), layer, channel, rank, mode=mode, norm=norm, switches=switches, out=out, log=_say,
              cache=cache, display=display, method=method, scale=scale, progress=progress)
    _picture(png, fmt, {"picture": "panel" if rank is None else "projection", "layer": layer, "channel": channel,
                        "rank": rank, "mode": mode, "norm": norm, "display": display, "method": method})


@main.command(context_settings=CONTEXT)
@atlas_argument
@click.argument("layer", required=False)
@picture_options
def filters(atlas_path, layer, out, scale, cache, fmt):
    """The first layer's learned filters as a grid PNG (the paper's figure 6 view); prints its path (or a row).

    \b
      atlas filters my-atlas
    """
    from ..pictures.projections import filters as run

    a = _open(atlas_path)
    png = run(a, layer, out=out, cache=cache, scale=scale)
    convs = [g["layer"] for g in a.manifest.get("geometry", {}).get("layers", []) if g["kind"] == "conv"]
    _picture(png, fmt, {"picture": "filters", "layer": layer or (convs[:1] or [None])[0]})


def _picture(png, fmt, record: dict) -> None:
    """A picture command's result: its path (no --format), or one row describing it, with the path."""
    click.echo(str(png) if fmt is None else render_dicts([{**record, "png": str(png)}], fmt))
