"""Nothing lost, one writer at a time, nothing left behind: --overwrite, the writer lock, temporary files,
a resumed build's throughput, the unreadable images named, and bad options refused before any work."""
import json
import os
import signal
import socket
import subprocess
import re
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import atlas
from atlas.build import build
from atlas.cli import main
from cli_helpers import one_line_error
from atlas.util.lock import lock_path, writer_lock

OPTS = dict(k=2, batch_size=4, chunk_size=4, image_size=32, index=False, progress=False)
BUILD = ["build", "--model", "zfnet-mini", "--image-size", "32", "--k", "2", "--batch-size", "4",
         "--chunk-size", "4", "--no-index", "--no-progress"]


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output




def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".lock")]


def test_overwrite_replaces_only_an_atlas_or_an_empty_folder(tmp_path, tiny_folder):
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "readme.txt").write_text("my notes")
    err = one_line_error(*BUILD, "--data", tiny_folder, "--out", precious, "--overwrite")
    assert "not an atlas" in err and "readme.txt" in err and "sub/" in err
    assert (precious / "readme.txt").read_text() == "my notes" and (precious / "sub").is_dir()
    assert not (tmp_path / "precious.partial").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is a file" in one_line_error(*BUILD, "--data", tiny_folder, "--out", a_file, "--overwrite")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = run(*BUILD, "--data", tiny_folder, "--out", empty, "--overwrite")
    assert code == 0, text
    code, text = run(*BUILD, "--data", tiny_folder, "--out", empty, "--overwrite")  # an atlas: replaced
    assert code == 0, text
    assert (empty / "manifest.json").is_file()


SLOW_BUILD = """
import sys, time
import atlas.build as b
real = b._flush_chunk
def slow(*a, **k):
    real(*a, **k)
    time.sleep(0.4)
b._flush_chunk = slow
b.build("zfnet-mini", sys.argv[1], sys.argv[2], k=2, batch_size=4, chunk_size=4, image_size=32, index=False,
        progress=False)
"""


def _start_slow_build(folder: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(folder), str(out)])
    work = out.with_name(out.name + ".partial") / "work"
    deadline = time.time() + 60
    while time.time() < deadline and not (work / "chunk-00001.npz").exists():
        time.sleep(0.05)
    assert (work / "chunk-00001.npz").exists(), "the first build did not start"
    return proc


def test_a_second_build_or_resume_is_refused_while_one_runs(tmp_path, tiny_folder):
    out = tmp_path / "a"
    proc = _start_slow_build(tiny_folder, out)
    try:
        staging = tmp_path / "a.partial"
        before = sorted(p.name for p in (staging / "work").iterdir())
        for extra in ([], ["--resume"]):
            err = one_line_error(*BUILD, "--data", tiny_folder, "--out", out, *extra)
            assert "is running" in err and f"process {proc.pid}" in err and socket.gethostname() in err, err
        # `atlas index` of the same atlas waits for the build too
        assert "is running" in one_line_error("index", out, "--no-progress")
        after = sorted(p.name for p in (staging / "work").iterdir())
        assert set(before) <= set(after)  # nothing of the running build was touched (it only adds chunks)
    finally:
        assert proc.wait(timeout=120) == 0
    assert (out / "manifest.json").is_file()
    assert temp_files(out) == [] and not lock_path(out).exists()


def test_kill_9_leaves_a_lock_that_resume_takes_over_and_no_temp_file(tmp_path, tiny_folder):
    out = tmp_path / "killed"
    proc = _start_slow_build(tiny_folder, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_path(out).exists()  # kill -9 runs no clean-up: the record stays, the OS lock does not
    staging = tmp_path / "killed.partial"
    (staging / "model").mkdir(exist_ok=True)
    (staging / "model" / ".features.pt.abc123.tmp").write_bytes(b"half a file")  # as a kill mid-write leaves
    code, text = run(*BUILD, "--data", tiny_folder, "--out", out, "--resume")
    assert code == 0, text
    assert temp_files(out) == [] and not lock_path(out).exists()
    timings = atlas.open(out).manifest["timings"]
    assert timings["images_per_s"] is None or timings["images_per_s"] > 0


def test_a_lock_recorded_by_another_host_is_honoured_and_says_how_to_clear_it(tmp_path, tiny_folder):
    # On a shared filesystem flock may not reach across hosts: the record alone must stop a second writer.
    out = tmp_path / "shared"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": 4242, "host": "node-17", "what": "a build", "started": "2026-01-01T00:00:00"}))
    err = one_line_error(*BUILD, "--data", tiny_folder, "--out", out)
    assert "node-17" in err and "4242" in err and str(lock) in err
    assert not (tmp_path / "shared.partial").exists()
    lock.unlink()  # what the message says to do once that build is known to be gone
    code, text = run(*BUILD, "--data", tiny_folder, "--out", out)
    assert code == 0, text


def test_training_and_indexing_hold_the_lock_too(tmp_path, tiny_folder, tiny_atlas):
    run_dir = tmp_path / "run"
    with writer_lock(run_dir, "a training run"):
        err = one_line_error("train", "--model", "zfnet-mini", "--data", tiny_folder, "--out", run_dir,
                             "--epochs", 1, "--image-size", 32, "--no-progress")
        assert "is running" in err
    assert not run_dir.exists()
    import shutil

    a = tmp_path / "a"
    shutil.copytree(tiny_atlas, a)
    left = a / "index" / ".images-fc7.faiss.json.1234.tmp"
    left.write_text("{")  # what a kill during indexing leaves
    code, text = run("index", a, "--no-progress")
    assert code == 0, text
    assert temp_files(a) == []


def test_a_resumed_build_reports_the_throughput_of_the_work_each_run_did(tmp_path, tiny_folder, monkeypatch,
                                                                          interrupt_build):
    import atlas.build as b

    out = tmp_path / "a"
    # a first run that stops after mining (every chunk done) and before the merge: the second run mines nothing
    monkeypatch.setattr(b, "_record_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build("zfnet-mini", str(tiny_folder), out, **OPTS)
    monkeypatch.undo()
    build("zfnet-mini", str(tiny_folder), out, resume=True, **OPTS)
    t = atlas.open(out).manifest["timings"]
    assert t["images_per_s"] is None  # no run of this build both mined and was recorded: no figure, not 0
    code, text = run("info", out)
    assert code == 0 and "None" not in text and "no images mined" in text, text
    # an interrupted run, then a resumed one that mines the rest: the figure is over the work done
    out2 = interrupt_build("zfnet-mini", str(tiny_folder), tmp_path / "b", after=3, **OPTS)
    build("zfnet-mini", str(tiny_folder), out2, resume=True, **OPTS)
    t = atlas.open(out2).manifest["timings"]
    assert t["images_per_s"] > 0
    code, text = run("info", out2)
    # no rate of zero (a rate such as 300.0 images/s is fine: the figure must not start at zero)
    assert code == 0 and not re.search(r"(?<![\d.])0(\.0+)? images/s", text), text


def test_the_build_names_its_unreadable_images(tmp_path, tiny_folder):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "red" / "broken.png").write_bytes(b"not a png")
    res = CliRunner().invoke(main, [*BUILD, "--data", str(data), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "red/broken.png" in res.stderr and "status = 'error'" in res.stderr


@pytest.mark.parametrize("option,value,words", [("--workers", "-1", "--workers must be from 0"),
                                                ("--chunk-size", "0", "--chunk-size must be from 1"),
                                                ("--image-size", "1000", "32 to 64"),
                                                ("--batch-size", "0", "--batch-size must be from 1")])
def test_bad_build_options_are_refused_before_any_work(tmp_path, tiny_folder, option, value, words):
    args = [a for a in BUILD]
    if option in args:
        i = args.index(option)
        del args[i:i + 2]
    err = one_line_error(*args, "--data", tiny_folder, "--out", tmp_path / "a", option, value)
    assert words in err
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_with_no_readable_image_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"bad{i}.png").write_bytes(b"nope")
    err = one_line_error(*BUILD, "--data", data, "--out", tmp_path / "a")
    assert "could be read" in err and "bad0.png" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_refused_command_leaves_no_folder_behind(tmp_path, tiny_folder):
    deep = tmp_path / "q" / "w" / "atlas"
    one_line_error(*[a if a != "zfnet-mini" else "nope" for a in BUILD], "--data", tiny_folder, "--out", deep)
    one_line_error(*BUILD, "--data", tmp_path / "no-data", "--out", deep)
    one_line_error("train", "--model", "zfnet-mini", "--data", tiny_folder, "--out", tmp_path / "r" / "d",
                   "--lr", "-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_symlink_and_its_target_share_one_lock(tmp_path):
    real = tmp_path / "real" / "atlas"
    real.parent.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real.parent)
    with writer_lock(real, "a build"):
        with pytest.raises(atlas.AtlasError, match="is running"):
            with writer_lock(link / "atlas", "an index build"):
                pass


def test_atlas_index_removes_a_manifest_write_a_kill_left(tmp_path, tiny_atlas):
    import shutil

    a = tmp_path / "a"
    shutil.copytree(tiny_atlas, a)
    (a / ".manifest.json.abc12345.tmp").write_text("{")
    code, text = run("index", a, "--layers", "conv5", "--no-progress")
    assert code == 0, text
    assert temp_files(a) == []
