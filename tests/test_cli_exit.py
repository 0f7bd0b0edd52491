"""The CLI's own process ends without the interpreter's teardown (cli.base._exit_now), and loses nothing
by it: the exit status, every line written, the exit handlers a command's libraries registered (a
temporary folder's cleanup among them). Each case runs a real process."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a command added to the CLI for the test: it leaves a temporary folder to its finaliser, registers an
# exit handler, owns an object whose __del__ only the interpreter's teardown would call, writes 20,000
# lines, then ends as asked (argv[2])
DRIVER = textwrap.dedent("""
    import atexit, sys, tempfile
    import click
    from atlas.cli import base

    class Teardown:
        def __del__(self):
            print("teardown ran", flush=True)

    KEEP = Teardown()

    @base.main.command("probe")
    @click.argument("how")
    def probe(how):
        probe.tmp = tempfile.TemporaryDirectory(prefix="atlas-exit-probe-")
        print("tmp", probe.tmp.name)
        atexit.register(lambda: print("handler ran", flush=True))
        for i in range(20000):
            print(f"line {i}")
        if how == "fail":
            raise RuntimeError("a bug")
        if how == "three":
            sys.exit(3)
        if how == "text":
            sys.exit("said why")
        if how == "distributed":  # a torchrun rank's process group: the usual teardown
            import types
            sys.modules["torch.distributed"] = types.SimpleNamespace(is_available=lambda: True,
                                                                   is_initialized=lambda: True)

    sys.argv = ["atlas", "probe", sys.argv[1]]
    base.run()
""")


def _run(how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, how], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


@pytest.mark.parametrize("how,status", [("ok", 0), ("three", 3), ("text", 1), ("fail", 1)])
def test_the_status_the_output_and_the_exit_handlers_survive_the_quick_exit(how, status):
    p = _run(how)
    assert p.returncode == status, p.stderr
    lines = p.stdout.splitlines()
    tmp = Path(next(ln for ln in lines if ln.startswith("tmp "))[4:])
    assert "line 19999" in lines and sum(ln.startswith("line ") for ln in lines) == 20000
    assert "handler ran" in lines
    assert not tmp.exists()  # its finaliser ran, as an exit handler
    assert "teardown ran" not in lines  # the interpreter's teardown was skipped
    if how == "fail":
        assert "RuntimeError: a bug" in p.stderr
    if how == "text":
        assert "said why" in p.stderr


def test_a_torchrun_rank_ends_with_the_interpreters_teardown():
    p = _run("distributed")
    assert p.returncode == 0, p.stderr
    assert "handler ran" in p.stdout and "teardown ran" in p.stdout


def test_a_python_caller_keeps_its_process():
    """main() from Python (tests, notebooks) never ends the caller's process."""
    code = textwrap.dedent("""
        from click.testing import CliRunner
        from atlas.cli import main
        r = CliRunner().invoke(main, ["--version"])
        print("still here", r.exit_code)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "still here 0" in p.stdout, p.stderr
