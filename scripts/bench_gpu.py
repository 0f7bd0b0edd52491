"""Benchmark: is the build job bound by decoding, by the forward pass, or by neither?

In one run, over a folder of generated JPEGs of ImageNet-like size (about
500x375, quality 90), for `zfnet` at 224 px:
  1. decode alone     -- the build's input pipeline (atlas.data.inputs) to model input on the device,
                         no model: both decoders (cpu: PIL in worker processes; device: nvjpeg on
                         the GPU, workers only read bytes)
  2. forward alone    -- the conv stack on in-memory batches on the device
  3. the whole build  -- `atlas build` end to end (mining, switches pass, writing, indexes),
                         with the decoder `--decode auto` picks; its phases from the manifest
Target: the whole build reaches at least 0.8 of the slower of the two ceilings (the
ceiling of decoding is the decoder the build used).
Runs on the GPU when there is one, else on the CPU (then the GPU figures wait).

The switches pass re-reads the images that hold some channel's top-k: with few
images that is nearly all of them (zfnet has 1376 conv channels x k=9), so use
enough images that they are a minority, as they are in a real dataset.

    python scripts/bench_gpu.py --images 30000         # on a GPU machine
    python scripts/bench_gpu.py --images 128           # CPU smoke run
    python scripts/bench_gpu.py --smoke                # seconds: zfnet-mini at 64 px over 16 JPEGs, batch 8
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
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas.build import build  # noqa: E402
from atlas.util.device import default_workers, resolve_device  # noqa: E402
from atlas.data import Preprocess, open_dataset  # noqa: E402
from atlas.data.inputs import InputBatches, choose_decoder  # noqa: E402
from atlas.net import LayerMap  # noqa: E402
from atlas.models import load_model, preprocessing_for  # noqa: E402


def _make_jpeg(args: tuple[Path, int]) -> None:
    folder, i = args
    rng = np.random.default_rng(i)  # per image: the same folder whatever the number of processes
    yy, xx = np.mgrid[0:375, 0:500]
    # Smooth structure plus texture: compresses like a photo, unlike pure noise.
    f1, f2 = rng.uniform(0.01, 0.08, 2)
    base = np.stack([np.sin(xx * f1 + c) * np.cos(yy * f2 - c) for c in (0, 1, 2)], -1)
    img = (127 + 90 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / f"img_{i:06d}.jpg", quality=90)


def make_jpegs(folder: Path, n: int) -> None:
    from multiprocessing import Pool

    folder.mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(_make_jpeg, [(folder, i) for i in range(n)], chunksize=64)


def decode_rate(src, pre, dev, decoder: str, workers: int, batch: int) -> float:
    """Images/s of the build's input pipeline alone, to normalised input on the device."""
    n = len(src)
    batches = [list(range(b, min(n, b + batch))) for b in range(0, n, batch)]
    inputs = InputBatches(src, pre, dev, decoder, workers)
    for _ in inputs(batches[:1]):  # warm-up: the decoder library's (and nvjpeg's) one-time set-up
        pass
    t = time.perf_counter()
    for x, _, _, _ in inputs(batches):
        pass
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--data", type=Path, help="reuse a folder of JPEGs instead of generating one")
    ap.add_argument("--smoke", action="store_true", help="seconds: zfnet-mini at 64 px over 16 JPEGs, batch 8")
    args = ap.parse_args()
    model_name, size = "zfnet", 224
    if args.smoke:
        model_name, size, args.images, args.batch = "zfnet-mini", 64, 16, 8
    dev = resolve_device(args.device)
    precision = args.precision or ("bf16" if dev.type == "cuda" else "fp32")
    workers = args.workers if args.workers is not None else default_workers(dev)
    batch = args.batch if dev.type == "cuda" else min(args.batch, 32)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none (CPU run; GPU figures wait)"
    if args.smoke:
        print(f"smoke run: {model_name} at {size} px, {args.images} images")
    print(f"device {dev} [{gpu}], torch {torch.__version__}, {os.cpu_count()} CPU cores, {workers} workers, "
          f"batch {batch}, {precision}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp) / "jpegs"
        if args.data is None:
            t = time.perf_counter()
            make_jpegs(folder, args.images)
            print(f"generated {args.images} JPEGs (500x375, q90) in {time.perf_counter() - t:.1f} s")
        src = open_dataset(folder)
        n = len(src)
        pre = Preprocess(preprocessing_for(model_name))
        used = choose_decoder("auto", src, dev)
        decoders = ["cpu", "device"] if used == "device" or dev.type == "cpu" else ["cpu"]
        decode = {d: decode_rate(src, pre, dev, d, workers, batch) for d in decoders}

        model = load_model(model_name).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        lmap = LayerMap(model, size)
        stack = model.features[: lmap.chain_read_at["conv5"] + 1]
        xb = torch.randn(batch, 3, size, size, device=dev)
        if dev.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        reps = max(2, n // batch)
        with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
            stack(xb)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                stack(xb)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        forward = reps * batch / (time.perf_counter() - t)

        t = time.perf_counter()
        out = build(model_name, str(folder), Path(tmp) / "atlas", batch_size=batch, device=str(dev), workers=workers,
                    precision=precision, decode=used, progress=False)
        whole_s = time.perf_counter() - t
        whole = n / whole_s
        manifest = json.loads((out / "manifest.json").read_text())
        import duckdb

        top_images = duckdb.sql(f"SELECT count(DISTINCT image_id) FROM read_parquet('{out}/switches.parquet')"
                                ).fetchall()[0][0]
    ceiling = min(decode[used], forward)
    for d, rate in decode.items():
        print(f"decode alone     {rate:9.1f} images/s   ({d} decoder{', the build uses it' if d == used else ''})")
    print(f"forward alone    {forward:9.1f} images/s")
    print(f"whole build      {whole:9.1f} images/s   = {whole / ceiling:.2f} of the slower ceiling (target >= 0.8)")
    tm = manifest["timings"]
    print(f"  phases: mining {tm['mining_s']:.1f} s ({n / tm['mining_s']:.1f} images/s = "
          f"{n / tm['mining_s'] / ceiling:.2f} of the ceiling), switches pass {tm['switches_s']:.1f} s over "
          f"{top_images} top-k images ({top_images / n:.0%} of the dataset), writing {tm['write_s']:.1f} s, "
          f"indexes and publishing {whole_s - tm['total_s']:.1f} s; total {whole_s:.1f} s")


if __name__ == "__main__":
    main()
