"""Where models come from: our architectures, torchvision's, timm's and the user's own code, each with
the weight files it is found with (atlas/models/registry.py says which module does what).

The names below load on first use, so that `atlas.models.consent` (which opening an atlas and
`atlas --help` read) imports no torch.
"""
import importlib

_EXPORTS = {"ZFNet": "zfnet", "ZFNetMini": "zfnet", "AlexNetSingle": "zfnet", "load_model": "registry",
            "model_names": "registry", "preprocessing_for": "registry", "model_record": "registry"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'atlas.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
