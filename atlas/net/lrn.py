"""Local response normalisation, computed as torch computes it, in less time.

`F.local_response_norm` sums each window of squared channels with `avg_pool3d` over a padded 5-D copy of
the maps, a large share of ZFNet's forward pass on a CPU. Here the window is summed from
shifted channel slices of the squares instead: the same float32 additions in the same order (from the
window's lowest channel up, starting from zero, as avg_pool3d's loop accumulates in float32), then
the same division by the window size and the same `mul`, `add`, `pow` and division, each its own op. So
the result is bit-identical to torch's (tests/test_net_lrn.py checks it against F.local_response_norm),
and about 2x faster on a channels-last map, where a channel slice is a run of contiguous values.

Used by the graph's interpreter (graph.Graph.run) for every nn.LocalResponseNorm it runs; where the
identity is not established (another dtype or device, a map that is not 4-D or not dense in either
layout, a tensor that needs gradients) or where a hook would see the call, the module runs as written.
The padding's zeros are not added: a square is never -0, so adding +0 changes nothing.
"""
from __future__ import annotations

import torch
from torch import nn


def applies(x: torch.Tensor) -> bool:
    """Where the sliced sum is the same arithmetic as torch's: dense float32 4-D maps (either layout) on a
    CPU, no autograd."""
    return (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)))


def local_response_norm(x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """F.local_response_norm(x, size, alpha, beta, k), bit for bit, for a tensor `applies` accepts."""
    sq = x * x
    channels = x.shape[1]
    lo, hi = size // 2, (size - 1) // 2  # the window of channel c: c - lo .. c + hi (F.pad's split)
    total = torch.zeros_like(x)
    for d in range(-lo, hi + 1):  # lowest channel first: avg_pool3d's order of addition
        a, b = max(0, -d), min(channels, channels - d)  # the channels c whose c + d exists
        if a < b:
            total[:, a:b] += sq[:, a + d:b + d]
    # torch's avg_pool3d hands back (N, C, H, W)-contiguous sums whatever x's layout, and `pow` rounds by
    # an element's place in its vectorised loop (a loop's tail is not computed as its body): the same
    # layout, so the same places
    div = total.contiguous().div_(size).mul_(alpha).add_(k).pow_(beta)
    return x / div


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
