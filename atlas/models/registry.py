"""Resolve a model (a name, a spec, or a module) and a weights file the user names to an eval-mode module.

Where models come from (`load_model(spec)`):

* our own architectures by name: zfnet, zfnet-mini, alexnet-single (atlas/models/zfnet.py);
* any torchvision classification model by its torchvision name (atlas/models/from_torchvision.py);
* `timm:NAME`, when timm is installed (atlas/models/from_timm.py);
* `path/to/net.py:FACTORY` or `package.module:FACTORY`, a factory returning an nn.Module, and an
  nn.Module passed from Python (atlas/models/from_code.py).

Weights are never downloaded: they come from the file `weights` names (atlas/models/weights.py reads
the forms found in the wild). Without one the model is randomly initialised from `seed`. Every model
this returns carries `model.atlas_meta` (name, weights, weights_sha256, random_init, seed, kwargs,
source, and the preprocessing where its source defines one), from which `model_record` says how an
atlas rebuilds it.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AtlasError
from . import from_code, from_timm, from_torchvision
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, check_size, make, override  # noqa: F401
from .weights import file_sha256, fit, read_weights, state_sha256  # noqa: F401 - read_weights is public here
from .zfnet import AlexNetSingle, ZFNet, ZFNetMini

# Our own architectures: name -> (class, default preprocessing).
_OWN = {
    "zfnet": (ZFNet, make(256, 224, IMAGENET_MEAN, (1.0, 1.0, 1.0),
                          "short side 256, centre crop 224, scale to [0,1], subtract the mean (the paper's recipe)")),
    "zfnet-mini": (ZFNetMini, make(64, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                                   "short side 64, centre crop 64, scale to [0,1], subtract 0.5, divide by 0.25")),
    "alexnet-single": (AlexNetSingle, make(256, 224, IMAGENET_MEAN, (1.0, 1.0, 1.0),
                                           "short side 256, centre crop 224, scale to [0,1], subtract the mean")),
}
SPEC_FORMS = ("timm:NAME", "FILE.py:FACTORY", "package.module:FACTORY")


def model_names() -> list[str]:
    """What `--model` takes: our names, torchvision's classification models, and the spec forms."""
    return list(_OWN) + list(from_torchvision.names()) + list(SPEC_FORMS)


def trainable_names() -> list[str]:
    """What `atlas train` takes (and what an `atlas train` checkpoint names): ours and every torchvision
    classification model."""
    return list(_OWN) + list(from_torchvision.names())


def family(name: str) -> dict[str, bool]:
    """What the recipe must know of a model it trains: whether it normalises its activations with
    BatchNorm (the paper's filter renormalisation and N(0, 1e-2) init are for nets without it) and whether
    its constructor takes `dropout`. Read from the model built on the meta device: nothing is computed."""
    def built(**options):
        try:
            with torch.device("meta"):
                return build_model(name, num_classes=10, **options)
        except AtlasError:
            raise
        except Exception:  # builders that compute while building: a real one
            return _seeded(0, lambda: build_model(name, num_classes=10, **options))

    net = built()
    try:
        built(dropout=0.5)
        takes = True
    except AtlasError:  # the builder says it takes no such option
        takes = False
    return {"batchnorm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()),
            "dropout": takes}


def source_of(name: Any) -> str:
    """Which source a spec names, or one line saying it names none."""
    if isinstance(name, nn.Module):
        return "object"
    if not isinstance(name, str) or not name.strip():
        raise AtlasError(f"--model takes a name or a spec, not {name!r}")
    if name in _OWN:
        return "atlas"
    if from_timm.is_spec(name):
        return "timm"
    code = from_code.parse(name)
    if code is not None:
        return code.source
    if from_torchvision.is_name(name):
        return "torchvision"
    raise AtlasError(_unknown(name))


def _unknown(name: str) -> str:
    import difflib

    if name.endswith(".py"):
        return f"model '{name}' names a file but no factory: give {name}:FACTORY (a function returning an nn.Module)"
    close = difflib.get_close_matches(name, list(_OWN) + list(from_torchvision.names()), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown model '{name}'{hint}: choose one of {', '.join(_OWN)}, a torchvision classification "
            f"model (resnet50, vgg16_bn, googlenet, densenet121, ...), {', '.join(SPEC_FORMS)}")


# ---------------------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------------------
def preprocessing_for(name: Any, image_size: int | None = None, mean=None, std=None,
                      model: nn.Module | None = None) -> dict[str, Any]:
    """The model's own preprocessing, as recorded in the manifest, with --image-size, --mean and --std
    over it. `model`: the loaded model, whose weights may say more (a checkpoint's, torchvision's entry
    for the file, googlenet's folded transform) and whose attributes are a user module's own."""
    meta = (getattr(model, "atlas_meta", None) or {}) if model is not None else {}
    source = meta.get("source") or source_of(name)  # a module from Python is named by its class
    label = name if isinstance(name, str) else from_code.class_name(name)
    if image_size is not None:
        image_size = int(image_size)
    recorded = meta.get("preprocessing")
    if source == "atlas":
        cls, own = _OWN[name]
        if image_size is not None:
            lo, hi = getattr(cls, "input_sizes", (1, None))
            check_size(name, image_size, lo, hi)
        # a checkpoint's own preprocessing, unless another size is asked: then the model's recipe at that size
        base = recorded if recorded and (image_size is None or image_size == recorded["crop"]) else own
    elif source == "torchvision":
        if image_size is not None:
            check_size(name, image_size, from_torchvision.min_size(name))
        base = recorded or from_torchvision.preprocessing(name)
    elif source == "timm":
        base = recorded or from_timm.preprocessing(model if model is not None else build_model(name))
    else:
        base = recorded or from_code.preprocessing(model, label, image_size)
    return override(base, image_size, mean, std)


# ---------------------------------------------------------------------------------------------------------
# constructor options and building
# ---------------------------------------------------------------------------------------------------------
def constructor_options(name: str, num_classes: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Every constructor option of the model `name` as it will be built: the given ones over the defaults
    of our classes (the builder's own for the other sources, which take what they take). This is what an
    atlas records (manifest "model"."kwargs") to rebuild exactly its model when the weights file is gone:
    `build_model(name, **constructor_options(...))` is that model."""
    source = source_of(name)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if source == "atlas":
        cls = _OWN[name][0]
        params = inspect.signature(cls).parameters
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise AtlasError(f"model '{name}' has no option {', '.join(unknown)} (its options: "
                             f"{', '.join(params)})")
        return {key: kwargs.get(key, p.default) for key, p in params.items()}
    if source == "torchvision":
        kwargs.setdefault("num_classes", 1000)
        return from_torchvision.build_options(name, kwargs)
    return dict(kwargs)


def option_models(option: str) -> list[str]:
    """The model names whose constructor takes `option` (say, contrast_norm)."""
    return [n for n, (cls, _) in _OWN.items() if option in inspect.signature(cls).parameters]


def build_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A randomly initialised model (seeded by the caller for determinism); `model.atlas_kwargs` holds
    every constructor option it was built with (constructor_options). A code spec runs its factory."""
    source = source_of(name)
    options = constructor_options(name, num_classes, **kwargs)
    if source == "atlas":
        model = _OWN[name][0](**options)
    elif source == "torchvision":
        model = from_torchvision.build(name, **options)
    elif source == "timm":
        model = from_timm.build(name, **options)
    else:
        spec = from_code.parse(name)
        model, module = from_code.call_factory(spec, options)
        model.atlas_code = from_code.record(spec, module)
    model.atlas_kwargs = options
    return model


def _seeded(seed: int, make_model):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model()


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
def load_model(name: Any, weights: str | Path | None = None, num_classes: int | None = None,
               seed: int = 0, **kwargs: Any) -> nn.Module:
    """`atlas.load_model`: the model `name` names (see the module docstring) in eval mode, with weights from
    the file `weights` if given.

    Without weights the model is randomly initialised from `seed` (so the same call gives the same model)
    and `model.atlas_meta["weights"]` says so. Constructor options (`contrast_norm`, `width`, a torchvision
    or timm option, a factory's keyword) not given here come from the checkpoint's meta, else the defaults;
    the ones used are in `model.atlas_meta["kwargs"]`. googlenet and inception_v3 take
    `transform_input`: whether the weights expect torchvision's input transform (by default, a weights
    file does, as torchvision's own files do); it is folded into the preprocessing either way.
    """
    source = source_of(name)
    if source == "object":
        return adopt(name, weights=weights)
    state, meta, sha = None, {}, None
    if weights is not None:
        state, meta = read_weights(weights)
        sha = file_sha256(weights)
        if meta.get("model") and meta["model"] != name:
            raise AtlasError(f"weights file '{weights}' was trained for model '{meta['model']}', not '{name}'")
    return _load(name, source, state, meta, sha, weights, num_classes, seed, kwargs)


def _load(name, source, state, meta, sha, weights, num_classes, seed, kwargs) -> nn.Module:
    kwargs = dict(kwargs)
    if "num_classes" in kwargs:  # a record's kwargs hold it
        recorded = kwargs.pop("num_classes")
        num_classes = num_classes if num_classes is not None else recorded
    loader = {"atlas": _load_own, "torchvision": _load_torchvision, "timm": _load_timm}.get(source, _load_code)
    make, state, describe = loader(name, state, meta, sha, num_classes, kwargs)
    # a user's factory runs once; the others are built on the meta device when a file gives every weight
    model = _instantiate(make, seed, fast=state is not None and source != "file" and source != "module")
    if state is not None:
        fit(model, state, weights, name)
        if _on_meta(model):  # a buffer no file holds (non-persistent): only a real build makes it
            model = _seeded(seed, make)
            fit(model, state, weights, name)
        model.atlas_meta = {"name": name, "weights": str(weights), "weights_sha256": sha, "random_init": False,
                            **{k: v for k, v in meta.items() if k in ("classes", "preprocessing")}}
    else:
        model.atlas_meta = {"name": name, "weights": None, "weights_sha256": None, "random_init": True, "seed": seed}
    extra = describe(model)
    for key in ("preprocessing", "classes"):  # a checkpoint's own come first
        if extra.get(key) is not None and key not in model.atlas_meta:
            model.atlas_meta[key] = extra[key]
    model.atlas_meta.update({"source": source, "kwargs": dict(model.atlas_kwargs),
                             **{k: v for k, v in extra.items() if k not in ("preprocessing", "classes")}})
    return model.eval()


def _instantiate(make, seed: int, fast: bool) -> nn.Module:
    """The model, randomly initialised from `seed`; with `fast`, its tensors on the meta device instead
    (no init: a weights file replaces every one of them), where the builder allows it."""
    if fast:
        try:
            with torch.device("meta"):
                return make()
        except Exception:  # builders that compute on their tensors while building (regnet's)
            pass
    return _seeded(seed, make)


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _num_classes_in(state: dict[str, torch.Tensor]) -> int | None:
    linear = [k for k, v in state.items() if k.startswith("classifier.") and k.endswith(".weight") and v.ndim == 2]
    if not linear:
        return None
    last = max(linear, key=lambda k: int(k.split(".")[1]))
    return int(state[last].shape[0])


# Each loader returns (make: builds the model the weights need, the state to load into it (keys fixed),
# describe: what the source knows beyond the weights, from the built model).
def _load_own(name, state, meta, sha, num_classes, kwargs):
    if state is not None:
        num_classes = num_classes or meta.get("num_classes") or _num_classes_in(state)
        # `atlas train` records every constructor option (model_kwargs); older checkpoints a few of them
        recorded = dict(meta.get("model_kwargs") or {})
        recorded.update({key: meta[key] for key in ("contrast_norm", "width") if key in meta})
        for key, value in recorded.items():
            if key != "num_classes":
                kwargs.setdefault(key, value)
    return lambda: build_model(name, num_classes=num_classes, **kwargs), state, lambda model: {}


def _load_torchvision(name, state, meta, sha, num_classes, kwargs):
    folds = name in from_torchvision.TRANSFORM_INPUT
    # googlenet's and inception_v3's files expect the transform unless said otherwise (atlas train's do not)
    expects_transform = bool(kwargs.pop("transform_input", state is not None and not meta)) if folds else False
    if state is not None:
        for key, value in (meta.get("model_kwargs") or {}).items():
            if key != "num_classes":
                kwargs.setdefault(key, value)
        options = from_torchvision.build_options(name, kwargs)
        state = from_torchvision.fix_state(name, state, options)
        if num_classes is None:
            head = from_torchvision.head_key(name, options, state)
            num_classes = meta.get("num_classes") or (int(state[head].shape[0]) if head in state else None)
    entry, matched = from_torchvision.weights_entry(name, sha)

    def describe(model):
        # the class names only of a file that is torchvision's: a 1000-class file of one's own may be anything
        return {"weights_entry": from_torchvision.entry_name(entry) if matched else None,
                "preprocessing": from_torchvision.preprocessing(name, entry, expects_transform, matched),
                "classes": from_torchvision.categories(entry, model.atlas_kwargs.get("num_classes"))
                if matched else None}

    return lambda: build_model(name, num_classes=num_classes, **kwargs), state, describe


def _load_timm(name, state, meta, sha, num_classes, kwargs):
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    elif state is not None:
        probe = _instantiate(lambda: build_model(name, **kwargs), 0, fast=True)
        head = from_timm.head_key(probe)
        if head in state and head in probe.state_dict() and state[head].shape != probe.state_dict()[head].shape:
            kwargs["num_classes"] = int(state[head].shape[0])

    def describe(model):
        return {"preprocessing": from_timm.preprocessing(model), "architecture": from_timm.arch(name),
                "timm_version": from_timm.version()}

    return lambda: build_model(name, **kwargs), state, describe


def _load_code(name, state, meta, sha, num_classes, kwargs):
    spec = from_code.parse(name)
    fn, _, where = from_code.factory_of(spec)
    takes_classes = from_code.accepts(fn, "num_classes")
    if num_classes is not None and not takes_classes:
        raise AtlasError(f"{spec.factory}() in {where} takes no num_classes")
    if num_classes is None and state is not None and takes_classes and "num_classes" not in kwargs:
        head = [k for k, v in state.items() if k.endswith(".weight") and v.ndim >= 2]
        num_classes = int(state[head[-1]].shape[0]) if head else None
    if num_classes is not None:
        kwargs.setdefault("num_classes", int(num_classes))
    return lambda: build_model(name, **kwargs), state, lambda model: {"code": model.atlas_code}


def adopt(model: nn.Module, weights: str | Path | None = None, name: str | None = None) -> nn.Module:
    """A module passed from Python (`atlas.build.build(model=net)`), described as load_model describes
    what it builds: its weights are its own (or the file's, loaded into it), their digest its hash."""
    if not isinstance(model, nn.Module):
        raise AtlasError(f"model must be a torch.nn.Module, not a {type(model).__name__}")
    label = name or from_code.class_name(model)
    if weights is not None:
        state, _ = read_weights(weights)
        fit(model, state, weights, label)
    own = getattr(model, "atlas_meta", None) or {}
    model.atlas_kwargs = dict(own.get("kwargs") or {})
    model.atlas_meta = {**{k: v for k, v in own.items() if k in ("classes", "preprocessing")},
                        "name": label, "source": "object", "class": from_code.class_name(model),
                        "weights": str(weights) if weights is not None else None,
                        "weights_sha256": file_sha256(weights) if weights is not None
                        else state_sha256(model.state_dict()),
                        "random_init": False, "kwargs": dict(model.atlas_kwargs)}
    return model.eval()


def contrast_norm_option(name: Any, contrast_norm: bool | None) -> dict[str, Any]:
    """The constructor options for `--contrast-norm/--no-contrast-norm` (None: the model's own default),
    refused in one line for a model that has no contrast normalisation."""
    if contrast_norm is None:
        return {}
    source = source_of(name)
    having = option_models("contrast_norm")
    if source != "atlas" or name not in having:
        label = name if isinstance(name, str) else from_code.class_name(name)
        raise AtlasError(f"--{'' if contrast_norm else 'no-'}contrast-norm: model '{label}' has no contrast "
                         f"normalisation to switch (models with it: {', '.join(having)})")
    return {"contrast_norm": bool(contrast_norm)}


# ---------------------------------------------------------------------------------------------------------
# the manifest's record, and rebuilding from it
# ---------------------------------------------------------------------------------------------------------
def model_record(model: nn.Module) -> dict[str, Any]:
    """How to rebuild `model` (a load_model or adopt result) without its weights file: the manifest's
    record, {"source", "name", "kwargs", ...}: for torchvision the weights entry the file is, for timm the
    architecture and timm's version, for code its path (or module), factory and sha256, for an object
    its class."""
    meta = model.atlas_meta
    name = meta["name"]
    source = meta.get("source") or ("atlas" if name in _OWN else "torchvision")
    out = {"source": source, "name": name, "kwargs": dict(meta["kwargs"])}
    if source == "torchvision" and meta.get("weights_entry"):
        out["weights_entry"] = meta["weights_entry"]
    elif source == "timm":
        out.update({"architecture": meta.get("architecture"), "timm_version": meta.get("timm_version")})
    elif source in ("file", "module"):
        out.update(meta["code"])
    elif source == "object":
        out["class"] = meta.get("class")
    return out


# What an atlas may rebuild without the user's consent: each builder of the closed set and the keyword options
# it may be given, with their types and ranges. Nothing path-like (timm's checkpoint_path, cache_dir,
# pretrained_cfg_overlay) and nothing that downloads (pretrained): anything outside needs --trust-code.
def _allowed_options() -> dict[str, dict[str, Any]]:
    from ..util.schema import CLASSES_MAX, Bool, Float, Int, List, Str

    fraction, classes = Float(0.0, 1.0), Int(1, CLASSES_MAX)
    return {
        "atlas": {"num_classes": classes, "contrast_norm": Bool(), "dropout": fraction, "width": Int(1, 1024)},
        "torchvision": {
            "num_classes": classes, "dropout": fraction, "transform_input": Bool(), "aux_logits": Bool(),
            "init_weights": Bool(), "zero_init_residual": Bool(), "groups": Int(1, 256),
            "width_per_group": Int(1, 1024), "replace_stride_with_dilation": List(Bool(), 3, 3, nullable=True),
            "drop_rate": fraction, "memory_efficient": Bool(), "stochastic_depth_prob": fraction,
            "width_mult": Float(0.05, 8.0), "bn_size": Int(1, 64), "growth_rate": Int(1, 1024),
            "num_init_features": Int(1, 4096), "attention_dropout": fraction},
        "timm": {"num_classes": classes, "in_chans": Int(1, 4), "drop_rate": fraction, "drop_path_rate": fraction,
                 "global_pool": Str(choices=("avg", "max", "avgmax", "catavgmax", "token", ""))},
    }


def record_source(record: dict[str, Any], where: str = "the atlas") -> str:
    """The source a manifest's model record rebuilds from, checked against its name: a name that is not
    its source's (an own model named 'os:system', a torchvision name that torchvision does not build) is
    refused in one line, so that a record never reaches a builder it does not name."""
    name, source = record.get("name"), record.get("source")
    if source is None:  # format 1 recorded no source: only our names and torchvision's existed then
        source = "atlas" if name in _OWN else "torchvision"
    if source in ("file", "module", "object"):
        return source
    belongs = {"atlas": lambda: name in _OWN, "torchvision": lambda: from_torchvision.is_name(name),
               "timm": lambda: from_timm.is_spec(name) and from_timm.is_registered(name)}[source]
    if not isinstance(name, str) or not belongs():
        raise AtlasError(f"{where}: manifest.json field model.name {name!r} is not a model of source "
                         f"'{source}' (our own: {', '.join(_OWN)}; torchvision's classification models by name; "
                         "timm:NAME from timm's registry)")
    return source


def unvetted(record: dict[str, Any], where: str = "the atlas") -> str | None:
    """What rebuilding the record would run beyond the closed set (for the consent line), or None when it
    is a builder of ours, torchvision's or timm's with options from its allow-list. Raises for a record
    that names no model of its source."""
    source = record_source(record, where)
    if source == "file":
        return f"the file '{record.get('path')}' ({record.get('factory')}())"
    if source == "module":
        return f"the Python module '{record.get('module')}' ({record.get('factory')}())"
    if source == "object":
        return None  # nothing to run: the module must be passed again (consent.refusal says so)
    allowed = _allowed_options()[source]
    if source == "atlas":  # our classes' own signatures bound what they take
        allowed = {k: v for k, v in allowed.items() if k in inspect.signature(_OWN[record["name"]][0]).parameters}
    for key, value in (record.get("kwargs") or {}).items():
        rule = allowed.get(key)
        if rule is None:
            return f"{record['name']} with the option {key}={value!r}, which atlas does not vet for {source} models"
        try:
            rule.check(value, f"model.kwargs.{key}")
        except AtlasError as e:
            raise AtlasError(f"{where}: manifest.json {e}") from None
    return None


def rebuild(record: dict[str, Any], state: dict[str, torch.Tensor] | None = None, seed: int = 0,
            label: str = "the atlas's model/state.pt") -> nn.Module:
    """The model a manifest's record describes, built as it was built, with `state` (every key: the
    atlas's own copy of the whole model), else randomly initialised from `seed`. For code the caller has
    the user's consent (atlas.models.consent); the code must still be the file that was recorded, or the
    model might differ from the atlas's in ways no weight shows."""
    source = record_source(record, label)
    kwargs = dict(record.get("kwargs") or {})
    if source == "object":
        raise AtlasError(f"a model passed from Python ({record.get('class')}) cannot be rebuilt: pass it again, "
                         "atlas.open(path, model=<the nn.Module>)")
    # the code the consent was asked for (consent.refusal names these fields), never the name as typed
    name = record["name"]
    if source == "file":
        name = f"{record['path']}:{record['factory']}"
    elif source == "module":
        name = f"{record['module']}:{record['factory']}"
    if source in ("file", "module"):
        _check_unchanged(record)
    model = _load(name, source, state, {}, None, label, None, seed, kwargs)
    # what the atlas was built from, not the copy it was rebuilt from
    model.atlas_meta.update({k: record.get(k) for k in ("weights", "weights_sha256", "random_init")})
    return model


def _check_unchanged(record: dict[str, Any]) -> None:
    path = record.get("path")
    if record.get("source") == "module":
        if not path:
            return  # a module without a file (a namespace's, a builtin): nothing to compare
        spec = from_code.CodeSpec("module", record["module"], record["factory"])
        path = getattr(from_code.factory_of(spec)[1], "__file__", None) or path
    if not path or not Path(path).is_file():
        raise AtlasError(f"the model code '{path}' that this atlas was built from is gone: pass the model from "
                         "Python, atlas.open(path, model=<the nn.Module>)")
    if record.get("sha256") and file_sha256(path) != record["sha256"]:
        raise AtlasError(f"the model code '{path}' has changed since this atlas was built (its sha256 differs): "
                         "pass the model from Python, atlas.open(path, model=<the nn.Module>), or rebuild the atlas")


def feature_options(name: str) -> list[str]:
    """The constructor options of model `name` beyond num_classes and dropout that change its features
    (what an atlas must record to rebuild them): [] for the other sources (format 1 knew only ours and
    torchvision's, whose features the name fixes)."""
    if name not in _OWN:
        return []
    return [p for p in inspect.signature(_OWN[name][0]).parameters if p not in ("num_classes", "dropout")]
