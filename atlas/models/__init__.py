"""Model definitions and the loader that resolves a model name plus a weights file."""
from .zfnet import ZFNet, ZFNetMini, AlexNetSingle
from .registry import load_model, model_names, preprocessing_for

__all__ = ["ZFNet", "ZFNetMini", "AlexNetSingle", "load_model", "model_names", "preprocessing_for"]
