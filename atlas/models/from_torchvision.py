"""torchvision's classification models, by their torchvision names, with the weight files torchvision
itself writes (`~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth` loads as `--weights`).

Nothing is downloaded: the models are built with weights=None and the file is loaded into them. What a
file needs that torchvision's own loader would have done:

* old DenseNet files name their layers `norm.1` where the modules are now `norm1`: renamed, with the
  pattern torchvision's `_load_state_dict` uses;
* googlenet and inception_v3 files were trained with `transform_input=True` (the model turns ImageNet
  normalised input into (x - 0.5) / 0.5 itself). The model is built without it and the transform is
  folded into the recorded mean and std (0.5 and 0.5), which gives the same numbers and leaves the graph
  plain convolutions; their auxiliary heads (unused in eval mode) are dropped;
* the preprocessing is the one of the weights the file is: torchvision names its files after the first
  hex digits of their sha256, so the file is matched against the weights enum's entries by its hash
  (resnet50's V1 file resizes to 256, its V2 file to 232), else the model's DEFAULT entry. Those entries
  are metadata in torchvision's code: reading them downloads nothing.
"""
from __future__ import annotations

import copy
import functools
import inspect
import re
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import AtlasError
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, describe, make
from .weights import last_weight_key

TRANSFORM_INPUT = ("googlenet", "inception_v3")
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
# torchvision.models.densenet._load_state_dict's pattern ('.'s are no longer allowed in module names), and
# num_batches_tracked, which a file converted by a newer torch carries
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


@functools.lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """Every classification model torchvision builds (not its detection, video or quantized ones)."""
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


def is_name(name: str) -> bool:
    return name in names()


def build_options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The constructor options the model is built with: the given ones, and for googlenet and
    inception_v3 no transform_input (folded into the preprocessing), no auxiliary heads unless asked,
    and their weight init chosen (torchvision warns when it is left to its default)."""
    options = dict(kwargs)
    if name in TRANSFORM_INPUT:
        options["transform_input"] = False
        options.setdefault("aux_logits", False)
        options.setdefault("init_weights", True)
    return options


def build(name: str, **options: Any) -> nn.Module:
    import torchvision.models as tvm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. inception's scipy-free init notice
            return tvm.get_model(name, weights=None, **options)
    except TypeError as e:  # an option the builder does not take
        raise AtlasError(f"model '{name}' (torchvision) does not take these options "
                         f"({', '.join(sorted(options))}): {e}") from None


def head_key(name: str, options: dict[str, Any], state: dict[str, torch.Tensor]) -> str | None:
    """The classifier's weight key: the model's last weight, found on a model built on the meta device
    (free), or where that fails the file's last weight in its own order."""
    try:
        with torch.device("meta"):
            net = build(name, **{k: v for k, v in options.items() if k != "num_classes"})
        key = last_weight_key(k for k, v in net.state_dict().items() if v.ndim >= 2)
        if key in state:
            return key
    except Exception:  # some builders (regnet) copy data while they build: no meta device for them
        pass
    return last_weight_key(k for k, v in state.items() if v.ndim >= 2)


def fix_state(name: str, state: dict[str, torch.Tensor], options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A file's keys as the model built by `build_options` names them (see the module docstring)."""
    state = copy.copy(state)  # keeps load_state_dict's _metadata (module versions)
    if name.startswith("densenet"):
        for key in list(state):
            m = _DENSENET_OLD_KEY.match(key)
            if m:
                state[m.group(1) + m.group(2)] = state.pop(key)
    if name in TRANSFORM_INPUT and not options.get("aux_logits"):
        for key in [k for k in state if k.startswith(_AUX_PREFIXES)]:
            del state[key]
    return state


def weights_entry(name: str, sha256: str | None):
    """(the weights enum entry, whether the file is that entry): the entry whose file name carries the
    first hex digits of the file's sha256 (torchvision names its files so), else (DEFAULT, False)."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError):
        return None, False
    if sha256:
        for entry in enum:
            digits = re.search(r"-([0-9a-f]{8,})\.pth$", entry.url or "")
            if digits and sha256.startswith(digits.group(1)):
                return entry, True
    return enum.DEFAULT, False


def entry_name(entry) -> str | None:
    return f"{type(entry).__name__}.{entry.name}" if entry is not None else None


def min_size(name: str) -> int:
    """The smallest input the model takes (inception_v3: 75 px), from its weights metadata."""
    entry, _ = weights_entry(name, None)
    size = (entry.meta.get("min_size") if entry is not None else None) or (1, 1)
    return int(max(size))


def preprocessing(name: str, entry=None, transform_input: bool = False, matched: bool = True) -> dict[str, Any]:
    """The preprocessing of the weights `entry` (torchvision's ImageClassification preset; `matched`:
    the file is that entry, else the entry is only the model's default)."""
    from torchvision.transforms._presets import ImageClassification

    if entry is None:
        entry, matched = weights_entry(name, None)
    defaults = {k: p.default for k, p in inspect.signature(ImageClassification).parameters.items()
                if p.default is not inspect.Parameter.empty}
    keywords = dict(getattr(entry.transforms, "keywords", {}) if entry is not None else {})
    crop = int(keywords.get("crop_size", 224))
    resize = int(keywords.get("resize_size", defaults.get("resize_size", 256)))
    mean = tuple(keywords.get("mean", defaults.get("mean", IMAGENET_MEAN)))
    std = tuple(keywords.get("std", defaults.get("std", IMAGENET_STD)))
    interpolation = str(getattr(keywords.get("interpolation"), "value", "bilinear"))
    why = f"torchvision's {entry_name(entry)}" if entry is not None else "torchvision's"
    if entry is not None and not matched:
        why = f"torchvision's default for {name}, {entry_name(entry)}"
    if transform_input:
        # the file's model maps ImageNet-normalised input to (x - 0.5) / 0.5: that, done here
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        why += ", its transform_input folded into the mean and std"
    if interpolation != "bilinear":
        why += f"; torchvision resizes {interpolation}, the atlas bilinear"
    return make(resize, crop, mean, std, describe(resize, crop, mean, std, why))


def categories(entry, num_classes: int | None) -> list[str] | None:
    """The class names of the weights entry (ImageNet's), when the model has that many outputs."""
    cats = list(entry.meta.get("categories") or []) if entry is not None else []
    return cats if cats and num_classes == len(cats) else None
