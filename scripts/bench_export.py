"""Benchmark `atlas export`: a full site of a zfnet atlas at 224 px, then the same export again.

Scenario: a random-weight ZFNet (1376 conv channels), k = 9, built over a generated
ImageFolder of N images of 300 x 250 px (4 classes of shapes on noise). Then

  cold      export into an empty site with an empty render cache: every projection,
            patch and panel is made (the projection work), every page written
  again     the same export, atlas unchanged: must be >= 10x faster (nothing to do)
  warm      a new, empty site from the now-filled render cache (what an export after
            `atlas show` costs): pages and hardlinks only

Reported: seconds per scenario, per channel, and the share of the cold export that
is picture work (reading images and switches, the DeconvNet projections, drawing
and PNG encoding), with the projection engine's own share broken out. The machine
load (1-minute load average) before and after is printed: on a shared machine,
compare runs only at similar load.
With --max-channels N only N channels per layer are exported and the full-export
figures are EXTRAPOLATED from the measured per-channel time (labelled as such).

    python scripts/bench_export.py [--images 200] [--threads 2] [--max-channels N] [--work DIR] [--json out.json]
    python scripts/bench_export.py --smoke   # seconds: zfnet-mini at 64 px, 16 images, k = 4, 2 channels a layer
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(root: Path, n: int, size=(300, 250), seed: int = 0) -> Path:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    classes = ["discs", "bars", "boxes", "rings"]
    for i in range(n):
        c = classes[i % len(classes)]
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 110, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        dr = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            col = tuple(int(v) for v in rng.integers(60, 256, 3))
            x0, y0 = int(rng.integers(0, size[0] - 60)), int(rng.integers(0, size[1] - 60))
            w, h = int(rng.integers(25, 120)), int(rng.integers(25, 120))
            box = (x0, y0, x0 + w, y0 + h)
            if c == "discs":
                dr.ellipse(box, fill=col)
            elif c == "bars":
                dr.rectangle((x0, y0, x0 + w, y0 + max(6, h // 6)), fill=col)
            elif c == "boxes":
                dr.rectangle(box, fill=col)
            else:
                dr.ellipse(box, outline=col, width=6)
        im.save(d / f"{c}_{i:04d}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--max-channels", type=int, default=None,
                    help="export only N channels per layer and extrapolate the full export")
    ap.add_argument("--work", default=None, help="folder for data, atlas and sites (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: zfnet-mini at 64 px over 16 images, k = 4, --max-channels 2")
    args = ap.parse_args()
    model = "zfnet"
    if args.smoke:
        model, args.images, args.k = "zfnet-mini", 16, 4
        args.max_channels = args.max_channels or 2

    import torch

    torch.set_num_threads(args.threads)
    from atlas.build import build
    from atlas.export import export
    from atlas.facade import Atlas

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = work / "data"
        if not data.exists():
            make_images(data, args.images)
        atlas_dir = work / "atlas"
        t0 = time.perf_counter()
        if not (atlas_dir / "manifest.json").is_file():
            shutil.rmtree(atlas_dir, ignore_errors=True)
            build(model, str(data), atlas_dir, k=args.k, batch_size=32, device="cpu", progress=False)
        t_build = time.perf_counter() - t0
        a = Atlas(atlas_dir)
        total_channels = sum(la["channels"] for la in a.manifest["layers"])
        shutil.rmtree(atlas_dir / "cache", ignore_errors=True)  # cold: nothing rendered yet

        def run(site: Path) -> dict:
            t = time.perf_counter()
            export(atlas_dir, site, max_channels=args.max_channels, progress=False)
            dt = time.perf_counter() - t
            st = json.loads((site / ".atlas-export.json").read_text())["last_run"]
            return {"seconds": round(dt, 3), **st}

        site = work / "site"
        shutil.rmtree(site, ignore_errors=True)
        load0 = round(os.getloadavg()[0], 2)
        cold = run(site)
        again = run(site)
        warm_site = work / "site-warm"
        shutil.rmtree(warm_site, ignore_errors=True)
        warm = run(warm_site)

        n = cold["channels"]
        files = sum(1 for p in site.rglob("*") if p.is_file())
        size_mb = sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) / 1e6
        per_ch = cold["seconds"] / n
        pic_share = cold["picture_seconds"] / cold["seconds"]
        res = {
            "load_average_1min_before_after": [load0, round(os.getloadavg()[0], 2)],
            "model": model, "image_size": a.image_size, "images": a.manifest["dataset"]["count"], "k": args.k,
            "threads": torch.get_num_threads(), "build_s": round(t_build, 1),
            "channels_in_atlas": total_channels, "channels_exported": n,
            "cold_export_s": cold["seconds"], "cold_per_channel_s": round(per_ch, 4),
            "cold_picture_s": cold["picture_seconds"], "cold_picture_share": round(pic_share, 3),
            "cold_pictures_rendered": cold["pictures_rendered"],
            "cold_picture_split_s": cold.get("picture_split"),
            "cold_projection_engine_share": round(cold.get("picture_split", {}).get("projection_s", 0)
                                                  / cold["seconds"], 3),
            "pictures_per_channel_s": round(cold["picture_seconds"] / n, 4),
            "pages_and_stats_per_channel_s": round((cold["seconds"] - cold["picture_seconds"]) / n, 4),
            "again_export_s": again["seconds"], "again_up_to_date": again["up_to_date"],
            "speedup_again_vs_cold": round(cold["seconds"] / max(again["seconds"], 1e-9), 1),
            "warm_cache_new_site_s": warm["seconds"], "warm_pictures_rendered": warm["pictures_rendered"],
            "site_files": files, "site_mb_on_disk_apparent": round(size_mb, 1),
        }
        if n < total_channels:
            res["EXTRAPOLATED_full_cold_export_s"] = round(per_ch * total_channels, 1)
            res["EXTRAPOLATED_note"] = (f"only {n} of {total_channels} channels exported (--max-channels "
                                        f"{args.max_channels}); full figure = measured per-channel time x "
                                        f"{total_channels}")
        print(json.dumps(res, indent=2))
        print(f"\n{model} @{a.image_size}, {res['images']} images, k={args.k}, {res['threads']} threads: "
              f"cold export of {n} channels {cold['seconds']:.1f} s ({per_ch * 1000:.0f} ms/channel, "
              f"{pic_share:.0%} picture work, of it "
              f"{res['cold_projection_engine_share']:.0%} of the total in the DeconvNet engine); unchanged re-export {again['seconds']:.2f} s "
              f"({res['speedup_again_vs_cold']}x faster); new site from a warm cache {warm['seconds']:.1f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
