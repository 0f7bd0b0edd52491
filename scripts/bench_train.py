"""Training throughput of `atlas train` against the bare forward+backward+step ceiling.

    python scripts/bench_train.py                       # zfnet at 224 px; CPU: batch 16, 6 steps, 3 rounds
    python scripts/bench_train.py --device cuda         # GPU: batch 128, 40 steps, bf16 + channels-last
    python scripts/bench_train.py --model zfnet-mini --image-size 64 --batch-size 64 --steps 20
    python scripts/bench_train.py --smoke               # seconds: zfnet-mini at 32 px, batch 8, 2 steps, 1 round

What is measured, side by side in one process, on the same images:
  train    atlas.train.train() on a synthetic ImageFolder of steps x batch images (256 px JPEG-free
           PNGs, 2 classes, a separate 4-image --val folder), 2 epochs; its own images/s of each
           epoch's training phase (metrics.csv). This is the whole per-step path of a real run:
           batch gather, random crop + flip on the device, normalisation, autocast, forward, loss,
           backward, SGD step, filter renormalisation, metric accumulation, progress.
  ceiling  the same model (same init, same precision and memory format) stepping on the same
           images in the same order, already cropped, normalised and resident on the device:
           forward, cross-entropy, backward, SGD step, nothing else (CPU: with denormals flushed,
           as in train).
--rounds rounds of ceiling, train, ceiling (so both see the same swings of a shared machine's
load). Printed: each round's ratio (mean of its two epochs / mean of its two ceilings), the
best-of ratio (best train epoch / best ceiling) and the median of the rounds' ratios, with the
load average (os.getloadavg). The target is >= 0.9.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas.models.registry import build_model  # noqa: E402
from atlas.models.zfnet import paper_init  # noqa: E402
from atlas.train import MODEL_DEFAULTS, PAPER_DEFAULTS, decode_squares, read_metrics, train  # noqa: E402
from atlas.train.recipe import epoch_augmentation, run_preprocessing  # noqa: E402
from atlas.train.trainer import flush_denormal  # noqa: E402
from atlas.util.device import resolve_device  # noqa: E402
from atlas.data import open_dataset  # noqa: E402


def make_folder(root: Path, n: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"{i:05d}.png", compress_level=1)
    return root


def ceiling(model: str, init: str, x_all: torch.Tensor, y_all: torch.Tensor, batch: int, steps: int,
            dev: torch.device, precision: str, channels_last: bool, lr: float, seed: int) -> float:
    """images/s of bare forward + backward + step on resident, preprocessed batches."""
    torch.manual_seed(seed)
    net = build_model(model, num_classes=2)
    if init == "paper":
        paper_init(net)
    net = net.to(dev).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    batches = []
    for s in range(steps):
        x = x_all[s * batch:(s + 1) * batch].to(dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, y_all[s * batch:(s + 1) * batch].to(dev)))

    def step(x, y):
        with torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
            out = net(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with flush_denormal(dev.type == "cpu"):  # as train() runs on CPU
        step(*batches[0])  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for x, y in batches:
            step(x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return steps * batch / (time.perf_counter() - t)


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zfnet")
    ap.add_argument("--image-size", type=int, default=None, help="crop size (default: the model's, 224 for zfnet)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 128 on GPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (default 6 on CPU, 40 on GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="ceiling / train / ceiling rounds (best-of and median)")
    ap.add_argument("--smoke", action="store_true", help="seconds: zfnet-mini at 32 px, batch 8, 2 steps, 1 round")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.image_size, args.batch_size, args.steps, args.rounds = "zfnet-mini", 32, 8, 2, 1

    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    batch = args.batch_size or (128 if gpu else 16)
    steps = args.steps or (40 if gpu else 6)
    precision = args.precision if args.precision != "auto" else ("bf16" if gpu else "fp32")
    pre = run_preprocessing(args.model, args.image_size, None, None)
    md = {**PAPER_DEFAULTS, **MODEL_DEFAULTS.get(args.model, {})}
    init, lr = md["init"], 1e-3
    n = batch * steps
    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        t = time.perf_counter()
        data = make_folder(tmp / "train", n, pre["resize"], args.seed)
        val = make_folder(tmp / "val", 4, pre["resize"], args.seed + 1)
        print(f"{args.model} at {pre['crop']} px (from {pre['resize']}), batch {batch}, {steps} steps/epoch, "
              f"{dev}, {precision}, torch {torch.__version__}, {torch.get_num_threads()} threads "
              f"[data made in {time.perf_counter() - t:.1f} s]; load average {_load()} (1/5/15 min)")

        # the same images the train run sees, centre-cropped and normalised, on the device
        src = open_dataset(str(data))
        sq, _ = decode_squares(src, range(len(src)), pre["resize"], 0, False)
        o = (pre["resize"] - pre["crop"]) // 2
        mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
        x_all = (sq[:, :, o:o + pre["crop"], o:o + pre["crop"]].float() / 255 - mean) / std
        y_all = torch.tensor([r.label_index for r in src.records])
        # in train's epoch-1 order (a folder listing is sorted by class: single-class batches learn
        # fast, and their vanishing gradients would make the ceiling a different workload)
        order = epoch_augmentation(args.seed, 1, n, pre["resize"], pre["crop"], False)[0]
        x_all, y_all = x_all[order], y_all[order]

        # Rounds of ceiling / train / ceiling, so that both see the same changes in the machine's load
        # (other jobs share it); each gives two samples per round (two ceilings, two epochs).
        ceil, rates, ratios = [], [], []
        for r in range(args.rounds):
            c1 = ceiling(args.model, init, x_all, y_all, batch, steps, dev, precision, gpu, lr, args.seed)
            t = time.perf_counter()
            final = train(args.model, str(data), tmp / f"run{r}", val=str(val), epochs=2, batch_size=batch, lr=lr,
                          image_size=args.image_size, device=str(dev), precision=precision, workers=args.workers,
                          seed=args.seed, progress=False)
            wall = time.perf_counter() - t
            tr = [row["images_per_s"] for row in read_metrics(final.parent)]
            c2 = ceiling(args.model, init, x_all, y_all, batch, steps, dev, precision, gpu, lr, args.seed)
            shutil.rmtree(tmp / f"run{r}", ignore_errors=True)
            ceil += [c1, c2]
            rates += tr
            ratios.append((sum(tr) / 2) / ((c1 + c2) / 2))
            print(f"round {r + 1}: ceiling {c1:7.1f} / {c2:7.1f} images/s, atlas train {tr[0]:7.1f} / {tr[1]:7.1f} "
                  f"images/s (epochs 1 / 2; whole call {wall:.1f} s incl. decode, validation, checkpoints); "
                  f"ratio {ratios[-1]:.3f}; load {_load()}")
        print(f"best of {len(rates)}: atlas train {max(rates):.1f} images/s, ceiling {max(ceil):.1f} images/s")
        print(f"ratio train / ceiling: best-of {max(rates) / max(ceil):.3f}, median of rounds "
              f"{statistics.median(ratios):.3f}; target >= 0.9; load average {_load()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
