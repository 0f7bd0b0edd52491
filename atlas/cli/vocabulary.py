"""The command line's vocabulary: each option name with its one meaning, and the commands that take it.

This is the contract every command keeps (the manual's vocabulary topic, atlas/manual/vocabulary.md, shows it as a table made by `markdown_table()`:
python -c "from atlas.cli.vocabulary import markdown_table; print(markdown_table())"), and
tests/test_cli_vocabulary.py holds the commands to it:

* an option that two commands take is a `Term` here, with one meaning and one kind of value;
* a `Term` lists exactly the commands that take it (a new command that prints data, or runs long,
  must join `--format` or `--progress` here, in PRINTS_DATA / LONG);
* an option that only one command takes is in COMMAND_SPECIFIC under that command;
* an old spelling is a `Deprecation`: it keeps working, hidden from --help, with one warning line on
  stderr (atlas/cli/base.py's AtlasCommand adds and handles them).

Plain data: importing it imports nothing (it is read while `atlas --help` runs).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    option: str                 # the option as click knows it: its first long name ("--progress")
    spelling: str               # as the table shows it ("--progress/--no-progress")
    takes: str                  # what it takes ("" for a flag)
    meaning: str                # the one meaning, everywhere
    commands: tuple[str, ...]   # exactly the commands that take it
    same_type: bool = True      # every command parses it the same way (same click type, same choices)


# Commands that print data (rows, a summary, a record): each takes --format table|csv|json.
PRINTS_DATA = ("sql", "queries", "info", "layers", "channels", "top", "show", "filters", "similar", "index",
               "evolution", "compare-filters", "compare", "matches", "occlude", "invariance", "correspondence",
               "visualize")
# Commands that may run long (a pass over a dataset, training, a site, hundreds of occluded copies of an
# image, a deep net's pictures drawn cold): each takes --progress/--no-progress.
LONG = ("demo", "build", "make-shapes", "index", "export", "train", "evolution", "compare", "visualize", "occlude",
        "invariance", "correspondence", "show")

# Commands that open an atlas (cli/base.py's atlas_argument): each takes --trust-code.
OPENS_ATLAS = ("sql", "info", "layers", "channels", "top", "show", "filters", "similar", "index", "export",
               "occlude", "invariance", "correspondence", "visualize")

VOCABULARY: tuple[Term, ...] = (
    Term("--out", "--out", "PATH",
         "the file or folder the command writes (an atlas, a training run, a PNG, a folder of PNGs: the "
         "command's --help says which, and its default)",
         ("demo", "build", "train", "show", "filters", "evolution", "compare-filters", "compare", "matches",
          "occlude", "invariance", "correspondence", "visualize", "similar")),
    Term("--format", "--format", "table|csv|json",
         "how the command prints its data: an aligned table, CSV, or strict JSON (RFC 8259). Listings print a "
         "table by default; without --format, `show` and `filters` print the PNG's path and the analyses their "
         "summary (with it, paths and summaries go to stderr for CSV and JSON, so stdout stays parseable)",
         PRINTS_DATA),
    Term("--progress", "--progress/--no-progress", "",
         "progress on stderr with a rate and an ETA: a bar on a terminal, a line every 5 s otherwise (a log "
         "file); on by default. `show`, one batched step, says instead what it draws when a picture not in the "
         "cache takes over 2 s, then how long it took (by default on a terminal only)",
         LONG),
    Term("--device", "--device", "auto|cpu|cuda|cuda:N",
         "where the model runs; auto (the default): the GPU when there is one, else the CPU. Anything else is "
         "refused in one line",
         ("build", "index", "train", "evolution", "occlude", "invariance", "correspondence", "visualize")),
    Term("--k", "--k", "N",
         "only the top-k an atlas keeps: the strongest activations recorded per channel (default 9)",
         ("build",)),
    Term("--limit", "--limit", "N",
         "a number of results: print at most N (N >= 1)",
         ("channels", "similar")),
    Term("--layers", "--layers", "L1,L2,...",
         "the layers the command works on, always a comma list (default: the command's own, in its --help)",
         ("build", "index", "export", "evolution", "compare", "invariance", "correspondence")),
    Term("--layer", "--layer", "LAYER",
         "the one layer the command works on",
         ("similar", "occlude")),
    Term("--channels", "--channels", "C1,C2,A-B",
         "channel numbers and ranges, applied to each chosen layer, e.g. 0-15,17",
         ("export", "evolution", "visualize")),
    Term("--image-size", "--image-size", "PIXELS",
         "the model's input side, for models that take several (zfnet-mini: 32 to 64)",
         ("build", "train")),
    Term("--snapshot-epochs", "--snapshot-epochs", "E1,E2,...",
         "the list of snapshot epochs: `train` keeps those epochs' weights, `evolution` shows them "
         "(0: the initial weights)",
         ("train", "evolution")),
    Term("--fill", "--fill", "grey|mean",
         "the colour of what an analysis blanks out (the occluder; in invariance, what a transform "
         "uncovers): grey, the paper's, by default; mean: the dataset's mean colour",
         ("occlude", "invariance", "correspondence")),
    Term("--class", "--class", "CLASS",
         "the class charted: an output index of the model or one of its recorded class names "
         "(default: the true class when known, else the most probable)",
         ("occlude",)),
    Term("--classes", "--classes", "C1,C2,...",
         "the classes charted, one per image or one for all (each as in --class)",
         ("invariance",)),
    Term("--all", "--all", "",
         "every one, not a chosen few: layers lists every candidate layer of the model (what build's "
         "--layers takes); visualize renders every channel of the layer",
         ("layers", "visualize")),
    Term("--cache", "--cache", "DIR",
         "where pictures go instead of the atlas's own cache (for an atlas that cannot be written; "
         "default: the atlas's, else ~/.cache/atlas/pictures)",
         ("show", "filters", "export", "visualize")),
    Term("--scale", "--scale", "FACTOR",
         "a picture drawn this many times larger, cells and text alike (0.25 to 8; default 1; 2 fills a slide's "
         "width)",
         ("show", "filters", "similar")),
    Term("--display", "--display", "percentile|max",
         "how a projection's values become grey levels, zero mid-grey: percentile (the default) scales each "
         "by the 99.5th percentile of |v| inside its receptive field and clips the few larger values; max by "
         "its largest |v| (where one strong pixel can leave the rest near grey)",
         ("show", "export", "matches")),
    Term("--method", "--method", "deconvnet|guided",
         "how a projection goes down to pixels: deconvnet, the paper's (from the stored switches, no image "
         "needed), or guided backpropagation (each ReLU's forward on/off pattern too; reads the images; "
         "sharper where a net has few max-pools)",
         ("show",)),
    Term("--timeout", "--timeout", "SECONDS",
         "sql's time limit (default 30; 0: none)",
         ("sql",)),
    Term("--contrast-norm", "--contrast-norm/--no-contrast-norm", "",
         "the paper's local contrast normalisation on or off (default: the model's own, or the checkpoint's)",
         ("build", "train")),
    Term("--model", "--model", "NAME",
         "the model: zfnet, zfnet-mini, alexnet-single, any torchvision classification model by name, "
         "timm:NAME, or your own FILE.py:FACTORY / package.module:FACTORY (build); train and the demo train "
         "ours and any torchvision classification model",
         ("demo", "build", "train")),
    Term("--data", "--data", "DATA",
         "the images read: an image folder (a sub-folder per class, or flat), a CIFAR-10 folder, or `shapes`",
         ("build", "train", "evolution")),
    Term("--batch-size", "--batch-size", "N",
         "images per forward pass (in train: per SGD step)",
         ("build", "train", "evolution", "occlude", "visualize")),
    Term("--workers", "--workers", "N",
         "image-decoding processes; 0: the main process decodes (build: in threads while the model is idle) "
         "(default: by device and cores)",
         ("build", "train", "evolution")),
    Term("--precision", "--precision", "fp32|bf16",
         "the arithmetic of the forward pass: fp32, or bf16 autocast (train also takes auto: bf16 on CUDA)",
         ("build", "train"), same_type=False),
    Term("--seed", "--seed", "N",
         "the seed of everything random the command does: the same seed gives the same result",
         ("build", "make-shapes", "train", "correspondence", "visualize")),
    Term("--resume", "--resume", "",
         "continue an interrupted run of the same command, with the same options",
         ("build", "train")),
    Term("--overwrite", "--overwrite", "",
         "replace what --out holds (an existing atlas, run or comparison)",
         ("build", "train", "compare")),
    Term("--trust-code", "--trust-code", "",
         "run the model code an atlas was built from (FILE.py:FACTORY, package.module:FACTORY, named in its "
         "manifest) when the command needs the model; without it such an atlas refuses in one line",
         OPENS_ATLAS),
)

# Options only one command takes (a second command that needs one makes it a Term above).
COMMAND_SPECIFIC: dict[str, tuple[str, ...]] = {
    "demo": ("--quick",),
    "build": ("--weights", "--decode", "--no-activations", "--no-switches", "--index", "--index-layers",
              "--chunk-size", "--mean", "--std"),
    "make-shapes": ("--n", "--side"),
    "sql": ("--file", "--query", "--param", "--max-rows", "--unsafe-full-duckdb"),
    "info": ("--json",),
    "channels": ("--sort", "--desc"),
    "show": ("--rank", "--mode", "--norm", "--switches"),
    "similar": ("--image", "--image-id", "--channel", "--of-layer"),
    "export": ("--max-channels", "--feature-vis", "--compare", "--panels"),
    "train": ("--val", "--epochs", "--lr", "--momentum", "--weight-decay", "--dropout", "--init", "--renorm-radius",
              "--lr-patience", "--lr-factor", "--resize", "--crop", "--flip", "--ten-crop-eval", "--val-fraction",
              "--in-memory", "--memory-limit"),
    "evolution": ("--per-layer", "--select", "--cell", "--max-images", "--follow"),
    "compare-filters": ("--labels", "--dead-fraction", "--bands", "--fft-size"),
    "compare": ("--pairs",),
    "matches": ("--kind", "--atlas"),
    "occlude": ("--occluder-size", "--stride", "--forward"),
    "invariance": ("--transforms",),
    "correspondence": ("--images", "--random"),
    "visualize": ("--steps", "--preview", "--unit", "--diversity"),
}


@dataclass(frozen=True)
class Deprecation:
    """An old spelling that still works for now: hidden from --help, one warning line on stderr."""

    command: str
    old: tuple[str, ...]        # its spellings ("-k", "--k")
    new: str | None             # what to use instead; None: the option is ignored (`why` says so)
    when: str | None = None     # deprecated only together with this option (the old one is also a live
                                # option with another meaning)
    why: str = ""

    @property
    def dest(self) -> str:
        """The name the hidden option's value is parsed into (never a parameter of the command)."""
        return "deprecated_" + self.old[0].lstrip("-").replace("-", "_")

    def warning(self, spelled: str | None = None) -> str:
        old = spelled or self.old[0]
        if self.new is None:
            return f"warning: {old} is ignored: {self.why}"
        if self.when:
            return f"warning: {old} with {self.when} is deprecated: use {self.new}"
        return f"warning: {old} is deprecated: use {self.new}"


DEPRECATIONS: tuple[Deprecation, ...] = (
    Deprecation("similar", ("-k", "--k"), "--limit", why="--k is the top-k an atlas keeps"),
    Deprecation("similar", ("--layer",), "--of-layer", when="--channel",
                why="--layer is the layer an image query compares at; channel queries keep channels "
                    "of one layer with --of-layer"),
    Deprecation("make-shapes", ("--size",), "--side", why="--image-size is a model's input side"),
    Deprecation("occlude", ("--size",), "--occluder-size", why="--image-size is a model's input side"),
    Deprecation("occlude", ("--label",), "--class", why="one class, as --layer is one layer"),
    Deprecation("occlude", ("--method",), "--forward",
                why="--method is how a projection goes down to pixels (show --method deconvnet|guided)"),
    Deprecation("invariance", ("--labels",), "--classes",
                why="--labels names the models of compare-filters"),
    Deprecation("evolution", ("--epochs",), "--snapshot-epochs",
                why="--epochs is the number of epochs `atlas train` runs"),
    Deprecation("index", ("--batch-size",), None,
                why="a forward pass of `atlas index` runs in the build's own batches, so it computes the "
                    "build's numbers"),
)


def deprecations_for(command: str) -> tuple[Deprecation, ...]:
    return tuple(d for d in DEPRECATIONS if d.command == command)


def term(option: str) -> Term | None:
    return next((t for t in VOCABULARY if t.option == option), None)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The vocabulary as atlas/manual/vocabulary.md shows it (tests/test_cli_vocabulary.py compares the two)."""
    lines = ["| option | takes | one meaning everywhere | commands |", "|---|---|---|---|"]
    for t in VOCABULARY:
        takes = f"`{_cell(t.takes)}`" if t.takes else "flag"
        lines.append(f"| `{t.spelling}` | {takes} | {_cell(t.meaning)} | {', '.join(t.commands)} |")
    return "\n".join(lines)


def deprecation_table() -> str:
    """The old spellings and what replaced them, as atlas/manual/vocabulary.md lists them."""
    lines = ["| command | old spelling | use | why |", "|---|---|---|---|"]
    for d in DEPRECATIONS:
        old = " / ".join(f"`{o}`" for o in d.old) + (f" with `{d.when}`" if d.when else "")
        new = f"`{d.new}`" if d.new else "nothing: ignored"
        lines.append(f"| {d.command} | {old} | {new} | {_cell(d.why)} |")
    return "\n".join(lines)
