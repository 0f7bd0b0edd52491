"""The one exception type the CLI turns into a single line and a non-zero exit.

Library code raises `AtlasError` for every *expected* failure (bad input, a
missing file, an atlas of another format). Anything else is a bug and is
allowed to show its traceback.
"""


class AtlasError(Exception):
    """An expected failure, described in one line that names the input."""

    exit_code = 2
