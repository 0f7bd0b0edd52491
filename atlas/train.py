"""Training with the paper's recipe (Zeiler & Fergus 2014, section 3): `atlas.train.train`.

CLI:
  atlas train --model NAME --data DATA --out RUN_DIR [options]
      -> one call: train(NAME, DATA, RUN_DIR, **options); prints RUN_DIR/final.pt
  --val VAL                  validation folder (its classes must equal DATA's); without it a fixed,
                             seeded 10 % of DATA is held out (--val-fraction)
  --epochs N                 default: 70 (zfnet, alexnet-single: the paper), 10 (zfnet-mini)
  --batch-size N --lr X      default: 128 / 1e-2 (the paper); zfnet-mini: 32 / 5e-3
  --momentum 0.9 --weight-decay 5e-4
  --dropout P                dropout in fc6/fc7; default 0.5 (the paper), 0 for zfnet-mini
  --init paper|default       paper: weights N(0, 1e-2), biases 0; default: the model's own
                             (default: paper for zfnet and alexnet-single, default for zfnet-mini)
  --renorm-radius 0.1        conv-filter RMS renormalisation after every step (0 turns it off)
  --lr-patience 3 --lr-factor 0.1   lower the lr when validation top-1 error stops falling
  --resize R --crop C        random C crops of the R x R centre crop (zfnet: 256 / 224)
  --flip/--no-flip           random horizontal flips (default on)
  --ten-crop-eval            validate on 10 crops (corners + centre, with flips) instead of the centre
  --snapshot-epochs 1,2,5    keep these epochs' weights in RUN_DIR/snapshots/ (for `atlas evolution`)
  --resume                   continue a killed run where it stopped (same options)
  --overwrite                replace an existing run in RUN_DIR
  --device auto|cpu|cuda --workers N --precision auto|fp32|bf16 --in-memory/--stream
  --seed 0 --image-size N --progress/--no-progress

RUN_DIR after a run:
  config.json      every option (defaults included, resolved), data, split, device
  metrics.csv      per epoch: lr, training loss and top-1 error, validation loss / top-1 / top-5
                   error, training images/s
  curves.png       the curves of metrics.csv
  checkpoint.pt    model, optimizer, scheduler, RNG states, epoch, history (written atomically
                   after every epoch; `resume=True` continues from it)
  snapshots/epoch-005.pt   the weights after epoch 5 (same format as final.pt)
  final.pt         {"model_state": ..., "meta": {"model", "num_classes", "classes",
                   "preprocessing", "init", "epochs", ...}}: `atlas.load_model(NAME,
                   weights="RUN_DIR/final.pt")` and `atlas build --weights` read it

The recipe (paper.md, "Training recipe"): SGD with momentum 0.9, mini-batch 128, lr 1e-2 lowered
by a factor 10 when the validation error stops falling (the paper did it by hand; here
ReduceLROnPlateau on validation top-1 error), dropout 0.5 in fc6/fc7, weights N(0, 1e-2) and
biases 0, and after every update every conv filter whose RMS exceeds 0.1 is rescaled to RMS
0.1. Images: random `crop` x `crop` sub-crops of the `resize` x `resize` centre crop and
horizontal flips. Weight decay is not stated in the paper: 5e-4 is AlexNet's (its predecessor).

Reproducibility: epoch e's data order, crop offsets and flips come from a generator seeded by
(seed, e), and the global RNG (dropout) is reseeded from (seed, e) at the start of the epoch.
So a run resumed from the checkpoint of epoch e-1 sees exactly what the uninterrupted run saw,
and on CPU the final weights are bit-identical. (On CUDA, cuDNN kernels may not be
deterministic; resuming is exact up to that.)

Data: each image is decoded once to its `resize` x `resize` centre crop (uint8). When all of them
fit in `memory_limit` (2 GB) they are kept in memory (on the GPU when there is room) and
cropped/flipped there, batch by batch; otherwise they are streamed by DataLoader workers
(pinned memory) and cropped/flipped on the device. Both give the same batches.

Measured (2-core CPU VM shared with other jobs, torch 2.15, fp32):
  zfnet-mini defaults on `atlas make-shapes` data (12 classes, 4,000 images at 64 px, seed 0),
  train("zfnet-mini", DATA, RUN, epochs=3) -- what `atlas demo` runs: validation accuracy
  38 / 62 / 72 % after epochs 1 / 2 / 3 on the held-out 10 % (chance 8.3 %); with
  val=<1,200 other shapes images, seed 1> and all 4,000 for training: 39 / 73 / 78 %.
  About 1,100 training images/s with both cores free: the 3 epochs take ~12-18 s in all
  (decode, validation and checkpoints included); 70-110 s while other jobs held the cores.
  scripts/bench_train.py (3 rounds of ceiling / train / ceiling): zfnet at 224 px, batch 16:
  best-of ratio 0.91-1.00 of the bare forward+backward+step rate (best 23-24 images/s on this
  CPU, load average 2.5-4 from other jobs; single rounds swing from 0.83 to 1.5 with the load).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSource, Preprocess, open_dataset
from .device import default_workers, resolve_device
from .errors import AtlasError
from .fsutil import atomic_write, atomic_write_bytes, atomic_write_json, remove_temp_files
from .lock import holds_writer_lock
from .models.registry import (build_model, constructor_options, contrast_norm_option, model_names,
                              preprocessing_for)
from .models.zfnet import paper_init
from .progress import Progress

CHECKPOINT_FORMAT = 1

# The paper's recipe; per-model departures below (each recorded in config.json).
PAPER_DEFAULTS: dict[str, Any] = {"epochs": 70, "batch_size": 128, "lr": 1e-2, "dropout": 0.5, "init": "paper"}
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # A 5-conv net for 32-64 px images, trained for a few epochs (the demo: 3 epochs of 3,600
    # shapes images). N(0, 1e-2) does not get it going (its own He init does); lr >= 0.02 kills its
    # ReLUs; dropout 0.5 on its 256-unit fc6/fc7 holds it back (29 % validation accuracy after 3
    # epochs instead of 72-80 %). Measured on `atlas make-shapes` (12 classes, 4,000 images, 64 px),
    # seeds 0-2; see the module docstring.
    "zfnet-mini": {"epochs": 10, "batch_size": 32, "lr": 5e-3, "dropout": 0.0, "init": "default"},
}
# Options that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"epochs", "snapshot_epochs"}
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_top1_error", "val_loss", "val_top1_error",
                  "val_top5_error", "images_per_s", "train_seconds", "epoch_seconds"]
MEMORY_LIMIT = 2 << 30


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, stream): independent streams per epoch."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1 << 31, 1], dtype=np.uint64)) & ((1 << 63) - 1))


def parse_epochs(spec: str | Iterable[int] | None) -> list[int]:
    """`"1,2,5"` or [1, 2, 5] -> sorted unique epochs."""
    if spec is None or spec == "":
        return []
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    try:
        return sorted({int(s) for s in items})
    except (TypeError, ValueError):
        raise AtlasError(f"--snapshot-epochs must be whole numbers like 1,2,5 (got {spec!r})") from None


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


# ---------------------------------------------------------------------------
# data: decode once to the `resize` x `resize` centre crop, augment on tensors
# ---------------------------------------------------------------------------
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


class _Batches:
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


# ---------------------------------------------------------------------------
# the split
# ---------------------------------------------------------------------------
def holdout_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed, seeded, per-class (stratified) hold-out: (train positions, val positions), sorted.

    Each class gives round(fraction * its count) images (at least 1 when it has 2 or more)."""
    g = torch.Generator().manual_seed(_mix(seed, 0xB0A1))
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(int(lab), []).append(i)
    train, val = [], []
    for lab in sorted(by_class):
        members = by_class[lab]
        perm = torch.randperm(len(members), generator=g).tolist()
        k = int(round(fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        else:
            k = 0
        val += [members[p] for p in perm[:k]]
        train += [members[p] for p in perm[k:]]
    return sorted(train), sorted(val)


# ---------------------------------------------------------------------------
# the run's configuration
# ---------------------------------------------------------------------------
def _check_options(o: dict[str, Any]) -> None:
    def bad(flag: str, why: str):
        raise AtlasError(f"--{flag.replace('_', '-')} {why}")

    if o["model"] not in model_names():
        raise AtlasError(f"unknown model '{o['model']}': choose one of {', '.join(model_names())}")
    if o["epochs"] < 1:
        bad("epochs", f"must be at least 1 (got {o['epochs']})")
    if o["batch_size"] < 1:
        bad("batch_size", f"must be at least 1 (got {o['batch_size']})")
    if not o["lr"] > 0:
        bad("lr", f"must be positive (got {o['lr']})")
    if not 0 <= o["momentum"] < 1:
        bad("momentum", f"must be in [0, 1) (got {o['momentum']})")
    if o["weight_decay"] < 0:
        bad("weight_decay", f"must be >= 0 (got {o['weight_decay']})")
    if not 0 <= o["dropout"] < 1:
        bad("dropout", f"must be in [0, 1) (got {o['dropout']})")
    if o["init"] not in ("paper", "default"):
        bad("init", f"must be paper or default (got '{o['init']}')")
    if o["renorm_radius"] < 0:
        bad("renorm_radius", f"must be >= 0 (0 turns it off; got {o['renorm_radius']})")
    if not 0 < o["lr_factor"] < 1:
        bad("lr_factor", f"must be in (0, 1) (got {o['lr_factor']})")
    if o["lr_patience"] < 0:
        bad("lr_patience", f"must be >= 0 (got {o['lr_patience']})")
    if not 0 < o["val_fraction"] < 1:
        bad("val_fraction", f"must be in (0, 1) (got {o['val_fraction']})")
    if o["precision"] not in ("fp32", "bf16"):
        bad("precision", f"must be auto, fp32 or bf16 (got '{o['precision']}')")
    if o["crop"] < 8 or o["resize"] < o["crop"]:
        raise AtlasError(f"--crop {o['crop']} must be at least 8 and at most --resize {o['resize']}")
    late = [e for e in o["snapshot_epochs"] if not 0 <= e <= o["epochs"]]
    if late:
        raise AtlasError(f"--snapshot-epochs {','.join(map(str, late))}: the run has epochs 1..{o['epochs']} "
                         "(0 = the initial weights)")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if k in RESUMABLE_CHANGES:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = list(a or []), list(b or [])
        if a != b:
            out.append(f"{k} (run: {a!r}, now: {b!r})")
    return out


def _preprocessing(model: str, image_size: int | None, resize: int | None, crop: int | None) -> dict[str, Any]:
    pre = preprocessing_for(model, image_size)
    if crop is not None and resize is None:
        resize = int(round(crop * pre["resize"] / pre["crop"]))
    pre["resize"], pre["crop"] = int(resize or pre["resize"]), int(crop or pre["crop"])
    mean = ", ".join(f"{v:g}" for v in pre["mean"])
    std = ", ".join(f"{v:g}" for v in pre["std"])
    pre["note"] = (f"short side {pre['resize']}, centre crop {pre['crop']}, scale to [0,1], "
                   f"subtract ({mean}), divide by ({std})")
    return pre


# ---------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------
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
    def evaluate(self, batches: "_Batches", batch_size: int, ten_crop: bool) -> dict[str, float]:
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


def _epoch_augmentation(seed: int, epoch: int, n: int, r: int, c: int, flip: bool):
    """Epoch `epoch`'s data order, crop offsets and flips: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, 1))
    order = torch.randperm(n, generator=g)
    oy = torch.randint(0, r - c + 1, (n,), generator=g)
    ox = torch.randint(0, r - c + 1, (n,), generator=g)
    fl = torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.long)
    return order, oy, ox, fl


def _save_weights(path: Path, net: nn.Module, meta: dict[str, Any]) -> None:
    state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
    _torch_save_atomic(path, {"model_state": state, "meta": meta})


def _torch_save_atomic(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRIC_COLUMNS})
    atomic_write_bytes(path, out.getvalue().encode())


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """RUN_DIR/metrics.csv as a list of dicts of numbers."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise AtlasError(f"training run '{run_dir}' has no metrics.csv")
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


@holds_writer_lock("a training run")
def train(model: str, data: str | os.PathLike, out: str | os.PathLike, *, val: str | os.PathLike | None = None,
          epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
          momentum: float = 0.9, weight_decay: float = 5e-4, dropout: float | None = None, init: str | None = None,
          renorm_radius: float = 0.1, lr_patience: int = 3, lr_factor: float = 0.1,
          resize: int | None = None, crop: int | None = None, flip: bool = True, ten_crop_eval: bool = False,
          val_fraction: float = 0.1, snapshot_epochs: str | Iterable[int] | None = None,
          resume: bool = False, overwrite: bool = False, device: str = "auto", workers: int | None = None,
          precision: str = "auto", in_memory: bool | None = None, memory_limit: int = MEMORY_LIMIT,
          seed: int = 0, image_size: int | None = None, contrast_norm: bool | None = None,
          progress: bool | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Train `model` (a registry name) on the labelled images of `data`; returns RUN_DIR/final.pt.

    Options left as None take the model's defaults (MODEL_DEFAULTS) or the paper's (PAPER_DEFAULTS);
    the values used are written to RUN_DIR/config.json. See the module docstring for the recipe,
    the files written, and what `resume` guarantees.
    """
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    out = Path(out)
    if model not in model_names():
        raise AtlasError(f"unknown model '{model}': choose one of {', '.join(model_names())}")
    md = {**PAPER_DEFAULTS, **MODEL_DEFAULTS.get(model, {})}
    dev = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    pre = _preprocessing(model, image_size, resize, crop)
    model_options = contrast_norm_option(model, contrast_norm)
    default_norm = constructor_options(model).get("contrast_norm")
    opts: dict[str, Any] = {
        "model": model, "epochs": int(epochs if epochs is not None else md["epochs"]),
        "batch_size": int(batch_size if batch_size is not None else md["batch_size"]),
        "lr": float(lr if lr is not None else md["lr"]), "momentum": float(momentum),
        "weight_decay": float(weight_decay), "dropout": float(dropout if dropout is not None else md["dropout"]),
        "init": init if init is not None else md["init"], "renorm_radius": float(renorm_radius or 0.0),
        "lr_patience": int(lr_patience), "lr_factor": float(lr_factor),
        "resize": pre["resize"], "crop": pre["crop"], "flip": bool(flip), "ten_crop_eval": bool(ten_crop_eval),
        "val_fraction": float(val_fraction), "snapshot_epochs": parse_epochs(snapshot_epochs),
        "precision": precision, "seed": int(seed), "image_size": image_size,
        "contrast_norm": model_options.get("contrast_norm", default_norm),
    }
    _check_options(opts)

    # -- data ------------------------------------------------------------------
    source = open_dataset(data)
    if source.classes is None or any(r.label_index is None for r in source.records):
        raise AtlasError(f"dataset '{data}' has no labels (a flat folder of images): training needs an "
                         "ImageFolder (one sub-folder per class) or CIFAR-10")
    present = sorted({r.label_index for r in source.records})
    if len(source.classes) < 2 or len(present) < 2:
        have = source.classes[present[0]] if present else "none"
        raise AtlasError(f"dataset '{data}' has images of only one class ({have}): training needs at least two")
    classes = list(source.classes)
    if val is not None:
        vsource = open_dataset(val)
        if vsource.classes != classes:
            vc = vsource.classes or []
            only_t = [c for c in classes if c not in vc]
            only_v = [c for c in vc if c not in classes]
            why = (f"only in '{data}': {', '.join(only_t[:5]) or '-'}; only in '{val}': {', '.join(only_v[:5]) or '-'}"
                   if (only_t or only_v) else "same names in another order")
            raise AtlasError(f"validation classes of '{val}' differ from the training classes of '{data}' ({why})")
        train_ids = list(range(len(source)))
        val_ids = list(range(len(vsource)))
        validation = {"kind": "folder", "path": str(vsource.root.resolve()), "images": len(val_ids)}
    else:
        vsource = source
        train_ids, val_ids = holdout_split([r.label_index for r in source.records], opts["val_fraction"], seed)
        validation = {"kind": "holdout", "fraction": opts["val_fraction"], "seed": int(seed),
                      "stratified": True, "images": len(val_ids),
                      "note": f"a fixed, seeded {opts['val_fraction']:.0%} of the training data per class, "
                              "held out (atlas.train.holdout_split)"}
    if not val_ids:
        raise AtlasError(f"dataset '{data}' is too small to hold out validation images: pass --val")
    config = {
        "model": model, "data": str(data), "data_root": str(source.root.resolve()),
        "train_images": len(train_ids), "classes": classes, "validation": validation,
        "options": opts, "preprocessing": pre,
        "defaults": {"paper": PAPER_DEFAULTS, "model": MODEL_DEFAULTS.get(model, {}),
                     "weight_decay_note": "not stated in the paper; 5e-4 is AlexNet's"},
    }
    # The options that define the run (compared on --resume): the options plus what the data is.
    identity = {**opts, "data": config["data_root"], "train_images": len(train_ids), "classes": classes,
                "validation": {k: v for k, v in validation.items() if k != "note"}}

    # -- the run folder ----------------------------------------------------------
    ckpt_path, cfg_path = out / "checkpoint.pt", out / "config.json"
    checkpoint = None
    if cfg_path.exists() or ckpt_path.exists():
        if resume:
            if cfg_path.exists():
                old = json.loads(cfg_path.read_text())
                # a run from before --contrast-norm had the model's own
                old_id = {"contrast_norm": default_norm, **old.get("options", {}), "data": old.get("data_root"),
                          "train_images": old.get("train_images"), "classes": old.get("classes"),
                          "validation": {k: v for k, v in (old.get("validation") or {}).items() if k != "note"}}
                diff = _differences(old_id, identity)
                if diff:
                    raise AtlasError(f"cannot resume '{out}' with different options: {'; '.join(diff)}")
            if ckpt_path.exists():
                try:
                    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
                except Exception as e:
                    raise AtlasError(f"checkpoint '{ckpt_path}' is not readable ({type(e).__name__})") from None
                if checkpoint.get("epoch", 0) > opts["epochs"]:
                    raise AtlasError(f"run '{out}' has already trained {checkpoint['epoch']} epochs: "
                                     f"--epochs {opts['epochs']} is fewer")
        elif overwrite:
            shutil.rmtree(out)
        else:
            raise AtlasError(f"run folder '{out}' already holds a training run: pass --resume to continue it "
                             "or --overwrite to start again")
    elif resume:
        log(f"no checkpoint in '{out}': starting a new run")
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        remove_temp_files(out)  # a killed run's half-written checkpoint or snapshot (under the lock)
    channels_last = dev.type == "cuda"
    nworkers = workers if workers is not None else default_workers(dev)
    need = (len(train_ids) + len(val_ids)) * 3 * pre["resize"] ** 2
    keep = in_memory if in_memory is not None else need <= memory_limit
    config["runtime"] = {"device": str(dev), "channels_last": channels_last, "workers": nworkers,
                         "in_memory": bool(keep), "torch": torch.__version__,
                         "deterministic_note": "bit-identical on CPU given the seed, resumed or not"}
    atomic_write_json(cfg_path, config)

    # -- model and optimizer -------------------------------------------------------
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model, num_classes=len(classes), dropout=opts["dropout"], **model_options)
        if opts["init"] == "paper":
            paper_init(net)
    net = net.to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=opts["lr"], momentum=opts["momentum"],
                          weight_decay=opts["weight_decay"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=opts["lr_factor"],
                                                       patience=opts["lr_patience"])
    history: list[dict[str, Any]] = []
    start = 1
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model_state"])
        opt.load_state_dict(checkpoint["optimizer_state"])
        sched.load_state_dict(checkpoint["scheduler_state"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if dev.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            try:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], dev)
            except RuntimeError:
                pass
        history = list(checkpoint["history"])
        start = int(checkpoint["epoch"]) + 1
        log(f"resuming '{out}' after epoch {start - 1}")

    # model_kwargs: every constructor option, so that load_model (and an atlas) rebuilds this very net
    meta_base = {"model": model, "model_kwargs": net.atlas_kwargs, "num_classes": len(classes),
                 "classes": classes, "preprocessing": pre,
                 "init": opts["init"], "seed": int(seed), "dataset": config["data_root"], "trained_by": "atlas train"}

    # -- data in memory or streamed ---------------------------------------------------
    labels_t = torch.tensor([source.records[i].label_index for i in train_ids], dtype=torch.long)
    vlabels_t = torch.tensor([vsource.records[i].label_index for i in val_ids], dtype=torch.long)
    if start <= opts["epochs"]:
        tb = _Batches(source, train_ids, labels_t, pre["resize"], keep, dev, nworkers, progress, "decode train")
        vb = _Batches(vsource, val_ids, vlabels_t, pre["resize"], keep, dev, nworkers, progress, "decode val")
        if tb.bad() or vb.bad():
            log(f"{tb.bad() + vb.bad()} unreadable image(s) are left out of training and validation")
        trainer = Trainer(net, opt, dev, pre, precision, channels_last, opts["renorm_radius"])
        if 0 in opts["snapshot_epochs"] and start == 1:
            _save_weights(out / "snapshots" / "epoch-000.pt", net, {**meta_base, "epochs": 0, "epoch": 0})
        n = len(train_ids)
        r, c = pre["resize"], pre["crop"]
        net.train()
        with Progress(opts["epochs"] * n, "train", "images", enabled=progress, initial=(start - 1) * n) as bar, \
                flush_denormal(dev.type == "cpu"):
            for epoch in range(start, opts["epochs"] + 1):
                t0 = time.perf_counter()
                torch.manual_seed(_mix(seed, epoch, 2))  # dropout: a function of (seed, epoch)
                order, oy, ox, fl = _epoch_augmentation(seed, epoch, n, r, c, opts["flip"])
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                correct = torch.zeros((), dtype=torch.long, device=dev)
                n_bad = 0
                for xb, yb, okb, idx, bad in tb.iterate(order, opts["batch_size"]):
                    xb = crop_flip(xb, oy[idx], ox[idx], fl[idx], c)
                    ls, cr = trainer.step(trainer.normalize(xb), yb, okb)
                    loss_sum += ls
                    correct += cr
                    n_bad += bad
                    bar.update(len(idx))
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t_train = time.perf_counter() - t0
                if n_bad and not keep and epoch == start:
                    log(f"{n_bad} unreadable training image(s) are left out of the loss")
                n_ok = max(n - n_bad, 1)
                row = {"epoch": epoch, "lr": float(opt.param_groups[0]["lr"]),
                       "train_loss": float(loss_sum) / n_ok, "train_top1_error": 1.0 - int(correct) / n_ok}
                row.update(trainer.evaluate(vb, max(opts["batch_size"], 64), opts["ten_crop_eval"]))
                row["images_per_s"] = n / t_train if t_train > 0 else 0.0
                row["train_seconds"] = t_train
                sched.step(row["val_top1_error"])
                row["epoch_seconds"] = time.perf_counter() - t0
                if not math.isfinite(row["train_loss"]):
                    raise AtlasError(f"training diverged in epoch {epoch} (loss {row['train_loss']}): "
                                     f"lower --lr (now {opts['lr']:g})")
                history.append(row)
                if epoch in opts["snapshot_epochs"]:
                    _save_weights(out / "snapshots" / f"epoch-{epoch:03d}.pt", net,
                                  {**meta_base, "epochs": epoch, "epoch": epoch,
                                   "val_top1_error": row["val_top1_error"]})
                _torch_save_atomic(ckpt_path, {
                    "format": CHECKPOINT_FORMAT, "epoch": epoch,
                    "model_state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                    "optimizer_state": opt.state_dict(), "scheduler_state": sched.state_dict(),
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None},
                    "data_order": {"seed": int(seed), "next_epoch": epoch + 1,
                                   "scheme": "epoch e: randperm and crops from SeedSequence(seed, e, 1); "
                                             "dropout RNG reseeded from (seed, e, 2)"},
                    "history": history})
                _write_metrics(out / "metrics.csv", history)
                log(f"epoch {epoch}/{opts['epochs']}: train loss {row['train_loss']:.3f}, "
                    f"val top-1 error {row['val_top1_error']:.1%}, top-5 {row['val_top5_error']:.1%}, "
                    f"lr {row['lr']:g}, {row['images_per_s']:.0f} images/s")
    else:
        log(f"run '{out}' is already complete ({start - 1} epochs)")
        _write_metrics(out / "metrics.csv", history)

    final = out / "final.pt"
    last = history[-1] if history else {}
    _save_weights(final, net, {**meta_base, "epochs": len(history),
                               "val_top1_error": last.get("val_top1_error"),
                               "val_top5_error": last.get("val_top5_error")})
    if history:
        plot_curves(history, out / "curves.png", title=f"{model} on {Path(str(data)).name}")
    log(f"trained {model} for {len(history)} epochs in {time.perf_counter() - t_start:.0f} s: {final}")
    return final


# ---------------------------------------------------------------------------
# curves.png, drawn with PIL
# ---------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v < hi + step * 0.999:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _panel(draw, box, series: list[tuple[str, list[tuple[float, float]], tuple[int, int, int]]], title: str,
           ylabel: str, xmax: int, percent: bool, lr_drops: list[int]) -> None:
    x0, y0, x1, y1 = box
    f, fs = _font(14), _font(12)
    left, right, top, bottom = x0 + 58, x1 - 12, y0 + 30, y1 - 42
    draw.text(((x0 + x1) // 2, y0 + 6), title, fill=(0, 0, 0), font=_font(15), anchor="mt")
    ys = [v for _, pts, _ in series for _, v in pts if math.isfinite(v)]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    lo = min(lo, 0.0)
    ticks = nice_ticks(lo, hi * 1.05 if hi > 0 else 1.0)
    ylo, yhi = ticks[0], ticks[-1]
    xlo, xhi = 1, max(xmax, 2)

    def px(ep: float) -> float:
        return left + (ep - xlo) / (xhi - xlo) * (right - left)

    def py(v: float) -> float:
        return bottom - (v - ylo) / (yhi - ylo) * (bottom - top)

    for t in ticks:
        yy = py(t)
        draw.line([(left, yy), (right, yy)], fill=(228, 228, 228))
        lab = f"{t * 100:g}%" if percent else f"{t:g}"
        draw.text((left - 6, yy), lab, fill=(60, 60, 60), font=fs, anchor="rm")
    xt = nice_ticks(xlo, xhi, 8)
    for t in xt:
        if xlo <= t <= xhi and float(t).is_integer():
            xx = px(t)
            draw.line([(xx, bottom), (xx, bottom + 4)], fill=(0, 0, 0))
            draw.text((xx, bottom + 6), f"{int(t)}", fill=(60, 60, 60), font=fs, anchor="mt")
    for ep in lr_drops:
        xx = px(ep - 0.5)
        for yy in range(int(top), int(bottom), 8):
            draw.line([(xx, yy), (xx, min(yy + 4, bottom))], fill=(150, 150, 150))
        draw.text((xx + 3, top + 2), "lr lowered", fill=(120, 120, 120), font=fs)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text(((left + right) // 2, bottom + 24), "epoch", fill=(0, 0, 0), font=f, anchor="mt")
    draw.text((x0 + 4, top - 22), ylabel, fill=(0, 0, 0), font=fs)
    for _, pts, colour in series:
        pts = [(px(e), py(v)) for e, v in pts if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for xx, yy in pts:
            draw.ellipse([xx - 3, yy - 3, xx + 3, yy + 3], fill=colour)
    # legend, top right inside the plot
    lw = max(int(draw.textlength(name, font=fs)) for name, _, _ in series) + 34
    lx, ly = right - lw - 6, top + 6
    draw.rectangle([lx, ly, lx + lw, ly + 18 * len(series) + 6], fill=(255, 255, 255), outline=(160, 160, 160))
    for i, (name, _, colour) in enumerate(series):
        yy = ly + 12 + 18 * i
        draw.line([(lx + 6, yy), (lx + 24, yy)], fill=colour, width=3)
        draw.text((lx + 28, yy), name, fill=(0, 0, 0), font=fs, anchor="lm")


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Two panels -- loss, and error rates -- over epochs; dashed lines where the lr was lowered."""
    from PIL import Image, ImageDraw

    w, h = 1000, 420
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if title:
        d.text((w // 2, 8), title, fill=(0, 0, 0), font=_font(16), anchor="mt")
    ep = [r["epoch"] for r in history]
    xmax = max(ep)
    drops = [history[i]["epoch"] for i in range(1, len(history)) if history[i]["lr"] < history[i - 1]["lr"]]
    blue, orange, green, red = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)
    _panel(d, (0, 24, w // 2, h), [
        ("training loss", [(e, r["train_loss"]) for e, r in zip(ep, history)], blue),
        ("validation loss", [(e, r["val_loss"]) for e, r in zip(ep, history)], orange),
    ], "loss", "cross-entropy", xmax, False, drops)
    _panel(d, (w // 2, 24, w, h), [
        ("training top-1", [(e, r["train_top1_error"]) for e, r in zip(ep, history)], blue),
        ("validation top-1", [(e, r["val_top1_error"]) for e, r in zip(ep, history)], red),
        ("validation top-5", [(e, r["val_top5_error"]) for e, r in zip(ep, history)], green),
    ], "error", "error rate", xmax, True, drops)
    return atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))
