"""Feature visualization: what a batch buys, how often the recipe reaches the dataset's maximum, and
Lucent (torch-lucent's render_vis) on the same channels with the same steps.

    python scripts/bench_featurevis.py                       # the demo's atlas (atlas demo), all of it
    python scripts/bench_featurevis.py --layers conv5 --lucent /tmp/lucent-venv/bin/python
    python scripts/bench_featurevis.py --smoke               # seconds: a tiny atlas of its own, 4 steps

1. Time per channel, side by side in one run, on the first --timing-channels live channels of
   --timing-layer: batched (those channels as one padded batch, the default batch size), one channel at
   a time unpadded (a batch of one: what a tool without batching does), and one channel alone in the
   padded batch (what `atlas visualize ATLAS LAYER CHANNEL` costs: a whole batch).
2. Quality: for each of --layers, the share of its live channels (dataset maximum > 0; dead ones
   excluded) whose visualization reaches more than the channel's dataset maximum, by the statistic of
   `atlas visualize --format json`: the spatial maximum of the channel's map on the finished,
   untransformed image against the `channels` table's max. Rendered through the atlas's own cache (as
   `atlas visualize --all` does, so an export afterwards shows them; a second run reads them back);
   --fresh draws into a temporary cache instead.
3. Lucent, if --lucent names a Python that imports it (a throwaway venv: `python -m venv
   /tmp/lucent-venv && /tmp/lucent-venv/bin/pip install torch-lucent`): render_vis with its defaults
   (fft, decorrelate, standard_transforms, Adam 0.05) and the model's own preprocessing, on the timing
   channels with the same steps, one channel at a time and as one batch; the same statistic on its
   finished image, and its time.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import atlas
from atlas.pictures import featurevis as fv
from atlas.pictures import visualizations as V

ROOT = Path(__file__).resolve().parent.parent


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def live_channels(a, layer: str) -> list[int]:
    return [r["channel"] for r in a.rows("SELECT channel FROM channels WHERE layer = ? AND max > 0 ORDER BY channel",
                                          [layer])]


def timing(a, layer: str, n: int, steps: int, colour) -> dict:
    lmap, pre = a.lmap, a.manifest["preprocessing"]
    chans = live_channels(a, layer)[:n]
    kw = dict(mean=pre["mean"], std=pre["std"], colour=colour)
    targets = [fv.Target(layer, c) for c in chans]
    b = V.BATCH_CPU
    out = {"layer": layer, "channels": chans, "steps": steps, "batch_size": b, "load_before": load()}
    t = time.perf_counter()
    batched = fv.optimize(lmap, targets, fv.Recipe(steps=steps, batch_size=b), **kw)
    out["batched_s_per_channel"] = (time.perf_counter() - t) / len(chans)
    t = time.perf_counter()
    single = []
    for tg in targets:
        single += fv.optimize(lmap, [tg], fv.Recipe(steps=steps, batch_size=1), **kw)
    out["one_at_a_time_s_per_channel"] = (time.perf_counter() - t) / len(chans)
    t = time.perf_counter()
    fv.optimize(lmap, targets[:1], fv.Recipe(steps=steps, batch_size=b), **kw)
    out["alone_padded_s_per_channel"] = time.perf_counter() - t
    out["speedup"] = out["one_at_a_time_s_per_channel"] / out["batched_s_per_channel"]
    out["map_max_batched"] = [v.map_max for v in batched]
    out["map_max_one_at_a_time"] = [v.map_max for v in single]
    out["load_after"] = load()
    return out


def quality(a, layers: list[str], steps: int, cache) -> list[dict]:
    rows = []
    for layer in layers:
        live = live_channels(a, layer)
        n_all = next(la["channels"] for la in a.manifest["layers"] if la["layer"] == layer)
        t = time.perf_counter()
        recs = V.visualize(a, layer, live, steps=steps, cache=cache, progress=True) if live else []
        dt = time.perf_counter() - t
        reached = [r for r in recs if r["reached"]]
        ratios = sorted(r["ratio"] for r in recs if r["ratio"] is not None)
        rows.append({"layer": layer, "channels": n_all, "live": len(live), "reached": len(reached),
                     "share": len(reached) / len(live) if live else None,
                     "median_ratio": ratios[len(ratios) // 2] if ratios else None,
                     "min_ratio": ratios[0] if ratios else None,
                     "seconds": dt, "s_per_channel": dt / len(live) if live else None,
                     "not_reached": [(r["channel"], round(r["ratio"], 3)) for r in recs if not r["reached"]]})
        print(f"  {layer}: {len(reached)}/{len(live)} live channels above their dataset max "
              f"({rows[-1]['share']:.1%}), median ratio {rows[-1]['median_ratio']:.2f}, {dt:.0f} s", flush=True)
    return rows


LUCENT_JOB = r"""
import json, sys, time
import numpy as np
import torch
sys.path.insert(0, sys.argv[2])  # the model's classes (pickled with the whole module)
from lucent.optvis import objectives, param, render, transform

job = json.load(open(sys.argv[1]))
model = torch.load(job["model"], weights_only=False).eval()
mean = torch.tensor(job["mean"]).view(1, 3, 1, 1)
std = torch.tensor(job["std"]).view(1, 3, 1, 1)
norm = lambda x: (x - mean) / std
S, name, steps = job["size"], job["lucent_layer"], job["steps"]
feats = list(model.features)

def channel_max(images, chans):
    x = torch.from_numpy(np.round(np.clip(images, 0, 1) * 255).astype(np.float32) / 255).permute(0, 3, 1, 2)
    with torch.no_grad():
        h = norm(x)
        for i in range(job["read_at"] + 1):
            h = feats[i](h)
    return [float(h[k, c].max()) for k, c in enumerate(chans)]

def run(chans):
    torch.manual_seed(0)
    obj = sum(objectives.channel(name, c, batch=k) for k, c in enumerate(chans)) if len(chans) > 1 \
        else objectives.channel(name, chans[0])
    t = time.perf_counter()
    imgs = render.render_vis(model, obj, lambda: param.image(S, batch=len(chans)),
                             transforms=transform.standard_transforms + [norm], thresholds=(steps,),
                             preprocess=False, progress=False, show_image=False, fixed_image_size=S)
    return time.perf_counter() - t, channel_max(imgs[-1], chans)

out = {"one_at_a_time": [], "batched": None}
total = 0.0
for c in job["channels"]:
    dt, m = run([c])
    total += dt
    out["one_at_a_time"].append(m[0])
out["one_at_a_time_s_per_channel"] = total / len(job["channels"])
dt, m = run(job["channels"])
out["batched"] = m
out["batched_s_per_channel"] = dt / len(job["channels"])
json.dump(out, open(job["out"], "w"))
"""


def lucent(a, python: str, layer: str, chans: list[int], steps: int) -> dict:
    lmap = a.lmap
    if not lmap.chain:
        return {"ran": False, "why": "the bench drives Lucent by module names of a `features` Sequential"}
    la = lmap.by_name[layer]
    with tempfile.TemporaryDirectory() as d:
        torch.save(a.model, Path(d) / "model.pt")
        job = {"model": str(Path(d) / "model.pt"), "mean": a.manifest["preprocessing"]["mean"],
               "std": a.manifest["preprocessing"]["std"], "size": a.image_size, "steps": steps,
               "channels": chans, "lucent_layer": f"features_{lmap.chain_read_at[layer]}",
               "read_at": lmap.chain_read_at[layer],
               "out": str(Path(d) / "out.json")}
        (Path(d) / "job.json").write_text(json.dumps(job))
        (Path(d) / "job.py").write_text(LUCENT_JOB)
        try:
            res = subprocess.run([python, str(Path(d) / "job.py"), str(Path(d) / "job.json"), str(ROOT)],
                                 capture_output=True, text=True, timeout=3600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"ran": False, "why": f"{type(e).__name__}: {e}"}
        if res.returncode != 0:
            return {"ran": False, "why": (res.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        return {"ran": True, **json.loads(Path(job["out"]).read_text())}


def _smoke_atlas() -> str:
    from atlas.build import build

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_export import make_images

    work = Path(tempfile.mkdtemp(prefix="bench-featurevis-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    make_images(work / "data", 12, size=(96, 96))
    build("zfnet-mini", str(work / "data"), work / "atlas", k=2, batch_size=4, device="cpu", progress=False,
          image_size=32)
    return str(work / "atlas")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default=str(ROOT / "atlas-demo" / "atlas"))
    p.add_argument("--steps", type=int, default=V.DEFAULT_STEPS)
    p.add_argument("--timing-layer", default="conv5")
    p.add_argument("--timing-channels", type=int, default=8)
    p.add_argument("--layers", default=None, help="layers for the quality figure (default: every conv layer)")
    p.add_argument("--fresh", action="store_true", help="render into a temporary cache, not the atlas's")
    p.add_argument("--lucent", default="/tmp/lucent-venv/bin/python",
                   help="a Python with torch-lucent installed ('' to skip)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: a 32 px zfnet-mini atlas of 12 images made in a temp folder, 4 steps, 2 channels, "
                   "conv1 and conv5, no Lucent")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads (on a machine shared with other jobs 1 avoids the threads waiting for each "
                   "other at every small op)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.atlas, args.steps, args.timing_channels, args.layers = _smoke_atlas(), 4, 2, "conv1,conv5"
        args.fresh, args.lucent = True, ""
    a = atlas.open(args.atlas)
    layers = args.layers.split(",") if args.layers else [la["layer"] for la in a.manifest["layers"]
                                                          if la.get("kind", "conv") == "conv"]
    print(f"atlas {args.atlas}: {a.manifest['model']['name']} at {a.image_size} px; {args.steps} steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; load {load()}")
    colour = V.colour_stats(a, V.picture_cache(a))
    report: dict = {"atlas": args.atlas, "steps": args.steps, "colour": colour}
    if not args.skip_timing:
        tm = timing(a, args.timing_layer, args.timing_channels, args.steps, colour["matrix"])
        report["timing"] = tm
        print(f"\n1. time per channel, {tm['layer']} channels {tm['channels']}, {args.steps} steps (load "
              f"{tm['load_before']} -> {tm['load_after']}):")
        print(f"  batched ({len(tm['channels'])} channels, batch {tm['batch_size']}): "
              f"{tm['batched_s_per_channel']:.2f} s/channel")
        print(f"  one at a time (batch of 1):              {tm['one_at_a_time_s_per_channel']:.2f} s/channel"
              f"  -> batched is {tm['speedup']:.1f}x faster")
        print(f"  one alone, padded to batch {tm['batch_size']} (`atlas visualize A L C`): "
              f"{tm['alone_padded_s_per_channel']:.2f} s")
    cache = tempfile.mkdtemp(prefix="fv-bench-") if args.fresh else None
    if cache:
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    print(f"\n2. quality: live channels whose visualization exceeds their dataset maximum ({args.steps} steps):")
    report["quality"] = quality(a, layers, args.steps, cache)
    live = sum(r["live"] for r in report["quality"])
    reached = sum(r["reached"] for r in report["quality"])
    print(f"  all layers: {reached}/{live} ({reached / live:.1%})" if live else "  no live channel")
    if args.lucent:
        chans = live_channels(a, args.timing_layer)[:args.timing_channels]
        print(f"\n3. Lucent on {args.timing_layer} channels {chans}, {args.steps} steps:")
        if not Path(args.lucent).exists():
            lu = {"ran": False, "why": f"no Python at {args.lucent} (make the venv: see the docstring)"}
        else:
            lu = lucent(a, args.lucent, args.timing_layer, chans, args.steps)
        report["lucent"] = lu
        if not lu["ran"]:
            print(f"  did not run: {lu['why']}")
        else:
            ds = {r["channel"]: r["max"] for r in a.channels(args.timing_layer)}
            ours = report.get("timing", {}).get("map_max_batched")
            print("  channel  dataset max  atlas  lucent (alone)  lucent (batched)")
            for k, c in enumerate(chans):
                mine = f"{ours[k]:.3f}" if ours else "-"
                print(f"  {c:7d}  {ds[c]:11.3f}  {mine:>5}  {lu['one_at_a_time'][k]:14.3f}  {lu['batched'][k]:16.3f}")
            def above(vals):
                return sum(v > ds[c] for v, c in zip(vals, chans))
            print(f"  above the dataset max: atlas {above(ours) if ours else '-'}/{len(chans)}, lucent alone "
                  f"{above(lu['one_at_a_time'])}/{len(chans)}, lucent batched {above(lu['batched'])}/{len(chans)}")
            print(f"  time per channel: lucent alone {lu['one_at_a_time_s_per_channel']:.2f} s, lucent batched "
                  f"{lu['batched_s_per_channel']:.2f} s"
                  + (f"; atlas batched {report['timing']['batched_s_per_channel']:.2f} s, one at a time "
                     f"{report['timing']['one_at_a_time_s_per_channel']:.2f} s" if "timing" in report else ""))
    print(f"\nload average at the end: {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
