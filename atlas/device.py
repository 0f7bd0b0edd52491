"""Where the work runs: the `--device` option and how many decoding workers feed it."""
from __future__ import annotations

import os

import torch

from .errors import AtlasError


def resolve_device(device: str | None) -> torch.device:
    """`auto` (CUDA when there is a GPU, else CPU), `cpu`, `cuda` or `cuda:N`."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise AtlasError(f"device '{device}' was asked for, but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise AtlasError(f"unknown device '{device}': use auto, cpu or cuda") from None


def default_workers(dev: torch.device) -> int:
    # under torchrun every local rank starts its own workers: share the cores among them
    n = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if dev.type == "cuda":
        # a GPU outruns PIL: every core but the main process's decodes (device decoding needs far fewer,
        # its workers only read files, but idle ones cost nothing)
        return min(16, max(1, n - 1))
    return 0 if n <= 2 else min(4, n // 2)  # on few cores, decoding steals from the forward pass
