"""The paper's training recipe as data: its defaults, the per-model departures, the checks on a run's
options, the held-out split, and the seeded per-epoch augmentation that makes a resumed run exact."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..choices import PRECISIONS
from ..errors import AtlasError
from ..models.registry import preprocessing_for, trainable_names

# The paper's recipe; per-model departures below (each recorded in config.json).
PAPER_DEFAULTS: dict[str, Any] = {"epochs": 70, "batch_size": 128, "lr": 1e-2, "dropout": 0.5, "init": "paper",
                                  "renorm_radius": 0.1}
# A net with BatchNorm (a ResNet, a MobileNet, vgg16_bn...) departs from the paper where BatchNorm does its
# job: the renormalisation of conv filters to RMS 0.1 would fight BatchNorm's own scale (it is off), and
# N(0, 1e-2) would start the convs in front of BatchNorm at an arbitrary scale (the builder's own init
# instead, He for torchvision's). The learning rate is a BatchNorm net's usual one.
BATCHNORM_DEFAULTS: dict[str, Any] = {"epochs": 10, "batch_size": 64, "lr": 5e-2, "init": "default",
                                      "renorm_radius": 0.0}
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


def mix(*parts: int) -> int:
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


def holdout_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed, seeded, per-class (stratified) hold-out: (train positions, val positions), sorted.

    Each class gives round(fraction * its count) images (at least 1 when it has 2 or more)."""
    g = torch.Generator().manual_seed(mix(seed, 0xB0A1))
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


def check_options(o: dict[str, Any]) -> None:
    def bad(flag: str, why: str):
        raise AtlasError(f"--{flag.replace('_', '-')} {why}")

    if o["model"] not in trainable_names():
        raise AtlasError(f"unknown model '{o['model']}': choose one of {', '.join(trainable_names())}")
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
    if o["dropout"] is not None and not 0 <= o["dropout"] < 1:
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
    if o["precision"] not in PRECISIONS:
        bad("precision", f"must be auto, fp32 or bf16 (got '{o['precision']}')")
    if o["crop"] < 8 or o["resize"] < o["crop"]:
        raise AtlasError(f"--crop {o['crop']} must be at least 8 and at most --resize {o['resize']}")
    late = [e for e in o["snapshot_epochs"] if not 0 <= e <= o["epochs"]]
    if late:
        raise AtlasError(f"--snapshot-epochs {','.join(map(str, late))}: the run has epochs 1..{o['epochs']} "
                         "(0 = the initial weights)")


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
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


def run_preprocessing(model: str, image_size: int | None, resize: int | None, crop: int | None) -> dict[str, Any]:
    pre = preprocessing_for(model, image_size)
    if crop is not None and resize is None:
        resize = int(round(crop * pre["resize"] / pre["crop"]))
    pre["resize"], pre["crop"] = int(resize or pre["resize"]), int(crop or pre["crop"])
    mean = ", ".join(f"{v:g}" for v in pre["mean"])
    std = ", ".join(f"{v:g}" for v in pre["std"])
    pre["note"] = (f"short side {pre['resize']}, centre crop {pre['crop']}, scale to [0,1], "
                   f"subtract ({mean}), divide by ({std})")
    return pre


def epoch_augmentation(seed: int, epoch: int, n: int, r: int, c: int, flip: bool):
    """Epoch `epoch`'s data order, crop offsets and flips: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(mix(seed, epoch, 1))
    order = torch.randperm(n, generator=g)
    oy = torch.randint(0, r - c + 1, (n,), generator=g)
    ox = torch.randint(0, r - c + 1, (n,), generator=g)
    fl = torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.long)
    return order, oy, ox, fl
