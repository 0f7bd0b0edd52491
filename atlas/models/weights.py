"""Weight files as they exist in the wild, read without running anything they hold.

A bare `state_dict` (what torchvision and most scripts write), a checkpoint of `atlas train` (a dict
with "model_state" and "meta"), a training script's checkpoint ({"state_dict": ...} or {"model": ...},
as timm's and DeiT's scripts write), and `.safetensors` files. `torch.load` always runs with
weights_only=True: a pickle that is more than tensors is refused rather than executed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AtlasError

# the keys under which training scripts keep the model's weights, in the order they are looked for
_NESTED = ("state_dict", "model", "state_dict_ema", "model_ema", "net")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of weights that have no file (a module passed from Python): names, shapes, dtypes, bytes."""
    h = hashlib.sha256()
    for key, v in state.items():
        t = v.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensors_only(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) from any of the forms above; meta is {} but for `atlas train`'s."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        first = (str(e).strip().splitlines() or [""])[0][:160]
        why = " (it holds more than tensors: only weights are read)" if "weights_only" in str(e) else ""
        raise AtlasError(f"weights file '{path}' is not a PyTorch weights file{why} "
                         f"({type(e).__name__}{': ' + first if first and not why else ''})") from None
    if isinstance(obj, dict) and "model_state" in obj:
        return _unwrapped(obj["model_state"]), dict(obj.get("meta") or {})
    if _tensors_only(obj):
        return _unwrapped(obj), {}
    if isinstance(obj, dict):
        for key in _NESTED:
            if _tensors_only(obj.get(key)):
                return _unwrapped(obj[key]), {}
    raise AtlasError(f"weights file '{path}' holds no state_dict")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise AtlasError(f"weights file '{path}' is a .safetensors file: pip install safetensors") from None
    try:
        return _unwrapped(load_file(str(path), device="cpu"))
    except Exception as e:  # a truncated or foreign file
        raise AtlasError(f"weights file '{path}' is not a safetensors file ({type(e).__name__})") from None


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys without the "module." prefix that nn.DataParallel and DDP add to every name."""
    metadata = getattr(state, "_metadata", None)  # module versions: BatchNorm's fills in what old files lack
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        if metadata is not None:
            metadata = type(metadata)((k[len("module."):] if k.startswith("module.") else k, v)
                                      for k, v in metadata.items())
    if metadata is not None:
        state = _WithMetadata(state)
        state._metadata = metadata
    return state


class _WithMetadata(dict):
    """A dict that can carry load_state_dict's `_metadata` (a plain dict cannot take attributes)."""


def fit(model: nn.Module, state: dict[str, torch.Tensor], weights: str | Path, name: str) -> None:
    """Load `state` into `model`, every key and shape, or say in one line what does not fit."""
    # a model built on the meta device (no init, the file replaces every tensor) takes the file's tensors
    assign = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if assign:  # as a copy into the model would: the model's dtypes, not the file's (fp16 files exist)
        own = model.state_dict()
        state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in lines[1:] if ln.strip()), lines[0] if lines else "")
        raise AtlasError(f"weights file '{weights}' does not fit model '{name}': {detail[:200]}") from None


def last_weight_key(keys) -> str | None:
    """The last layer's weight among state_dict keys in module order: the classifier head of a
    classification model (a Linear's 2-D weight, or squeezenet's 1x1 conv)."""
    keys = [k for k in keys if k.endswith(".weight")]
    return keys[-1] if keys else None
