"""Your own model: `path/to/net.py:make_model` or `package.module:make_model`, a factory that returns a
`torch.nn.Module`, or the module itself passed from Python (`atlas.build.build(model=net, ...)`).

Naming the code on the command line (or passing it from Python) is the user's consent to run it. An atlas
records where the code was and its sha256 so that it can be rebuilt; reopening it runs that code only
with consent again (atlas.models.consent), and only if the file is still the one that was recorded.

The preprocessing of such a model is the options' (--image-size, --mean, --std) over the module's own
attributes: `image_size` (the crop side), `resize` (the short side before the crop; default the crop),
`mean` and `std` (default ImageNet's).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from ..errors import AtlasError
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, describe, make
from .weights import file_sha256

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_IDENT}(\.{_IDENT})*")


class CodeSpec(NamedTuple):
    source: str        # "file" or "module"
    target: str        # the file's path as given, or the module's dotted name
    factory: str


def parse(spec: str) -> CodeSpec | None:
    """FILE.py:FACTORY or package.module:FACTORY; None for anything else."""
    target, sep, factory = spec.rpartition(":")
    if not sep or not target or not re.fullmatch(_IDENT, factory):
        return None
    if target.endswith(".py") or "/" in target or os.sep in target:
        return CodeSpec("file", target, factory)
    if _DOTTED.fullmatch(target):
        return CodeSpec("module", target, factory)
    return None


@contextlib.contextmanager
def _importable_from(folder: Path):
    """The file's own folder on sys.path while it runs, so that it can import its neighbours."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_file(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"model file '{path}' does not exist")
    resolved = path.resolve()
    # one module per file and content: a file edited since is loaded anew, not taken from sys.modules
    name = "atlas_user_model_" + hashlib.sha256(f"{resolved}:{file_sha256(resolved)}".encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise AtlasError(f"model file '{path}' is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it runs
    try:
        with _importable_from(resolved.parent):
            spec.loader.exec_module(module)
    except Exception as e:  # the user's code may raise anything: one line saying where
        del sys.modules[name]
        raise AtlasError(f"model file '{path}' failed to run: {_first_line(e)}") from None
    return module


def load_module(dotted: str):
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        # the `atlas` script, unlike `python -m`, has no working directory on sys.path
        if e.name and dotted.split(".")[0] == e.name.split(".")[0] and os.getcwd() not in sys.path:
            with _importable_from(Path(os.getcwd())):
                with contextlib.suppress(ModuleNotFoundError):
                    return importlib.import_module(dotted)
        raise AtlasError(f"model module '{dotted}' cannot be imported: {_first_line(e)}") from None
    except Exception as e:
        raise AtlasError(f"model module '{dotted}' failed to import: {_first_line(e)}") from None


def factory_of(spec: CodeSpec):
    """(the factory, the module it is in, where the code is in words)."""
    module = load_file(spec.target) if spec.source == "file" else load_module(spec.target)
    where = f"model file '{spec.target}'" if spec.source == "file" else f"model module '{spec.target}'"
    fn = getattr(module, spec.factory, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        has = f" (it defines {', '.join(defined[:8])})" if defined else ""
        raise AtlasError(f"{where} has no '{spec.factory}'{has}")
    if not callable(fn):
        raise AtlasError(f"'{spec.factory}' in {where} is not a function (it is a {type(fn).__name__})")
    return fn, module, where


def accepts(fn, option: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    # only a named parameter: a factory taking **kwargs may pass them to a class that has no such option
    return option in params


def call_factory(spec: CodeSpec, kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    fn, module, where = factory_of(spec)
    folder = Path(module.__file__).resolve().parent if getattr(module, "__file__", None) else Path.cwd()
    try:
        with _importable_from(folder):
            model = fn(**kwargs)
    except TypeError as e:
        raise AtlasError(f"{spec.factory}() in {where} does not take these options "
                         f"({', '.join(sorted(kwargs)) or 'none'}): {_first_line(e)}") from None
    except Exception as e:
        raise AtlasError(f"{spec.factory}() in {where} failed: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise AtlasError(f"{spec.factory}() in {where} returned a {type(model).__name__}, not a torch.nn.Module")
    return model, module


def record(spec: CodeSpec, module) -> dict[str, Any]:
    """Where the code is, for the manifest: the file's absolute path and sha256 (a module's file too)."""
    file = getattr(module, "__file__", None)
    out: dict[str, Any] = {"factory": spec.factory}
    if spec.source == "file":
        out["path"] = str(Path(spec.target).resolve())
    else:
        out["module"] = spec.target
        out["path"] = str(Path(file).resolve()) if file else None
    out["sha256"] = file_sha256(out["path"]) if out["path"] and Path(out["path"]).is_file() else None
    return out


def class_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _side(value: Any) -> int | None:
    """An `image_size` attribute as one side: 64, (64, 64) or timm's (3, 64, 64)."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        sides = [int(v) for v in value][-2:]
        if len(set(sides)) != 1:
            raise AtlasError(f"the model's image_size {tuple(value)} is not square: the atlas crops square "
                             "images; pass --image-size")
        return sides[0]
    return int(value)


def _triple(model: nn.Module | None, attr: str) -> tuple[float, ...] | None:
    value = getattr(model, attr, None) if model is not None else None
    if value is None:
        return None
    values = value.tolist() if hasattr(value, "tolist") else value
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise AtlasError(f"the model's {attr} {values} is not three numbers (one per RGB channel)")
    return tuple(values)


def preprocessing(model: nn.Module | None, name: str, image_size: int | None) -> dict[str, Any]:
    """The module's own attributes, the size from --image-size when it says none (else an error)."""
    own = _side(getattr(model, "image_size", None) or getattr(model, "input_size", None)) if model is not None \
        else None
    crop = int(image_size) if image_size is not None else own
    if crop is None:
        raise AtlasError(f"model '{name}' does not say its input size: pass --image-size PIXELS (or give the "
                         "module an `image_size` attribute)")
    resize = getattr(model, "resize", None) if model is not None else None
    resize = int(round(crop * int(resize) / own)) if resize and own else crop
    mean, std = _triple(model, "mean"), _triple(model, "std")
    said = [a for a in ("image_size", "mean", "std") if model is not None and getattr(model, a, None) is not None]
    why = f"the module's {', '.join(said)}" if said else ""
    if mean is None or std is None:
        why = (why + "; " if why else "") + "ImageNet's mean and std where the module says none"
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    return make(resize, crop, mean, std, describe(resize, crop, mean, std, why))
