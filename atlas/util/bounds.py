"""The ranges of the numbers a user (or a script, or a manifest) gives: each checked before any work.

A number far outside what the tool can do is refused in one line instead of becoming a huge allocation,
a thousand worker processes or a traceback an hour in: `--workers 100000` would start processes until
the machine gives out, `--k 9223372036854775807` would ask torch for exabytes. The CLI checks every
option named here as it parses (cli/base.py); the library checks the same table (BuildOptions and the
functions the options reach), so Python users get the same line.

Plain data and one function: importing it imports nothing heavy.
"""
from __future__ import annotations

import os

from ..errors import AtlasError

SEED_MAX = 2 ** 32 - 1  # numpy's and the samplers' seeds
IMAGE_ID_MAX = 2 ** 31 - 1  # images.image_id is an int32
WORKERS_PER_CORE = 4  # decoding workers only read and decode; more than a few per core only costs memory


def workers_max() -> int:
    return WORKERS_PER_CORE * (os.cpu_count() or 1)


# option name (as click names the parameter) -> (least, most); most may be a function of the machine
BOUNDS: dict[str, tuple[int, object]] = {
    "k": (1, 1024),
    "batch_size": (1, 4096),
    "chunk_size": (1, 1 << 20),
    "workers": (0, workers_max),
    "image_size": (8, 4096),
    "seed": (0, SEED_MAX),
    "image_id": (0, IMAGE_ID_MAX),
    "side": (8, 1024),
    "size": (8, 1024),
    "limit": (1, 1_000_000),
    "epochs": (1, 100_000),
    "steps": (1, 100_000),
    "count": (1, 10_000_000),
    "images": (1, 10_000_000),
    "max_rows": (0, 10 ** 9),
    "occluder_size": (1, 4096),
    "stride": (1, 4096),
    "max_channels": (1, 1 << 20),
    "random_draws": (1, 10_000),
    "resize": (8, 8192),
    "crop": (8, 4096),
    "per_layer": (1, 1024),
    "cell": (8, 1024),
    "fft_size": (8, 4096),
    "lr_patience": (0, 10_000),
}


def limits(name: str) -> tuple[int, int]:
    least, most = BOUNDS[name]
    return least, int(most() if callable(most) else most)


def check(name: str, value, flag: str | None = None):
    """`value` if it is a whole number in the range of option `name`, else one line naming the option
    (`flag`, default --NAME) and the range. None passes (an option left to its default)."""
    if value is None or name not in BOUNDS:
        return value
    flag = flag or f"--{name.replace('_', '-')}"
    least, most = limits(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AtlasError(f"{flag} takes a whole number from {least} to {most} (got {value!r})")
    if not least <= value <= most:
        raise AtlasError(f"{flag} must be from {least} to {most} (got {value})")
    return value
