"""Running the CLI in tests: its output, and the one-line refusal every expected failure must be."""
import json

from click.testing import CliRunner

from atlas.cli import main


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res, res.output.strip()


def ok(*args) -> str:
    res, text = run(*args)
    assert res.exit_code == 0 and res.exception is None, text
    return res.stdout


def one_line_error(*args) -> str:
    res, text = run(*args)
    assert res.exit_code != 0, text
    # CliRunner swallows an unexpected exception's traceback: an exception other than the exit is a bug too
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("Error: "), text
    return text


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def same_picture(copy, cached) -> bool:
    """Whether `copy` (what --out wrote) is the cached picture: the same bytes, or the picture titled for a
    slide (a single projection, a feature visualisation), which keeps all of the cached picture's PNG text."""
    from pathlib import Path

    from PIL import Image

    if Path(copy).read_bytes() == Path(cached).read_bytes():
        return True
    with Image.open(copy) as a, Image.open(cached) as b:
        return "atlas.title" in a.text and all(a.text.get(k) == v for k, v in b.text.items())
