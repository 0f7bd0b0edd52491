"""`compare(a, b, out)`: the correlation of every unit of A with every unit of B over their shared images,
layer pair by layer pair, the matches, and the comparison folder they are published in.

    DIR/comparison.json      what was compared: both atlases (path, model, weights), how images were paired
                             and how many, the statistic, the layer pairs, timings
    DIR/matches.parquet      layer_a, channel_a, layer_b, channel_b, corr, kind, side
    DIR/layer_pairs.parquet  per layer pair: units, live units, images, matched, mean / median correlations
    DIR/correlations.parquet layer_a, channel_a, layer_b, channel_b, corr: every pair of live units
    DIR/quality.png          the match-quality chart of every layer pair

matches.parquet has, per layer pair, kind 'one-to-one' (the optimal assignment: a row per unit of A, side
'a', channel_b NULL when it has no counterpart; and a row per unit of B left without one, side 'b') and
kind 'best' (each unit's most correlated counterpart: side 'a' rows for A's units, side 'b' rows for B's).
corr is NULL where there is no counterpart (a dead unit has none). The folder appears whole or not at all.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from ..errors import AtlasError
from ..util.files import atomic_write_json, atomic_write_parquet, publish_dir
from ..util.progress import Progress
from ..store import AtlasReader
from .pairing import Pairs, activation_files, paired_blocks, shared_images
from .stats import CoMoments, match

FORMAT = 1
STATISTIC = ("each image's spatial maximum of the unit's map (the atlas's activations table; Li et al. 2016 "
             "correlate activations over positions too, which an atlas does not keep)")
MATCH_SCHEMA = pa.schema([("layer_a", pa.string()), ("channel_a", pa.int32()), ("layer_b", pa.string()),
                          ("channel_b", pa.int32()), ("corr", pa.float64()), ("kind", pa.string()),
                          ("side", pa.string())])
CORR_SCHEMA = pa.schema([("layer_a", pa.string()), ("channel_a", pa.int32()), ("layer_b", pa.string()),
                         ("channel_b", pa.int32()), ("corr", pa.float32())])
PAIR_COLUMNS = ("layer_a", "layer_b", "channels_a", "channels_b", "live_a", "live_b", "images", "matched",
                "mean_one_to_one", "median_one_to_one", "min_one_to_one", "mean_best_a", "mean_best_b",
                "mutual_best")


def _reader(x) -> AtlasReader:
    return x if isinstance(x, AtlasReader) else AtlasReader(x)


def _channels(a: AtlasReader, layer: str) -> int:
    return int(next(la["channels"] for la in a.manifest["layers"] if la["layer"] == layer))


def layer_pairs(a: AtlasReader, b: AtlasReader, layers: str | Sequence[str] | None = None,
                pairs: str | Sequence[str] | Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The layer pairs compared: `pairs` ("conv5:layer4" or (A layer, B layer)) and `layers` (names both
    atlases have); by default every layer both have by name, in A's order."""
    def split(v):
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else list(v or [])

    out: list[tuple[str, str]] = []
    for p in split(pairs):
        if isinstance(p, str):
            la, sep, lb = p.partition(":")
            if not sep or not la.strip() or not lb.strip():
                raise AtlasError(f"layer pair '{p}' is not A_LAYER:B_LAYER (e.g. conv5:layer4)")
            p = (la.strip(), lb.strip())
        out.append((str(p[0]), str(p[1])))
    for name in split(layers):
        out.append((name, name))
    if not out:
        common = [n for n in a.layer_names if n in set(b.layer_names)]
        if not common:
            raise AtlasError(f"atlases '{a.path}' and '{b.path}' share no layers by name (A: "
                             f"{', '.join(a.layer_names)}; B: {', '.join(b.layer_names)}): name the pairs to "
                             "compare with --pairs A_LAYER:B_LAYER")
        out = [(n, n) for n in common]
    for la, lb in out:
        a.check_layer(la)
        b.check_layer(lb)
    for x, layer in [(a, la) for la, _ in out] + [(b, lb) for _, lb in out]:
        if not activation_files(x, layer):
            raise AtlasError(f"atlas '{x.path}' has no per-image statistics for {layer} (built with "
                             "--no-activations): rebuild it without that flag to compare it")
    return list(dict.fromkeys(out))


def correlations(a, b, layer_a: str, layer_b: str, pairs: Pairs | None = None, *,
                 bar: Progress | None = None, block_images: int | None = None) -> CoMoments:
    """The streamed co-moments of A's layer_a units with B's layer_b units over the shared images."""
    a, b = _reader(a), _reader(b)
    pairs = pairs if pairs is not None else shared_images(a, b)
    ca, cb = _channels(a, layer_a), _channels(b, layer_b)
    m = CoMoments(ca, cb)
    for x, y in paired_blocks(a, b, layer_a, layer_b, ca, cb, pairs, block_images):
        m.add(x, y)
        if bar is not None:
            bar.update(len(x))
    return m


def compare(a, b, out: str | os.PathLike, *, layers: str | Sequence[str] | None = None,
            pairs: str | Sequence | None = None, overwrite: bool = False, progress: bool | None = None,
            log: Callable[[str], None] | None = None):
    """Compare atlases `a` and `b` (folders or opened atlases) over their shared images; returns the
    Comparison (atlas.compare.Comparison) published at `out`."""
    from .result import Comparison, quality_chart

    log = log or (lambda s: None)
    t0 = time.perf_counter()
    a, b = _reader(a), _reader(b)
    out = Path(out)
    if out.exists() and not overwrite:
        raise AtlasError(f"'{out}' already exists: pass --overwrite to replace it")
    if out.exists() and not (out / "comparison.json").is_file():
        raise AtlasError(f"'{out}' exists and is not a comparison: give a new folder to --out")
    chosen = layer_pairs(a, b, layers, pairs)
    shared = shared_images(a, b)
    log(f"comparing {len(chosen)} layer pair{'s' if len(chosen) != 1 else ''} over {len(shared)} shared images "
        f"(paired by {shared.how})")
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        rows: dict[str, list] = {f: [] for f in MATCH_SCHEMA.names}
        summaries: list[dict] = []
        corr_tables: list[pa.Table] = []
        timings = {"correlation_s": 0.0, "matching_s": 0.0}
        with Progress(len(shared) * len(chosen), "compare", "images", enabled=progress) as bar:
            for la, lb in chosen:
                t1 = time.perf_counter()
                m = correlations(a, b, la, lb, shared, bar=bar)
                c = m.corr()
                t2 = time.perf_counter()
                got = match(c)
                timings["correlation_s"] += t2 - t1
                timings["matching_s"] += time.perf_counter() - t2
                live_a, live_b = m.live()
                _match_rows(rows, la, lb, c, got)
                summaries.append(_summary(la, lb, c, got, live_a, live_b, m.n))
                corr_tables.append(_corr_table(la, lb, c))
        atomic_write_parquet(staging / "matches.parquet", pa.table(rows, schema=MATCH_SCHEMA))
        atomic_write_parquet(staging / "layer_pairs.parquet", pa.Table.from_pylist(summaries))
        atomic_write_parquet(staging / "correlations.parquet", pa.concat_tables(corr_tables))
        record = {
            "format": FORMAT, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "a": _describe(a), "b": _describe(b),
            "images": {"shared": len(shared), "paired_by": shared.how},
            "statistic": STATISTIC,
            "layer_pairs": [{"layer_a": la, "layer_b": lb} for la, lb in chosen],
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        atomic_write_json(staging / "comparison.json", record)
        quality_chart(summaries, _one_to_one_values(rows), staging / "quality.png",
                      title=f"{Path(a.path).name} vs {Path(b.path).name}: one-to-one matches")
        record["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(staging / "comparison.json", record)
        publish_dir(staging, out, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    cmp = Comparison(out)
    for s in summaries:
        log(f"  {s['layer_a']} ~ {s['layer_b']}: {s['matched']} one-to-one matches, mean correlation "
            f"{_fmt(s['mean_one_to_one'])} (live units {s['live_a']}/{s['channels_a']} and "
            f"{s['live_b']}/{s['channels_b']})")
    log(f"comparison written to {out} in {time.perf_counter() - t0:.1f} s")
    return cmp


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _describe(a: AtlasReader) -> dict:
    m = a.manifest
    mdl = m.get("model", {})
    return {"path": str(Path(a.path).resolve()), "model": mdl.get("name"),
            "weights": mdl.get("weights"), "weights_sha256": mdl.get("weights_sha256"),
            "random_init": bool(mdl.get("random_init")),
            "dataset": {k: m.get("dataset", {}).get(k) for k in ("spec", "kind", "root", "count")}}


def _match_rows(rows: dict[str, list], la: str, lb: str, c: np.ndarray, got) -> None:
    def add(ca, cb, kind, side):
        ok = ca is not None and cb is not None
        for k, v in (("layer_a", la), ("channel_a", ca), ("layer_b", lb), ("channel_b", cb),
                     ("corr", float(c[ca, cb]) if ok else None), ("kind", kind), ("side", side)):
            rows[k].append(v)

    na, nb = c.shape
    assigned = set()
    for i in range(na):
        j = int(got.one_to_one[i])
        add(i, j if j >= 0 else None, "one-to-one", "a")
        if j >= 0:
            assigned.add(j)
    for j in range(nb):
        if j not in assigned:
            add(None, j, "one-to-one", "b")
    for i in range(na):
        j = int(got.best_a[i])
        add(i, j if j >= 0 else None, "best", "a")
    for j in range(nb):
        i = int(got.best_b[j])
        add(i if i >= 0 else None, j, "best", "b")


def _summary(la, lb, c, got, live_a, live_b, n) -> dict:
    i = np.flatnonzero(got.one_to_one >= 0)
    v = c[i, got.one_to_one[i]]
    ba = np.flatnonzero(got.best_a >= 0)
    bb = np.flatnonzero(got.best_b >= 0)
    mutual = int(sum(1 for x in ba if got.best_b[got.best_a[x]] == x))

    def stat(f, arr):
        return float(f(arr)) if len(arr) else None

    return {"layer_a": la, "layer_b": lb, "channels_a": int(c.shape[0]), "channels_b": int(c.shape[1]),
            "live_a": int(live_a.sum()), "live_b": int(live_b.sum()), "images": int(n), "matched": int(len(i)),
            "mean_one_to_one": stat(np.mean, v), "median_one_to_one": stat(np.median, v),
            "min_one_to_one": stat(np.min, v),
            "mean_best_a": stat(np.mean, c[ba, got.best_a[ba]]), "mean_best_b": stat(np.mean, c[got.best_b[bb], bb]),
            "mutual_best": mutual}


def _corr_table(la: str, lb: str, c: np.ndarray) -> pa.Table:
    ia, ib = np.nonzero(~np.isnan(c))
    return pa.table({"layer_a": pa.repeat(pa.scalar(la, pa.string()), len(ia)),
                     "channel_a": ia.astype(np.int32), "layer_b": pa.repeat(pa.scalar(lb, pa.string()), len(ia)),
                     "channel_b": ib.astype(np.int32), "corr": c[ia, ib].astype(np.float32)}, schema=CORR_SCHEMA)


def _one_to_one_values(rows: dict[str, list]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for la, lb, v, kind, side in zip(rows["layer_a"], rows["layer_b"], rows["corr"], rows["kind"], rows["side"]):
        if kind == "one-to-one" and side == "a" and v is not None:
            out.setdefault((la, lb), []).append(v)
    return out

