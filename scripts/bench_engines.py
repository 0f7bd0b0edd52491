"""The chain engine against the one (graph) engine on ZFNet, side by side in one run.

ZFNet (random weights, seed 0) at 224 px, 9 generated images; for each of conv1..conv5 the top 9 units of
one channel (each image's strongest position of the channel that fires most), projected from the
images' switches (unit mode, DeconvNet) by the chain engine (`LayerMap`, the Sequential walk) and by the
graph engine (`GraphLayerMap` forced onto the same model), one thread, interleaved, best of --repeat.
Prints per layer both times for the 9, the ratio of projections per second (graph / chain) and their
largest difference relative to the largest value.

It measures the chain engine, deleted since: run it on the last commit that has both engines,

    git worktree add /tmp/pre 7cfe679 && cd /tmp/pre && python scripts/bench_engines.py [--repeat 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--smoke", action="store_true", help="scripts/smoke_all.sh: say where this runs and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from atlas import deconv as D
    if not hasattr(D, "check_model"):
        # a measurement of the chain engine, deleted since: its figures are reproduced on the commit before
        message = "bench_engines.py: this tree has one engine; run it on 7cfe679 (see its docstring)"
        if args.smoke:
            print(message)
            return
        sys.exit(message)
    from atlas.net.layer_map import GraphLayerMap
    from atlas.net import LayerMap
    from atlas.models import load_model

    torch.manual_seed(0)
    model = load_model("zfnet").eval()
    S = args.size
    x = torch.randn(9, 3, S, S)
    chain, graph = LayerMap(model, S), GraphLayerMap(model, S)
    assert type(chain) is LayerMap, "zfnet must walk as a chain for this comparison"
    layers = [la.name for la in chain.conv_layers]
    rec_c = D.record(chain, x, layers)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.threads} thread(s); best of {args.repeat}")
    print(f"{'layer':6} {'chain ms':>9} {'graph ms':>9} {'graph/chain':>12} {'max diff':>9}")
    for name in layers:
        act = rec_c.activations[name]
        c = int(act.amax(dim=(0, 2, 3)).argmax())
        reqs = []
        for i in range(9):
            pos = int(act[i, c].flatten().argmax())
            y, xx = divmod(pos, act.shape[3])
            reqs.append(D.Request(i, name, c, y, xx, float(act[i, c, y, xx])))
        # the graph map's names are module paths: the same unit under the graph's name for the layer
        gname = _graph_name(chain, graph, name)
        greqs = [D.Request(r.image, gname, r.channel, r.y, r.x, r.value) for r in reqs]
        gsw = {p.name: rec_c.switches[_chain_pool(chain, graph, p.name)] for p in graph.pools
               if _chain_pool(chain, graph, p.name) in rec_c.switches}
        best = {"chain": float("inf"), "graph": float("inf")}
        out = {}
        for _ in range(args.repeat):
            for which, lm, rq, sw in (("chain", chain, reqs, rec_c.switches), ("graph", graph, greqs, gsw)):
                t = time.perf_counter()
                out[which] = D.project(lm, rq, sw)
                best[which] = min(best[which], time.perf_counter() - t)
        diff = float((out["chain"].images - out["graph"].images).abs().max() / out["chain"].images.abs().max())
        ratio = best["chain"] / best["graph"]
        print(f"{name:6} {best['chain'] * 1e3:9.2f} {best['graph'] * 1e3:9.2f} {ratio:12.2f} {diff:9.1e}")


def _graph_name(chain, graph, name: str) -> str:
    """The graph map's layer for a chain layer: the module its read point is (features.i)."""
    la = chain.by_name[name]
    return f"features.{la.index}" if f"features.{la.index}" in graph.by_name else name


def _chain_pool(chain, graph, pool: str) -> str:
    idx = int(pool.split(".")[-1])
    return next(p.name for p in chain.pools if p.index == idx)


if __name__ == "__main__":
    main()
