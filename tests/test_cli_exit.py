"""The CLI's own process ends without the interpreter's teardown (cli.base._exit_now), and loses nothing
by it: the exit status, every line written, the exit handlers a command's libraries registered (a
temporary folder's cleanup among them). Each case runs a real process."""
from __future__ import annotations

import os
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
        atexit.register(lambda: print("handler ran"))  # not flushed: _exit_now's flush must carry it
        for i in range(20000):
            print(f"line {i}")
        if how == "fail":
            raise RuntimeError("a bug")
        if how == "three":
            sys.exit(3)
        if how == "huge":  # beyond a C int: its low byte, as Python's own exit takes it
            sys.exit(2 ** 40 + 5)
        if how == "text":
            sys.exit("said why")
        if how == "distributed":  # a torchrun rank's process group (here of one rank): the usual teardown
            import torch.distributed as dist
            dist.init_process_group("gloo", init_method="file://" + probe.tmp.name + "/store", rank=0,
                                    world_size=1)

    sys.argv = ["atlas", "probe", sys.argv[1]]
    base.run()
""")


def _env(**more: str) -> dict[str, str]:
    """This environment less what would keep the usual ending or flush the output by itself."""
    drop = ("PYTHONUNBUFFERED", "PYTHONDEVMODE", "LD_PRELOAD", "ATLAS_FULL_EXIT", "COVERAGE_PROCESS_START")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **more}


def _run(how: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, how], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=_env(**env))


@pytest.mark.parametrize("how,status", [("ok", 0), ("three", 3), ("text", 1), ("fail", 1), ("huge", 5)])
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
    if how != "fail":
        assert "Traceback" not in p.stderr, p.stderr


def test_the_usual_ending_where_asked_for():
    p = _run("ok", ATLAS_FULL_EXIT="1")
    assert p.returncode == 0 and "handler ran" in p.stdout and "teardown ran" in p.stdout


def test_importing_the_cli_registers_no_exit_handler():
    """The quick exit's handler runs after those registered once `run` has begun: one registered while
    `atlas.cli` is imported (a weakref finaliser, logging's) would be skipped."""
    code = textwrap.dedent("""
        import atexit, sys, weakref
        before = atexit._ncallbacks()
        import atlas.cli
        print(atexit._ncallbacks() - before, weakref.finalize._registered_with_atexit,
              "logging" in sys.modules, "multiprocessing" in sys.modules)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=_env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0", "False", "False", "False"]


def test_a_usage_error_and_a_refusal_keep_their_status():
    p = subprocess.run([sys.executable, "-m", "atlas", "build", "--no-such-option"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env=_env())
    assert p.returncode == 2 and "no-such-option" in p.stderr
    p = subprocess.run([sys.executable, "-m", "atlas", "info", str(ROOT / "no-such-atlas")], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env=_env())
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and "no-such-atlas" in p.stderr


def test_a_process_group_keeps_the_interpreters_teardown():
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
