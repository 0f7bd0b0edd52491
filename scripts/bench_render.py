"""Benchmark the DeconvNet projection engine (atlas/deconv.py).

Scenario (the atlas's hot path): one conv5 channel's top-9 on a 224 px ZFNet
(random weights), projected from stored switches (encode/decode round trip,
what the lazy renderer reads from switches.parquet).

Reports, each as the best/median of several runs unless "cold":
  check       the one-off model check (per process and model)
  cold        the first projection call in the process (oneDNN primitives not yet built)
  warm        later calls
  baseline    per-image autograd loop, whole model forward + backward with the ReLU
              backward replaced by ReLU(grad) (what Captum's NeuronDeconvolution does)
  speedup     baseline / warm, per projection
and the agreement of the engine with the slow gradient reference.

    python scripts/bench_render.py [--threads 2] [--repeat 7] [--layer conv5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


def _baseline(model: nn.Module, lmap, x: torch.Tensor, reqs) -> torch.Tensor:
    """Per image: full forward with deconv ReLUs, then autograd from the one neuron (Captum-like)."""
    from atlas.deconv import _NORM, _DeconvReLU, _IdentityBackward

    class DReLU(nn.Module):
        def forward(self, t):
            return _DeconvReLU.apply(t)

    class PassNorm(nn.Module):  # the paper's handling, so that the results can be compared
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return _IdentityBackward.apply(t, self.m)

    feats = nn.Sequential(*[DReLU() if isinstance(m, nn.ReLU) else PassNorm(m) if isinstance(m, _NORM) else m
                            for m in model.features])
    out = []
    for r in reqs:
        layer = lmap.by_name[r.layer]
        xi = x[r.image:r.image + 1].clone().requires_grad_(True)
        got = {}
        h = feats[layer.read_at].register_forward_hook(lambda m, i, o: got.__setitem__("a", o))
        try:
            y = feats(xi)
            y = model.classifier(torch.flatten(model.avgpool(y), 1))  # Captum runs the whole model
            a = got["a"][0, r.channel, r.y, r.x]
            (g,) = torch.autograd.grad(a, xi)
        finally:
            h.remove()
        out.append(g[0] * a.detach())
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layer", default="conv5")
    ap.add_argument("--model", default="zfnet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--json", default=None)
    ap.add_argument("--throughput", type=int, default=0, metavar="N",
                    help="also time N random unit projections per conv layer in one call")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from atlas import deconv as D
    from atlas.layers import LayerMap
    from atlas.models import load_model
    from atlas.switches import decode, encode, regions_below

    model = load_model(args.model, seed=0)
    lm = LayerMap(model, args.size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.k, 3, args.size, args.size, generator=gen)

    t0 = time.perf_counter()
    D.check_model(lm)
    t_check = time.perf_counter() - t0

    # The "top-k" of one channel: the channel with the largest summed maxima; each image's max position.
    rec = D.record(lm, x, [args.layer])
    act = rec.activations[args.layer]
    channel = int(act.amax(dim=(2, 3)).sum(0).argmax())
    layer = lm.by_name[args.layer]
    reqs, stored = [], {p.name: [] for p in lm.pools if p.name in layer.pools_below}
    pools = {p.name: p for p in lm.pools}
    for i in range(args.k):
        flat = int(act[i, channel].flatten().argmax())
        y, xx = divmod(flat, layer.width)
        regions = {reg.pool: reg for reg in regions_below(lm, layer, y, xx)}
        for name in stored:
            p = pools[name]
            data = encode(rec.switches[name][i], p.geometry, regions[name])
            stored[name].append(decode(data, p.channels, p.geometry, regions[name]))
        reqs.append(D.Request(i, args.layer, channel, y, xx, value=float(act[i, channel, y, xx])))
    switches = {k: torch.stack(v) for k, v in stored.items()}

    t0 = time.perf_counter()
    P = D.project(lm, reqs, switches)
    t_cold = time.perf_counter() - t0
    # engine and baseline interleaved, so that load from other processes hits both alike
    warm, full, base = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        D.project(lm, reqs, switches)
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        D.project(lm, reqs, switches).images  # including the (k, 3, S, S) tensor
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        B = _baseline(model, lm, x, reqs)
        base.append(time.perf_counter() - t0)

    thr = {}
    if args.throughput:
        # a whole layer's atlas: every channel's top-k (random images and positions), one call
        n = args.throughput
        g = torch.Generator().manual_seed(1)
        recall = D.record(lm, x)
        for la in lm.conv_layers:
            idx = torch.randint(0, args.k, (n,), generator=g)
            ys = torch.randint(0, la.height, (n,), generator=g)
            xs = torch.randint(0, la.width, (n,), generator=g)
            rq = [D.Request(int(i), la.name, j % la.channels, int(y), int(xx), value=1.0)
                  for j, (i, y, xx) in enumerate(zip(idx, ys, xs))]
            D.project(lm, rq[:8], recall.switches)
            t0 = time.perf_counter()
            D.project(lm, rq, recall.switches)
            dt = time.perf_counter() - t0
            thr[la.name] = {"projections": n, "seconds": round(dt, 3), "ms_per_projection": round(1000 * dt / n, 3)}

    errs = [D.relative_error(P.images[i], D.gradient_reference(lm, x, r)) for i, r in enumerate(reqs)]
    base_err = D.relative_error(P.images, B)
    res = {
        "model": args.model, "size": args.size, "layer": args.layer, "channel": channel, "k": args.k,
        "threads": torch.get_num_threads(),
        "check_s": round(t_check, 4),
        "cold_s": round(t_cold, 4),
        "warm_best_s": round(min(warm), 4), "warm_median_s": round(statistics.median(warm), 4),
        "warm_with_images_median_s": round(statistics.median(full), 4),
        "baseline_best_s": round(min(base), 4), "baseline_median_s": round(statistics.median(base), 4),
        "speedup_per_projection_median": round(statistics.median(base) / statistics.median(warm), 1),
        "speedup_per_projection_best": round(min(base) / min(warm), 1),
        "load_average_1min": round(__import__("os").getloadavg()[0], 2),
        "max_relative_error_vs_gradient_reference": max(errs),
        "relative_error_vs_baseline": base_err,
    }
    if thr:
        res["throughput"] = thr
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
