"""The SLOW reference the engine is tested against: autograd with every ReLU's backward replaced by
ReLU(incoming gradient), and the agreement measure. A documented public oracle: small on purpose."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..net import LayerMap
from ..net.graph import Op
from .requests import Request, as_request


class _DeconvReLU(torch.autograd.Function):
    """Forward: the op itself; backward: the DeconvNet or guided rule (the autograd reference)."""

    @staticmethod
    def forward(ctx, x, kind, param, guided):
        ctx.kind, ctx.param, ctx.guided = kind, param, guided
        ctx.save_for_backward(x)
        if kind == "leaky":
            return F.leaky_relu(x, param)
        if kind == "relu6":
            return x.clamp(0, param)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = F.leaky_relu(g, ctx.param) if ctx.kind == "leaky" else g.clamp(min=0)
        if ctx.guided:
            if ctx.kind == "leaky":
                out = out * torch.where(x > 0, torch.ones_like(x), torch.full_like(x, ctx.param))
            elif ctx.kind == "relu6":
                out = out * ((x > 0) & (x < ctx.param)).to(g.dtype)
            else:
                out = out * (x > 0).to(g.dtype)
        return out, None, None, None


class _IdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m):
        return m(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


def graph_reference(lmap, x: torch.Tensor, r: Request, mode: str = "unit", method: str = "deconvnet",
                    norm: str = "identity") -> torch.Tensor:
    """SLOW REFERENCE (autograd, one request; for tests): the input gradient of the kept activation(s)
    with every ReLU-kind op's backward replaced by its rule, every LRN's by the identity, and
    everything else autograd's own (max-pools by the image's own switches)."""
    guided = method == "guided"

    def relu(op: Op, t):
        param = op.params.get("slope", op.params.get("max", 0.0))
        return _DeconvReLU.apply(t, op.kind, param, guided)

    def lrn(op: Op, t):
        return _IdentityBackward.apply(t, op.module)

    # The forward runs over the whole batch x, as the engine's record does: CPU kernels round by batch
    # shape, and a ReLU input or a pool's winner within rounding of a tie would otherwise differ.
    p = next(lmap.model.parameters())
    xi = x.detach().to(device=p.device, dtype=p.dtype).clone().requires_grad_(True)
    node = lmap.read_node[r.layer]
    with torch.enable_grad():
        rules = {"relu": relu, "relu6": relu, "leaky": relu, **({"lrn": lrn} if norm == "identity" else {})}
        vals, _ = lmap.graph.run(xi, {node}, replace=rules)
        h = vals[node]
        seed = torch.zeros_like(h)
        if mode == "unit":
            seed[r.image, r.channel, r.y, r.x] = h[r.image, r.channel, r.y, r.x].detach()
        else:
            seed[r.image, r.channel] = h[r.image, r.channel].detach()
        (grad,) = torch.autograd.grad(h, xi, seed)
    return grad[r.image].detach()


def gradient_reference(lmap: LayerMap, x: torch.Tensor, request: Request | tuple | dict,
                       mode: str = "unit", norm: str = "identity", method: str = "deconvnet") -> torch.Tensor:
    """SLOW REFERENCE (one autograd pass per request; for tests): (3, S, S).

    The vector-Jacobian product of the kept activation(s) of `request` with respect to image
    x[request.image], where every ReLU's backward is ReLU(g) (guided: ReLU(g) where the forward input
    was positive, else 0) and, for norm="identity", every norm layer's backward is the identity. In unit
    mode that is value * d a / d x; in map mode the channel map is the vector."""
    return graph_reference(lmap, x, as_request(request), mode=mode, method=method, norm=norm)


def relative_error(p: torch.Tensor, ref: torch.Tensor) -> float:
    """max|p - ref| / max|ref| (0 when both are zero): the agreement measure of the tests."""
    scale = float(ref.abs().max())
    diff = float((p - ref).abs().max())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale
