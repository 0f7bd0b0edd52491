"""Feature Atlas: what every channel of a CNN has learned, over a whole dataset.

    import atlas
    model = atlas.load_model("zfnet", weights="zfnet.pt")
    a = atlas.open("my-atlas")
    a.sql("SELECT * FROM channels ORDER BY fire_rate LIMIT 5")
"""
from .store.formats import FORMAT_VERSION, __version__  # noqa: E402

from .errors import AtlasError  # noqa: E402


def load_model(name, weights=None, **kwargs):
    """The named model in eval mode, weights from the file `weights` (see atlas.models.registry)."""
    from .models.registry import load_model as _load  # torch is imported only when a model is needed

    return _load(name, weights, **kwargs)


def open(path, *, trust_code=False, model=None):  # noqa: A001 - the documented API name
    """Open an existing atlas folder (see `atlas.facade.Atlas`).

    An atlas whose model was built from your own code (FILE.py:FACTORY, package.module:FACTORY) rebuilds
    it only with trust_code=True (it runs the file its manifest names), or from `model`, the nn.Module
    itself (atlas.models.consent)."""
    from .facade import Atlas

    return Atlas(path, trust_code=trust_code, model=model)


__all__ = ["AtlasError", "load_model", "open", "__version__", "FORMAT_VERSION"]
