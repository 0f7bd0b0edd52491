"""Which models the engine projects exactly, and how it reads each module going up: `check_model`
refuses, with one line naming the module, what it cannot project (atlas/deconv/__init__.py says why)."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AtlasError
from ..layers import LayerMap

# Exactly these types (not subclasses) may appear in `features`.
_CONV, _RELU, _POOL = (nn.Conv2d,), (nn.ReLU,), (nn.MaxPool2d,)
_NORM = (nn.LocalResponseNorm, nn.CrossMapLRN2d)
NORM_TYPES = _NORM  # the contrast normalisations: undone as identity or by their gradient (norm=)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout2d)
_SUPPORTED = _CONV + _RELU + _POOL + _NORM + _PASS
_WHY_NOT = {
    nn.BatchNorm2d: "batch normalisation has no DeconvNet inverse in the paper",
    nn.AvgPool2d: "average pooling has no switches to unpool with",
    nn.AdaptiveAvgPool2d: "average pooling has no switches to unpool with",
    nn.AdaptiveMaxPool2d: "adaptive max pooling is not supported",
}


_checked: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _structure_key(model: nn.Module, image_size: int) -> tuple:
    feats = getattr(model, "features", None)
    mods = tuple(id(m) for m in feats) if isinstance(feats, nn.Sequential) else ()
    return (image_size, id(feats), mods, type(model).forward)


def _static_check(model: nn.Module) -> None:
    feats = model.features
    for i, m in enumerate(feats):
        t = type(m)
        where = f"features.{i} ({t.__name__})"
        if t not in _SUPPORTED:
            base = next((b for b in _SUPPORTED if isinstance(m, b)), None)
            if base is not None:
                raise AtlasError(f"cannot project {where}: a subclass of {base.__name__} may compute more "
                                 f"than {base.__name__} (e.g. a functional ReLU the engine cannot see); "
                                 f"use plain {base.__name__} modules")
            why = next((w for k, w in _WHY_NOT.items() if isinstance(m, k)), "the engine does not know it")
            raise AtlasError(f"cannot project {where}: {why} (supported: Conv2d, ReLU, MaxPool2d, "
                             "LocalResponseNorm, Identity, Dropout)")
        if "forward" in vars(m):
            raise AtlasError(f"cannot project {where}: its forward was replaced on the instance")
        if m._forward_hooks or m._forward_pre_hooks:
            raise AtlasError(f"cannot project {where}: it has forward hooks that may change its output")
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise AtlasError(f"cannot project {where}: grouped convolutions are not supported")
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise AtlasError(f"cannot project {where}: only explicit zero padding is supported")
            if tuple(m.dilation) != (1, 1):
                raise AtlasError(f"cannot project {where}: dilated convolutions are not supported")
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise AtlasError(f"cannot project {where}: a pool that returns indices changes the data flow")
            d = m.dilation if isinstance(m.dilation, int) else tuple(m.dilation)
            if d not in (1, (1, 1)):
                raise AtlasError(f"cannot project {where}: dilated pooling is not supported")


def check_model(lmap: LayerMap) -> None:
    """Refuse (AtlasError) a model the engine cannot project exactly; puts it in eval mode.

    1. every module of `features` is exactly a supported type (no subclasses,
       no replaced forward, no hooks) with supported settings;
    2. on a random probe input run through `model.forward` (or `features` for a
       model without its own forward), `features` is called exactly once, on
       the raw input, and every module's input is the previous module's output
       and its output is what the engine computes for its type (catches a
       forward that applies the modules, or F.relu, on its own, a Sequential
       that does more than chain its modules, global hooks).
    The probe is small (64 px when the geometry allows it; else the image size)
    and the result is cached per model and structure.
    """
    model = lmap.model
    model.eval()
    key = _structure_key(model, lmap.image_size)
    if _checked.get(model) == key:
        return
    _static_check(model)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    sizes = [lmap.image_size]
    if lmap.image_size > 64:
        try:
            LayerMap(model, 64)
            sizes.insert(0, 64)
        except AtlasError:
            pass
    own_forward = type(model).forward is not nn.Module.forward
    for n, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn((1, 3, size, size), generator=gen, dtype=dtype).to(device)
        try:
            ins, outs, calls = _probe(model, x, own_forward)
            break
        except AtlasError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means we cannot confirm the data flow
            if n + 1 < len(sizes):
                continue
            raise AtlasError(f"cannot project: model.forward failed on a probe input of {size} px "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
    if len(calls) != 1:
        raise AtlasError(f"cannot project: model.forward calls model.features {len(calls)} times (it must "
                         "run features once, as one block, on its input, so that the engine sees every ReLU)")
    if not torch.equal(calls[0], x):
        raise AtlasError("cannot project: model.forward changes the input before model.features")
    ours = x
    with torch.no_grad():
        for i, m in enumerate(model.features):
            where = f"features.{i} ({type(m).__name__})"
            if i not in outs:
                raise AtlasError(f"cannot project: model.features did not run {where}")
            if not _close(ins[i], ours):
                raise AtlasError(f"cannot project: the input of {where} is not the previous module's output "
                                 "(model.features does more than chain its modules, e.g. a functional ReLU)")
            ours = _walk_one(m, ins[i])[0]
            if not _close(outs[i], ours):
                raise AtlasError(f"cannot project: {where} does not compute what the engine assumes for its type")
            ours = outs[i]
    _checked[model] = key


def _probe(model: nn.Module, x: torch.Tensor, own_forward: bool):
    """Run the model on x with hooks: each feature module's first input and output, and features' calls."""
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    calls: list[torch.Tensor] = []
    handles = []
    feats = model.features

    def pre(mod, inp, i):  # in-place modules overwrite their input: copy it first
        if i not in ins:
            ins[i] = inp[0].detach().clone()

    def post(mod, inp, out, i):
        if i not in outs:
            outs[i] = out.detach().clone()

    try:
        for i, m in enumerate(feats):
            handles.append(m.register_forward_pre_hook(lambda mod, inp, i=i: pre(mod, inp, i)))
            handles.append(m.register_forward_hook(lambda mod, inp, out, i=i: post(mod, inp, out, i)))
        handles.append(feats.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].detach().clone())))
        with torch.no_grad():
            (model if own_forward else feats)(x.clone())
    finally:
        for h in handles:
            h.remove()
    return ins, outs, calls


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) <= 1e-5 * scale + 1e-30 if b.numel() else True


def _walk_one(m: nn.Module, x: torch.Tensor):
    """The engine's reading of one module's forward: (output, pool indices or None)."""
    if isinstance(m, nn.Conv2d):
        return F.conv2d(x, m.weight, m.bias, m.stride, m.padding), None
    if isinstance(m, nn.ReLU):
        return F.relu(x), None
    if isinstance(m, nn.MaxPool2d):
        return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, 1, ceil_mode=m.ceil_mode,
                            return_indices=True)
    if isinstance(m, _NORM):
        return m(x), None
    return x, None
