"""Rows out to a terminal or a pipe: aligned table, CSV or JSON."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Iterable, Sequence

FORMATS = ("table", "csv", "json")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    return str(v)


def render(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str = "table") -> str:
    rows = [list(r) for r in rows]
    if fmt == "json":
        def plain(v):
            if isinstance(v, (bytes, bytearray)):
                return f"<{len(v)} bytes>"
            if isinstance(v, float) and math.isnan(v):
                return None
            return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        return json.dumps([{c: plain(v) for c, v in zip(columns, r)} for r in rows], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_cell(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in r] for r in rows]
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
