"""The `atlas` command line: small commands, the same option names everywhere.

Each command parses its options and calls one library function; anything a
command does, Python users can do through the same function. One module per
kind of command; `base` holds the group and the shared options.
"""
from . import analyses, browse, make, publish, search, training  # noqa: F401  (each registers its commands)
from .base import main

__all__ = ["main"]
