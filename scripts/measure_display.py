"""Measure how faint projections look under each display rule: the share of in-image pixels that sit
within 8 grey levels of mid-grey (every colour channel within 128 +- 8), over a layer's top-k projections.

For every channel of LAYER and every rank of its top-k, the projection is computed (the stored switches,
as `atlas show` does), cropped to the unit's receptive-field box, and shown by each display rule of
atlas.pictures.drawing.DISPLAYS (max: v / (2 max|v|); percentile: v / (2 s), s the 99.5th percentile of |v|,
clipped); with --percentiles, other percentiles too, to show why 99.5 was chosen. Only the part of
the box inside the image counts (the rest is the quiet outside tone). Reported per rule: the share of
those pixels near grey (all projections pooled), its median over projections, and the share of values
clipped to black or white.

    python scripts/measure_display.py atlas-demo/atlas --layer conv5 [--percentiles 99,99.5,99.9] [--json out.json]
    python scripts/measure_display.py --smoke   # seconds: a tiny atlas built in a temp folder
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NEAR = 8  # grey levels


def shown(crop: np.ndarray, inside: np.ndarray, s: float) -> np.ndarray:
    """uint8 (h, w, 3) of a signed (3, h, w) crop at scale s, as atlas.pictures.drawing.normalise draws it."""
    from atlas.pictures import drawing as R

    return R.normalise(crop, inside, scale=s)


def measure(path: str, layer: str, percentiles: list[float], chunk: int = 32) -> dict:
    import atlas
    from atlas.pictures import drawing as R
    from atlas.pictures.projections import Renderer

    a = atlas.open(path)
    a.check_layer(layer)
    S = a.image_size
    rows = a.rows("SELECT channel, rank, image_id, value, y, x FROM top_activations WHERE layer = ? "
                  "ORDER BY channel, rank", [layer])
    rules = {"max": None, **{f"percentile {p:g}": p for p in percentiles}}
    near = {r: 0 for r in rules}
    clipped = {r: 0 for r in rules}
    per = {r: [] for r in rules}
    pixels = values = projections = zero = 0
    r = Renderer(a)
    channels = sorted({t["channel"] for t in rows})
    t0 = time.perf_counter()
    for i in range(0, len(channels), chunk):
        part = set(channels[i:i + chunk])
        items = [(t["channel"], t) for t in rows if t["channel"] in part]
        P, done, errors = r.project(layer, items)
        for j in range(len(done)):
            box = tuple(P.meta[j]["rf_box"])
            crop = np.asarray(P.crop(j, box).detach().float().cpu().numpy())
            inside = R._inside(box, S)
            sel = np.abs(crop[:, inside]).ravel()
            n_px = int(inside.sum())
            pixels += n_px
            values += sel.size
            projections += 1
            m = float(sel.max()) if sel.size else 0.0
            if m == 0.0:
                zero += 1
            for rule, p in rules.items():
                s = m if p is None else (float(np.percentile(sel, p)) or m)
                u = shown(crop, inside, s)[inside].astype(np.int16)
                k = int(np.all(np.abs(u - 128) <= NEAR, axis=-1).sum())
                near[rule] += k
                per[rule].append(k / max(n_px, 1))
                clipped[rule] += int((sel > s).sum()) if s > 0 else 0
    out = {"atlas": str(path), "layer": layer, "projections": projections, "in_image_pixels": pixels,
           "all_zero": zero, "near_grey_levels": NEAR, "seconds": round(time.perf_counter() - t0, 1), "rules": {}}
    for rule in rules:
        out["rules"][rule] = {"near_grey_share": round(near[rule] / max(pixels, 1), 4),
                              "median_per_projection": round(float(np.median(per[rule])) if per[rule] else 0.0, 4),
                              "clipped_share": round(clipped[rule] / max(values, 1), 5)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas", nargs="?")
    ap.add_argument("--layer", default="conv5")
    ap.add_argument("--percentiles", default="99.5", help="comma list, e.g. 99,99.5,99.9")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import make_image_folder
        from atlas.build import build

        tmp = Path(tempfile.mkdtemp(prefix="atlas-measure-display-"))
        data = make_image_folder(tmp / "data", per_class=4)
        args.atlas = str(build("zfnet-mini", str(data), tmp / "atlas", k=2, batch_size=8, image_size=32,
                               progress=False))
    if not args.atlas:
        ap.error("give an atlas (or --smoke)")
    res = measure(args.atlas, args.layer, [float(p) for p in args.percentiles.split(",") if p.strip()])
    print(f"{res['layer']} of {res['atlas']}: {res['projections']} top-k projections, {res['in_image_pixels']} "
          f"in-image pixels ({res['all_zero']} all-zero projections), {res['seconds']} s; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'rule':<18} {'near grey (pooled)':>20} {'median / projection':>20} {'values clipped':>15}")
    for rule, v in res["rules"].items():
        print(f"{rule:<18} {v['near_grey_share']:>20.1%} {v['median_per_projection']:>20.1%} "
              f"{v['clipped_share']:>15.2%}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
