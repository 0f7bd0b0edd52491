"""timm's models, `--model timm:NAME` (NAME as timm spells it, with a pretrained tag if you like:
`timm:resnet50.a1_in1k`), when timm is installed (`pip install "atlas[timm]"`).

Always built with pretrained=False: timm would fetch weights from its hub otherwise. The weights come
from the file the user names (`.safetensors`, as timm's hub holds them, or `.pth`), and the
preprocessing from the model's own pretrained config (input size, crop fraction, mean, std), which
timm keeps in its code: resolving it reads no file and no network.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import AtlasError
from .preprocessing import describe, make

PREFIX = "timm:"


def is_spec(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise AtlasError("timm models need timm: pip install timm (or the extra: pip install \"atlas[timm]\")") \
            from None
    return timm


def arch(spec: str) -> str:
    name = spec[len(PREFIX):].strip()
    if not name:
        raise AtlasError(f"model '{spec}' names no timm model: give timm:NAME, e.g. timm:resnet50")
    return name


def is_registered(spec: str) -> bool:
    """Whether timm's registry builds the architecture `spec` names (a pretrained tag after the dot)."""
    name = spec[len(PREFIX):].strip()
    return bool(name) and _timm().is_model(name.split(".", 1)[0])


def build(spec: str, **options: Any) -> nn.Module:
    timm = _timm()
    name = arch(spec)
    if not timm.is_model(name.split(".", 1)[0]):
        close = timm.list_models(f"*{name.split('.', 1)[0]}*")[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise AtlasError(f"unknown timm model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=False, **options)
    except TypeError as e:
        raise AtlasError(f"timm model '{name}' does not take these options ({', '.join(sorted(options))}): {e}") \
            from None


def head_key(model: nn.Module) -> str | None:
    """The classifier's weight key, as timm's pretrained config names the classifier."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    if isinstance(head, (list, tuple)):
        head = head[0] if head else None
    return f"{head}.weight" if head else None


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """timm's resolve_data_config for the model: input_size and crop_pct give the crop and the resize."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    resize = int(math.floor(crop / float(cfg.get("crop_pct") or 1.0)))
    why = f"timm's pretrained config for {getattr(model, 'pretrained_cfg', {}).get('architecture', 'the model')}"
    if cfg.get("interpolation", "bilinear") != "bilinear":
        why += f"; timm resizes {cfg['interpolation']}, the atlas bilinear"
    return make(resize, crop, cfg["mean"], cfg["std"], describe(resize, crop, cfg["mean"], cfg["std"], why))


def version() -> str | None:
    try:
        return _timm().__version__
    except AtlasError:
        return None
