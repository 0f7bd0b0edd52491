"""What the pages show, read from the atlas in bulk (one pass per layer, never one query per channel).

Every number here has a SQL twin in `sql_for_channel`, shown on the channel
page, that reproduces it with `atlas sql ATLAS "..."`.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import OCCLUSION_PANELS

HIST_BINS = 24
# The files of an analysis run whose figure.png sets them side by side, in the figure's order: the
# page shows the figure once and lists these after it
PANEL_ORDER = {"occlusion": OCCLUSION_PANELS}
SIMILAR = 6
UNLABELLED = "(unlabelled)"


def _clean(v: Any) -> Any:
    """JSON-safe scalars: NaN/inf -> None, numpy -> Python."""
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def layer_summaries(a) -> list[dict[str, Any]]:
    """Per recorded conv layer: geometry plus summary statistics of its channels."""
    rows = a.rows(
        "SELECT l.*, count(c.channel) FILTER (WHERE c.max <= 0) AS dead, "
        "count(c.channel) FILTER (WHERE c.fire_rate < 0.01) AS rarely_fire, "
        "avg(c.mean) AS mean_of_means, max(c.max) AS max, avg(c.fire_rate) AS mean_fire_rate "
        "FROM layers l LEFT JOIN channels c USING (layer) GROUP BY ALL")
    order = {n: i for i, n in enumerate(a.layer_names)}
    rows.sort(key=lambda r: order.get(r["layer"], len(order)))
    return [{k: _clean(v) for k, v in r.items()} for r in rows]


def channel_stats(a, layer: str) -> list[dict[str, Any]]:
    rows = a.rows("SELECT channel, mean, std, max, fire_rate FROM channels WHERE layer = ? ORDER BY channel",
                  [layer])
    for r in rows:
        for k in ("mean", "std", "max", "fire_rate"):
            r[k] = _clean(r[k])
        r["dead"] = r["max"] is None or r["max"] <= 0
    return rows


def top_rows(a, layer: str) -> dict[int, list[dict[str, Any]]]:
    """channel -> its top-k rows (rank order) with the image's path and label."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in a.rows("SELECT t.channel, t.rank, t.image_id, t.value, t.y, t.x, t.x0, t.y0, t.x1, t.y1, "
                    "i.path, i.label FROM top_activations t JOIN images i USING (image_id) "
                    "WHERE t.layer = ? ORDER BY t.channel, t.rank", [layer]):
        r["value"] = _clean(r["value"])
        out.setdefault(r.pop("channel"), []).append(r)
    return out


UNREADABLE_SHOWN = 10
UNREADABLE_SQL = "SELECT image_id, path, error FROM images WHERE status = 'error' ORDER BY image_id;"


def unreadable_images(a, shown: int = UNREADABLE_SHOWN) -> dict[str, Any]:
    """The images the build could not read: {"count", "shown": the first few (image_id, path, error),
    "sql": the query that lists them all}."""
    count = a.rows("SELECT count(*) AS n FROM images WHERE status = 'error'")[0]["n"]
    rows = a.rows(f"{UNREADABLE_SQL[:-1]} LIMIT {int(shown)}") if count else []
    return {"count": int(count), "shown": rows, "sql": UNREADABLE_SQL}


def label_mix(tops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The labels among a channel's top-k, most frequent first (ties by label): label, n, share."""
    c = Counter(r["label"] if r["label"] is not None else UNLABELLED for r in tops)
    n = sum(c.values())
    return [{"label": lab, "n": k, "share": round(k / n, 3)} for lab, k in sorted(c.items(), key=lambda t: (-t[1], t[0]))]


def activation_summary(a, layer: str, channels: int, bins: int = HIST_BINS, similar: int = SIMILAR
                       ) -> dict[str, Any] | None:
    """Histograms of each channel's per-image maxima and its most correlated channels, in one
    streamed pass over the layer's activations (memory: C x C, not images x C).

    Returns {"hist": {channel: {"lo", "hi", "counts"}}, "similar": {channel: [{"channel", "r"}]},
    "images": N} or None when the atlas has no activations table for the layer.
    """
    if not a.has_activations(layer):
        return None
    lim = {r["channel"]: (r["lo"], r["hi"]) for r in a.rows(
        "SELECT channel, min(value::DOUBLE) AS lo, max(value::DOUBLE) AS hi FROM activations "
        "WHERE layer = ? GROUP BY channel", [layer])}
    if not lim:
        return None
    C = channels
    lo = np.array([lim.get(c, (0.0, 0.0))[0] for c in range(C)], dtype=np.float64)
    hi = np.array([lim.get(c, (0.0, 0.0))[1] for c in range(C)], dtype=np.float64)
    span = hi - lo
    safe = np.where(span > 0, span, np.inf)  # a constant channel: everything in bin 0, as the SQL says
    counts = np.zeros((C, bins), dtype=np.int64)
    s1 = np.zeros(C)
    gram = np.zeros((C, C))
    n = 0
    for block in _image_blocks(a, layer, C):
        x = block.astype(np.float64)  # (images, C)
        b = np.clip(np.floor((x - lo) * bins / safe), 0, bins - 1).astype(np.int64)
        counts += np.bincount((b + np.arange(C) * bins).ravel(), minlength=C * bins).reshape(C, bins)
        s1 += x.sum(0)
        gram += x.T @ x
        n += x.shape[0]
    sim: dict[int, list[dict[str, Any]]] = {}
    if n >= 2:
        mean = s1 / n
        cov = gram / n - np.outer(mean, mean)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = cov / np.outer(sd, sd)
        ok = sd > 1e-12 * np.maximum(np.abs(mean), 1.0)
        r[~ok, :] = np.nan
        r[:, ~ok] = np.nan
        np.fill_diagonal(r, np.nan)
        r = np.clip(r, -1.0, 1.0)
        for c in range(C):
            row = r[c]
            if not ok[c]:
                sim[c] = []
                continue
            cand = np.where(np.isfinite(row))[0]
            best = cand[np.lexsort((cand, -row[cand]))][:similar]
            sim[c] = [{"channel": int(j), "r": round(float(row[j]), 4)} for j in best]
    hist = {c: {"lo": _clean(lo[c]), "hi": _clean(hi[c]), "counts": counts[c].tolist()} for c in range(C)}
    return {"hist": hist, "similar": sim, "images": n, "bins": bins}


def _image_blocks(a, layer: str, C: int, rows_per_block: int = 1 << 20):
    """Yield (images, C) float32 blocks of the layer's activations, one row per image.

    The build writes each image's C channels as consecutive rows in channel
    order; that layout is read straight from the Parquet files. Anything else
    (a hand-made table) goes through DuckDB, sorted.
    """
    import pyarrow.parquet as pq

    files = sorted(Path(a.path, "activations", f"layer={layer}").glob("*.parquet"))
    expect = np.arange(C, dtype=np.int64)
    try:
        blocks = []
        carry_v = np.zeros(0, np.float32)
        carry_c = np.zeros(0, np.int64)
        for f in files:
            pf = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering keeps every row group read until close
            for batch in pf.iter_batches(batch_size=rows_per_block, columns=["channel", "value"]):
                ch = np.concatenate([carry_c, batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)])
                v = np.concatenate([carry_v, batch.column(1).to_numpy(zero_copy_only=False).astype(np.float32)])
                m = (len(v) // C) * C
                if m and not np.array_equal(ch[:m].reshape(-1, C), np.broadcast_to(expect, (m // C, C))):
                    raise ValueError("layout")
                carry_c, carry_v = ch[m:], v[m:]
                if m:
                    blocks.append(v[:m].reshape(-1, C))
                    if sum(len(b) for b in blocks) * C >= rows_per_block:
                        yield from blocks
                        blocks = []
        if len(carry_v):
            raise ValueError("layout")
        yield from blocks
        return
    except ValueError:
        pass
    # Fallback: pivot through DuckDB (sorted; missing channels count as 0).
    rel = a.con.execute("SELECT image_id, channel, value FROM activations WHERE layer = ? "
                        "ORDER BY image_id, channel", [layer])
    cur_id, row = None, np.zeros(C, np.float32)
    out = []
    while True:
        chunk = rel.fetchmany(65536)
        if not chunk:
            break
        for image_id, channel, value in chunk:
            if image_id != cur_id:
                if cur_id is not None:
                    out.append(row)
                cur_id, row = image_id, np.zeros(C, np.float32)
            if 0 <= channel < C:
                row[channel] = value
        if len(out) >= 4096:
            yield np.stack(out)
            out = []
    if cur_id is not None:
        out.append(row)
    if out:
        yield np.stack(out)


def q(s: str) -> str:
    """A SQL string literal."""
    return "'" + str(s).replace("'", "''") + "'"


def sql_for_channel(layer: str, channel: int, bins: int = HIST_BINS, similar: int = SIMILAR) -> list[dict[str, str]]:
    """The queries that reproduce a channel page's numbers (run with `atlas sql ATLAS "..."`)."""
    L = q(layer)
    c = int(channel)
    return [
        {"title": "Statistics over the dataset",
         "sql": f"SELECT * FROM channels WHERE layer = {L} AND channel = {c};"},
        {"title": "Top-k activations (the panel)",
         "sql": "SELECT t.rank, t.image_id, i.path, i.label, t.value, t.y, t.x, t.x0, t.y0, t.x1, t.y1\n"
                "FROM top_activations t JOIN images i USING (image_id)\n"
                f"WHERE t.layer = {L} AND t.channel = {c}\nORDER BY t.rank;"},
        {"title": "Label mix of the top-k",
         "sql": "SELECT coalesce(i.label, '(unlabelled)') AS label, count(*) AS n,\n"
                "       round(count(*) / sum(count(*)) OVER (), 3) AS share\n"
                "FROM top_activations t JOIN images i USING (image_id)\n"
                f"WHERE t.layer = {L} AND t.channel = {c}\nGROUP BY ALL ORDER BY n DESC, label;"},
        {"title": f"Histogram of the per-image maxima ({bins} bins from min to max)",
         "sql": "WITH v AS (SELECT value::DOUBLE AS value FROM activations\n"
                f"           WHERE layer = {L} AND channel = {c}),\n"
                "     r AS (SELECT min(value) AS lo, max(value) AS hi FROM v)\n"
                f"SELECT least(greatest(coalesce(floor((value - lo) * {bins} / nullif(hi - lo, 0)), 0), 0), "
                f"{bins - 1})::INT AS bin,\n"
                f"       lo + bin * (hi - lo) / {bins} AS bin_start, count(*) AS images\n"
                "FROM v, r GROUP BY ALL ORDER BY bin;"},
        {"title": "Most similar channels (correlation of per-image maxima)",
         "sql": "SELECT b.channel, round(corr(a.value, b.value), 4) AS r\n"
                "FROM activations a JOIN activations b USING (image_id, layer)\n"
                f"WHERE a.layer = {L} AND a.channel = {c} AND b.channel <> {c}\n"
                "GROUP BY b.channel HAVING NOT isnan(r) ORDER BY r DESC, b.channel "
                f"LIMIT {similar};"},
    ]


# What a page's SQL is written with for the shared templates (sql_templates): a layer no atlas has, a
# number no page shows
_LAYER_MARK, _NUMBER_MARK = "\u2063layer\u2063", 987654321


def sql_templates() -> dict[str, list[dict[str, str]]]:
    """The channel and image pages' queries with `{L}` for the layer's SQL literal (q(layer)) and `{C}` for
    the channel or image number: shipped once in the site (static/sql.js, filled in by atlas.js from the
    section's data-l and data-c) rather than in every page (2.3 KB each: 4.7 MB of a resnet50 layer4)."""
    def fill(items: list[dict[str, str]]) -> list[dict[str, str]]:
        out = []
        for it in items:
            sql = it["sql"].replace(q(_LAYER_MARK), "{L}").replace(str(_NUMBER_MARK), "{C}")
            assert _LAYER_MARK not in sql and str(_NUMBER_MARK) not in it["title"]
            out.append({"title": it["title"], "sql": sql})
        return out

    return {"channel": fill(sql_for_channel(_LAYER_MARK, _NUMBER_MARK)), "image": fill(sql_for_image(_NUMBER_MARK))}


def linked_run(a) -> Path | None:
    """The training run an atlas links: the folder of its weights when `atlas train` wrote them
    (`atlas build --weights RUN_DIR/final.pt`) and the file there is still the one the atlas was built from
    (its sha256), else None: a manifest from someone else could name any folder, and its pictures would be
    published with the site."""
    m = a.manifest.get("model", {})
    w, sha = m.get("weights"), m.get("weights_sha256")
    if not w or not sha or not Path(w).is_file():
        return None
    from ..models.weights import file_sha256

    run = Path(w).parent
    return run if (run / "config.json").is_file() and file_sha256(w) == sha else None


def linked_pictures(a) -> dict[str, dict[Path, str]]:
    """Analysis pictures that live in the linked training run rather than the atlas:
    {analysis name: {picture: group (the run folder's name)}}."""
    run = linked_run(a)
    if run is None:
        return {}
    fig = run / "evolution.png"  # where `atlas evolution RUN_DIR` writes by default
    return {"evolution": {fig: run.name}} if fig.is_file() else {}


def analyses(a) -> list[dict[str, Any]]:
    """What the analyses left in ATLAS/analyses/NAME/ (its tables, SQL views, and pictures), plus
    the pictures of the linked training run (see linked_pictures)."""
    known = {
        # the general method only: what each run measured (model, layer, map, class) is read from its own rows
        "occlusion": ("Occlusion sensitivity", "figure 7: a square slid over an image; the total activation of "
                      "one map of a layer, its projection, and the probability of a class, at each position"),
        "evolution": ("Feature evolution", "figure 4: the strongest activation of a few channels per layer "
                      "over training epochs, projected to pixels"),
        "invariance": ("Invariance", "figure 5: feature distance at a layer and the probability of a class "
                       "under translation, scale and rotation"),
        "correspondence": ("Correspondence", "figure 8 / table 7: consistency of occluding the same part "
                           "across images (Hamming distance of feature-difference signs)"),
    }
    out = []
    root = Path(a.path, "analyses")
    linked = linked_pictures(a)
    dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    dirs += [root / name for name in sorted(linked) if not (root / name).is_dir()]
    for d in dirs:
        tables = sorted(d.glob("*.parquet")) if d.is_dir() else []
        order = {stem: i for i, stem in enumerate(PANEL_ORDER.get(d.name, ()))}
        pictures = sorted((p for p in (d.rglob("*") if d.is_dir() else []) if p.is_file()
                           and not p.name.startswith(".")
                           and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".webp")),
                          # a run's figure first, then its panels in the figure's order, then the rest by name
                          key=lambda p: (str(p.parent), p.stem != "figure", order.get(p.stem, len(order)),
                                         p.name))
        pictures = list(linked.get(d.name, {})) + pictures
        if not tables and not pictures:
            continue
        title, about = known.get(d.name, (d.name.replace("_", " ").capitalize(), ""))
        view = d.name if tables and d.name.replace("_", "").isalnum() else None
        out.append({"name": d.name, "title": title, "about": about, "dir": d, "tables": tables,
                    "view": view, "pictures": pictures, "linked": linked.get(d.name, {})})
    return out


def analysis_rows(a, view: str, limit: int = 50) -> tuple[list[str], list[list[Any]], int]:
    """(columns, first rows as display values, total rows) of an analysis view."""
    total = a.con.execute(f'SELECT count(*) FROM "{view}"').fetchone()[0]
    cur = a.con.execute(f'SELECT * FROM "{view}" LIMIT {int(limit)}')
    cols = [d[0] for d in cur.description]
    rows = [[_display(v) for v in r] for r in cur.fetchall()]
    return cols, rows, int(total)


def _display(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(v))} bytes>"
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else str(v)
    if isinstance(v, (int, str, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return f"[{len(v)} values]"
    return str(v)


# What an analysis run measured, read from its own rows (never assumed from the analysis's name): the
# columns a run's rows share, by name, as the analyses write them (atlas/analyses/*: COLUMNS)
RECORD = ("model", "image", "path", "dataset_label", "layer", "channel", "size", "stride", "fill", "transform",
          "part", "kind", "control_for", "images", "class_name", "class_source", "true_class")


def analysis_runs(a, view: str) -> list[dict[str, Any]]:
    """Per run of an analysis view: {"run", "rows", and for each RECORD column it has, its distinct
    non-null values (sorted)}, and "measured": the run in words (`measured`)."""
    cols = [d[0] for d in a.con.execute(f'SELECT * FROM "{view}" LIMIT 0').description]
    have = [c for c in RECORD if c in cols]
    run = '"run"' if "run" in cols else "''"
    parts = ", ".join(f'list_sort(list_distinct(list("{c}"))) AS "{c}"' for c in have)
    cur = a.con.execute(f'SELECT {run} AS run, count(*) AS rows{", " + parts if parts else ""} FROM "{view}" '
                        "GROUP BY ALL ORDER BY run")
    names = [d[0] for d in cur.description]
    out = []
    for r in cur.fetchall():
        rec = dict(zip(names, r))
        rec = {k: ([_display(x) for x in v] if isinstance(v, list) else _display(v)) for k, v in rec.items()}
        rec["measured"] = measured(view, rec)
        out.append(rec)
    return out


def _one(vals: Any) -> str:
    vals = [str(v) for v in (vals or [])]
    return vals[0] if len(vals) == 1 else ", ".join(vals)


def class_words(rec: dict[str, Any]) -> str | None:
    """The class whose probability a run charted, as its rows say (class_source: given | true |
    most_probable), claiming no more than they do; None when the run charted no class."""
    names, sources = rec.get("class_name") or [], rec.get("class_source") or []
    if not names:
        return None
    which = f"p({_one(names)})"
    if sources == ["true"]:
        return f"{which}, the image's true class"
    if sources == ["given"]:
        return f"{which}, the class asked for"
    if sources == ["most_probable"]:
        return f"{which}, the most probable class of the unaltered image (the correct class is unknown)"
    return f"{which} ({_one(sources)})" if sources else which


def measured(view: str, rec: dict[str, Any]) -> str:
    """One run of an analysis in words, from its record (analysis_runs)."""
    model = _one(rec.get("model")) or "the model"
    image = _one(rec.get("path") or rec.get("image"))
    cls = class_words(rec)
    layer, channel = _one(rec.get("layer")), _one(rec.get("channel"))
    if view == "occlusion":
        what = f"{model} on {image}" if image else model
        sq = f"a {_one(rec.get('fill'))} square of {_one(rec.get('size'))} px, stride {_one(rec.get('stride'))}"
        s = f"{what}: {sq}; the total activation of {layer} channel {channel} (the {layer} map strongest on the " \
            "unoccluded image)"
        return s + (f", and {cls}" if cls else "; no class probability (no classifier output)")
    if view == "invariance":
        what = f"{model} on {image}" if image else model
        s = f"{what}: {_one(rec.get('transform'))}; the feature distance at {layer}"
        return s + (f", and {cls}" if cls else "")
    bits = [f"{k} {_one(rec[k])}" for k in RECORD if rec.get(k) and k not in ("model", "class_name", "class_source")]
    s = model + (": " + "; ".join(bits) if bits else "")
    return s + (f"; {cls}" if cls else "")


# -- the image pages ------------------------------------------------------------------
STRONGEST = 8  # channels listed per layer on an image page


def images_of(a, ids: list[int]) -> dict[int, dict[str, Any]]:
    """image_id -> its row (image_id, path, label), for these images."""
    if not ids:
        return {}
    return {r["image_id"]: r for r in a.rows("SELECT image_id, path, label FROM images "
                                             "WHERE image_id IN (SELECT unnest(?::BIGINT[])) ORDER BY image_id",
                                             [sorted(ids)])}


def strongest_channels(a, layer: str, ids: list[int], n: int = STRONGEST) -> dict[int, list[dict[str, Any]]] | None:
    """image_id -> the n channels of `layer` whose per-image maximum (the activations table) is largest on
    it, strongest first (ties: the lower channel); None when the atlas has no activations for the layer.
    One query per layer for every image (the SQL on each image page is this, for one image)."""
    if not ids or not a.has_activations(layer):
        return None
    out: dict[int, list[dict[str, Any]]] = {}
    for r in a.rows("SELECT image_id, channel, value FROM (SELECT image_id, channel, value, row_number() OVER "
                    "(PARTITION BY image_id ORDER BY value DESC, channel) AS r FROM activations "
                    "WHERE layer = ? AND image_id IN (SELECT unnest(?::BIGINT[]))) WHERE r <= ? "
                    "ORDER BY image_id, r", [layer, sorted(ids), int(n)]):
        out.setdefault(r["image_id"], []).append({"channel": r["channel"], "value": _clean(r["value"])})
    return out


def sql_for_image(image_id: int, n: int = STRONGEST) -> list[dict[str, str]]:
    """The queries that reproduce an image page's numbers (run with `atlas sql ATLAS "..."`)."""
    i = int(image_id)
    return [
        {"title": f"Its {n} strongest channels per layer (per-image maxima)",
         "sql": "SELECT layer, channel, value FROM (\n"
                "  SELECT layer, channel, value,\n"
                "         row_number() OVER (PARTITION BY layer ORDER BY value DESC, channel) AS r\n"
                f"  FROM activations WHERE image_id = {i})\n"
                f"WHERE r <= {n} ORDER BY layer, r;"},
        {"title": "The top-k entries it holds",
         "sql": f"SELECT layer, channel, rank, value FROM top_activations WHERE image_id = {i}\n"
                "ORDER BY layer, channel, rank;"},
    ]
