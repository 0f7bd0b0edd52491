"""The `atlas` group, its error handling, and the options every command shares."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import AtlasError
from ..output import FORMATS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
TUTORIAL_ORDER = ["demo", "build", "info", "layers", "channels", "top", "show", "filters", "sql", "queries",
                  "similar", "index", "export", "train", "evolution", "compare-filters", "occlude", "invariance",
                  "correspondence", "make-shapes"]


class AtlasGroup(click.Group):
    """Turns expected failures into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AtlasError as e:
            click.echo(f"Error: {e}", err=True)
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

    Every command explains itself: atlas COMMAND --help.
    """


# -- shared options ------------------------------------------------------------
def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                        help="Output as an aligned table, CSV or JSON.")(f)


def atlas_argument(f):
    return click.argument("atlas_path", metavar="ATLAS", type=click.Path(path_type=Path))(f)


def _open(path: Path):
    from ..facade import Atlas

    return Atlas(path)


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def device_option(f):
    return click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")(f)


def contrast_norm_option(f):
    return click.option("--contrast-norm/--no-contrast-norm", "contrast_norm", default=None,
                        help="The paper's local contrast normalisation after pool1 and pool2, on or off "
                        "(default: the model's own: on for zfnet and alexnet-single, off for zfnet-mini; "
                        "a checkpoint's choice). Only for models that have it.")(f)


def progress_option(f):
    return click.option("--progress/--no-progress", default=None,
                        help="Progress with images/s and ETA: a bar on a terminal, a line every 5 s otherwise "
                        "(a log file); on by default.")(f)


def out_option(f):
    return click.option("--out", type=click.Path(path_type=Path),
                        help="Folder for the PNGs (default: inside the atlas, under analyses/).")(f)
