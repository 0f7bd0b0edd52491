"""Resolve a model name (and a weights file the user names) to an eval-mode module.

Weights are never downloaded. A weights file may be a bare `state_dict` or a
checkpoint written by `atlas train` (a dict with "model_state" and "meta").
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AtlasError
from .zfnet import AlexNetSingle, ZFNet, ZFNetMini

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Our own architectures: name -> (class, default preprocessing).
_OWN = {
    "zfnet": (ZFNet, {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": (1.0, 1.0, 1.0),
                      "note": "short side 256, centre crop 224, scale to [0,1], subtract the mean (the paper's recipe)"}),
    "zfnet-mini": (ZFNetMini, {"resize": 64, "crop": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                               "note": "short side 64, centre crop 64, scale to [0,1], subtract 0.5, divide by 0.25"}),
    "alexnet-single": (AlexNetSingle, {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": (1.0, 1.0, 1.0),
                                       "note": "short side 256, centre crop 224, scale to [0,1], subtract the mean"}),
}
# torchvision CNNs whose feature extractor is Conv2d / ReLU / MaxPool2d only.
_TORCHVISION = ("alexnet", "vgg11", "vgg13", "vgg16", "vgg19")
_TV_PREPROCESSING = {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                     "note": "short side 256, centre crop 224, ImageNet mean/std (torchvision's)"}


def model_names() -> list[str]:
    return list(_OWN) + list(_TORCHVISION)


def preprocessing_for(name: str, image_size: int | None = None) -> dict[str, Any]:
    """The model's own preprocessing, as recorded in the manifest."""
    _check_name(name)
    if image_size is not None:
        lo, hi = getattr(_OWN[name][0], "input_sizes", (1, None)) if name in _OWN else (1, None)
        if image_size < lo or (hi is not None and image_size > hi):
            span = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise AtlasError(f"--image-size {image_size} does not suit model '{name}': it takes {span} px")
    pre = dict(_OWN[name][1]) if name in _OWN else dict(_TV_PREPROCESSING)
    if image_size is not None and image_size != pre["crop"]:
        scale = pre["resize"] / pre["crop"]
        pre["resize"], pre["crop"] = int(round(image_size * scale)), int(image_size)
        pre["note"] = f"short side {pre['resize']}, centre crop {pre['crop']}; " + pre["note"].split(", ", 2)[-1]
    pre["mean"], pre["std"] = list(pre["mean"]), list(pre["std"])
    return pre


def _check_name(name: str) -> None:
    if name not in _OWN and name not in _TORCHVISION:
        raise AtlasError(f"unknown model '{name}': choose one of {', '.join(model_names())}")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) from a bare state_dict or an `atlas train` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"weights file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise AtlasError(f"weights file '{path}' is not a PyTorch weights file ({type(e).__name__})") from None
    if isinstance(obj, dict) and "model_state" in obj:
        return obj["model_state"], dict(obj.get("meta") or {})
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise AtlasError(f"weights file '{path}' holds no state_dict")


def _num_classes_in(state: dict[str, torch.Tensor]) -> int | None:
    linear = [k for k, v in state.items() if k.startswith("classifier.") and k.endswith(".weight") and v.ndim == 2]
    if not linear:
        return None
    last = max(linear, key=lambda k: int(k.split(".")[1]))
    return int(state[last].shape[0])


def constructor_options(name: str, num_classes: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Every constructor option of the model `name` as it will be built: the given ones over the class's
    defaults. This is what an atlas records (manifest "model"."kwargs") to rebuild exactly its model
    when the weights file is gone: `build_model(name, **constructor_options(...))` is that model."""
    _check_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if name in _OWN:
        cls = _OWN[name][0]
        params = inspect.signature(cls).parameters
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise AtlasError(f"model '{name}' has no option {', '.join(unknown)} (its options: "
                             f"{', '.join(params)})")
        return {key: kwargs.get(key, p.default) for key, p in params.items()}
    # torchvision's builders take **kwargs: what is not given is the class's default, which is fixed by
    # the name (num_classes is the only option a weights file sets)
    if set(kwargs) - {"num_classes"}:
        extra = ", ".join(sorted(set(kwargs) - {"num_classes"}))
        raise AtlasError(f"model '{name}' (torchvision) takes no option {extra} here")
    return {"num_classes": int(kwargs.get("num_classes") or 1000)}


def option_models(option: str) -> list[str]:
    """The model names whose constructor takes `option` (say, contrast_norm)."""
    return [n for n, (cls, _) in _OWN.items() if option in inspect.signature(cls).parameters]


def build_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A randomly initialised model (seeded by the caller for determinism); `model.atlas_kwargs` holds
    every constructor option it was built with (constructor_options)."""
    options = constructor_options(name, num_classes, **kwargs)
    if name in _OWN:
        model = _OWN[name][0](**options)
    else:
        import torchvision.models as tvm

        model = getattr(tvm, name)(weights=None, **options)
    model.atlas_kwargs = options
    return model


def load_model(name: str, weights: str | Path | None = None, num_classes: int | None = None,
               seed: int = 0, **kwargs: Any) -> nn.Module:
    """`atlas.load_model`: the named model in eval mode, with weights from `weights` if given.

    Without weights the model is randomly initialised from `seed` (so the same
    call gives the same model) and `model.atlas_meta["weights"]` says so.
    Constructor options (`contrast_norm`, `width`, ...) not given here come
    from the checkpoint's meta, else the class's defaults; the ones used are in
    `model.atlas_meta["kwargs"]`.
    """
    meta: dict[str, Any] = {}
    state = None
    if weights is not None:
        state, meta = read_weights(weights)
        if meta.get("model") and meta["model"] != name:
            raise AtlasError(f"weights file '{weights}' was trained for model '{meta['model']}', not '{name}'")
        num_classes = num_classes or meta.get("num_classes") or _num_classes_in(state)
        # `atlas train` records every constructor option (model_kwargs); older checkpoints a few of them
        recorded = dict(meta.get("model_kwargs") or {})
        recorded.update({key: meta[key] for key in ("contrast_norm", "width") if key in meta})
        for key, value in recorded.items():
            if key != "num_classes":
                kwargs.setdefault(key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, num_classes=num_classes, **kwargs)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
            raise AtlasError(f"weights file '{weights}' does not fit model '{name}': {detail[:200]}") from None
        model.atlas_meta = {"name": name, "weights": str(weights), "weights_sha256": file_sha256(weights),
                            "random_init": False, **{k: v for k, v in meta.items() if k in ("classes", "preprocessing")}}
    else:
        model.atlas_meta = {"name": name, "weights": None, "weights_sha256": None, "random_init": True, "seed": seed}
    model.atlas_meta["kwargs"] = dict(model.atlas_kwargs)
    return model.eval()


def contrast_norm_option(name: str, contrast_norm: bool | None) -> dict[str, Any]:
    """The constructor options for `--contrast-norm/--no-contrast-norm` (None: the model's own default),
    refused in one line for a model that has no contrast normalisation."""
    if contrast_norm is None:
        return {}
    _check_name(name)
    having = option_models("contrast_norm")
    if name not in having:
        raise AtlasError(f"--{'' if contrast_norm else 'no-'}contrast-norm: model '{name}' has no contrast "
                         f"normalisation to switch (models with it: {', '.join(having)})")
    return {"contrast_norm": bool(contrast_norm)}


def model_record(model: nn.Module) -> dict[str, Any]:
    """How to rebuild `model` (a load_model result) without its weights file: the manifest's record."""
    name = model.atlas_meta["name"]
    return {"source": "atlas" if name in _OWN else "torchvision", "name": name,
            "kwargs": dict(model.atlas_meta["kwargs"])}


def feature_options(name: str) -> list[str]:
    """The constructor options of model `name` beyond num_classes and dropout that change its features
    (what an atlas must record to rebuild them): [] for torchvision's."""
    if name not in _OWN:
        return []
    return [p for p in inspect.signature(_OWN[name][0]).parameters if p not in ("num_classes", "dropout")]
