"""Where a build's time goes: `atlas.build.build` run in this process with its phases timed.

Wraps the build's own functions (nothing of the build is changed) and prints the seconds spent in each,
summed over the build, largest first, in one list though they nest (`job.mine` holds `extract`,
`capture`, `wait_input`, `flush`, ...; `capture` holds part of `topk`):

    extract      the forward pass of mining (the graph interpreter, pool indices included)
    capture      the one-pass switch capture (running top-k, boxes, window codes, packing)
    wait_input   the main process waiting for the next batch: the decoding workers', or its own threads'
                 decoding (no workers, as on a CPU of fewer than 4 cores)
    switches     switches.parquet, cut from the captures (or the second pass)
    flush        each chunk's work files (activation rows, top-k state, captures pruned)
    ...          the rest, each a function of atlas.build or atlas.mining

Compare `extract` with the bare forward pass of the same layers on in-memory batches to see what the
decoding workers cost the forward pass on a machine whose cores it shares. One process, one run: on a
shared machine run it twice.

    python scripts/profile_build_phases.py --model zfnet --data JPEGS --out /tmp/atlas [--workers 2]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

t0 = time.perf_counter()
import torch  # noqa: E402,F401 - its import is part of what is timed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atlas.build as B  # noqa: E402
from atlas import mining as M  # noqa: E402
from atlas.build import capture as C  # noqa: E402
from atlas.data import inputs as I  # noqa: E402
from atlas.net import layer_base as LB, layer_map as LM  # noqa: E402
from atlas.util.device import keep_freed_memory  # noqa: E402

SECONDS: collections.Counter = collections.Counter()


def timed(owner, name: str, key: str) -> None:
    fn = getattr(owner, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            SECONDS[key] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def timed_input() -> None:
    batches = I.InputBatches.__call__

    def call(self, ids):
        it = batches(self, ids)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            SECONDS["wait_input"] += time.perf_counter() - t
            yield item

    I.InputBatches.__call__ = call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zfnet")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    keep_freed_memory()  # as `atlas build` in a process of its own
    for owner, name, key in [(LB.LayerMapBase, "extract", "extract"), (LM.GraphLayerMap, "check_trace", "check"),
                             (C.SwitchCapture, "add", "capture"), (C.SwitchCapture, "finish", "capture_finish"),
                             (B.ColourSample, "keep", "colour"), (B, "_flush_chunk", "flush"),
                             (M.TopK, "update", "topk"), (M.Moments, "update", "moments"),
                             (B, "_write_captured_switches", "switches"), (B, "_write_switches", "switches"),
                             *((B.BuildJob, n, f"job.{n}") for n in ("resolve", "prepare", "mine", "merge", "write"))]:
        timed(owner, name, key)
    timed_input()
    t1 = time.perf_counter()
    B.build(args.model, args.data, args.out, overwrite=True, progress=False, index=False,
            batch_size=args.batch_size, **({"workers": args.workers} if args.workers is not None else {}))
    t2 = time.perf_counter()
    print(f"{'import':16s} {t1 - t0:6.2f}\n{'build':16s} {t2 - t1:6.2f}")
    for key, s in SECONDS.most_common():
        print(f"{key:16s} {s:6.2f}")


if __name__ == "__main__":
    main()
