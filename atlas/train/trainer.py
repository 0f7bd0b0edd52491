"""One training step (SGD, the paper's filter renormalisation after it) and one evaluation pass, shared
by `train` and scripts/bench_train.py so the benchmark measures the step the product runs."""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .pipeline import Batches, crop_flip, ten_crop_offsets

def conv_filter_rms(model: nn.Module) -> dict[str, torch.Tensor]:
    """RMS of every conv filter (one value per output channel), by parameter name."""
    return {name: m.weight.detach().float().pow(2).mean(dim=(1, 2, 3)).sqrt()
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@torch.no_grad()
def renormalize_filters(convs: Sequence[nn.Conv2d], radius: float) -> None:
    """The paper's filter renormalisation: a conv filter whose RMS exceeds `radius` is rescaled to it.

    Filters at or under the radius are multiplied by exactly 1 (left as they are)."""
    for m in convs:
        w = m.weight
        rms = w.float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        scale = (radius / rms.clamp(min=1e-30)).clamp(max=1.0)
        w.mul_(scale.to(w.dtype))


@contextlib.contextmanager
def flush_denormal(enabled: bool = True):
    """CPU: flush denormal floats to zero while training (and back to the default after).

    Once a batch is learnt well, its gradients can shrink into the denormal range, where x86
    arithmetic is many times slower: a single-class run of batches halved the step rate here."""
    if not enabled:
        yield
        return
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


class Trainer:
    """One training step and one evaluation pass, shared by `train` and scripts/bench_train.py."""

    def __init__(self, net: nn.Module, opt: torch.optim.Optimizer, dev: torch.device, pre: dict[str, Any],
                 precision: str, channels_last: bool, renorm_radius: float):
        self.net, self.opt, self.dev = net, opt, dev
        self.crop, self.size = int(pre["crop"]), int(pre["resize"])
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32, device=dev).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(pre["std"], dtype=torch.float32, device=dev).view(1, 3, 1, 1) * 255.0)
        self.autocast = precision == "bf16"
        self.channels_last = channels_last
        self.convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        self.radius = renorm_radius

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # In place on the one fresh float copy: one large allocation per batch instead of three
        # (on CPU each is page-faulted in anew).
        x = x.to(torch.float32, copy=True).sub_(self.mean).mul_(self.inv_std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on a normalised float batch; `ok` (bool, optional) masks unreadable images out of
        the loss. Returns (summed loss, correct count) as tensors (no sync)."""
        with torch.autocast(self.dev.type, torch.bfloat16, enabled=self.autocast):
            logits = self.net(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        if ok is None:
            loss = losses.mean()
            w = None
        else:
            w = ok.to(losses.dtype)
            loss = (losses * w).sum() / w.sum().clamp(min=1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.radius:
            renormalize_filters(self.convs, self.radius)
        with torch.no_grad():
            correct = logits.argmax(1) == y
            if w is not None:
                return (losses.detach() * w).sum(), (correct & ok).sum()
            return losses.detach().sum(), correct.sum()

    @torch.no_grad()
    def evaluate(self, batches: "Batches", batch_size: int, ten_crop: bool) -> dict[str, float]:
        self.net.eval()
        c, r = self.crop, self.size
        views = ten_crop_offsets(r, c) if ten_crop else [((r - c) // 2, (r - c) // 2, False)]
        tot = torch.zeros(4, dtype=torch.float64, device=self.dev)  # loss, top1 wrong, top5 wrong, n
        order = torch.arange(len(batches))
        for x, y, ok, _, _ in batches.iterate(order, batch_size):
            probs = None
            b = x.shape[0]
            for oy, ox, f in views:
                v = crop_flip(x, torch.full((b,), oy), torch.full((b,), ox), torch.full((b,), int(f)), c)
                with torch.autocast(self.dev.type, torch.bfloat16, enabled=self.autocast):
                    logits = self.net(self.normalize(v))
                p = logits.float().softmax(1)
                probs = p if probs is None else probs + p
            probs /= len(views)
            loss = -probs.gather(1, y[:, None]).squeeze(1).clamp(min=1e-12).log()
            k = min(5, probs.shape[1])
            top = probs.topk(k, dim=1).indices
            w1 = top[:, 0] != y
            w5 = ~(top == y[:, None]).any(1)
            okf = ok.to(torch.float64) if ok is not None else torch.ones_like(loss, dtype=torch.float64)
            tot += torch.stack([(loss.double() * okf).sum(), (w1.double() * okf).sum(),
                                (w5.double() * okf).sum(), okf.sum()])
        self.net.train()
        loss, e1, e5, n = tot.tolist()
        n = max(n, 1.0)
        return {"val_loss": loss / n, "val_top1_error": e1 / n, "val_top5_error": e5 / n}
