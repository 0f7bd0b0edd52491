"""A comparison folder, opened: its SQL (beside both atlases), its pictures, and its notebook display.

SQL: the views `matches`, `layer_pairs` and `correlations` (the folder's tables), and each atlas's own
views in a schema of its own, `a` and `b` (a.channels, b.top_activations, ...), so a query joins a match
to both units' statistics. `query` is confined as `atlas sql` is: read-only, and no file outside the
comparison folder and the two atlas folders. Named queries live in sql/compare/.

Pictures: `pair(layer, channel)` draws a unit's figure-2 panel beside its counterpart's (each atlas's own
projections, from its stored switches), `quality(layer)` the chart of a layer pair's one-to-one
correlations; both are PNGs under DIR/pictures/, drawn once.
"""
from __future__ import annotations

import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from ..errors import AtlasError
from ..store.manifest import LAYER_NAME
from ..util.files import link_outside
from ..util.schema import Int, List, Obj, Str
from ..util.files import atomic_write
from ..store.sql_guard import confine
from ..store import AtlasReader, Result, _quote

TABLES = ("matches", "layer_pairs", "correlations")
KINDS = ("one-to-one", "best")


def is_comparison(path: str | os.PathLike) -> bool:
    return (Path(path) / "comparison.json").is_file()


def _record(path: Path) -> dict[str, Any]:
    f = path / "comparison.json"
    if not path.is_dir():
        raise AtlasError(f"comparison '{path}' does not exist")
    if not f.is_file():
        raise AtlasError(f"'{path}' is not a comparison: it has no comparison.json (make one with "
                         f"`atlas compare A B --out {path}`)")
    try:
        record = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise AtlasError(f"comparison '{path}' has an unreadable comparison.json") from None
    # a comparison may come from someone else, as an atlas may: no link out of it, every field used checked
    found = link_outside(path)
    if found is not None:
        raise AtlasError(f"comparison '{path}': {found[0].relative_to(path.resolve())} is a link to '{found[1]}', "
                         "outside the comparison folder; a comparison reads and writes only its own files")
    try:
        RECORD.check(record, "")
    except AtlasError as e:
        raise AtlasError(f"comparison '{path}': comparison.json {e}") from None
    return record


SIDE = Obj({"path": Str(what="an atlas folder path")})
RECORD = Obj({"a": SIDE, "b": SIDE,
              "images": Obj({"shared": Int(0, 10 ** 10), "paired_by": Str(choices=("content_hash", "path"))}),
              "layer_pairs": List(Obj({"layer_a": LAYER_NAME, "layer_b": LAYER_NAME}), 0, 100_000)})


class _ComparisonSQL(AtlasReader):
    """The SQL side: AtlasReader's query machinery (confinement, deadline, one-line errors) over a
    connection with the comparison's views and both atlases' views in schemas a and b."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.record = _record(self.path)
        self.manifest = {}
        self._given_model = None
        import threading

        self._lock = threading.RLock()
        self._registered: set[str] = set()

    def sides(self) -> dict[str, AtlasReader]:
        """The atlases that are still where the comparison found them."""
        out = {}
        for side in ("a", "b"):
            try:
                out[side] = AtlasReader(self.record[side]["path"])
            except AtlasError:
                continue
        return out

    @cached_property
    def con(self):
        import duckdb

        root = self.path.resolve()
        missing = [f"{t}.parquet" for t in TABLES if not (root / f"{t}.parquet").is_file()]
        if missing:
            raise AtlasError(f"comparison '{self.path}' is damaged: {missing[0]} is missing; make it again with "
                             "`atlas compare ... --overwrite`")
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
                             if self._confined else {})
        for t in TABLES:
            con.execute(f"CREATE OR REPLACE VIEW {t} AS SELECT * FROM read_parquet({_quote(f'{root}/{t}.parquet')})")
        allowed = [root]
        for side, reader in self.sides().items():
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {side}")
            con.execute(f"SET schema = '{side}'")
            for statement in reader.view_statements():
                con.execute(statement)
            con.execute("SET schema = 'main'")
            allowed.append(reader.path.resolve())
        if self._confined:
            confine(con, self, allowed)
        return con


class Comparison:
    """Two atlases compared (`atlas compare`, `atlas.compare.compare`): `layer_pairs` and `matches`
    (Tables), `counterpart(layer, channel)`, `query`/`sql` (SQL beside both atlases), `pair(layer,
    channel)` and `quality(layer)` (Pictures). In a notebook it shows its chart and its layer pairs."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.record = _record(self.path)
        self._sql = _ComparisonSQL(self.path)

    def __repr__(self) -> str:
        return (f"<Comparison {self.path}: {Path(self.record['a']['path']).name} vs "
                f"{Path(self.record['b']['path']).name}, {self.record['images']['shared']} images>")

    # -- SQL ------------------------------------------------------------------------------
    def query(self, sql: str, params: dict[str, Any] | None = None, *, confined: bool = True,
              timeout: float | None = None, max_rows: int | None = None) -> list[Result]:
        """Run a SQL script (read-only and confined unless confined=False): `atlas sql DIR` runs this."""
        return self._sql.query(sql, params, confined=confined, timeout=timeout, max_rows=max_rows)

    def sql(self, query: str, params: dict[str, Any] | None = None):
        """A DuckDB relation over the comparison's views and the atlases' (schemas a and b)."""
        return self._sql.sql(query, params)

    def rows(self, query: str, params: list | None = None) -> list[dict[str, Any]]:
        return self._sql.rows(query, params)

    # -- data -----------------------------------------------------------------------------
    @property
    def layer_pairs(self):
        from ..notebook import Table

        rows = self.rows("SELECT * FROM layer_pairs")
        return Table(rows, title=f"{self.names[0]} vs {self.names[1]}: match quality per layer pair")

    @property
    def names(self) -> tuple[str, str]:
        return Path(self.record["a"]["path"]).name, Path(self.record["b"]["path"]).name

    def matches(self, layer: str | None = None, kind: str = "one-to-one"):
        """The matches (a Table): of a layer of A (or of the pair whose A or B layer it is), one kind."""
        from ..notebook import Table

        if kind not in KINDS:
            raise AtlasError(f"unknown kind of match '{kind}': use {' or '.join(KINDS)}")
        where, params = "kind = ?", [kind]
        if layer is not None:
            self._layer_pair(layer)
            where += " AND (layer_a = ? OR layer_b = ?)"
            params += [layer, layer]
        rows = self.rows(f"SELECT * FROM matches WHERE {where} ORDER BY layer_a, side, channel_a, channel_b",
                         params)
        return Table(rows, title=f"{kind} matches" + (f" of {layer}" if layer else ""))

    def _layer_pair(self, layer: str, side: str = "a") -> tuple[str, str]:
        if side not in ("a", "b"):
            raise AtlasError(f"side must be a or b (got '{side}')")
        pairs = [(p["layer_a"], p["layer_b"]) for p in self.record["layer_pairs"]]
        key = 0 if side == "a" else 1
        for p in pairs:
            if p[key] == layer:
                return p
        have = ", ".join(f"{x}~{y}" for x, y in pairs)
        raise AtlasError(f"comparison '{self.path}' has no layer pair with {layer} in {side.upper()} "
                         f"(its pairs: {have})")

    def counterpart(self, layer: str, channel: int, kind: str = "one-to-one", side: str = "a"
                    ) -> dict[str, Any]:
        """The match row of unit (layer, channel) of A (side='b': of B): its counterpart and the correlation
        (channel NULL: none)."""
        if kind not in KINDS:
            raise AtlasError(f"unknown kind of match '{kind}': use {' or '.join(KINDS)}")
        la, lb = self._layer_pair(layer, side)
        mine = "channel_a" if side == "a" else "channel_b"
        rows = self.rows(f"SELECT * FROM matches WHERE layer_a = ? AND layer_b = ? AND kind = ? AND {mine} = ? "
                         f"AND (side = ? OR kind = 'one-to-one')", [la, lb, kind, int(channel), side])
        if not rows:
            n = self.rows("SELECT channels_a, channels_b FROM layer_pairs WHERE layer_a = ? AND layer_b = ?",
                          [la, lb])[0]["channels_" + side]
            raise AtlasError(f"channel {channel} is out of range for {layer} (0..{n - 1})")
        return rows[0]

    # -- pictures -------------------------------------------------------------------------
    def atlas(self, side: str):
        """Atlas A or B (atlas.open), where the comparison found it."""
        from ..facade import Atlas

        return Atlas(self.record[side]["path"])

    def pair(self, layer: str, channel: int, *, kind: str = "one-to-one", side: str = "a",
             display: str | None = None):
        """A unit's figure-2 panel beside its counterpart's (a Picture)."""
        from ..notebook import Picture
        from ..pictures.projections import DEFAULT_DISPLAY

        display = display or DEFAULT_DISPLAY
        m = self.counterpart(layer, channel, kind, side)
        path = self.path / "pictures" / _safe(f"pair-{kind}-{side}-{m['layer_a']}-{m['channel_a']}-"
                                              f"{m['layer_b']}-{m['channel_b']}-{display}.png")
        if not path.is_file():
            from .figures import pair_figure

            pair_figure(self, m, path, display)
        a_name, b_name = self.names
        return Picture(path, f"{a_name} {m['layer_a']}:{m['channel_a']} and {b_name} {m['layer_b']}:"
                             f"{m['channel_b']} ({kind}, r = {_r(m['corr'])})")

    def quality(self, layer: str | None = None, side: str = "a"):
        """The chart of one-to-one correlations, best first: every layer pair's (quality.png), or the pair of
        `layer` (of A, or of B with side='b')."""
        from ..notebook import Picture

        if layer is None:
            return Picture(self.path / "quality.png", "match quality of every layer pair")
        la, lb = self._layer_pair(layer, side)
        path = self.path / "pictures" / _safe(f"quality-{la}-{lb}.png")
        if not path.is_file():
            rows = self.rows("SELECT * FROM layer_pairs WHERE layer_a = ? AND layer_b = ?", [la, lb])
            values = [r["corr"] for r in self.rows(
                "SELECT corr FROM matches WHERE layer_a = ? AND layer_b = ? AND kind = 'one-to-one' AND side = 'a' "
                "AND corr IS NOT NULL", [la, lb])]
            quality_chart(rows, {(la, lb): values}, path, title=f"{self.names[0]} {la} vs {self.names[1]} {lb}")
        return Picture(path, f"match quality of {la} ~ {lb}")

    def _repr_html_(self) -> str:
        from ..notebook import STYLE, _img, escape

        a_name, b_name = self.names
        head = (f"<h3>{escape(a_name)} vs {escape(b_name)}</h3><p class='muted'>{self.record['images']['shared']} "
                f"shared images (paired by {escape(self.record['images']['paired_by'])}); c.pair(LAYER, C) shows a "
                "unit beside its counterpart</p>")
        q = self.quality()
        return (f'{STYLE}<div class="atlas-nb">{head}{_img(q.png(), q.title)}'
                f"{self.layer_pairs._repr_html_()}</div>")


def _r(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def quality_chart(summaries: Sequence[dict], values: dict[tuple[str, str], list[float]], path: Path,
                  title: str) -> Path:
    """One curve per layer pair: its one-to-one correlations, best first, over the share of matched units;
    the legend says the mean."""
    from ..pictures.charts import label_colours, line_plot, margin

    series = []
    for s, colour in zip(summaries, label_colours(len(summaries))):
        v = sorted(values.get((s["layer_a"], s["layer_b"]), []), reverse=True)
        xs = [(i + 0.5) / len(v) for i in range(len(v))]
        name = s["layer_a"] if s["layer_a"] == s["layer_b"] else f"{s['layer_a']}~{s['layer_b']}"
        mean = s.get("mean_one_to_one")
        series.append((f"{name} (mean {_r(mean)}, {len(v)} pairs)", colour, xs, v))
    low = min([0.0] + [min(v) for v in values.values() if v])
    im = line_plot(series, title=title, xlabel="matched units, best first (share of the pairs)",
                   ylabel="correlation", size=(520, 300), ylim=(low, 1.0))
    atomic_write(path, lambda tmp: margin(im, 6).save(tmp, format="PNG"))
    return path
