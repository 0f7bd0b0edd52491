"""One CLI vocabulary (atlas/cli/vocabulary.py): every command's options against it, the README's table
against it, `atlas build` / `atlas train` against BuildOptions / TrainOptions, and each old spelling
(it works, it warns once on stderr, it is hidden from --help)."""
import dataclasses
import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from atlas.cli import main
from atlas.cli.vocabulary import (COMMAND_SPECIFIC, DEPRECATIONS, LONG, PRINTS_DATA, VOCABULARY, Deprecation,
                                  deprecation_table, markdown_table, term)
from atlas.errors import AtlasError
from atlas.util.output import FORMATS

# the manual's vocabulary topic (`atlas help vocabulary`) holds the tables; README.md points to it
README = Path(__file__).resolve().parent.parent / "atlas" / "manual" / "vocabulary.md"
START, END = "<!-- cli-vocabulary:start -->", "<!-- cli-vocabulary:end -->"
OLD_START, OLD_END = "<!-- cli-deprecations:start -->", "<!-- cli-deprecations:end -->"
DEPRECATED_ALIASES = {(d.command, d.dest) for d in DEPRECATIONS if d.when is None}


def long_name(p: click.Option) -> str:
    return next(o for o in p.opts if o.startswith("--"))


def options(command: str, hidden: bool = False) -> dict[str, click.Option]:
    """The command's options by their first long name (`--progress` for --progress/--no-progress)."""
    return {long_name(p): p for p in main.commands[command].params
            if isinstance(p, click.Option) and p.hidden == hidden}


def signature(p: click.Option):
    """What an option takes, as click parses it."""
    choices = tuple(p.type.choices) if isinstance(p.type, click.Choice) else None
    return type(p.type).__name__, choices, p.is_flag, bool(p.secondary_opts), p.multiple


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res) -> str:
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.output, res.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# every command against the vocabulary
# ---------------------------------------------------------------------------------------------------------
def test_every_option_is_a_term_of_the_vocabulary_or_its_commands_own():
    stray = []
    for command in main.commands:
        for name in options(command):
            t = term(name)
            if t is not None:
                if command not in t.commands:
                    stray.append(f"{command} {name}: a term of the vocabulary, but the term does not list {command}")
            elif name not in COMMAND_SPECIFIC.get(command, ()):
                stray.append(f"{command} {name}: neither a term nor in COMMAND_SPECIFIC['{command}']")
    assert not stray, "\n".join(stray)


def test_each_term_lists_exactly_the_commands_that_take_it():
    for t in VOCABULARY:
        having = {c for c in main.commands if t.option in options(c)}
        assert having == set(t.commands), (t.option, "missing:", set(t.commands) - having,
                                           "not listed:", having - set(t.commands))
    assert len({t.option for t in VOCABULARY}) == len(VOCABULARY)


def test_an_option_of_one_command_is_that_commands_alone():
    # a second command taking a command-specific option must make it a term, with one meaning
    for command, names in COMMAND_SPECIFIC.items():
        assert command in main.commands, command
        for name in names:
            assert term(name) is None, f"{name} is both a term and specific to {command}"
            having = {c for c in main.commands if name in options(c)}
            assert having == {command}, (name, having)


def test_a_term_takes_one_kind_of_value_everywhere():
    for t in VOCABULARY:
        kinds = {signature(options(c)[t.option]) for c in t.commands}
        if t.same_type:
            assert len(kinds) == 1, (t.option, kinds)
    # the ones whose values are spelled out in the table, checked against it
    for c in term("--format").commands:
        assert tuple(options(c)["--format"].type.choices) == FORMATS
    for c in term("--fill").commands:
        opt = options(c)["--fill"]
        assert tuple(opt.type.choices) == ("grey", "mean") and opt.default == "grey", c
    for c in term("--device").commands:
        assert options(c)["--device"].default == "auto", c
    for name in ("--layers", "--channels", "--snapshot-epochs", "--classes"):  # comma lists, parsed alike
        for c in term(name).commands:
            assert options(c)[name].type.name in ("list", "numbers"), (c, name)


def test_commands_that_print_data_take_format_and_long_ones_progress():
    for c in PRINTS_DATA:
        assert "--format" in options(c), c
    for c in LONG:
        opt = options(c).get("--progress")
        assert opt is not None and opt.secondary_opts == ["--no-progress"] and opt.default is None, c
    assert set(PRINTS_DATA) | set(LONG) <= set(main.commands)


def test_every_option_says_what_it_takes_and_its_default():
    silent = []
    for command in main.commands:
        for name, p in options(command).items():
            if not (p.help or "").strip():
                silent.append(f"{command} {name}: no help")
                continue
            unset = p.default is None or p.default is getattr(click.core, "UNSET", None)
            # a value with a default, or --x/--no-x with the default left to the command: the help says it
            has_default = (not p.is_flag and not unset) or (bool(p.secondary_opts) and p.default is None)
            if has_default and not p.show_default and "default" not in p.help.lower():
                silent.append(f"{command} {name}: its default ({p.default!r}) is not shown")
    assert not silent, "\n".join(silent)


# ---------------------------------------------------------------------------------------------------------
# the README's table is the vocabulary's
# ---------------------------------------------------------------------------------------------------------
def readme_rows(readme: Path) -> dict[str, set[str]]:
    """The README table's rows between the markers: option -> the commands listed."""
    text = readme.read_text()
    assert START in text and END in text, (f"{readme} has no vocabulary table: put "
                                            "atlas.cli.vocabulary.markdown_table() between the lines "
                                            f"{START} and {END}")
    block = text.split(START, 1)[1].split(END, 1)[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) < 4 or set(cells[0]) <= set("-: ") or cells[0] == "option":
            continue
        name = re.search(r"`(--[a-z][a-z0-9-]*)", cells[0])
        assert name, f"README vocabulary row without an option: {line}"
        rows[name.group(1)] = {c.strip() for c in cells[-1].split(",") if c.strip()}
    return rows


def check_readme(readme: Path) -> None:
    rows = readme_rows(readme)
    names = {t.option for t in VOCABULARY}
    assert set(rows) == names, ("only in README:", set(rows) - names, "missing from README:", names - set(rows))
    for t in VOCABULARY:
        assert rows[t.option] == set(t.commands), (t.option, "README:", rows[t.option], "vocabulary:", t.commands)


def test_the_readme_table_lists_exactly_the_vocabulary():
    check_readme(README)


def test_the_table_made_for_the_readme_passes_the_check(tmp_path):
    made = tmp_path / "README.md"
    made.write_text(f"# atlas\n\n{START}\n{markdown_table()}\n{END}\n\n{OLD_START}\n{deprecation_table()}\n{OLD_END}\n")
    check_readme(made)
    check_readme_deprecations(made)


def check_readme_deprecations(readme: Path) -> None:
    text = readme.read_text()
    assert OLD_START in text and OLD_END in text, (f"{readme} has no table of old spellings: put "
                                                    "atlas.cli.vocabulary.deprecation_table() between the lines "
                                                    f"{OLD_START} and {OLD_END}")
    block = text.split(OLD_START, 1)[1].split(OLD_END, 1)[0]
    listed = set()
    for line in block.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) >= 3 and cells[0] not in ("command", "") and not set(cells[0]) <= set("-: "):
            listed.add((cells[0], re.search(r"`(-{1,2}[\w-]+)`", cells[1]).group(1)))
    assert listed == {(d.command, d.old[0]) for d in DEPRECATIONS}, listed


def test_the_readme_lists_the_old_spellings():
    check_readme_deprecations(README)


# ---------------------------------------------------------------------------------------------------------
# build and train: the flags are the options' fields
# ---------------------------------------------------------------------------------------------------------
def field_of(p: click.Option, fields: set[str]) -> str:
    name = long_name(p)[2:]
    if name.startswith("no-") and name[3:].replace("-", "_") in fields:
        name = name[3:]  # --no-activations <-> activations
    return name.replace("-", "_")


BUILD_OWN = {"model", "weights", "data", "out", "resume", "overwrite", "progress"}
TRAIN_OWN = {"model", "data", "val", "out", "resume", "overwrite", "progress"}


def test_build_options_are_the_fields_of_build_options():
    from atlas.build import BuildOptions

    fields = {f.name for f in dataclasses.fields(BuildOptions)}
    flags = {field_of(p, fields) for p in options("build").values()}
    assert flags == fields | BUILD_OWN, ("flags without a field:", flags - fields - BUILD_OWN,
                                         "fields without a flag:", fields - flags)


def test_train_options_are_the_fields_of_train_options():
    from atlas.train.run import TrainOptions

    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    flags = {field_of(p, fields) for p in options("train").values()}
    assert flags == fields | TRAIN_OWN, ("flags without a field:", flags - fields - TRAIN_OWN,
                                         "fields without a flag:", fields - flags)


def test_build_flags_reach_build_options(monkeypatch, tmp_path):
    import atlas.build
    from atlas.build import BuildOptions

    seen = {}
    monkeypatch.setattr(atlas.build, "build", lambda *a, **kw: seen.update(args=a, kw=kw) or tmp_path)
    res = run("build", "--model", "zfnet-mini", "--data", "imgs", "--out", tmp_path / "a", "--k", 3,
              "--layers", "conv1, conv2", "--batch-size", 5, "--chunk-size", 10, "--device", "cpu", "--workers", 1,
              "--precision", "bf16", "--decode", "cpu", "--image-size", 48, "--contrast-norm", "--seed", 7,
              "--no-activations", "--no-switches", "--no-index", "--index-layers", "conv2", "--no-progress",
              "--mean", "0.5,0.5,0.5", "--std", "0.25, 0.25, 0.25")
    assert res.exit_code == 0, res.output
    kw = seen["kw"]
    fields = [f.name for f in dataclasses.fields(BuildOptions)]
    opts = BuildOptions(**{f: kw[f] for f in fields})
    assert dataclasses.asdict(opts) == dict(
        k=3, layers=["conv1", "conv2"], batch_size=5, chunk_size=10, device="cpu", workers=1, precision="bf16",
        decode="cpu", image_size=48, contrast_norm=True, seed=7, activations=False, switches=False, index=False,
        index_layers=["conv2"], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert kw["progress"] is False and seen["args"][:2] == ("zfnet-mini", "imgs")


def test_train_flags_reach_train_options(monkeypatch, tmp_path):
    import atlas.train
    from atlas.train.run import TrainOptions

    seen = {}
    monkeypatch.setattr(atlas.train, "train", lambda *a, **kw: seen.update(args=a, kw=kw) or tmp_path / "final.pt")
    res = run("train", "--model", "zfnet-mini", "--data", "imgs", "--out", tmp_path / "r", "--epochs", 3,
              "--batch-size", 4, "--lr", 0.02, "--momentum", 0.8, "--weight-decay", 0.001, "--dropout", 0.2,
              "--init", "default", "--renorm-radius", 0.2, "--lr-patience", 2, "--lr-factor", 0.5, "--resize", 36,
              "--crop", 32, "--no-flip", "--ten-crop-eval", "--val-fraction", 0.2, "--snapshot-epochs", "0,2",
              "--device", "cpu", "--workers", 0, "--precision", "fp32", "--stream", "--memory-limit", 64,
              "--seed", 3, "--image-size", 32, "--no-contrast-norm", "--no-progress")
    assert res.exit_code == 0, res.output
    kw = seen["kw"]
    opts = TrainOptions(**{f.name: kw[f.name] for f in dataclasses.fields(TrainOptions)})
    assert dataclasses.asdict(opts) == dict(
        epochs=3, batch_size=4, lr=0.02, momentum=0.8, weight_decay=0.001, dropout=0.2, init="default",
        renorm_radius=0.2, lr_patience=2, lr_factor=0.5, resize=36, crop=32, flip=False, ten_crop_eval=True,
        val_fraction=0.2, snapshot_epochs=[0, 2], device="cpu", workers=0, precision="fp32", in_memory=False,
        memory_limit=64 << 20, seed=3, image_size=32, contrast_norm=False)
    assert kw["progress"] is False and kw["val"] is None


# ---------------------------------------------------------------------------------------------------------
# old spellings: working, hidden, one warning on stderr
# ---------------------------------------------------------------------------------------------------------
BASE_ARGS = {  # enough for each command to parse
    "similar": ["A", "--image-id", "1"], "make-shapes": ["out"], "occlude": ["A", "1"], "invariance": ["A", "1"],
    "evolution": ["run"], "index": ["A"],
}
# (deprecation, the old spelling's arguments, the new spelling's arguments, extra arguments for both)
CASES = [
    (("similar", "-k"), ["-k", "3"], ["--limit", "3"], []),
    (("similar", "--layer"), ["--layer", "conv4"], ["--of-layer", "conv4"], ["--channel", "conv5:1"]),
    (("make-shapes", "--size"), ["--size", "16"], ["--side", "16"], []),
    (("occlude", "--size"), ["--size", "8"], ["--occluder-size", "8"], []),
    (("occlude", "--label"), ["--label", "dog"], ["--class", "dog"], []),
    (("occlude", "--method"), ["--method", "full"], ["--forward", "full"], []),
    (("invariance", "--labels"), ["--labels", "dog,cat"], ["--classes", "dog,cat"], []),
    (("evolution", "--epochs"), ["--epochs", "1,5"], ["--snapshot-epochs", "1,5"], []),
    (("index", "--batch-size"), ["--batch-size", "3"], [], []),
]


def deprecation(command: str, old: str) -> Deprecation:
    return next(d for d in DEPRECATIONS if d.command == command and d.old[0] == old)


def parsed(command: str, args: list[str]) -> dict:
    cmd = main.commands[command]
    with cmd.make_context(command, list(args)) as ctx:
        return dict(ctx.params)


def test_every_deprecation_has_a_case():
    assert {(d.command, d.old[0]) for d in DEPRECATIONS} == {c[0] for c in CASES}


@pytest.mark.parametrize("key,old,new,extra", CASES, ids=[f"{c[0][0]} {c[0][1]}" for c in CASES])
def test_an_old_spelling_works_and_warns_once_on_stderr(key, old, new, extra, capsys):
    d = deprecation(*key)
    base = BASE_ARGS[d.command] + extra
    with_new = parsed(d.command, base + new)
    assert capsys.readouterr().err == ""
    with_old = parsed(d.command, base + old)
    out, err = capsys.readouterr()
    assert with_old == with_new  # the same call of the library
    assert out == "" and err.splitlines() == [d.warning(old[0])], err
    if d.new:
        assert err == f"warning: {old[0]} {'with ' + d.when + ' ' if d.when else ''}is deprecated: use {d.new}\n"
    else:
        assert err.startswith(f"warning: {old[0]} is ignored: ")


def test_the_other_spellings_of_an_old_option_work_too(capsys):
    assert parsed("similar", ["A", "--image-id", "1", "--k=4"])["limit"] == 4
    assert capsys.readouterr().err == "warning: --k is deprecated: use --limit\n"
    assert parsed("similar", ["A", "--image-id", "1", "-k4"])["limit"] == 4
    assert capsys.readouterr().err == "warning: -k is deprecated: use --limit\n"
    # --layer keeps its own meaning, without a warning, for an image query
    assert parsed("similar", ["A", "--image-id", "1", "--layer", "fc7"])["layer"] == "fc7"
    assert capsys.readouterr().err == ""


def test_old_and_new_spelling_together_is_one_line():
    res = run("occlude", "A", "1", "--size", "8", "--occluder-size", "9")
    assert one_line_error(res) == "Error: give --occluder-size or --size (its old spelling), not both"
    res = run("similar", "A", "--channel", "conv5:1", "--layer", "conv4", "--of-layer", "conv3")
    assert "not both" in one_line_error(res)


def test_old_spellings_are_hidden_from_help():
    for d in DEPRECATIONS:
        text = run(d.command, "--help").output.split("\nOptions:\n", 1)[1]
        listed = set(re.findall(r"^\s+(-{1,2}[\w-]+)|, (-{1,2}[\w-]+)", text, re.M))
        listed = {a or b for a, b in listed}
        assert d.new is None or d.new in listed, (d.command, d.new)
        if d.when is None:
            assert not set(d.old) & listed, (d.command, d.old, listed)
    # the only hidden options are the old spellings
    for command in main.commands:
        for name, p in options(command, hidden=True).items():
            assert (command, p.name) in DEPRECATED_ALIASES, (command, name)


def test_an_old_spelling_end_to_end(tmp_path):
    new = run("make-shapes", tmp_path / "a", "--n", 24, "--side", 16, "--no-progress")
    old = run("make-shapes", tmp_path / "b", "--n", 24, "--size", 16, "--no-progress")
    assert new.exit_code == old.exit_code == 0, (new.output, old.output)
    assert new.stderr == "" and old.stderr == "warning: --size is deprecated: use --side\n"
    a, b = Path(new.stdout.strip()), Path(old.stdout.strip())
    assert sorted(p.relative_to(a) for p in a.rglob("*.png")) == sorted(p.relative_to(b) for p in b.rglob("*.png"))


def test_similar_old_spellings_end_to_end(tiny_atlas):
    new = run("similar", tiny_atlas, "--channel", "conv5:1", "--of-layer", "conv4", "--limit", 3, "--format", "json")
    old = run("similar", tiny_atlas, "--channel", "conv5:1", "--layer", "conv4", "-k", 3, "--format", "json")
    assert new.exit_code == old.exit_code == 0, (new.output, old.output)
    assert new.stdout == old.stdout and {r["layer"] for r in json.loads(new.stdout)} == {"conv4"}
    assert old.stderr.splitlines() == ["warning: -k is deprecated: use --limit",
                                       "warning: --layer with --channel is deprecated: use --of-layer"]
    assert "for channel queries" in one_line_error(run("similar", tiny_atlas, "--image-id", 1, "--of-layer", "conv4"))


# ---------------------------------------------------------------------------------------------------------
# --device: one message; --format: the commands that printed only paths
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "gpu", "cuda:"])
def test_a_bad_device_is_one_line_before_any_work(bad, tmp_path):
    from atlas.util.device import check_device

    for args in (["build", "--model", "zfnet-mini", "--data", tmp_path / "none", "--out", tmp_path / "a"],
                 ["occlude", tmp_path / "none", "1"], ["index", tmp_path / "none"]):
        msg = one_line_error(run(*args, "--device", bad))
        assert msg == f"Error: --device '{bad}' is not a device: use auto, cpu, cuda or cuda:N (N: a GPU's number, " \
                      "from 0)", msg
    assert not (tmp_path / "a").exists()
    with pytest.raises(AtlasError) as e:
        check_device(bad)
    assert str(e.value) == msg[len("Error: "):]
    assert [check_device(d) for d in ("auto", "cpu", "cuda", "cuda:1", "CPU", None)] == \
        ["auto", "cpu", "cuda", "cuda:1", "cpu", "auto"]


def test_resolve_device_refuses_what_the_machine_lacks():
    import torch

    from atlas.util.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(AtlasError, match="is not a device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AtlasError, match="no CUDA GPU is available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(AtlasError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_a_bad_value_click_refuses_is_one_line(tiny_atlas):
    msg = one_line_error(run("info", tiny_atlas, "--format", "xml"))
    assert "--format" in msg and "'xml'" in msg
    assert "Missing option '--model'" in one_line_error(run("build", "--data", "x", "--out", "y"))


def test_comma_lists_and_numbers_are_parsed_once(tmp_path):
    assert parsed("export", ["A", "site", "--layers", " conv1,,conv3 ", "--channels", "3,0-2,3"])["layers"] == \
        ["conv1", "conv3"]
    assert parsed("export", ["A", "site", "--channels", "3,0-2,3"])["channels"] == [3, 0, 1, 2]
    for args, needle in ((["export", "A", "site", "--channels", "2-1"], "--channels: '2-1'"),
                         (["export", "A", "site", "--layers", ","], "--layers is empty"),
                         (["evolution", "run", "--snapshot-epochs", "x"], "--snapshot-epochs: 'x'"),
                         (["similar", "A", "--channel", "conv5"], "LAYER:CHANNEL")):
        assert needle in one_line_error(run(*args)), args


def test_info_show_and_filters_print_their_result_as_rows(tiny_atlas, tmp_path):
    import csv
    import io
    import shutil

    a = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, a)
    rows = list(csv.DictReader(io.StringIO(run("info", a, "--format", "csv").stdout)))
    assert [r["field"] for r in rows][:2] == ["atlas", "model"] and rows[0]["value"] == str(a)
    # the summary, as before, under the random-weights line (this test atlas is untrained)
    assert run("info", a).stdout.split("\n", 1)[1].startswith(f"atlas      {a}\n")
    path = run("show", a, "conv1", 0).stdout.strip()
    [row] = json.loads(run("show", a, "conv1", 0, "--format", "json").stdout)
    assert row == {"picture": "panel", "layer": "conv1", "channel": 0, "rank": None, "mode": "unit",
                   "norm": "identity", "display": "percentile", "method": "deconvnet", "png": path}
    [row] = json.loads(run("show", a, "conv1", 0, "--rank", 1, "--format", "json").stdout)
    assert row["picture"] == "projection" and row["rank"] == 1 and Path(row["png"]).is_file()
    path = run("filters", a).stdout.strip()
    [row] = json.loads(run("filters", a, "--format", "json").stdout)
    assert row == {"picture": "filters", "layer": "conv1", "png": path}
    assert run("filters", a, "--format", "csv").stdout.splitlines()[0] == "picture,layer,png"
