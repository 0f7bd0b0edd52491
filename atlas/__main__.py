"""`python -m atlas ...` (and `torchrun ... -m atlas build ...`) runs the CLI."""
from .cli import run

run()
