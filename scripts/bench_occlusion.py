"""Occlusion sensitivity (figure 7): batched vs one position at a time, measured in one run.

    python scripts/bench_occlusion.py [--serial 48] [--image PATH] [--size 50] [--stride 8] [--threads N]
    python scripts/bench_occlusion.py --smoke   # seconds: stride 56 (4 x 4 = 16 positions), 4 of them one at a time

A ZFNet (random weights) atlas at 224 px is built over two synthetic images in a
temporary folder; then one image is occluded at stride 8 (ceil(224/8)^2 = 784
positions of a 50 px square) and timed as

  one-at-a-time  every occluded image alone through the whole net (batch of 1); run on
                 --serial positions spread over the grid, extrapolated per position
  batched full   all positions in memory-sized batches through the whole net
  batched incr.  the same batches; the first layers only on the window the square can
                 change (occlusion_forward.py, method="incremental", the default)

on the CPU, and again on the GPU when there is one (same script). The batched
results are checked against the one-at-a-time ones. Finally the whole command
(`occlude`: maps, projection, table, PNGs) is timed once.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas.analyses import common  # noqa: E402
from atlas.net.runner import Runner  # noqa: E402
from atlas.analyses.occluder import fill_value, positions  # noqa: E402
from atlas.analyses.occlusion import occlude  # noqa: E402
from atlas.analyses.occlusion_forward import occlusion_forward  # noqa: E402


def synthetic_images(folder: Path, n: int = 2, size: int = 256) -> list[Path]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // 3
        im = Image.fromarray(arr)
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = rng.integers(0, size - 60, 2)
            w, h = rng.integers(30, 90, 2)
            d.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        p = folder / f"img{i}.png"
        im.save(p)
        paths.append(p)
    return paths


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def bench_device(atlas, ref, device: str, size: int, stride: int, serial: int) -> list[dict]:
    runner = Runner(atlas, device)
    dev = runner.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    n, boxes = positions(atlas.image_size, size, stride)
    N = len(boxes)
    fill = fill_value(atlas.preprocess, "grey")
    layer = runner.lmap.conv_layers[-1].name
    kw = dict(layer=layer, channel=0, fill=fill)
    # warm-up (kernel selection, allocator), not timed
    occlusion_forward(runner, ref.x, boxes[:8], **kw, batch_size=8)
    occlusion_forward(runner, ref.x, boxes[:8], **kw, method="full", batch_size=8)
    occlusion_forward(runner, ref.x, boxes[:2], **kw, method="full", batch_size=1)
    sub = np.unique(np.linspace(0, N - 1, min(serial, N)).round().astype(int))
    rows = []
    one, t1 = timed(lambda: occlusion_forward(runner, ref.x, boxes[sub], **kw, method="full", batch_size=1), sync)
    per1 = t1 / len(sub)
    rows.append({"device": str(dev), "mode": "one-at-a-time", "positions": len(sub), "batch": 1,
                 "seconds": t1, "ms_per_position": 1e3 * per1, "seconds_for_all": per1 * N, "speedup": 1.0,
                 "note": f"{len(sub)} of {N} positions, extrapolated to all"})
    for method in ("full", "incremental"):
        m, t = timed(lambda: occlusion_forward(runner, ref.x, boxes, **kw, method=method), sync)
        err_a = np.abs(m.activation[sub] - one.activation).max() / max(np.abs(one.activation).max(), 1e-12)
        err_l = np.abs(m.logits[sub] - one.logits).max() / max(np.abs(one.logits).max(), 1e-12)
        rows.append({"device": str(dev), "mode": f"batched {method}", "positions": N, "batch": m.batch,
                     "seconds": t, "ms_per_position": 1e3 * t / N, "seconds_for_all": t,
                     "speedup": per1 * N / t,
                     "note": f"max rel. diff vs one-at-a-time: activation {err_a:.1e}, logits {err_l:.1e}"
                             + (f"; {m.plan.describe()}" if method == "incremental" else "")})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serial", type=int, default=48, help="positions run one at a time (extrapolated)")
    ap.add_argument("--image", type=Path, help="image to occlude (default: a synthetic 256 px image)")
    ap.add_argument("--size", type=int, default=50)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="seconds: stride 56 (16 positions), --serial 4")
    args = ap.parse_args()
    if args.smoke:
        args.stride, args.serial = 56, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    from atlas.build import build
    from atlas.facade import Atlas

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        imgs = synthetic_images(tmp / "data")
        t = time.perf_counter()
        path = build("zfnet", str(tmp / "data"), tmp / "atlas", k=1, batch_size=2, progress=False, device="cpu")
        print(f"built a ZFNet atlas (random weights, 224 px) over 2 images in {time.perf_counter() - t:.1f} s")
        atlas = Atlas(path)
        image = args.image or imgs[0]
        ref = common.resolve_image(atlas, str(image))
        n, _ = positions(atlas.image_size, args.size, args.stride)
        print(f"occluding {image}: {args.size} px square, stride {args.stride}, {n} x {n} = {n * n} positions; "
              f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
        rows = bench_device(atlas, ref, "cpu", args.size, args.stride, args.serial)
        if torch.cuda.is_available() and not args.no_gpu:
            rows += bench_device(atlas, ref, "cuda", args.size, args.stride, max(args.serial, 200))
        else:
            print("no GPU here: CPU figures only")
        print()
        print(f"{'device':8} {'mode':20} {'positions':>9} {'batch':>6} {'seconds':>8} {'ms/pos':>8} "
              f"{'all (s)':>8} {'speedup':>8}  note")
        for r in rows:
            print(f"{r['device']:8} {r['mode']:20} {r['positions']:9d} {r['batch']:6d} {r['seconds']:8.2f} "
                  f"{r['ms_per_position']:8.2f} {r['seconds_for_all']:8.2f} {r['speedup']:7.1f}x  {r['note']}")
        for dev in sorted({r["device"] for r in rows}):
            rr = {r["mode"]: r for r in rows if r["device"] == dev}
            print(f"{dev}: batched (incremental) is {rr['batched incremental']['speedup']:.1f}x and batched (full) "
                  f"{rr['batched full']['speedup']:.1f}x faster than one position at a time")
        t = time.perf_counter()
        res = occlude(atlas, str(image), size=args.size, stride=args.stride)
        print(f"\nwhole `occlude` (maps, projection, table, PNGs): {time.perf_counter() - t:.1f} s")
        print("\n".join(res.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
