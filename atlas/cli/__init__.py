"""The `atlas` command line: small commands, the same option names everywhere.

Each command parses its options and calls one library function; anything a
command does, Python users can do through the same function. One module per
kind of command; `base` holds the group, the shared options and value types;
`vocabulary` is the contract they keep (each option name, its one meaning, the
commands that take it, the old spellings that still work).
"""
from . import analyses, browse, make, publish, search, training  # noqa: F401  (each registers its commands)
from . import visualize  # noqa: F401,E402  (feature visualization: atlas/cli/visualize.py)
from . import compare  # noqa: F401,E402  (comparing two atlases: atlas/cli/compare.py)
from . import manual  # noqa: F401,E402  (atlas help: the manual in atlas/manual/)
from .base import main, run

__all__ = ["main", "run"]
