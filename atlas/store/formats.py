"""The tool's version and the atlas format version it writes (atlas.store says which it reads)."""

__version__ = "0.1.0"
FORMAT_VERSION = 2  # 2: the manifest records the model's constructor options (model.kwargs)
