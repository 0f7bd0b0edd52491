"""Benchmark: the build job's mining throughput against the bare forward pass.

Both run on the same in-memory batches, interleaved batch by batch (A, B, A,
B, ...) so that a noisy shared machine slows both alike; the figure is the
ratio of their images/s. Then the whole `atlas build` runs in two fresh
processes over N and 4N generated images to show that peak memory does not
grow with the number of images.

    python scripts/bench_build.py                 # zfnet at 224 px (the issue's figure)
    python scripts/bench_build.py --quick         # zfnet-mini at 64 px, small runs
    python scripts/bench_build.py --smoke         # seconds: zfnet-mini, 2 batches of 16, builds of 32 / 128 images
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas.build import ChunkMiner  # noqa: E402
from atlas.search.indexing import plan_for_build  # noqa: E402
from atlas.util.device import resolve_device  # noqa: E402
from atlas.util.heap import keep_memory_flat  # noqa: E402
from atlas.net import LayerMap  # noqa: E402
from atlas.models import load_model, preprocessing_for  # noqa: E402


def throughput(model_name: str, size: int, batch: int, batches: int, device: str, rounds: int) -> dict:
    dev = resolve_device(device)
    model = load_model(model_name).to(dev)
    lmap = LayerMap(model, size)
    chosen = lmap.resolve(None)  # a default build's layers: every conv (2012-2014 nets), each stage's output
    # what a default build runs: every conv layer, plus the similarity index's vectors (fc7 when the
    # model has a classifier, kept by the miner); the ceiling runs the same layers bare
    plan = plan_for_build(lmap, [la.name for la in chosen], None, True, batches * batch)
    fcs = [lmap.by_name[n] for n in plan.vectors if lmap.by_name[n].kind == "fc"]
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, 3, size, size, generator=g) for _ in range(batches)]
    ids = [torch.arange(i * batch, (i + 1) * batch) for i in range(batches)]
    stack, head = model, None  # the model's own forward, whole

    def bare(x):
        with torch.inference_mode():
            y = stack(x.to(dev))
            if head is not None:
                head(torch.flatten(model.avgpool(y), 1))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    miner = ChunkMiner(lmap, chosen, 9, dev, plan=plan)

    def mine(x, i):
        miner.add(x, i)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    bare(data[0]); mine(data[0], ids[0])  # warm up both paths
    t_bare = t_mine = 0.0
    for _ in range(rounds):
        for x, i in zip(data, ids):
            t0 = time.perf_counter(); bare(x); t1 = time.perf_counter(); mine(x, i); t2 = time.perf_counter()
            t_bare += t1 - t0
            t_mine += t2 - t1
    n = rounds * batches * batch
    return {"bare_images_per_s": n / t_bare, "build_images_per_s": n / t_mine, "ratio": t_bare / t_mine,
            "layers": [la.name for la in chosen] + [la.name for la in fcs]}


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    for i in range(n):
        arr = np.roll(base, shift=i * 7, axis=1)
        Image.fromarray(arr).save(folder / f"img_{i:06d}.jpg", quality=90)


PEAK = """
import json, resource, sys
from atlas.build import build
build(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=int(sys.argv[4]), progress=False)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_memory(model_name: str, n: int, batch: int, size: tuple[int, int]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "data", 4 * n, size)
        small = tmp / "small"
        make_images(small, n, size)
        for label, folder in (("n", small), ("4n", tmp / "data")):
            res = subprocess.run([sys.executable, "-c", PEAK, model_name, str(folder), str(tmp / f"atlas-{label}"),
                                  str(batch)], capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parent.parent)
            out[label] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    out["growth"] = out["4n"] / out["n"] - 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zfnet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memory-images", type=int, default=256, help="N for the peak-memory runs (N and 4N)")
    ap.add_argument("--quick", action="store_true", help="zfnet-mini at 64 px, small runs")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: zfnet-mini at 64 px, tiny runs")
    args = ap.parse_args()
    if args.quick:
        args.model, args.size, args.batch, args.batches, args.rounds, args.memory_images = \
            "zfnet-mini", 64, 64, 4, 2, 256
    if args.smoke:
        args.model, args.size, args.batch, args.batches, args.rounds, args.memory_images = \
            "zfnet-mini", 64, 16, 2, 1, 32
    torch.set_num_threads(os.cpu_count() or 1)
    keep_memory_flat()  # as `atlas build` does: both sides of the ratio run under the same allocator
    print(f"model {args.model} at {args.size} px, batch {args.batch}, device {resolve_device(args.device)}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU threads")
    t = throughput(args.model, args.size, args.batch, args.batches, args.device, args.rounds)
    print(f"layers run     {', '.join(t['layers'])} (a default build: every conv layer, fc vectors for the index)")
    print(f"bare forward   {t['bare_images_per_s']:8.1f} images/s")
    print(f"build mining   {t['build_images_per_s']:8.1f} images/s")
    print(f"ratio          {t['ratio']:8.3f}  (target >= 0.9)")
    pre = preprocessing_for(args.model)
    side = pre["resize"]
    m = peak_memory(args.model, args.memory_images, args.batch, (int(side * 4 / 3), side))
    print(f"peak RSS, whole build of {args.memory_images} images: {m['n']:.0f} MB; of {4 * args.memory_images}: "
          f"{m['4n']:.0f} MB; growth {100 * m['growth']:+.1f} % (target within 10 %)")


if __name__ == "__main__":
    main()
