"""Running an atlas's model over images for the analyses and `atlas index`: a private copy on the chosen
device (channels-last, the same numbers; 2-3x faster on CPU for ZFNet) and the memory budgets that
size its batches."""
from __future__ import annotations

import copy
import os

import torch

from ..errors import AtlasError

# CPU memory a run may use for one batch of activations (at most a quarter of the memory available;
# GPU: a share of what is free).
CPU_BUDGET_BYTES = 2 << 30
GPU_BUDGET_SHARE = 0.5


class Runner:
    """The atlas's model on a device, for batched forward passes.

    On a GPU the model is a copy on that device. Conv models run in the channels-last memory
    layout (the same numbers; 2-3x faster on CPU for ZFNet) on a private copy, so the atlas's
    own model is never changed.
    """

    def __init__(self, atlas, device: str = "auto", channels_last: bool = True):
        from ..util.device import resolve_device
        from . import LayerMap

        self.device = resolve_device(device)
        model = copy.deepcopy(atlas.model).eval()
        model = model.to(self.device)
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.lmap = LayerMap(model, atlas.image_size)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def budget_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_BUDGET_SHARE)
        try:  # never more than a quarter of the memory available now
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return max(64 << 20, min(CPU_BUDGET_BYTES, avail // 4))
        except (ValueError, OSError, AttributeError):
            return CPU_BUDGET_BYTES

    def per_image_bytes(self, start: int = 0) -> int:
        """Peak bytes of one image's activations in a forward pass from features[start] on
        (two consecutive levels alive at once, x2 for temporaries)."""
        return 8 * feature_peak_floats(self.lmap, start) + 8 * classifier_floats(self.lmap)

    def chunk(self, n: int, per_image: int, batch_size: int | None = None) -> int:
        if batch_size is not None:
            if batch_size < 1:
                raise AtlasError(f"batch size must be at least 1, not {batch_size}")
            return min(n, batch_size)
        return max(1, min(n, self.budget_bytes() // max(per_image, 1)))

    def extract(self, x: torch.Tensor, names: list[str], batch_size: int | None = None,
                progress=None) -> dict[str, torch.Tensor]:
        """lmap.extract over x (N, 3, S, S) in memory-sized chunks; results on the CPU, float32.
        `progress`: an atlas.util.progress.Progress told of each chunk's images."""
        from ..util.progress import reported_batch

        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        bs = reported_batch(self.chunk(len(x), self.per_image_bytes(), batch_size), len(x), progress)
        with torch.no_grad():
            for i in range(0, len(x), bs):
                acts = self.lmap.extract(self.prepare(x[i:i + bs]), names)
                for n in names:
                    out[n].append(acts[n].float().cpu().contiguous())
                if progress is not None:
                    progress.update(min(bs, len(x) - i))
        return {n: torch.cat(v) for n, v in out.items()}


def feature_peak_floats(lmap, start: int = 0) -> int:
    """The most floats of one image alive at once in a run (a run from a later start keeps no more):
    what the graph's run keeps alive at its peak, x1.5 for a kernel's temporaries."""
    return int(1.5 * lmap.peak_floats)


def classifier_floats(lmap) -> int:
    fcs = [la.channels for la in lmap.layers if la.kind == "fc"]
    return 2 * max(fcs) + lmap.feature_channels * 64 if fcs else 0
