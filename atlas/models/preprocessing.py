"""The preprocessing an atlas records: short side `resize`, centre crop `crop`, scale to [0, 1],
subtract `mean`, divide by `std` (atlas.data.Preprocess applies it), and a `note` in words.

Each source of models says its own (registry, torchvision's weights metadata, timm's pretrained config,
attributes on a user's module); --image-size, --mean and --std change it here, the same way for all.
"""
from __future__ import annotations

import math

from typing import Any, Sequence

from ..errors import AtlasError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _numbers(v: Sequence[float]) -> str:
    return ", ".join(f"{float(x):g}" for x in v)


def make(resize: int, crop: int, mean: Sequence[float], std: Sequence[float], note: str) -> dict[str, Any]:
    return {"resize": int(resize), "crop": int(crop), "mean": [float(x) for x in mean],
            "std": [float(x) for x in std], "note": note}


def describe(resize: int, crop: int, mean: Sequence[float], std: Sequence[float], why: str = "") -> str:
    return (f"short side {resize}, centre crop {crop}, scale to [0,1], subtract ({_numbers(mean)}), "
            f"divide by ({_numbers(std)})" + (f" ({why})" if why else ""))


def check_size(name: str, image_size: int, least: int = 1, most: int | None = None) -> None:
    if image_size < least or (most is not None and image_size > most):
        span = f"{least} to {most}" if most is not None else f"at least {least}"
        raise AtlasError(f"--image-size {image_size} does not suit model '{name}': it takes {span} px")


def three(values: Sequence[float] | None, flag: str) -> list[float] | None:
    """--mean / --std: three numbers, one per RGB channel (std above zero)."""
    if values is None:
        return None
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise AtlasError(f"{flag} takes three finite numbers, one per RGB channel (got {values!r})")
    if flag == "--std" and min(out) <= 0:
        raise AtlasError(f"--std must be above zero for every channel (got {_numbers(out)})")
    return out


def override(pre: dict[str, Any], image_size: int | None = None, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> dict[str, Any]:
    """`pre` with the user's --image-size (the resize keeps its ratio to the crop), --mean and --std."""
    pre = dict(pre)
    mean, std = three(mean, "--mean"), three(std, "--std")
    if image_size is not None and int(image_size) != pre["crop"]:
        scale = pre["resize"] / pre["crop"]
        pre["resize"], pre["crop"] = int(round(image_size * scale)), int(image_size)
        rest = pre["note"].split(", ", 2)[-1]
        pre["note"] = f"short side {pre['resize']}, centre crop {pre['crop']}; {rest}"
    if mean is not None or std is not None:
        pre["mean"] = mean if mean is not None else list(pre["mean"])
        pre["std"] = std if std is not None else list(pre["std"])
        pre["note"] = describe(pre["resize"], pre["crop"], pre["mean"], pre["std"], "--mean/--std as given")
    pre["mean"], pre["std"] = [float(x) for x in pre["mean"]], [float(x) for x in pre["std"]]
    return pre
