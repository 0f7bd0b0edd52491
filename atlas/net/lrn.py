"""Local response normalisation, computed as torch computes it, in less time.

`F.local_response_norm` sums each window of squared channels with `avg_pool3d` over a padded 5-D copy of
the maps, a large share of ZFNet's forward pass on a CPU. Here the window is summed from
shifted channel slices of the squares instead: the same float32 additions in the same order (from the
window's lowest channel up, starting from zero, as avg_pool3d's loop accumulates in float32), then
the same division by the window size and the same `mul`, `add`, `pow` and division, each its own op. So
the result is bit-identical to torch's (tests/test_net_lrn.py checks it against F.local_response_norm).
The exact steps (squares, sums, scaling) run a chunk of images at a time, in the cache; only `pow` and the
last division run over the whole batch at once. On a batch of zfnet's pooled conv1 maps, 2.3 to 2.9x
faster than torch's channels-last and 3.4 to 3.7x contiguous (python scripts/bench_lrn.py, three runs).

Used by the graph's interpreter (graph.Graph.run) for every nn.LocalResponseNorm it runs; where the
identity is not established (another dtype or device, a map that is not 4-D or not dense in either
layout, a tensor that needs gradients) or where a hook would see the call, the module runs as written.
The padding's zeros are not added: a square is never -0, so adding +0 changes nothing.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# the maps squared and summed at a time (at least one image): each step reads the last one's output
# from the cache, not from memory
CHUNK_BYTES = 1 << 20


def applies(x: torch.Tensor) -> bool:
    """Where the sliced sum is the same arithmetic as torch's: dense float32 4-D maps (either layout) on a
    CPU, no autograd."""
    return (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)))


def local_response_norm(x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """F.local_response_norm(x, size, alpha, beta, k), bit for bit, for a tensor `applies` accepts."""
    n, channels = x.shape[:2]
    lo, hi = size // 2, (size - 1) // 2  # the window of channel c: c - lo .. c + hi (F.pad's split)
    # torch's avg_pool3d hands back (N, C, H, W)-contiguous sums whatever x's layout, and `pow` rounds by
    # an element's place in its vectorised loop (a loop's tail is not computed as its body): the same
    # layout and one pow over the whole batch, so the same places
    div = torch.empty_like(x, memory_format=torch.contiguous_format)
    # The squares, sums and scaling are exact, so they can run a chunk of images at a time (one of
    # zfnet's first maps, 1.2 MB): each step then reads what the step before wrote from the cache, not
    # from memory (a batch of 64 of those maps is 74 MB)
    per = max(1, CHUNK_BYTES // max(1, math.prod(x.shape[1:]) * x.element_size()))
    squares = torch.empty_like(div[:per])
    for i in range(0, n, per):
        m = min(per, n - i)
        sq = torch.mul(x[i:i + m], x[i:i + m], out=squares[:m])
        total = div[i:i + m].zero_()
        for d in range(-lo, hi + 1):  # lowest channel first: avg_pool3d's order of addition
            a, b = max(0, -d), min(channels, channels - d)  # the channels c whose c + d exists
            if a < b:
                total[:, a:b] += sq[:, a + d:b + d]
        total.div_(size).mul_(alpha).add_(k)
    div.pow_(beta)
    return torch.div(x, div, out=div) if x.is_contiguous() else x / div


def run(module: nn.LocalResponseNorm, *args, **kwargs) -> torch.Tensor:
    """The module called as the model calls it (`input` by position or by name); the module itself
    wherever hooks would see or change the call."""
    x = args[0] if args else kwargs.get("input")
    if len(args) + len(kwargs) == 1 and isinstance(x, torch.Tensor) and applies(x) and not _hooked(module):
        return local_response_norm(x, module.size, module.alpha, module.beta, module.k)
    return module(*args, **kwargs)


def _hooked(module: nn.Module) -> bool:
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks)
