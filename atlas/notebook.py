"""The atlas in a notebook: objects that show themselves inline in Jupyter and hand their data to Python.

    a = atlas.open("my-atlas")
    a                              # a summary: model, weights, dataset, k, the layers with their statistics
    ch = a.channel("conv5", 17)    # statistics, the figure 2 panel and the top-k with thumbnails
    ch.panel                       # the panel as a picture (a `Picture`: .image() PIL, .array() numpy)
    ch.projection(0)               # one projection (a `Projection`: also .values(), the signed array)
    ch.top.to_pandas()             # the top-k as a DataFrame (.to_arrow(): a pyarrow Table, always)
    a.similar_images(image_id=42)  # a `Table` of rows with thumbnails of the images
    a.analysis("occlusion")        # an analysis's figures and its table

Jupyter asks an object for `_repr_html_` (or `_repr_png_`) and shows what it returns; nothing here
imports IPython, so these objects cost nothing outside a notebook, and the data methods work
anywhere. The HTML is self-contained: pictures are `data:` URIs (thumbnails re-encoded at
`THUMB` px, a panel or figure as its own PNG), so a saved notebook shows them without the atlas.
Every string from the dataset or the user is escaped by the site's rule (markupsafe, what the
exported site's Jinja templates escape with), so a file named `<img src=x onerror=...>.png` is text.

`Table` is a list of dicts (what `similar_images`, `similar_channels` and `top` always returned), so
code that used those lists keeps working. Importing this module imports only the standard library;
Pillow, numpy and pyarrow are imported when a picture or a table is asked for, pandas only by
`to_pandas`.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import AtlasError

THUMB = 64          # thumbnails' longest side, px
MAX_ROWS = 50       # rows a table shows inline (the data holds all of them)
STYLE = ("<style>.atlas-nb table{border-collapse:collapse;font-size:12px}"
         ".atlas-nb th,.atlas-nb td{padding:2px 8px;border-bottom:1px solid #dde2e6;text-align:left;"
         "vertical-align:middle}.atlas-nb th{background:#f4f6f8}.atlas-nb td.n{text-align:right;"
         "font-variant-numeric:tabular-nums}.atlas-nb img{image-rendering:pixelated;vertical-align:middle}"
         ".atlas-nb .muted{color:#66707a}.atlas-nb h3{margin:4px 0}"
         ".atlas-nb .random-weights{color:#b3261e;font-weight:600;margin:4px 0}</style>")


def random_weights_line(atlas) -> str | None:
    """The loud line of an atlas of an untrained model (None for trained weights)."""
    from .store.manifest import random_weights

    return random_weights(atlas.manifest["model"])


def random_weights_html(atlas) -> str:
    """That line as the first thing in a display ("" for trained weights)."""
    return _warning_html(random_weights_line(atlas))


def _warning_html(line: str | None) -> str:
    return f'<p class="random-weights">{escape(line)}</p>' if line else ""


# ---------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------
def escape(value: Any) -> str:
    """`value` as HTML text, escaped as the exported site escapes it (markupsafe: & < > " ')."""
    from markupsafe import escape as _escape

    return str(_escape("" if value is None else str(value)))


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _cell(v: Any) -> str:
    cls = ' class="n"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
    return f"<td{cls}>{escape(_num(v))}</td>"


def png_data_uri(png: bytes) -> str:
    """A data: URI for PNG or WebP bytes (by their signature)."""
    mime = "image/webp" if png[:4] == b"RIFF" and png[8:12] == b"WEBP" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")


WEB_QUALITY = 55  # WebP's lossy quality inside a notebook's HTML: labels still read (looked at on the demo's panels)


def web(png: bytes | None) -> bytes | None:
    """PNG bytes as lossy WebP for a notebook's HTML: a channel's panel and its 18 thumbnails as PNG weighed
    about 280 KB of base64 in every saved notebook; as WebP about a fifth of that. The files on disk (the
    cache, `Picture.path`, `_repr_png_`) stay PNG. The site's encoder with the notebook's settings
    (atlas/pictures/webp.py): method 6, every byte counts where pictures are base64 in the HTML."""
    if png is None:
        return None
    from .pictures.webp import encode

    return encode(png, quality=WEB_QUALITY, method=6)


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail(source: str | Path | Any, size: int = THUMB) -> bytes:
    """PNG bytes of a picture file or a PIL image, its longest side brought to `size` px (NEAREST when
    enlarging, so pixels stay pixels; LANCZOS when shrinking)."""
    from PIL import Image

    if isinstance(source, (str, Path)):
        with Image.open(source) as im:
            im = im.convert("RGB")
    else:
        im = source.convert("RGB")
    scale = size / max(im.size)
    if scale != 1:
        w, h = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize((w, h), Image.NEAREST if scale > 1 else Image.LANCZOS)
    return web(_png_bytes(im))


def _img(png: bytes | None, alt: str, width: int | None = None, natural: bool = False) -> str:
    """An <img> of PNG or WebP bytes. `natural`: at its own size, never shrunk to the cell's width (a
    figure's labels blur when it is)."""
    if png is None:
        return f'<span class="muted">{escape(alt)}: unavailable</span>'
    w = f' width="{int(width)}"' if width else ""
    style = ' style="max-width:none"' if natural else ""
    return f'<img src="{png_data_uri(png)}" alt="{escape(alt)}"{w}{style}>'


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(_num(v))}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------
class Table(list):
    """Rows (dicts) that show as an HTML table, thumbnails first, and give their data as Arrow or pandas.

    thumbs   {column title: row -> PNG bytes or None}, drawn only when the table is shown
    warning  a line shown above the table (an atlas of random weights says so on every display)
    """

    def __init__(self, rows: Iterable[dict[str, Any]] = (), columns: Sequence[str] | None = None, *,
                 title: str | None = None, thumbs: dict[str, Callable[[dict], bytes | None]] | None = None,
                 warning: str | None = None):
        super().__init__(rows)
        self.columns = list(columns) if columns is not None else _columns(self)
        self.title = title
        self.thumbs = dict(thumbs or {})
        self.warning = warning

    def to_arrow(self):
        """A pyarrow Table of the rows (the columns in order; thumbnails are display only)."""
        import pyarrow as pa

        if not self:
            return pa.table({c: pa.array([], pa.null()) for c in self.columns})
        return pa.Table.from_pylist([{c: r.get(c) for c in self.columns} for r in self])

    def to_pandas(self):
        """A pandas DataFrame of the rows (needs pandas: pip install pandas)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise AtlasError("to_pandas needs pandas, which is not installed: pip install pandas "
                             "(to_arrow gives the same table without it)") from None
        return self.to_arrow().to_pandas()

    def _repr_html_(self) -> str:
        return self._html(with_warning=True)

    def _html(self, with_warning: bool, thumbs: bool = True) -> str:
        """with_warning False: inside a display that has already said it (a channel's top-k). thumbs False:
        inside a display that already shows the pictures (a channel's panel holds its top-k's cells, so its
        table gives the numbers alone and a saved notebook carries each picture once)."""
        shown = self.thumbs if thumbs else {}
        head = "".join(f"<th>{escape(c)}</th>" for c in [*shown, *self.columns])
        body = []
        for r in self[:MAX_ROWS]:
            pics = "".join(f"<td>{_img(_safe(make, r), name)}</td>" for name, make in shown.items())
            body.append(f"<tr>{pics}{''.join(_cell(r.get(c)) for c in self.columns)}</tr>")
        more = (f'<p class="muted">{len(self) - MAX_ROWS} more rows: .to_arrow() or .to_pandas() has them all</p>'
                if len(self) > MAX_ROWS else "")
        title = f"<h3>{escape(self.title)}</h3>" if self.title else ""
        warn = _warning_html(self.warning) if with_warning else ""
        return (f'{STYLE}<div class="atlas-nb">{warn}{title}<table><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table>{more}'
                f'<p class="muted">{len(self)} rows</p></div>')


def _columns(rows: Sequence[dict]) -> list[str]:
    out: dict[str, None] = {}
    for r in rows:
        out.update(dict.fromkeys(r))
    return list(out)


def _safe(make: Callable[[dict], bytes | None], row: dict) -> bytes | None:
    """A thumbnail, or None when its picture cannot be had (an image gone, no switches): a table shows
    what it can."""
    try:
        return make(row)
    except (AtlasError, OSError):
        return None


# ---------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------
class Picture:
    """A PNG of the atlas (a figure 2 panel, a projection, a patch, a filter grid, an analysis figure).

    `path` is the file; `image()` a PIL image, `array()` a uint8 (h, w, 3) numpy array, `text` its
    PNG text (`atlas.pictures.drawing.read_text`: layer, channel, the display rule, ...). In a notebook it
    shows itself (`_repr_png_`, or `_repr_html_` with its caption)."""

    def __init__(self, path: str | Path, title: str | None = None):
        self.path = Path(path)
        self.title = title

    def __repr__(self) -> str:
        return f"<Picture {self.title or self.path.name}: {self.path}>"

    def __fspath__(self) -> str:
        return str(self.path)

    def png(self) -> bytes:
        return self.path.read_bytes()

    def image(self):
        """The picture as a PIL image (RGB)."""
        from PIL import Image

        with Image.open(self.path) as im:
            return im.convert("RGB")

    def array(self):
        """The picture as a uint8 numpy array (h, w, 3)."""
        import numpy as np

        return np.asarray(self.image())

    def __array__(self, dtype=None, copy=None):
        a = self.array()
        return a if dtype is None else a.astype(dtype)

    @property
    def text(self) -> dict[str, str]:
        from .pictures.drawing import read_text

        return read_text(self.path)

    def _repr_png_(self) -> bytes:
        return self.png()

    def _caption(self) -> str:
        return escape(self.title or self.path.name)

    def _repr_html_(self) -> str:
        return (f'{STYLE}<figure class="atlas-nb" style="margin:0">{_img(web(self.png()), self.title or self.path.name, natural=True)}'
                f'<figcaption class="muted">{self._caption()}</figcaption></figure>')


class Projection(Picture):
    """One top-k entry's DeconvNet projection: the picture, and `values()` the signed projection."""

    def __init__(self, atlas, layer: str, channel: int, rank: int, path: Path, display: str):
        super().__init__(path, f"{layer} channel {channel}, rank {rank}: projection ({display} display)")
        self.atlas, self.layer, self.channel, self.rank, self.display = atlas, layer, channel, rank, display

    def values(self):
        """The projection as float32 numpy (3, h, w) over its receptive-field box (unclipped, zero
        beyond the image), in the model's input units: what the picture shows before display scaling."""
        from .pictures.projections import project

        P = project(self.atlas, self.layer, self.channel, [self.rank])
        m = P.meta[0]
        s = P.image_size
        box = tuple(m["rf_box"]) if m["mode"] == "unit" else (0, 0, s, s)
        v = P.crop(0, box)
        return v.detach().float().cpu().numpy() if hasattr(v, "detach") else v


# ---------------------------------------------------------------------------
# a channel
# ---------------------------------------------------------------------------
class Channel:
    """One channel of an atlas: `stats` (a dict), `top` (a Table with thumbnails), `panel` (the figure 2
    panel, a Picture), `projection(rank)`, `patch(rank)`, `similar(k)` (a Table)."""

    def __init__(self, atlas, layer: str, channel: int, *, display: str | None = None):
        from .pictures.projections import DEFAULT_DISPLAY, _check_options

        atlas.check_channel(layer, channel)
        self.atlas, self.layer, self.channel = atlas, layer, int(channel)
        self.display = display or DEFAULT_DISPLAY
        _check_options("unit", "identity", "auto", self.display)
        self._stats: dict[str, Any] | None = None
        self._pics: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<Channel {self.layer}:{self.channel} of {self.atlas.path}>"

    @property
    def stats(self) -> dict[str, Any]:
        """mean, std, max, fire_rate over the dataset (the `channels` row)."""
        if self._stats is None:
            rows = self.atlas.rows("SELECT mean, std, max, fire_rate FROM channels WHERE layer = ? AND channel = ?",
                                   [self.layer, self.channel])
            self._stats = rows[0] if rows else {}
        return self._stats

    @property
    def dead(self) -> bool:
        m = self.stats.get("max")
        return m is not None and m <= 0

    def _pictures(self) -> dict[str, Any]:
        """{"proj": [Path|None], "patch": [...], "panel": Path|None, "error": str|None} (drawn once, cached)."""
        if self._pics is None:
            from .pictures.projections import renderer

            rows = self.atlas.top(self.layer, self.channel)
            r = renderer(self.atlas, display=self.display)
            with r.lock:
                got = r.channels(self.layer, [self.channel], {self.channel: rows}, panel=True)[self.channel]
            self._pics = {**got, "rows": rows}
        return self._pics

    @property
    def top(self) -> Table:
        """The channel's top-k (rank, image_id, value, y, x, box, path, label), with thumbnails of each
        projection and image patch."""
        rows = self.atlas.top(self.layer, self.channel)

        def pic(kind):
            def make(row):
                pics = self._pictures()
                at = pics["at"].get(row["rank"])  # the renderer's own rank -> index
                p = pics[kind][at] if at is not None else None
                return thumbnail(p) if p is not None else None
            return make

        return Table(rows, title=f"{self.layer} channel {self.channel}: top {len(rows)}",
                     thumbs={"projection": pic("proj"), "patch": pic("patch")},
                     warning=random_weights_line(self.atlas))

    @property
    def panel(self) -> Picture:
        """The figure 2 panel: the top-k projections beside their image patches."""
        from .pictures.projections import show

        return Picture(show(self.atlas, self.layer, self.channel, display=self.display),
                       f"{self.layer} channel {self.channel}: figure 2 panel ({self.display} display)")

    def projection(self, rank: int = 0) -> Projection:
        from .pictures.projections import show

        p = show(self.atlas, self.layer, self.channel, rank, display=self.display)
        return Projection(self.atlas, self.layer, self.channel, rank, p, self.display)

    def patch(self, rank: int = 0) -> Picture:
        """The image patch of a top-k entry (its receptive field in the image the net saw)."""
        pics = self._pictures()
        at = pics["at"].get(rank)
        if at is None:
            raise AtlasError(f"rank {rank} is out of range for {self.layer} channel {self.channel} "
                             f"(0..{len(pics['rows']) - 1})")
        if pics["patch"][at] is None:
            raise AtlasError(pics["error"] or f"no patch for {self.layer} channel {self.channel} rank {rank}")
        return Picture(pics["patch"][at], f"{self.layer} channel {self.channel}, rank {rank}: image patch")

    def similar(self, k: int = 10, layer: str | None = None) -> Table:
        """The channels whose responses are most like this one's (`Atlas.similar_channels`)."""
        return similar_channels_table(self.atlas, self.atlas.similar_channels((self.layer, self.channel), k=k,
                                                                              layer=layer), self.display)

    def _repr_html_(self) -> str:
        s = self.stats
        head = (f"<h3>{escape(self.layer)} · channel {self.channel}"
                + (' <span class="muted">(dead)</span>' if self.dead else "") + "</h3>")
        kv = _kv([("max", s.get("max")), ("mean", s.get("mean")), ("std", s.get("std")),
                  ("fire rate", s.get("fire_rate"))])
        try:
            panel = self.panel
            pic = _img(web(panel.png()), panel.title or "panel", natural=True)
        except AtlasError as e:
            pic = f'<p class="muted">no panel: {escape(e)}</p>'
        err = self._pictures().get("error") if self._pics is not None else None
        warn = f'<p class="muted">incomplete: {escape(err)}</p>' if err else ""
        return (f'{STYLE}<div class="atlas-nb">{random_weights_html(self.atlas)}{head}'
                '<div style="display:flex;gap:16px;align-items:flex-start">'
                f"{kv}<div>{pic}</div></div>{warn}{self.top._html(with_warning=False, thumbs=False)}</div>")


# ---------------------------------------------------------------------------
# similarity results
# ---------------------------------------------------------------------------
def similar_images_table(atlas, rows: list[dict[str, Any]]) -> Table:
    """`similar_images` rows as a Table whose thumbnails are the images as the network saw them."""
    def make(row):
        return thumbnail(atlas.image(row["image_id"])[1])

    return Table(rows, ["rank", "image_id", "score", "label", "path"], title="similar images",
                 thumbs={"image": make}, warning=random_weights_line(atlas))


def similar_channels_table(atlas, rows: list[dict[str, Any]], display: str | None = None) -> Table:
    """`similar_channels` rows as a Table whose thumbnails are each channel's strongest projection."""
    from .pictures.projections import DEFAULT_DISPLAY, show

    def make(row):
        return thumbnail(show(atlas, row["layer"], row["channel"], 0, display=display or DEFAULT_DISPLAY))

    return Table(rows, ["rank", "layer", "channel", "score"], title="similar channels",
                 thumbs={"projection": make}, warning=random_weights_line(atlas))


# ---------------------------------------------------------------------------
# the atlas and its analyses
# ---------------------------------------------------------------------------
def atlas_html(atlas) -> str:
    """The atlas as a summary: model, weights, dataset, k, its layers, the analyses run."""
    m = atlas.manifest
    mdl, ds = m["model"], m["dataset"]
    weights = (f"random initialisation, seed {mdl.get('seed')}" if mdl.get("random_init")
               else f"{Path(str(mdl.get('weights'))).name} (sha256 {str(mdl.get('weights_sha256'))[:12]}…)")
    classes = ds.get("classes") or []
    kv = _kv([("atlas", str(atlas.path)), ("model", mdl["name"]), ("weights", weights),
              ("dataset", f"{ds.get('spec')} ({ds.get('kind')})"), ("images", ds.get("count")),
              ("unreadable", ds.get("errors")), ("classes", len(classes) if classes else "unlabelled"),
              ("k", m.get("k")), ("input", m.get("preprocessing", {}).get("note"))])
    cols = ["layer", "channels", "height", "width", "rf_size", "jump", "dead", "mean_fire_rate"]
    layers = Table(atlas.layers(), cols, title="layers")._html(with_warning=False)
    names = analysis_names(atlas)
    an = (f'<p>analyses: {", ".join(escape(n) for n in names)} <span class="muted">(a.analysis(NAME))</span></p>'
          if names else "")
    return (f'{STYLE}<div class="atlas-nb">{random_weights_html(atlas)}<h3>Feature atlas of {escape(mdl["name"])}</h3>'
            f'{kv}{layers}{an}'
            f'<p class="muted">a.channel(LAYER, C) shows a channel; a.similar_images(image_id=N), '
            f"a.similar_channels('LAYER:C') find what is alike.</p></div>")


def analysis_names(atlas) -> list[str]:
    root = Path(atlas.path, "analyses")
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


class Analysis:
    """An analysis's results in the atlas (ATLAS/analyses/NAME/): `runs`, `figures(run)` (Pictures),
    `table` (a Table of its SQL view's rows, all runs; .to_arrow() / .to_pandas())."""

    def __init__(self, atlas, name: str, run: str | None = None):
        names = analysis_names(atlas)
        if name not in names:
            have = ", ".join(names) if names else "none yet (run `atlas occlude`, `invariance`, ...)"
            raise AtlasError(f"atlas '{atlas.path}' has no analysis '{name}': it has {have}")
        self.atlas, self.name = atlas, name
        self.dir = Path(atlas.path, "analyses", name)
        runs = self.runs
        if run is not None and run not in runs:
            raise AtlasError(f"analysis '{name}' has no run '{run}': its runs are {', '.join(runs) or 'none'}")
        self.run = run

    def __repr__(self) -> str:
        return f"<Analysis {self.name} of {self.atlas.path}: {len(self.runs)} runs>"

    @property
    def runs(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir())

    def figures(self, run: str | None = None) -> list[Picture]:
        """The run's pictures (default: this Analysis's run, else every run's), each run's figure first
        and its panels in the figure's order (as the exported page orders them)."""
        from .choices import OCCLUSION_PANELS

        order = {s: i for i, s in enumerate(OCCLUSION_PANELS if self.name == "occlusion" else ())}
        out = []
        for r in [run or self.run] if (run or self.run) else self.runs:
            files = sorted((p for p in (self.dir / r).glob("*.png")),
                           key=lambda p: (p.stem != "figure", order.get(p.stem, len(order)), p.name))
            out += [Picture(p, f"{self.name} {r}: {p.stem}") for p in files]
        return out

    @property
    def table(self) -> Table:
        warning = random_weights_line(self.atlas)
        if not any(self.dir.glob("*.parquet")):
            return Table([], [], title=f"{self.name}: no table", warning=warning)
        where = " WHERE run = ?" if self.run else ""
        rows = self.atlas.rows(f'SELECT * FROM "{self.name}"{where}', [self.run] if self.run else None)
        return Table(rows, title=f"table {self.name}" + (f", run {self.run}" if self.run else ""), warning=warning)

    def _repr_html_(self) -> str:
        parts = []
        for r in [self.run] if self.run else self.runs:
            figs = self.figures(r)
            if figs:  # the run's figure (it holds its panels: each shown once)
                parts.append(f"<h3>{escape(self.name)} · run {escape(r)}</h3>{_img(web(figs[0].png()), figs[0].title, natural=True)}")
        top = random_weights_html(self.atlas)
        try:
            table = self.table._html(with_warning=False)
        except AtlasError as e:
            table = f'<p class="muted">{escape(e)}</p>'
        return f'{STYLE}<div class="atlas-nb">{top}{"".join(parts)}{table}</div>'


class ShowsItsFigure:
    """For an analysis's result (occlude(), invariance(), correspondence()): in a notebook it shows its
    figure and its summary lines; `figure` is the figure as a Picture (None when none was drawn)."""

    # the random-weights line of the atlas it ran on (set by the analysis; None for trained weights)
    warning: str | None = None

    @property
    def figure(self) -> Picture | None:
        figs = getattr(self, "figures", None) or {}
        path = figs.get("figure")
        return Picture(path, title=f"{type(self).__name__} {getattr(self, 'run', '')}".strip()) if path else None

    def _repr_png_(self) -> bytes | None:
        fig = self.figure
        return fig.png() if fig is not None else None

    def _repr_html_(self) -> str:
        fig = self.figure
        lines = self.summary() if hasattr(self, "summary") else []
        text = "".join(f"<div>{escape(line)}</div>" for line in lines)
        pic = _img(web(fig.png()), fig.title or fig.path.name, natural=True) if fig is not None else ""
        return f'{STYLE}<div class="atlas-nb atlas-analysis">{_warning_html(self.warning)}{pic}{text}</div>'
