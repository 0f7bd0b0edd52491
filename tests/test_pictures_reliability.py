"""Pictures and the exported site under the conditions of a shared machine: a read-only atlas, two
exports of one site, an export killed half-way, a re-export asking for less, images that failed."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import atlas
from atlas.pictures import cache as picture_cache
from atlas.pictures import projections as PJ
from atlas.build import build
from atlas.cli import main
from atlas.export import export
from atlas.util.lock import lock_path, writer_lock

from test_export_site import crawl
from cli_helpers import same_picture

STATE = ".atlas-export.json"
JOURNAL = ".atlas-export.journal"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _copy(tiny_atlas, dst: Path) -> Path:
    shutil.copytree(tiny_atlas, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def _snapshot(root: Path) -> dict:
    """Every path under root with its kind, size, mtime and content hash: what 'untouched' means."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns,
                                         None if p.is_dir() else hash(p.read_bytes()))
    return out


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def make_read_only(folder: Path) -> None:
    """Make an atlas read-only as a shared one is, in a way that holds for root too.

    chmod -R a-w is what a normal user meets: creating cache/ fails with EACCES. Root ignores
    permission bits, so the atlas's cache/ path is also taken by an empty file: creating the cache
    folder then fails for anyone (ENOTDIR), through the same path a read-only file system's EROFS
    takes (any OSError on writing into the atlas). test_a_read_only_mount_still_draws does it with
    a real read-only mount where the system allows one.
    """
    (folder / "cache").write_bytes(b"")
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)


def make_writable(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)


@pytest.fixture
def xdg(tmp_path, monkeypatch) -> Path:
    """A per-user cache of this test's own (never the real ~/.cache)."""
    d = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    monkeypatch.delenv("ATLAS_PICTURE_CACHE_MB", raising=False)
    return d


@pytest.fixture
def writable(tiny_atlas, tmp_path) -> Path:
    return _copy(tiny_atlas, tmp_path / "writable")


@pytest.fixture
def read_only(tiny_atlas, tmp_path):
    path = _copy(tiny_atlas, tmp_path / "shared")
    make_read_only(path)
    yield path
    make_writable(path)


# ---------------------------------------------------------------------------
# a read-only atlas still draws
# ---------------------------------------------------------------------------
def test_a_read_only_atlas_draws_into_the_per_user_cache_the_same_bytes(writable, read_only, xdg, tmp_path):
    before = _snapshot(read_only)
    w = atlas.open(writable)
    ident = hashlib.sha256((Path(writable) / "manifest.json").read_bytes()).hexdigest()[:24]  # the atlas's identity
    user = xdg / "atlas" / "pictures" / ident

    res = _cli("show", read_only, "conv3", 6)
    assert res.exit_code == 0, res.output
    p = Path(res.stdout.strip())
    assert p.is_relative_to(user) and p.read_bytes() == w.show("conv3", 6).read_bytes()

    res = _cli("show", read_only, "conv3", 6, "--rank", "1", "--out", tmp_path / "one.png")
    assert res.exit_code == 0, res.output
    assert same_picture(tmp_path / "one.png", w.show("conv3", 6, rank=1))

    res = _cli("filters", read_only)
    assert res.exit_code == 0, res.output
    assert Path(res.stdout.strip()).is_relative_to(user)
    assert Path(res.stdout.strip()).read_bytes() == w.filters().read_bytes()

    png = atlas.open(read_only).sql("SELECT deconv_png('conv2', 3, 0)").fetchall()[0][0]
    assert Path(png).is_relative_to(user)
    ref = w.sql("SELECT deconv_png('conv2', 3, 0)").fetchall()[0][0]
    assert Path(png).read_bytes() == Path(ref).read_bytes()

    res = _cli("export", read_only, tmp_path / "site-ro", "--layers", "conv2", "--channels", "3,4", "--no-progress")
    assert res.exit_code == 0, res.output
    export(writable, tmp_path / "site-w", layers="conv2", channels=[3, 4], progress=False)
    pics_ro = {str(q.relative_to(tmp_path / "site-ro")): q.read_bytes() for q in (tmp_path / "site-ro").rglob("*") if q.suffix in (".png", ".webp")}
    pics_w = {str(q.relative_to(tmp_path / "site-w")): q.read_bytes() for q in (tmp_path / "site-w").rglob("*") if q.suffix in (".png", ".webp")}
    assert pics_ro and pics_ro == pics_w
    assert not crawl(tmp_path / "site-ro")[1]

    # --cache DIR: the pictures go there (under the atlas's identity), nowhere else
    mine = tmp_path / "mine"
    res = _cli("show", read_only, "conv3", 7, "--cache", mine)
    assert res.exit_code == 0, res.output
    p = Path(res.stdout.strip())
    assert p.is_relative_to(mine / ident) and p.read_bytes() == w.show("conv3", 7).read_bytes()
    assert not list(user.rglob("7-*.png"))
    assert _snapshot(read_only) == before  # nothing was written into the atlas


def test_a_read_only_atlas_with_no_writable_cache_is_one_line(read_only, writable, tmp_path, monkeypatch):
    blocked = tmp_path / "no-cache-here"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    res = _cli("show", read_only, "conv3", 6)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: cannot write pictures")
    assert "--cache DIR" in lines[0] and str(read_only) in lines[0]
    # an atlas that can be written never needs (nor touches) the per-user cache
    res = _cli("show", writable, "conv3", 6)
    assert res.exit_code == 0 and Path(res.stdout.strip()).is_relative_to(writable)


def _can_mount_read_only(tmp_path: Path) -> list[str] | None:
    """The unshare command that gives a private mount namespace where this user may bind-mount."""
    if not shutil.which("unshare"):
        return None
    probe = tmp_path / "probe"
    probe.mkdir()
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]) if os.geteuid() == 0 else (["unshare", "-rm"],):
        r = subprocess.run(cmd + ["sh", "-c", 'mount --bind -o ro "$0" "$0" && ! touch "$0/x" 2>/dev/null',
                                  str(probe)], capture_output=True)
        if r.returncode == 0:
            return cmd
    return None


RO_SCRIPT = r'''
import errno, json, sys
from click.testing import CliRunner
import atlas
from atlas.cli import main

ro, out = sys.argv[1], sys.argv[2]
def run(*args):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return {"code": r.exit_code, "out": r.stdout.strip(), "err": r.stderr.strip()}
res = {"show": run("show", ro, "conv3", "6"),
       "show_out": run("show", ro, "conv3", "6", "--rank", "1", "--out", out + "/one.png"),
       "filters": run("filters", ro),
       "export": run("export", ro, out + "/site", "--layers", "conv2", "--channels", "3,4", "--no-progress"),
       "sql": atlas.open(ro).sql("SELECT deconv_png('conv2', 3, 0)").fetchall()[0][0]}
try:
    open(ro + "/probe", "w")
    res["erofs"] = False
except OSError as e:
    res["erofs"] = e.errno == errno.EROFS
print(json.dumps(res))
'''


def test_a_read_only_mount_still_draws(writable, tiny_atlas, tmp_path):
    """The real thing: the atlas on a read-only file system (a bind mount in a private mount
    namespace, as root or in a user namespace), the commands in a process that sees only that."""
    cmd = _can_mount_read_only(tmp_path)
    if cmd is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm refused): make_read_only covers it")
    ro = _copy(tiny_atlas, tmp_path / "mounted")
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "ro.py"
    script.write_text(RO_SCRIPT)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONPATH": str(Path(__file__).parent.parent)}
    r = subprocess.run(cmd + ["sh", "-c", 'mount --bind -o ro "$2" "$2" && exec "$0" "$1" "$2" "$3"',
                              sys.executable, str(script), str(ro), str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["erofs"]  # it really was a read-only file system
    for k in ("show", "show_out", "filters", "export"):
        assert res[k]["code"] == 0, (k, res[k])
    w = atlas.open(writable)
    assert Path(res["show"]["out"]).read_bytes() == w.show("conv3", 6).read_bytes()
    assert same_picture(out / "one.png", w.show("conv3", 6, rank=1))
    assert Path(res["filters"]["out"]).read_bytes() == w.filters().read_bytes()
    ref = w.sql("SELECT deconv_png('conv2', 3, 0)").fetchall()[0][0]
    assert Path(res["sql"]).read_bytes() == Path(ref).read_bytes()
    assert str(tmp_path / "xdg") in res["show"]["out"]
    export(writable, tmp_path / "site-w", layers="conv2", channels=[3, 4], progress=False)
    got = {str(q.relative_to(out / "site")): q.read_bytes() for q in (out / "site").rglob("*") if q.suffix in (".png", ".webp")}
    ref = {str(q.relative_to(tmp_path / "site-w")): q.read_bytes() for q in (tmp_path / "site-w").rglob("*") if q.suffix in (".png", ".webp")}
    assert got and got == ref
    assert not (ro / "cache").exists()


def test_the_per_user_cache_keeps_to_its_bound_oldest_first(writable, read_only, xdg, monkeypatch):
    w = atlas.open(writable)
    w.show("conv3", 6)
    drawn = sum(f.stat().st_size for f in (Path(writable) / "cache").rglob("*") if f.is_file())
    root = xdg / "atlas" / "pictures"
    old = root / ("0" * 24) / "projections-v1" / "w" / "unit-identity" / "conv1"  # another atlas's pictures
    old.mkdir(parents=True)
    now = time.time()
    for i, days in enumerate((3, 2, 1)):
        f = old / f"{i}-panel.png"
        f.write_bytes(b"x" * 40_000)
        os.utime(f, (now - days * 86400, now - days * 86400))
    monkeypatch.setenv("ATLAS_PICTURE_CACHE_MB", str((drawn + 50_000) / (1 << 20)))
    res = _cli("show", read_only, "conv3", 6)
    assert res.exit_code == 0, res.output
    assert Path(res.stdout.strip()).read_bytes() == w.show("conv3", 6).read_bytes()
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert total <= drawn + 50_000
    assert sorted(f.name for f in old.iterdir()) == ["2-panel.png"]  # the two oldest went, the newest stayed


def test_trim_never_leaves_a_picture_without_its_incomplete_marker(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    now = time.time()
    files = {"1-panel.png.unavailable": (b"image 3 is unavailable", 5), "1-panel.png": (b"p" * 1000, 4),
             "2-panel.png": (b"q" * 1000, 3), ".3-panel.png.abcd1234.tmp": (b"t" * 1000, 0)}
    for name, (data, hours) in files.items():
        (d / name).write_bytes(data)
        os.utime(d / name, (now - hours * 3600, now - hours * 3600))
    picture_cache.trim(tmp_path, 2100)  # one picture of 1000 bytes (and its marker) has to go
    # the oldest file is the marker, but it goes only with its picture; the young temp stays (a writer may
    # be about to rename it)
    assert sorted(p.name for p in d.iterdir()) == [".3-panel.png.abcd1234.tmp", "2-panel.png"]


# ---------------------------------------------------------------------------
# temp files
# ---------------------------------------------------------------------------
def test_the_cache_removes_only_abandoned_temp_files_where_it_writes(writable):
    a = atlas.open(writable)
    d = PJ.cache_root(a) / "unit-identity-percentile" / "conv2"
    other = PJ.cache_root(a) / "unit-identity-percentile" / "conv4"
    d.mkdir(parents=True)
    other.mkdir(parents=True)
    old, young, elsewhere = d / ".7-panel.png.k3j2h1g0.tmp", d / ".8-panel.png.a1b2c3d4.tmp", other / ".1-0.png.zz.tmp"
    for f in (old, young, elsewhere):
        f.write_bytes(b"half a png")
    past = time.time() - 2 * 3600
    os.utime(old, (past, past))
    os.utime(elsewhere, (past, past))
    a.show("conv2", 1)
    assert not old.exists()
    assert young.exists()  # another reader may be writing it right now
    assert elsewhere.exists()  # only where it writes


def test_an_export_killed_half_way_then_another_leaves_the_site_clean(writable, tmp_path):
    site = tmp_path / "site"
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, sys\n"
        "from atlas.export import export\n"
        "site, real, n = sys.argv[2], os.replace, [0]\n"
        "def replace(src, dst, *a, **kw):\n"
        "    if str(dst).startswith(site):\n"
        "        n[0] += 1\n"
        "        if n[0] == 80:\n"
        "            os._exit(9)  # killed between writing a file and renaming it into place\n"
        "    return real(src, dst, *a, **kw)\n"
        "os.replace = replace\n"
        "export(sys.argv[1], site, layers='conv1,conv2', max_channels=6, progress=False)\n")
    r = subprocess.run([sys.executable, str(script), str(writable), str(site)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}, timeout=600)
    assert r.returncode == 9, r.stderr[-2000:]
    assert _temps(site) and (site / "conv2").is_dir() and not (site / STATE).exists()  # what a kill leaves

    export(writable, site, layers="conv1", max_channels=2, progress=False)
    assert not _temps(site)
    assert not (site / JOURNAL).exists()
    assert not (site / "conv2").exists()  # the killed export's pages, known only from its journal
    assert sorted(p.name for p in (site / "conv1").glob("*.html")) == ["0.html", "1.html", "index.html"]
    recorded = set(json.loads((site / STATE).read_text())["files"]) | {STATE}
    assert {str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()} == recorded
    assert not crawl(site)[1]
    assert not lock_path(site).exists()


def test_linking_a_picture_over_its_own_hardlink_leaves_no_temp(writable, tmp_path):
    """Two exports of one site used to leave a temp file per picture: the second links the cache's file
    onto the site's, which is already a link of it, and rename(2) between two links of one file does
    nothing. A site record that lost the first export's keys makes one export do the same."""
    site = tmp_path / "site"
    export(writable, site, layers="conv2", max_channels=2, progress=False)
    st = json.loads((site / STATE).read_text())
    st["files"], st["fingerprint"] = {rel: "lost" for rel in st["files"]}, "lost"
    (site / STATE).write_text(json.dumps(st))
    export(writable, site, layers="conv2", max_channels=2, progress=False)
    assert json.loads((site / STATE).read_text())["last_run"]["files_linked"] > 0
    assert not _temps(site)


def test_an_export_removes_the_temp_files_an_earlier_one_left_and_nothing_else(writable, tmp_path):
    site = tmp_path / "site"
    export(writable, site, layers="conv2", max_channels=2, progress=False)
    left = [site / "conv2" / ".0.html.4242.tmp", site / "conv2" / "img" / ".1-2.webp.4242.tmp",
            site / ".index.json.4242.tmp", site / "..atlas-export.json.q8w7e6r5.tmp"]  # fsutil's temp of the record
    for f in left:
        f.write_text("left by a killed export")
    mine = [site / ".my-notes.tmp", site / "conv2" / ".draft.txt.1.tmp"]  # not the temp of a file it wrote
    for f in mine:
        f.write_text("the user's")
    msgs = []
    export(writable, site, layers="conv2", max_channels=2, progress=False, log=msgs.append)
    assert "up to date" in msgs[-1]
    assert not any(f.exists() for f in left)
    assert all(f.read_text() == "the user's" for f in mine)


# ---------------------------------------------------------------------------
# one export of a site at a time
# ---------------------------------------------------------------------------
def test_a_second_export_of_a_site_is_refused_while_one_runs(writable, tmp_path):
    site = tmp_path / "site"
    export(writable, site, layers="conv1", max_channels=2, progress=False)
    before = _snapshot(site)
    with writer_lock(site, "an export"):
        res = _cli("export", writable, site, "--layers", "conv1,conv2", "--no-progress")
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert lines[0].startswith("Error: an export of ") and f"process {os.getpid()}" in lines[0]
        assert _snapshot(site) == before
        assert lock_path(site).exists()  # the holder's lock is left as it is
    res = _cli("export", writable, site, "--layers", "conv1,conv2", "--max-channels", "1", "--no-progress")
    assert res.exit_code == 0 and (site / "conv2" / "0.html").is_file()


# ---------------------------------------------------------------------------
# a site is what the last export asked for
# ---------------------------------------------------------------------------
def _links(page: Path) -> set[str]:
    from test_export_site import Links

    p = Links()
    p.feed(page.read_text())
    return {ref for tag, attr, ref in p.refs if tag == "a"}


def test_a_re_export_makes_the_site_what_was_asked(writable, tmp_path):
    site = tmp_path / "site"
    export(writable, site, layers="conv1,conv2", max_channels=4, progress=False)
    users = {site / "notes.txt": "mine", site / "conv2" / "mine.txt": "also mine",
             site / "conv1" / "img" / "mine.png": "a picture of mine"}
    for f, text in users.items():
        f.write_text(text)

    # fewer channels, one layer: the rest goes
    msgs = []
    export(writable, site, layers="conv1", max_channels=2, progress=False, log=msgs.append)
    assert "up to date" not in msgs[-1]
    assert sorted(p.name for p in (site / "conv1").glob("*.html")) == ["0.html", "1.html", "index.html"]
    assert sorted(p.name for p in (site / "conv1").glob("*.json")) == ["0.json", "1.json", "index.json"]
    assert {p.name.split("-")[0] for p in (site / "conv1" / "img").glob("*.webp")} == {"0", "1"}
    assert sorted(p.name for p in (site / "conv2").rglob("*")) == ["mine.txt"]
    assert "conv2/index.html" not in _links(site / "index.html")
    assert "conv1/index.html" in _links(site / "index.html")
    assert {h for h in _links(site / "conv1" / "index.html") if h[0].isdigit()} == {"0.html", "1.html"}
    assert json.loads((site / "conv1" / "1.json").read_text())["next"] is None
    assert not crawl(site)[1]
    assert all(f.read_text() == text for f, text in users.items())  # nothing it did not write is touched

    # another layer, more channels: conv1's pages go, conv2's come
    export(writable, site, layers="conv2", max_channels=3, progress=False)
    assert not list((site / "conv1").glob("*.html")) and (site / "conv1" / "img" / "mine.png").is_file()
    assert sorted(p.name for p in (site / "conv2").glob("*.html")) == ["0.html", "1.html", "2.html", "index.html"]
    assert "conv2/index.html" in _links(site / "index.html")
    assert "conv1/index.html" not in _links(site / "index.html")
    assert not crawl(site)[1]
    assert all(f.read_text() == text for f, text in users.items())


# ---------------------------------------------------------------------------
# what failed is said
# ---------------------------------------------------------------------------
BROKEN = ["red/broken <b>&.png", "green/empty.png", "blue/truncated.jpg"]


@pytest.fixture(scope="module")
def _broken_built(tmp_path_factory):
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("broken")
    data = make_image_folder(root / "data", per_class=4)
    (data / BROKEN[0]).write_bytes(b"not a png at all")
    (data / BROKEN[1]).write_bytes(b"")
    (data / BROKEN[2]).write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    path = build("zfnet-mini", str(data), root / "atlas", k=3, batch_size=16, image_size=32, progress=False)
    return path, data


@pytest.fixture
def broken(_broken_built, tmp_path):
    """(atlas, data): an atlas over a folder of its own with three unreadable files (one with a hostile
    name); a copy of both for each test (one deletes the folder)."""
    from conftest import copy_atlas

    path, data = _broken_built
    return copy_atlas(path, tmp_path / "atlas", data=data), tmp_path / "data"


def test_the_index_lists_the_unreadable_images(broken, tmp_path):
    path, _ = broken
    site = export(path, tmp_path / "site", layers="conv1", max_channels=1, progress=False)
    twin = json.loads((site / "index.json").read_text())
    bad = twin["unreadable"]
    assert bad["count"] == 3 and sorted(r["path"] for r in bad["shown"]) == sorted(BROKEN)
    assert all(r["error"] for r in bad["shown"])
    assert atlas.open(path).rows(bad["sql"]) == bad["shown"]  # the query shown lists them all
    page = (site / "index.html").read_text()
    assert "Unreadable images" in page and "3 images of the dataset could not be read" in page
    assert "broken &lt;b&gt;&amp;.png" in page and "broken <b>" not in page
    assert not crawl(site)[1]


def test_an_export_without_the_dataset_warns_once(broken, tmp_path):
    path, data = broken
    shutil.rmtree(data)
    res = _cli("export", path, tmp_path / "site", "--layers", "conv2", "--max-channels", "2", "--no-progress")
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("Warning")]
    assert len(warnings) == 1 and f"dataset folder '{data}' is gone" in warnings[0]
    # and the pages of the images in those top-k, whose pictures wait for the images too
    images = len(list((tmp_path / "site" / "images").glob("*.html")))
    assert f"2 channel pages and {images} image pages say incomplete" in warnings[0]
    assert "Some pictures are incomplete" in (tmp_path / "site" / "conv2" / "0.html").read_text()
