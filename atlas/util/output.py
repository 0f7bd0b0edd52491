"""Rows out to a terminal or a pipe: aligned table, CSV or JSON.

JSON is strict (RFC 8259), so that any JSON reader takes it: NaN and infinities are null, DuckDB's lists
and structs (maps) are arrays and objects, dates and times ISO 8601 strings, bytes a short description.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Callable, Iterable, Sequence

FORMATS = ("table", "csv", "json")


def plain(v: Any) -> Any:
    """A value as JSON has it (see the module's docstring)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    import datetime as dt  # here, not at the top: `atlas --help` imports this module
    import decimal
    import uuid

    if isinstance(v, decimal.Decimal):
        return (int(v) if v == v.to_integral_value() else float(v)) if v.is_finite() else None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(v))} bytes>"
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return _duration(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [plain(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return plain(v.tolist())
    return str(v)


def _duration(v) -> str:
    """A datetime.timedelta (DuckDB's INTERVAL) in ISO 8601: P1DT2H3M4.5S."""
    sign, v = ("-", -v) if v.total_seconds() < 0 else ("", v)
    hours, rest = divmod(v.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    secs = f"{seconds + v.microseconds / 1e6:g}"
    return f"{sign}P{v.days}DT{hours}H{minutes}M{secs}S"


def json_text(obj: Any) -> str:
    """obj as strict JSON, indented."""
    return json.dumps(plain(obj), indent=2, allow_nan=False, ensure_ascii=False)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(v))} bytes>"
    if isinstance(v, (dict, list, tuple)):  # a list or struct cell reads as JSON, not as Python's repr
        return json.dumps(plain(v), ensure_ascii=False)
    return str(v)


def _records(columns: Sequence[str], rows: list[list[Any]]) -> list[dict[str, Any]]:
    return [{c: v for c, v in zip(columns, r)} for r in rows]


def render(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str = "table",
           tick: Callable[[], None] | None = None) -> str:
    """The rows as an aligned table, CSV or JSON. `tick`: called every few thousand rows (a deadline's
    check: `atlas sql --timeout` covers printing too)."""
    rows = [list(r) for r in _ticking(rows, tick)]
    if fmt == "json":
        return json_text(_records(columns, rows))
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_cell(v) for v in r] for r in _ticking(rows, tick)])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in r] for r in _ticking(rows, tick)]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and rows != [] for i in
               range(len(columns))]
    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()
    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def render_dicts(rows: list[dict[str, Any]], fmt: str = "table", columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    return render(columns, [[r.get(c) for c in columns] for r in rows], fmt)


def render_results(results: Sequence[Sequence], fmt: str = "table", tick: Callable[[], None] | None = None) -> str:
    """Several (columns, rows, ...) results, in order: one JSON document (a list of each result's list of rows;
    one result alone is just its list, as `render` gives it), or tables / CSV blocks with a blank line between."""
    if fmt == "json" and len(results) != 1:
        return json_text([_records(r[0], [list(row) for row in _ticking(r[1], tick)]) for r in results])
    return "\n\n".join(render(r[0], r[1], fmt, tick) for r in results)


def _ticking(rows: Iterable, tick: Callable[[], None] | None, every: int = 4096):
    for n, row in enumerate(rows):
        if tick is not None and n % every == 0:
            tick()
        yield row
