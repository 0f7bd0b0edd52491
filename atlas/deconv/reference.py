"""The SLOW reference the engine is tested against: autograd with every ReLU's backward replaced by
ReLU(incoming gradient), and the agreement measure. A documented public oracle: small on purpose."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LayerMap
from .graph_engine import graph_reference
from .requests import Request, as_request
from .support import _NORM


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * (x > 0).to(g.dtype)


class _IdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m):
        return m(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


def gradient_reference(lmap: LayerMap, x: torch.Tensor, request: Request | tuple | dict,
                       mode: str = "unit", norm: str = "identity", method: str = "deconvnet") -> torch.Tensor:
    """SLOW REFERENCE (one autograd pass per request; for tests): (3, S, S).

    The vector-Jacobian product of the kept activation(s) of `request` with
    respect to image x[request.image], where every ReLU's backward is ReLU(g) (guided:
    ReLU(g) where the forward input was positive, else 0)
    and, for norm="identity", every norm layer's backward is the identity. In
    unit mode that is value * d a / d x; in map mode the channel map is the vector.
    """
    r = as_request(request)
    if lmap.is_graph:
        return graph_reference(lmap, x, r, mode=mode, method=method)
    relu = _GuidedReLU if method == "guided" else _DeconvReLU
    layer = lmap.by_name[r.layer]
    model = lmap.model.eval()
    p = next(model.parameters())
    xi = x[r.image:r.image + 1].detach().to(device=p.device, dtype=p.dtype).clone().requires_grad_(True)
    with torch.enable_grad():
        h = xi
        for i in range(layer.read_at + 1):
            m = model.features[i]
            if isinstance(m, nn.ReLU):
                h = relu.apply(h)
            elif isinstance(m, nn.Conv2d):
                h = F.conv2d(h, m.weight, None if m.bias is None else m.bias, m.stride, m.padding)
            elif isinstance(m, nn.MaxPool2d):
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
            elif isinstance(m, _NORM):
                h = m(h) if norm == "gradient" else _IdentityBackward.apply(h, m)
        seed = torch.zeros_like(h)
        if mode == "unit":
            seed[0, r.channel, r.y, r.x] = h[0, r.channel, r.y, r.x].detach()
        else:
            seed[0, r.channel] = h[0, r.channel].detach()
        (g,) = torch.autograd.grad(h, xi, seed)
    return g[0].detach()


def relative_error(p: torch.Tensor, ref: torch.Tensor) -> float:
    """max|p - ref| / max|ref| (0 when both are zero): the agreement measure of the tests."""
    scale = float(ref.abs().max())
    diff = float((p - ref).abs().max())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale
