"""Training data: each image decoded once to its `resize` x `resize` centre crop (uint8), then cropped
and flipped on tensors, in memory when it fits (MEMORY_LIMIT) or streamed by DataLoader workers; both
give the same batches."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..data import ImageSource, Preprocess
from ..util.progress import Progress

MEMORY_LIMIT = 2 << 30  # decoded training squares kept in memory up to this (else streamed)


class Squares(torch.utils.data.Dataset):
    """Item i: (uint8 tensor (3, R, R) -- the centre R x R crop after the short side is resized to R,
    ok flag). A corrupt image gives zeros and ok=False (it is left out of the loss and the errors)."""

    def __init__(self, source: ImageSource, ids: Sequence[int], size: int):
        self.source, self.ids, self.size = source, list(ids), int(size)
        self.pre = Preprocess({"resize": size, "crop": size, "mean": [0, 0, 0], "std": [1, 1, 1]})

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        try:
            img = self.pre.crop_image(self.source.open_image(self.ids[i]))
            arr = np.asarray(img, dtype=np.uint8)
            return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), True
        except Exception:  # a corrupt file: a property of the file, counted and skipped
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False


def decode_squares(source: ImageSource, ids: Sequence[int], size: int, workers: int = 0,
                   progress: bool | None = None, desc: str = "decode") -> tuple[torch.Tensor, torch.Tensor]:
    """All images at once: (uint8 (N, 3, R, R), bool ok (N,))."""
    ds = Squares(source, ids, size)
    out = torch.empty((len(ds), 3, size, size), dtype=torch.uint8)
    ok = torch.ones(len(ds), dtype=torch.bool)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, generator=torch.Generator())
    i = 0
    with Progress(len(ds), desc, "images", enabled=progress) as bar:
        for x, good in loader:
            out[i:i + len(x)] = x
            ok[i:i + len(x)] = good
            i += len(x)
            bar.update(len(x))
    return out, ok


def crop_flip(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, c: int) -> torch.Tensor:
    """Per-sample crop (c x c at (oy, ox)) and horizontal flip of a batch (B, 3, R, R).

    CUDA: one gather kernel. CPU: per-sample slice copies (10-15x faster there than the gather)."""
    b, _, r, _ = x.shape
    if c == r and not bool(flip.any()):
        return x
    if x.device.type == "cpu":
        out = torch.empty((b, x.shape[1], c, c), dtype=x.dtype)
        for i, (y0, x0, f) in enumerate(zip(oy.tolist(), ox.tolist(), flip.tolist())):
            v = x[i, :, y0:y0 + c, x0:x0 + c]
            out[i] = v.flip(-1) if f else v
        return out
    return crop_flip_gather(x, oy, ox, flip, c)


def crop_flip_gather(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, c: int) -> torch.Tensor:
    """crop_flip as one advanced-indexing gather (the CUDA path)."""
    b = x.shape[0]
    dev = x.device
    ar = torch.arange(c, device=dev)
    rows = oy.to(dev)[:, None] + ar
    cols = ox.to(dev)[:, None] + torch.where(flip.to(dev)[:, None].bool(), c - 1 - ar, ar)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ch = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return x[bi, ch, rows[:, None, :, None], cols[:, None, None, :]]


def ten_crop_offsets(r: int, c: int) -> list[tuple[int, int, bool]]:
    """The paper's 10 crops: 4 corners and the centre, each with and without a flip."""
    m = r - c
    spots = [(0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2)]
    return [(y, x, f) for f in (False, True) for (y, x) in spots]


class Batches:
    """Batches of (uint8 squares, labels, ok, positions) over a list of images, in memory or streamed."""

    def __init__(self, source: ImageSource, ids: list[int], labels: torch.Tensor, size: int,
                 in_memory: bool, dev: torch.device, workers: int, progress, desc: str):
        self.source, self.ids, self.labels, self.size = source, ids, labels, size
        self.in_memory, self.dev, self.workers = in_memory, dev, workers
        self.data = self.ok_cpu = None
        if in_memory:
            self.data, self.ok_cpu = decode_squares(source, ids, size, workers, progress, desc)
            if dev.type == "cuda":
                free = torch.cuda.mem_get_info(dev)[0]
                if self.data.numel() < free // 4:  # the whole set lives on the GPU
                    self.data = self.data.to(dev)
                else:
                    self.data = self.data.pin_memory()
        self.labels_dev = labels.to(dev)

    def __len__(self) -> int:
        return len(self.ids)

    def bad(self) -> int:
        """Unreadable images found by the in-memory decode (streaming: counted per epoch)."""
        return int((~self.ok_cpu).sum()) if self.ok_cpu is not None else 0

    def iterate(self, order: torch.Tensor, batch_size: int):
        """Yield (x uint8 on dev, labels, ok mask on dev or None when the whole batch decoded,
        dataset positions of the batch, number of unreadable images in it)."""
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if self.in_memory:
            for idx in batches:
                bad = int((~self.ok_cpu[idx]).sum())
                x = self.data[idx.to(self.data.device)]
                ok = self.ok_cpu[idx].to(self.dev) if bad else None
                yield x.to(self.dev, non_blocking=True), self.labels_dev[idx.to(self.dev)], ok, idx, bad
            return
        ds = Squares(self.source, self.ids, self.size)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=[b.tolist() for b in batches],
                                             num_workers=self.workers, pin_memory=self.dev.type == "cuda",
                                             prefetch_factor=4 if self.workers else None,
                                             # its own generator: workers' seeds must not draw from the
                                             # global RNG, which drives dropout
                                             generator=torch.Generator())
        for idx, (x, ok) in zip(batches, loader):
            bad = int((~ok).sum())
            yield (x.to(self.dev, non_blocking=True), self.labels_dev[idx.to(self.dev)],
                   ok.to(self.dev) if bad else None, idx, bad)
