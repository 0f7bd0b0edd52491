"""Benchmark the query side of a million-image atlas (issue 8), on this machine, in one run.

On synthetic atlases of realistic shape (scripts/make_large_atlas.py: zfnet's 1376 conv
channels at 224 px, k = 9, 1000 classes, the conv5 activations table; the same writers as
`atlas build`), at 250k and 1M images:

  open         `atlas.open(path)` and the first query (SELECT count(*) FROM images), each
               in a fresh process (import atlas included, interpreter start not); and
               `atlas info` end to end                                        bar < 1 s
  top-k        `Atlas.top("conv5", c)` on an open atlas, a different channel each call;
               the first call (it opens the DuckDB connection) on its own; `atlas top`
               end to end (interpreter start and imports: no bar)            bar < 50 ms
  show         `show(atlas, "conv5", 0)` rendered once in a fresh process, then the cached
               call: the panel and rank 0's projection; `atlas show` end to end for both.
               The images are not on disk, so patches are placeholders (see the note the
               run prints about panels drawn without their images)           bar < 50 ms
  selectivity  sql/queries/class_selectivity.sql (one class against the rest, every
               channel), and the mean per class per channel (a GROUP BY label, channel
               over the layer's activations joined to images)               timed
  export       `atlas export ATLAS SITE --layers conv5` into a new site with the layer's
               pictures removed from the atlas cache (cold pictures), then again into
               another new site with them cached (what grows with the images) timed
  disk         every table, and the tables that grow with the images per million images
  growth       each figure at both sizes and their ratio: open, top-k and show should
               stay flat, the scans grow linearly; peak memory (ru_maxrss of the process)
               beside the scans

Each figure is the best and the median of --repeat runs, with the 1-minute load average
when it was taken: the machine is shared, compare figures only at similar load. The OS
page cache stays warm ("fresh process" is cold in Python and DuckDB, not on disk).

Atlases are written to --dir (default /tmp/atlas-bench-scale: about 0.8 GB per million
images) and reused on later runs while the writers that made them are unchanged
(a hash of atlas.build's table writers and of make_large_atlas.py is kept in the manifest).

    python scripts/bench_scale.py                         # 250k and 1M images, ~6 min
    python scripts/bench_scale.py --atlas /tmp/large      # that atlas (written if missing) as the big one
    python scripts/bench_scale.py --sizes 20000,80000 --repeat 3   # a smoke run
    python scripts/bench_scale.py --smoke   # seconds: 500 and 1000 images in a temp folder, --repeat 1, 2 channels
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BARS = {"open_s": 1.0, "top_s": 0.050, "show_cached_s": 0.050}
LAYER = "conv5"
MEAN_PER_CLASS = ("SELECT i.label, a.channel, avg(a.value) AS mean FROM activations a JOIN images i USING (image_id) "
                  f"WHERE a.layer = '{LAYER}' GROUP BY i.label, a.channel")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def summary(times: list[float]) -> dict:
    return {"best": min(times), "median": statistics.median(times), "runs": len(times), "load": load()}


def maxrss_mb(usage) -> float:
    return round(usage.ru_maxrss / 1024, 1)  # Linux: kilobytes


# ---------------------------------------------------------------------------
# probes: each runs in a fresh process (`bench_scale.py --probe NAME --atlas PATH`), prints one JSON line
# ---------------------------------------------------------------------------
def probe_open(path: str, repeat: int) -> dict:
    t0 = time.perf_counter()
    import atlas

    t1 = time.perf_counter()
    a = atlas.open(path)
    t2 = time.perf_counter()
    n = a.sql("SELECT count(*) FROM images").fetchall()[0][0]
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "open_s": t2 - t1, "first_query_s": t3 - t2, "total_s": t3 - t0, "images": n}


def probe_top(path: str, repeat: int) -> dict:
    import atlas

    a = atlas.open(path)
    t = time.perf_counter()
    a.top(LAYER, 1)
    first = time.perf_counter() - t
    times = []
    for c in range(2, 2 + repeat * 4):
        t = time.perf_counter()
        rows = a.top(LAYER, c)
        times.append(time.perf_counter() - t)
        assert len(rows) == a.manifest["k"] and rows[0]["path"], rows
    return {"first_s": first, "times": times}


def probe_show(path: str, repeat: int) -> dict:
    import atlas
    from atlas.pictures.projections import incomplete, renderer

    a = atlas.open(path)
    d = renderer(a).root / LAYER
    for f in d.glob("0-*"):  # render once in this run, whatever an earlier run left
        f.unlink()
    t = time.perf_counter()
    panel = a.show(LAYER, 0)
    render = time.perf_counter() - t
    out = {"render_s": render, "panel_placeholder": incomplete(panel) is not None}
    for key, rank in (("panel", None), ("rank0", 0)):
        times = []
        for _ in range(repeat if rank is not None or not out["panel_placeholder"] else min(repeat, 3)):
            t = time.perf_counter()
            a.show(LAYER, 0, rank)
            times.append(time.perf_counter() - t)
        out[key] = times
    return out


def probe_selectivity(path: str, repeat: int) -> dict:
    import atlas
    from atlas.store import canned_queries

    a = atlas.open(path)
    sql = canned_queries()["class_selectivity"][1]
    out: dict = {}
    for key, q in (("class_selectivity", sql), ("mean_per_class", MEAN_PER_CLASS)):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            rows = a.sql(q).fetch_arrow_table().num_rows
            times.append(time.perf_counter() - t)
        out[key] = times
        out[key + "_rows"] = rows
    n = a.sql(f"SELECT count(*) FROM activations WHERE layer = '{LAYER}'").fetchall()[0][0]
    out["activation_rows"] = n
    out["maxrss_mb"] = vm_hwm_mb()
    return out


def probe_writer(path: str, repeat: int) -> dict:
    """What an atlas written by make_large_atlas.py depends on: the build's table writers and the script."""
    import atlas.build.tables as T

    h = hashlib.sha256()
    for part in (T.write_tables, T.write_activations, T.top_rows, T.IMAGE_ROW_GROUP, T.ACT_ROW_GROUP,
                 T.SWITCH_SCHEMA):
        h.update((inspect.getsource(part) if callable(part) else repr(part)).encode())
    h.update((ROOT / "scripts" / "make_large_atlas.py").read_bytes())
    return {"hash": h.hexdigest()[:16]}


def vm_hwm_mb() -> float:
    """Peak RSS of this process since its exec (ru_maxrss would include the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF))


PROBES = {"open": probe_open, "top": probe_top, "show": probe_show, "selectivity": probe_selectivity,
          "writer": probe_writer}


def run_probe(name: str, path: Path, repeat: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--probe", name, "--atlas", str(path), "--repeat", str(repeat)],
                       capture_output=True, text=True, check=False)
    if p.returncode:
        raise SystemExit(f"probe {name} on {path} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_cmd(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one command, its own rusage (wait4), not the children's total."""
    with tempfile.TemporaryFile("w+") as out:
        t = time.perf_counter()
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        err = p.stderr.read()
        p.stderr.close()
        if p.returncode:
            raise SystemExit(f"{' '.join(args)} failed ({p.returncode}): {err.strip()}")
        out.seek(0)
        return wall, maxrss_mb(usage), out.read()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "atlas", *args]


# ---------------------------------------------------------------------------
# the atlases
# ---------------------------------------------------------------------------
def ensure_atlas(path: Path, n: int | None, explicit: bool = False) -> tuple[Path, dict]:
    mf = path / "manifest.json"
    want = run_probe("writer", path, 1)["hash"]
    if mf.is_file():
        m = json.loads(mf.read_text())
        have = (m.get("synthetic") or {}).get("writer")
        if explicit or (have == want and m["dataset"]["count"] == n):
            if explicit and have != want:
                print(f"note: {path} was written by other writers than the current ones", file=sys.stderr)
            return path, {"written": False, "images": m["dataset"]["count"]}
    print(f"writing {path} ({n} images) ...", file=sys.stderr)
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_large_atlas.py"), "--out", str(path),
                    "--images", str(n)], check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    m = json.loads(mf.read_text())
    m["synthetic"]["writer"] = want
    from atlas.util.files import atomic_write_json

    atomic_write_json(mf, m)
    return path, {"written": True, "write_s": wall, "images": n, "load": load()}


def disk(path: Path, n: int) -> dict:
    """Bytes per table; the ones that grow with the images also per million images."""
    sizes: dict[str, int] = {}
    for f in path.rglob("*"):
        if f.is_file() and f.relative_to(path).parts[0] != "cache":
            rel = f.relative_to(path).parts
            key = "/".join(rel[:2]) if rel[0] in ("activations", "model", "index") else rel[0]
            sizes[key] = sizes.get(key, 0) + f.stat().st_size
    grows = {k: v for k, v in sizes.items() if k == "images.parquet" or k.startswith("activations/")}
    return {"bytes": sizes, "total": sum(sizes.values()),
            "per_million": {k: v * 1_000_000 / n for k, v in grows.items()}}


# ---------------------------------------------------------------------------
# one size
# ---------------------------------------------------------------------------
def measure(path: Path, repeat: int, export_runs: int, max_channels: int | None = None) -> dict:
    from atlas.pictures.projections import cache_root

    m = json.loads((path / "manifest.json").read_text())
    n = m["dataset"]["count"]
    r: dict = {"images": n}
    print(f"\n== {path} ({n:,} images) ==", file=sys.stderr)

    opens = [run_probe("open", path, 1) for _ in range(repeat)]
    r["open"] = {**summary([o["total_s"] for o in opens]),
                 "split_median": {k: statistics.median(o[k] for o in opens)
                                  for k in ("import_s", "open_s", "first_query_s")}}
    r["cli_info"] = summary([run_cmd(cli("info", str(path)))[0] for _ in range(repeat)])
    print(f"open {r['open']['best']:.3f} s", file=sys.stderr)

    top = run_probe("top", path, repeat)
    r["top"] = {**summary(top["times"]), "first_call_s": top["first_s"]}
    r["cli_top"] = summary([run_cmd(cli("top", str(path), LAYER, "7"))[0] for _ in range(repeat)])
    print(f"top-k {r['top']['best'] * 1000:.1f} ms", file=sys.stderr)

    show = run_probe("show", path, repeat)
    r["show"] = {"render_s": show["render_s"], "panel_placeholder": show["panel_placeholder"],
                 "panel": summary(show["panel"]), "rank0": summary(show["rank0"])}
    r["cli_show_rank0"] = summary([run_cmd(cli("show", str(path), LAYER, "0", "--rank", "0"))[0]
                                   for _ in range(repeat)])
    r["cli_show_panel"] = summary([run_cmd(cli("show", str(path), LAYER, "0"))[0]
                                   for _ in range(repeat if not show["panel_placeholder"] else min(repeat, 3))])
    print(f"show cached {r['show']['rank0']['best'] * 1000:.2f} ms", file=sys.stderr)

    sel = run_probe("selectivity", path, max(2, repeat // 2))
    r["selectivity"] = {k: summary(sel[k]) for k in ("class_selectivity", "mean_per_class")}
    r["selectivity"].update(rows=sel["activation_rows"], groups=sel["mean_per_class_rows"], maxrss_mb=sel["maxrss_mb"])
    print(f"mean per class per channel {r['selectivity']['mean_per_class']['best']:.2f} s", file=sys.stderr)

    pictures = cache_root(SimpleAtlas(path, m)) / "unit-identity-percentile" / LAYER  # Renderer.folder of the default
    cold, warm, last = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-site-") as tmp:
        for i in range(export_runs):
            shutil.rmtree(pictures, ignore_errors=True)
            for key, times in (("cold", cold), ("warm", warm)):
                site = Path(tmp) / f"{key}-{i}"
                limit = ["--max-channels", str(max_channels)] if max_channels else []
                wall, rss, _ = run_cmd(cli("export", str(path), str(site), "--layers", LAYER, "--no-progress", *limit))
                times.append(wall)
                last[key] = {**json.loads((site / ".atlas-export.json").read_text())["last_run"], "maxrss_mb": rss}
                shutil.rmtree(site)
    channels = last["cold"]["channels"]
    r["export"] = {"cold": summary(cold), "warm": summary(warm), "channels": channels,
                   "cold_per_channel_s": min(cold) / channels, "warm_per_channel_s": min(warm) / channels,
                   "picture_split": last["cold"]["picture_split"], "cold_maxrss_mb": last["cold"]["maxrss_mb"],
                   "warm_maxrss_mb": last["warm"]["maxrss_mb"]}
    print(f"export {min(cold):.1f} s cold, {min(warm):.1f} s with pictures cached", file=sys.stderr)
    r["disk"] = disk(path, n)
    return r


class SimpleAtlas:
    """What projections.cache_root reads: a path and a manifest (no DuckDB, no model)."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------
def fmt_s(v: float) -> str:
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def report(results: list[dict]) -> None:
    sizes = [r["images"] for r in results]
    head = [f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k" for n in sizes]
    rows = []

    def row(label: str, get, bar: float | None = None, kind: str = "") -> None:
        vals = [get(r) for r in results]
        cells = [f"{fmt_s(v['best'])} / {fmt_s(v['median'])} @{v['load']:.1f}" for v in vals]
        ratio = f"{vals[-1]['best'] / vals[0]['best']:.2f}x" if len(vals) > 1 and vals[0]["best"] > 0 else ""
        verdict = "" if bar is None else ("PASS" if vals[-1]["best"] < bar else "FAIL")
        rows.append((label, *cells, ratio, kind, f"< {fmt_s(bar)}" if bar else "", verdict))

    row("open + first query (fresh process)", lambda r: r["open"], BARS["open_s"], "flat")
    row("`atlas info` end to end", lambda r: r["cli_info"], None, "flat")
    row("top-k: Atlas.top (open atlas)", lambda r: r["top"], BARS["top_s"], "flat")
    row("`atlas top` end to end", lambda r: r["cli_top"], None, "flat")
    row("show cached: projection (rank 0)", lambda r: r["show"]["rank0"], BARS["show_cached_s"], "flat")
    row("show cached: panel", lambda r: r["show"]["panel"], BARS["show_cached_s"], "flat")
    row("`atlas show --rank 0` end to end", lambda r: r["cli_show_rank0"], None, "flat")
    row("`atlas show` (panel) end to end", lambda r: r["cli_show_panel"], None, "flat")
    row("class_selectivity.sql", lambda r: r["selectivity"]["class_selectivity"], None, "linear")
    row("mean per class per channel", lambda r: r["selectivity"]["mean_per_class"], None, "linear")
    row(f"export {LAYER}, cold pictures", lambda r: r["export"]["cold"], None, "")
    row(f"export {LAYER}, pictures cached", lambda r: r["export"]["warm"], None, "linear")
    cols = ["figure (best / median @load)", *head, "ratio", "expect", "bar", ""]
    width = [max(len(str(x[i])) for x in rows + [tuple(cols)]) for i in range(len(cols))]
    line = lambda t: "  ".join(str(x).ljust(w) for x, w in zip(t, width)).rstrip()  # noqa: E731
    print("\n" + line(cols))
    print(line(["-" * w for w in width]))
    for r in rows:
        print(line(r))

    big = results[-1]
    print(f"\nat {big['images']:,} images:")
    o = big["open"]["split_median"]
    print(f"  open split (median): import atlas {fmt_s(o['import_s'])}, atlas.open {fmt_s(o['open_s'])}, "
          f"first query (DuckDB import, views) {fmt_s(o['first_query_s'])}")
    print(f"  top-k: the first call on a new handle (opens the connection) {fmt_s(big['top']['first_call_s'])}")
    s = big["show"]
    print(f"  show: first render of {LAYER} channel 0 (loads torch and the model) {fmt_s(s['render_s'])}")
    if s["panel_placeholder"]:
        print("  note: the panel was drawn without its images (the synthetic dataset is not on disk): its patches "
              "are placeholders; with the whole dataset gone, the cached panel is served as it is")
    sel = big["selectivity"]
    for key in ("class_selectivity", "mean_per_class"):
        print(f"  {key}: {sel['rows'] / sel[key]['best'] / 1e6:.0f} M activation rows/s "
              f"({sel['rows']:,} rows; peak RSS of the process {sel['maxrss_mb']:.0f} MB)")
    e = big["export"]
    print(f"  export: {e['channels']} channels, {fmt_s(e['cold_per_channel_s'])} a channel with pictures to draw "
          f"(split {e['picture_split']}), {fmt_s(e['warm_per_channel_s'])} with pictures cached; peak RSS "
          f"{e['cold_maxrss_mb']:.0f} MB / {e['warm_maxrss_mb']:.0f} MB")
    if len(results) > 1:
        print("  peak RSS, " + " -> ".join(head) + ": " + ", ".join(
            f"{label} " + " -> ".join(f"{get(r):.0f}" for r in results) + " MB" for label, get in (
                ("selectivity", lambda r: r["selectivity"]["maxrss_mb"]),
                ("export cold", lambda r: r["export"]["cold_maxrss_mb"]),
                ("export pictures cached", lambda r: r["export"]["warm_maxrss_mb"]))))

    print("\ndisk (bytes; per million images for the tables that grow with the images):")
    names = sorted(big["disk"]["bytes"], key=lambda k: -big["disk"]["bytes"][k])
    for k in names:
        per = big["disk"]["per_million"].get(k)
        print(f"  {k:32s} {big['disk']['bytes'][k] / 1e6:10.1f} MB" + (f"   {per / 1e6:8.1f} MB per 1M images"
                                                                        if per is not None else "   (fixed)"))
    act = [k for k in big["disk"]["per_million"] if k.startswith("activations/")]
    if act:
        rows_act = big["selectivity"]["rows"]
        b = big["disk"]["bytes"][act[0]] / rows_act
        print(f"  activations: {b:.2f} bytes a row; all of zfnet's 1376 conv channels would take "
              f"{b * 1376 * 1e6 / 1e9:.1f} GB per 1M images")
    print(f"  total {big['disk']['total'] / 1e9:.2f} GB at {big['images']:,} images")
    fails = [r[0] for r in rows if r[-1] == "FAIL"]
    print(f"\nload average (1 min) now {load()}; bars: {'all PASS' if not fails else 'FAIL: ' + ', '.join(fails)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", type=Path, help="the big atlas: reused as it is, or written there if missing")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "atlas-bench-scale",
                    help="where the synthetic atlases are written and reused")
    ap.add_argument("--sizes", default="250000,1000000", help="images per atlas, small to big")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--export-runs", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--probe", choices=sorted(PROBES), help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="seconds: 500 and 1000 images in a temp folder, --repeat 1, "
                    "one export of 2 channels")
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(PROBES[args.probe](str(args.atlas), args.repeat)))
        return
    if not args.smoke:
        run(args)
        return
    args.sizes, args.repeat, args.export_runs, args.max_channels = "500,1000", 1, 1, 2
    with tempfile.TemporaryDirectory(prefix="bench-scale-smoke-") as tmp:
        args.dir = Path(tmp)
        run(args)


def run(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    paths = [(args.dir / f"images-{n}", n, False) for n in sizes]
    if args.atlas:
        paths[-1] = (args.atlas, None if (args.atlas / "manifest.json").is_file() else sizes[-1],
                     (args.atlas / "manifest.json").is_file())
    print(f"load average (1 min) at start: {load()}", file=sys.stderr)
    results, writes = [], []
    for path, n, explicit in paths:
        path, w = ensure_atlas(path, n, explicit)
        writes.append(w)
        results.append(measure(path, args.repeat, args.export_runs, getattr(args, "max_channels", None)))
    for w in writes:
        if w["written"]:
            print(f"wrote a synthetic atlas of {w['images']:,} images in {w['write_s']:.0f} s (load {w['load']})")
    report(results)
    print(f"benchmark took {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "writes": writes}, indent=1))


if __name__ == "__main__":
    main()
