"""The engine's local response normalisation (atlas/net/lrn.py) against torch's F.local_response_norm,
side by side in one run, on a batch of the maps zfnet normalises (conv1's, pooled: 96 x 55 x 55; conv2's,
pooled: 256 x 13 x 13), in both memory formats. Prints each one's best time and the ratio; checks the two
agree bit for bit.

    python scripts/bench_lrn.py [--batch 64] [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas.net import lrn  # noqa: E402
from atlas.util.device import keep_freed_memory  # noqa: E402


def best(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    keep_freed_memory()  # as the build runs
    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, best of {args.repeats}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for shape in [(96, 55, 55), (256, 13, 13)]:
        x0 = torch.randn((args.batch, *shape), generator=g).relu_()
        for fmt, label in [(torch.contiguous_format, "contiguous"), (torch.channels_last, "channels_last")]:
            x = x0.contiguous(memory_format=fmt)
            torch_s = best(lambda: F.local_response_norm(x, 5, 1e-4, 0.75, 2.0), args.repeats)
            ours_s = best(lambda: lrn.local_response_norm(x, 5, 1e-4, 0.75, 2.0), args.repeats)
            same = torch.equal(lrn.local_response_norm(x, 5, 1e-4, 0.75, 2.0),
                               F.local_response_norm(x, 5, 1e-4, 0.75, 2.0))
            print(f"{'x'.join(map(str, shape)):12s} {label:14s} torch {torch_s * 1e3:7.1f} ms   "
                  f"engine {ours_s * 1e3:7.1f} ms   {torch_s / ours_s:4.2f}x   bit-identical: {same}")


if __name__ == "__main__":
    main()
