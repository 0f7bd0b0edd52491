"""The commands that can take more than a few seconds say so on stderr (--progress, the default), and
are silent with --no-progress: the analyses count their inputs, a cold `show` says what it draws."""
import json
import re
import shutil

from cli_helpers import run


def _lines(res, word):
    return [ln for ln in res.stderr.splitlines() if ln.startswith(word + ":")]


def test_occlude_counts_its_positions(own_atlas):
    res, text = run("occlude", own_atlas, "3", "--occluder-size", "8", "--stride", "4")
    assert res.exit_code == 0, text
    last = _lines(res, "occlude")[-1]
    n = int(re.match(r"occlude: (\d+)/(\d+) positions", last).group(1))
    assert last.startswith(f"occlude: {n}/{n} positions") and "ETA" in last
    quiet, _ = run("occlude", own_atlas, "3", "--occluder-size", "8", "--stride", "4", "--no-progress")
    assert quiet.exit_code == 0 and not _lines(quiet, "occlude")


def test_invariance_and_correspondence_count_their_inputs(own_atlas, tiny_folder, tmp_path):
    res, text = run("invariance", own_atlas, "0", "--transforms", "rotate")
    assert res.exit_code == 0, text
    assert re.match(r"invariance: (\d+)/\1 inputs", _lines(res, "invariance")[-1])
    for name in ("a.png", "b.png"):
        shutil.copy(tiny_folder / "green" / "green_002.png", tmp_path / name)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"images": [{"image": n, "parts": {"eye": [4, 6, 12, 14]}} for n in ("a.png", "b.png")]}))
    res, text = run("correspondence", own_atlas, "--images", spec, "--random", "2")
    assert res.exit_code == 0, text
    assert re.match(r"correspondence: (\d+)/\1 inputs", _lines(res, "correspondence")[-1])


def test_a_slow_cold_show_says_what_it_draws_and_a_warm_one_is_silent(tiny_atlas, tmp_path, monkeypatch):
    from atlas.pictures import projections

    monkeypatch.setattr(projections, "ANNOUNCE_AFTER_S", 0.0)  # every draw counts as slow
    cache = tmp_path / "pictures"
    res, text = run("show", tiny_atlas, "conv4", "2", "--cache", cache, "--progress")  # not a terminal here
    assert res.exit_code == 0, text
    said = _lines(res, "show")
    assert said[0].startswith("show: drawing conv4 channel 2") and re.fullmatch(r"show: drawn in [\d.]+ s", said[1])
    again, _ = run("show", tiny_atlas, "conv4", "2", "--cache", cache, "--progress")
    assert again.exit_code == 0 and not _lines(again, "show")
    for quiet in ("--no-progress", None):  # asked not to, or by default where no terminal watches
        res, _ = run(*[a for a in ("show", tiny_atlas, "conv4", "3", "--cache", cache, quiet) if a])
        assert res.exit_code == 0 and not _lines(res, "show")
        shutil.rmtree(cache)
