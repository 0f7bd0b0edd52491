"""The `atlas` group, its error handling, and the options and value types every command shares.

The option names and their meanings are the vocabulary (atlas/cli/vocabulary.py, the table in `atlas help vocabulary`);
the shared options are defined here once, so that each means one thing and takes one kind of value
wherever it appears. Old spellings (vocabulary.DEPRECATIONS) are added to their command by
AtlasCommand: hidden from --help, working, with one warning line on stderr.
"""
from __future__ import annotations

import atexit
import os
import re
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from ..util import bounds
from ..errors import AtlasError
from ..util.output import FORMATS
from .vocabulary import VOCABULARY, Deprecation, deprecations_for
from ..choices import OCCLUDER_FILLS as FILLS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
TUTORIAL_ORDER = ["demo", "build", "info", "layers", "channels", "top", "show", "filters", "sql", "queries",
                  "similar", "index", "export", "train", "evolution", "compare-filters", "compare", "matches", "occlude", "invariance",
                  "correspondence", "make-shapes", "help"]


def _say(msg: str) -> None:
    click.echo(msg, err=True)


# flags that consent to something risky: running an atlas's model code, DuckDB's full access, replacing a folder
CONSENTS = {"--trust-code", "--unsafe-full-duckdb", "--overwrite"}


class AtlasCommand(click.Command):
    """A command of the vocabulary: its deprecated spellings work, hidden, with one warning on stderr.

    For each vocabulary.Deprecation of the command, an old spelling that is not an option of its own gets a
    hidden option parsed like the new one; after parsing its value moves to the new option (both given:
    one line asking for one). A deprecation `when` another option is given (similar's --layer with
    --channel) moves the old option's value to the new one only then."""

    def __init__(self, name, *args, **kwargs):
        super().__init__(name, *args, **kwargs)
        # consents last in --help (after what the command does and how it prints): a reader meets them
        # once they know what they would be consenting to
        consent = [q for q in self.params if isinstance(q, click.Option) and set(q.opts) & CONSENTS]
        self.params = [q for q in self.params if q not in consent] + consent
        self.deprecations: tuple[Deprecation, ...] = deprecations_for(name or "")
        for d in self.deprecations:
            if d.when is not None:
                continue
            new = self._option(d.new) if d.new else None
            if d.new and new is None:
                raise TypeError(f"atlas {name}: deprecation {d.old[0]} names {d.new}, which it does not have")
            self.params.append(click.Option([*d.old, d.dest], type=new.type if new else click.STRING,
                                            multiple=bool(new and new.multiple), default=None, hidden=True,
                                            expose_value=True))

    def _option(self, spelling: str) -> click.Option | None:
        return next((p for p in self.params if isinstance(p, click.Option)
                     and spelling in (*p.opts, *p.secondary_opts)), None)

    def parse_args(self, ctx, args):
        typed = list(args)
        rest = super().parse_args(ctx, args)
        for d in self.deprecations:
            self._apply(ctx, d, typed)
        # every number the user typed, in its range before any work (atlas/util/bounds.py says why)
        for p in self.params:
            if p.name in bounds.BOUNDS and isinstance(ctx.params.get(p.name), int):
                bounds.check(p.name, ctx.params.get(p.name), p.opts[0] if isinstance(p, click.Option) else p.name.upper())
        return rest

    def _apply(self, ctx, d: Deprecation, typed: list[str]) -> None:
        given = lambda name: ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,  # noqa: E731
                                                                 ParameterSource.ENVIRONMENT)
        new = self._option(d.new) if d.new else None
        if d.when is None:
            value = ctx.params.pop(d.dest, None)
            if not given(d.dest):
                return
        else:
            old, cond = self._option(d.old[0]), self._option(d.when)
            if not given(old.name) or ctx.params.get(cond.name) is None:
                return
            value, ctx.params[old.name] = ctx.params[old.name], None
        spelled = _spelled(typed, d.old)
        if new is not None and given(new.name):
            raise AtlasError(f"give {d.new} or {spelled} (its old spelling), not both")
        _say(d.warning(spelled))
        if new is not None:
            ctx.params[new.name] = value


def _spelled(args: list[str], spellings: tuple[str, ...]) -> str:
    """Which of an option's spellings the user typed (for the warning), else its first."""
    for tok in args:
        if tok == "--":
            break
        for s in spellings:
            if tok == s or tok.startswith(s + "=") or (not s.startswith("--") and tok.startswith(s)
                                                       and not tok.startswith("--")):
                return s
    return spellings[0]


class AtlasGroup(click.Group):
    """Turns expected failures into one line on stderr and a non-zero exit."""

    command_class = AtlasCommand

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AtlasError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except click.BadParameter as e:  # a value click refuses (a choice, a number, a missing option): one line
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # the file system said no: read-only atlas, full disk, a file where a folder goes
            where = f" '{e.filename}'" if e.filename else ""
            click.echo(f"Error: cannot write or read{where}: {e.strerror or e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted. A build or training run continues where it stopped with --resume.", err=True)
            sys.exit(130)

    def list_commands(self, ctx):
        known = [c for c in TUTORIAL_ORDER if c in self.commands]  # the order of a first session, not A-Z
        return known + [c for c in self.commands if c not in known]


OWN_PROCESS = False  # set by `run`: the process is the CLI's alone, not a Python caller's


def run() -> None:
    """The `atlas` command and `python -m atlas`: the CLI in a process of its own (main() may also be
    called from Python, by tests and notebooks, whose process a command must leave as it found it)."""
    global OWN_PROCESS, _EXIT_REGISTERED, _STATUS
    OWN_PROCESS = True
    if not _EXIT_REGISTERED:  # a second run in the process (a debugger's restart) keeps the first
        # registered first, so run last of the exit handlers: every other one registered from here on (a
        # library's, logging's, a temporary folder's finaliser) has run. `import atlas.cli` registers
        # none before this (tests/test_cli_exit.py holds it to that)
        atexit.register(_exit_now)
        _EXIT_REGISTERED = True
    try:
        main()
        _STATUS = 0
    except SystemExit as e:
        # what the process's status will be: an int's low byte (as CPython takes it), 0 for None, else 1
        _STATUS = 0 if e.code is None else e.code & 0xFF if isinstance(e.code, int) else 1
        raise
    except BaseException:  # a bug's traceback, printed by Python before the exit handlers run
        _STATUS = 1
        raise


_STATUS = 1  # the status `run` leaves with
_EXIT_REGISTERED = False


def _exit_now() -> None:
    """End the CLI's process once its exit handlers have run, without the interpreter's own teardown:
    tearing down torch's modules and the command's objects took 0.4 to 0.7 s after every command that
    loads torch (2 to 4 % of a zfnet build of 1,024 images), and none of it is the command's work; every
    file the command publishes is closed and renamed into place before this (util.files). Output that
    can no longer be written (a closed pipe) is dropped silently, with the command's status.

    The usual teardown is kept where something may still act in it: a torchrun rank (its process group),
    Python's development mode (its warnings of unclosed files), `python -i`, a tracer or profiler or
    coverage in the process, a preloaded library (LD_PRELOAD: a profiler's, which saves at exit), and
    ATLAS_FULL_EXIT=1."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return
    if (sys.flags.dev_mode or sys.flags.inspect or sys.gettrace() is not None or sys.getprofile() is not None
            or "coverage" in sys.modules or os.environ.get("LD_PRELOAD") or os.environ.get("ATLAS_FULL_EXIT")):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(_STATUS)


def keep_freed_memory_when_own() -> None:
    """util.device.keep_freed_memory, for a command whose process is its own: each batch then reuses the
    last one's memory. Never in a caller's process: the setting is process-wide and for good."""
    if OWN_PROCESS:
        from ..util.device import keep_freed_memory

        keep_freed_memory()


@click.group(cls=AtlasGroup, context_settings=CONTEXT)
@click.version_option(package_name="atlas")
def main():
    """Feature Atlas: what every channel of a CNN has learned, over a whole dataset.

    \b
    Start here:
      atlas demo                          make data, train a small ZFNet, build its atlas
      atlas build --model zfnet --weights zf.pt --data imgs/ --out my-atlas
      atlas info my-atlas                 what is in it
      atlas channels my-atlas conv5 --sort max --desc
      atlas top my-atlas conv5 17         the channel's strongest images
      atlas show my-atlas conv5 17        their DeconvNet projections beside the patches (figure 2)
      atlas sql my-atlas "SELECT * FROM channels WHERE max <= 0"
      atlas similar my-atlas --image-id 42
      atlas export my-atlas site/         a static site to browse and publish

    Every command explains itself: atlas COMMAND --help. The options mean the same in every command
    (`atlas help vocabulary`).
    """


# -- value types: parsed once here, refused in one line ------------------------------------------------
def _name(param) -> str:
    if param is None:
        return "the value"
    return param.opts[0] if param.param_type_name == "option" else param.human_readable_name


class AtLeastOne(click.ParamType):
    """A whole number >= 1, refused in one line (AtlasError) rather than click's usage block."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            try:
                n = int(str(value).strip())
            except ValueError:
                n = None
        if n is None or n < 1:
            raise AtlasError(f"{_name(param)} must be a whole number of at least 1 (got '{value}')")
        return n


class _Parts(click.ParamType):
    """A comma list, parsed part by part (`parse`); a list given from Python passes as it is."""

    example = ""

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        out = self.parse([s.strip() for s in str(value).split(",") if s.strip()], value, param)
        if not out:
            raise AtlasError(f"{_name(param)} is empty: give {self.example}")
        return out

    def parse(self, parts: list[str], value, param) -> list:
        raise NotImplementedError


class CommaList(_Parts):
    """A comma list of names (`conv1,conv3`) -> ["conv1", "conv3"]; the library checks the names."""

    name = "list"
    example = "a comma list like conv1,conv3"

    def parse(self, parts, value, param):
        return parts


class NumberList(_Parts):
    """Whole numbers >= 0 and ranges, `0-15,17` -> [0, 1, ..., 15, 17], in the order given, each once."""

    name = "numbers"
    example = "numbers like 0,5,9 or ranges like 0-15"

    def parse(self, parts, value, param):
        out: list[int] = []
        for part in parts:
            m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                raise AtlasError(f"{_name(param)}: '{part}' is not a whole number >= 0 or a range like 0-15 "
                                 f"(got '{value}')")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            out += [n for n in range(lo, hi + 1) if n not in out]
        return out


class LayerChannel(click.ParamType):
    """`LAYER:CHANNEL` (conv5:17) -> ("conv5", 17); the atlas checks that the layer and channel exist."""

    name = "LAYER:CHANNEL"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        layer, _, c = str(value).strip().rpartition(":")
        if not layer or not re.fullmatch(r"-?\d+", c.strip()):
            raise AtlasError(f"channel '{value}' is not LAYER:CHANNEL (e.g. conv5:17)")
        return layer.strip(), int(c)


class Device(click.ParamType):
    """auto, cpu, cuda or cuda:N (atlas.util.device.check_device: the one message for anything else)."""

    name = "auto|cpu|cuda|cuda:N"

    def convert(self, value, param, ctx):
        from ..util.device import check_device  # torch-free

        return check_device(value)


# -- shared options: one definition each ------------------------------------------------------------------
def format_option(f=None, *, default: str | None = "table", help: str | None = None):
    """--format table|csv|json. Listings default to a table; a command whose usual output is a path or a
    summary passes default=None and a `help` that says what it prints with and without --format."""
    def deco(fn):
        return click.option("--format", "fmt", type=click.Choice(FORMATS), default=default,
                            show_default=default is not None,
                            help=help or "Print as an aligned table, CSV or strict JSON.")(fn)
    return deco(f) if f is not None else deco


def _trust_code(ctx, param, value):
    """--trust-code: consent, for this command only, to run the code an atlas's model was built from."""
    if value:
        from ..models.consent import trust_command  # torch-free

        trust_command(True)
        ctx.call_on_close(lambda: trust_command(False))
    return value


def atlas_argument(f):
    """The ATLAS argument, and --trust-code with it: every command that opens an atlas may open its model."""
    f = click.option("--trust-code", is_flag=True, expose_value=False, callback=_trust_code,
                     help="Run the model code this atlas was built from (FILE.py:FACTORY or package.module:"
                     "FACTORY, recorded in its manifest) when the command needs the model. Without it such "
                     "an atlas refuses, saying which file would run.")(f)
    return click.argument("atlas_path", metavar="ATLAS", type=click.Path(path_type=Path))(f)


def _open(path: Path):
    from ..facade import Atlas

    return Atlas(path)


def device_option(f):
    return click.option("--device", type=Device(), default="auto", show_default=True, metavar=Device.name,
                        help="Where the model runs: auto (the GPU when there is one, else the CPU), cpu, cuda "
                        "or cuda:N.")(f)


def contrast_norm_option(f):
    return click.option("--contrast-norm/--no-contrast-norm", "contrast_norm", default=None,
                        help="The paper's local contrast normalisation after pool1 and pool2, on or off "
                        "(default: the model's own: on for zfnet and alexnet-single, off for zfnet-mini; "
                        "a checkpoint's choice). Only for models that have it.")(f)


def term_help(option: str) -> str:
    """An option's help as the vocabulary says its one meaning: written once, there."""
    meaning = next(t.meaning for t in VOCABULARY if t.option == option)
    return meaning[0].upper() + meaning[1:] + "."


def progress_option(f):
    return click.option("--progress/--no-progress", default=None, help=term_help("--progress"))(f)


def out_option(f):
    return click.option("--out", type=click.Path(path_type=Path),
                        help="Folder for the PNGs (default: inside the atlas, under analyses/).")(f)


def layers_option(help_text: str):
    return click.option("--layers", type=CommaList(), metavar="L1,L2,...", help=help_text)


def fill_option(f):
    return click.option("--fill", type=click.Choice(FILLS), default="grey", show_default=True,
                        help="The colour of what is blanked out: grey (mid-grey, the paper's) or mean (the "
                        "dataset's mean colour, an all-zero model input).")(f)


def cache_option(f):
    return click.option("--cache", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                        help="Picture cache folder to use instead of the atlas's own (default: the atlas's, or "
                        "~/.cache/atlas/pictures when the atlas cannot be written).")(f)


def seed_option(what: str):
    return click.option("--seed", type=int, default=0, show_default=True, metavar="N",
                        help=f"Seed of {what}: the same seed gives the same result.")


def batch_size_option(help_text: str, default: int | None = None):
    return click.option("--batch-size", type=int, default=default, show_default=default is not None,
                        metavar="N", help=help_text)


def workers_option(f):
    return click.option("--workers", type=int, metavar="N",
                        help="Image decoding processes; 0: none, this process decodes (build: in "
                        "threads, while the model is idle) (default: by device and cores).")(f)


def image_size_option(f):
    return click.option("--image-size", type=int, metavar="PIXELS",
                        help="The model's input side, for models that take several (zfnet-mini: 32 to 64; "
                        "default: the model's own).")(f)
