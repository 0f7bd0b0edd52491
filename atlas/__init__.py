"""Feature Atlas: what every channel of a CNN has learned, over a whole dataset.

    import atlas
    model = atlas.load_model("zfnet", weights="zfnet.pt")
    a = atlas.open("my-atlas")
    a.sql("SELECT * FROM channels ORDER BY fire_rate LIMIT 5")
"""
__version__ = "0.1.0"
FORMAT_VERSION = 1

from .errors import AtlasError  # noqa: E402
from .models import load_model  # noqa: E402


def open(path):  # noqa: A001 - the documented API name
    """Open an existing atlas folder (see `atlas.store.Atlas`)."""
    from .store import Atlas

    return Atlas(path)


__all__ = ["AtlasError", "load_model", "open", "__version__", "FORMAT_VERSION"]
