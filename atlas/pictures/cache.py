"""Where the pictures of an atlas live, and how they are written there.

Where pictures go when the atlas cannot be written (a shared atlas on a
read-only file system, a folder of another user): `PictureCache`. A picture is
looked for in the atlas's own cache; when that cannot be written (its nearest
existing folder is not writable for this process: a read-only file system, no
permission, cache/ not a folder) or a write there fails all the same (any
OSError: disk full, a server that says no), pictures are looked for and drawn
in the per-user cache of this atlas instead, for the rest of that renderer's life:

    $XDG_CACHE_HOME/atlas/pictures/<identity>/projections-v3/<weights16>/...   (default ~/.cache/atlas/pictures)

An atlas whose cache can be written never touches the per-user one. `--cache DIR`
(cache= here) replaces both with DIR/<identity>/projections-v3/<weights16>/.
<identity> is `identity(atlas)`: the start of the sha256 of manifest.json's
bytes, which hold the build's creation time and the weights' hash, so a rebuilt
atlas never meets the pictures of the old one (the atlas's own cache needs no
such key: a rebuild replaces the folder). The same writer and the same drawing
make the same bytes wherever the file lands. The per-user cache is bounded
(`user_cache_bound`: 1024 MB unless ATLAS_PICTURE_CACHE_MB says otherwise):
when a call has written into it, the oldest files (by modification time) go
until it fits, never the pictures that call returns; a --cache DIR the user
chose is not trimmed.

Leftover temp files: a process killed between drawing and renaming leaves
`.NAME.XXXXXXXX.tmp` beside NAME. Readers write the cache concurrently without
a lock, so a writer removes only temp files older than an hour (`TEMP_AGE_S`),
surely abandoned, from each folder it writes into.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import AtlasError
from ..util.files import TEMP_NAME, remove_temp_files

# v3: fields mostly beyond the image drawn as their part inside it, large fields shrunk, panels and filter grids
# titled and labelled; v2 (percentile display, light-grey outside) and v1 (max only, magenta hatching) are never
# served again
VERSION = "projections-v3"
# feature visualisations keep the root they were first cached under: their drawing did not change with v3, and
# each one takes minutes to make
FEATUREVIS_VERSION = "projections-v2"
UNAVAILABLE = "atlas.unavailable"  # PNG text of a picture drawn with an image missing
USER_CACHE_MB = 1024  # the per-user cache's bound unless ATLAS_PICTURE_CACHE_MB says otherwise
TEMP_AGE_S = 3600  # a cache temp file this old was left by a writer that died (a picture takes seconds)


def _weights_key(atlas) -> str:
    m = atlas.manifest["model"]
    return (m.get("weights_sha256") or "")[:16] or f"random-seed{m.get('seed', 0)}"


def cache_root(atlas, version: str = VERSION) -> Path:
    """ATLAS/cache/<version>/<weights16>: everything rendered from these weights, in the atlas itself."""
    return Path(atlas.path, "cache", version, _weights_key(atlas))


def identity(atlas) -> str:
    """What tells atlases apart outside their folders: the start of the sha256 of manifest.json's bytes.

    The manifest holds the build's creation time and the weights' sha256, so a rebuild (even of the same
    model over the same data, into the same path) gets a new identity, and copies of one atlas share it.
    """
    try:
        data = (Path(atlas.path) / "manifest.json").read_bytes()
    except OSError as e:
        raise AtlasError(f"cannot read the manifest of atlas '{atlas.path}': {e.strerror or e}") from None
    return hashlib.sha256(data).hexdigest()[:24]


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/atlas/pictures (default ~/.cache/atlas/pictures): the per-user picture cache."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "atlas" / "pictures"
    try:
        return Path.home() / ".cache" / "atlas" / "pictures"
    except RuntimeError:  # no HOME and no passwd entry
        raise AtlasError("no per-user cache folder (neither XDG_CACHE_HOME nor HOME is set): give one with "
                         "--cache DIR") from None


def user_cache_bound() -> int:
    """The per-user cache's size bound in bytes (ATLAS_PICTURE_CACHE_MB, default USER_CACHE_MB)."""
    v = os.environ.get("ATLAS_PICTURE_CACHE_MB")
    try:
        mb = float(v) if v else USER_CACHE_MB
    except ValueError:
        raise AtlasError(f"ATLAS_PICTURE_CACHE_MB='{v}' is not a number of megabytes") from None
    return int(mb * (1 << 20))


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".unavailable")


def incomplete(path: Path) -> str | None:
    """Why a cached picture was drawn without one of its images (None if it was not): a stat, no PNG read."""
    m = _marker(path)
    try:
        return m.read_text() or "an image was unavailable"
    except (FileNotFoundError, NotADirectoryError):
        return None


def usable(atlas, path: Path) -> bool:
    """A cached picture serves unless it was drawn with an image missing and the dataset is there to
    try again; with the whole dataset gone, redrawing could not do better."""
    return path.is_file() and (incomplete(path) is None or not Path(atlas.manifest["dataset"]["root"]).exists())


class PictureCache:
    """The folders one renderer reads pictures from and writes them to (see the module docstring).

    `find(rel)` is the first usable copy, or where a new one would be written; `put(path, image)`
    writes it there, moving on to the next folder when one cannot be written; `settle(keep)` keeps
    the per-user cache within its bound after a call has written into it.
    """

    def __init__(self, atlas, cache: str | os.PathLike | None = None, version: str = VERSION):
        self.a, self.version = atlas, version
        self.chosen = None if cache is None else Path(cache).absolute()
        self._tiers: list[Path | None] = [None] if self.chosen is not None else [cache_root(atlas, version), None]
        self.at = 0  # the folder written to: those before it could not be written
        self.why: list[str | None] = []  # why, one per folder given up
        self._probed = self.chosen is not None
        self._swept: set[Path] = set()
        self._written = 0  # bytes put into the bounded per-user cache since it was last trimmed
        self._trimmed = False

    def tier(self, i: int) -> Path:
        if self._tiers[i] is None:  # built when first needed: a hit in the atlas's cache reads no manifest
            base = self.chosen if self.chosen is not None else user_cache_dir()
            self._tiers[i] = base / identity(self.a) / self.version / _weights_key(self.a)
        return self._tiers[i]

    @property
    def bounded(self) -> bool:
        """Whether writes go to the per-user cache (the one with a size bound)."""
        return self.chosen is None and self.at == 1

    def _own(self, p: Path) -> Path:
        """`p` in the atlas's own cache, refused if a link there leads outside the atlas: an atlas from
        someone else could hold cache/ -> /anywhere, and pictures would be written and served there."""
        root, q = Path(self.a.path).resolve(), p
        while not os.path.lexists(q) and q != q.parent:  # the nearest entry there is (a dangling link too)
            q = q.parent
        if not q.resolve().is_relative_to(root):
            raise AtlasError(f"atlas '{self.a.path}': its picture cache leads outside the atlas folder (to "
                             f"'{q.resolve()}'); an atlas writes only into itself and its caches")
        return p

    def find(self, rel: str) -> Path:
        p = self._own(self.tier(0) / rel) if self.chosen is None else self.tier(0) / rel
        if usable(self.a, p):
            return p
        if not self._probed:
            # on a miss, once: the per-user cache is looked in (and HOME needed) only for an atlas whose own
            # cache cannot be written; a write that fails anyway still moves on to it (put)
            self._probed = True
            if not _could_write(self.tier(0)):
                self.why.append(None)
                self.at = 1
        for i in range(1, self.at + 1):
            p = self.tier(i) / rel
            if usable(self.a, p):
                return p
        return self.tier(self.at) / rel

    def rel(self, path: Path) -> str:
        """A cached picture's path inside whichever cache folder holds it (what `find` takes)."""
        for t in self._tiers:
            if t is not None and path.is_relative_to(t):
                return str(path.relative_to(t))
        raise ValueError(f"{path} is in none of the picture caches")

    def put(self, path: Path, image, text: dict | None = None, unavailable: str | None = None) -> Path:
        """Write `image` as the picture `path` names (a path `find` gave); returns where it went."""
        return self.put_with(path, lambda dest: _write_png(dest, image, text, unavailable))

    def put_with(self, path: Path, write: Callable[[Path], Any]) -> Path:
        """`write(dest)` the file `path` names (a path `find` gave) into the first tier that takes it (the
        atlas's cache, else the per-user one); returns where it went. `put` is this for a PNG."""
        rel = self.rel(path)
        while True:
            dest = self.tier(self.at) / rel
            if self.at == 0 and self.chosen is None:
                self._own(dest)
            try:
                write(dest)
                break
            except OSError as e:
                self._give_up(dest, e)
        self._sweep(dest.parent)
        if self.bounded:
            try:
                self._written += dest.stat().st_size
            except OSError:
                pass
        return dest

    def _give_up(self, dest: Path, e: OSError) -> None:
        where = self.tier(self.at)
        why = e.strerror or str(e)
        if self.chosen is not None:
            raise AtlasError(f"cannot write pictures into --cache '{self.chosen}' ({where}): {why}") from None
        if self.at == 0:
            self.why.append(why)
            self.at = 1
            return
        first = f" ({self.why[0]})" if self.why[0] else ""
        raise AtlasError(f"cannot write pictures: not into the atlas's cache '{self.tier(0)}'{first} nor into the "
                         f"per-user cache '{where}' ({why}); give a writable folder with --cache DIR") from None

    def _sweep(self, folder: Path) -> None:
        """Remove the temp files writers that died left in `folder` (once per folder and cache)."""
        if folder in self._swept:
            return
        self._swept.add(folder)
        remove_temp_files(folder, older_than_s=TEMP_AGE_S, recursive=False)

    def settle(self, keep: set[Path] | None = None) -> None:
        """After a call that wrote into the per-user cache: trim it to its bound, first once per
        PictureCache, then each time another eighth of the bound has been written."""
        if not self.bounded or not self._written:
            return
        bound = user_cache_bound()
        if self._trimmed and self._written < bound // 8:
            return
        trim(user_cache_dir(), bound, keep={Path(k) for k in (keep or ()) if k is not None})
        self._trimmed, self._written = True, 0


def _could_write(folder: Path) -> bool:
    """Whether `folder` could be made and written: its nearest existing ancestor is a folder this
    process may write (a read-only file system says no here, even to root)."""
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    ids = os.access in os.supports_effective_ids
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK, effective_ids=ids)


def trim(root: Path, bound: int, keep: set[Path] = frozenset()) -> int:
    """Bring the files under `root` to at most `bound` bytes, oldest (mtime) first; returns bytes freed.

    Never removes a path in `keep`, a temp file younger than TEMP_AGE_S (a writer may be about to
    rename it), or an incomplete-marker whose picture is there or may be coming: without it, a
    picture drawn with an image missing would be served as whole. A picture's marker goes with it.
    """
    files = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            files.append((st.st_mtime_ns, st.st_size, p, name))
    total = sum(f[1] for f in files)
    if total <= bound:
        return 0
    keep = {str(k) for k in keep}
    now, freed, touched = time.time_ns(), 0, set()
    for mtime, size, p, name in sorted(files):
        if total - freed <= bound:
            break
        if p in keep or p in touched:
            continue
        young = now - mtime < TEMP_AGE_S * 1e9
        if TEMP_NAME.match(name) and young:
            continue
        # a marker is written before its picture: a young one alone may be a writer's, its picture coming
        if name.endswith(".unavailable") and (young or os.path.exists(p[:-len(".unavailable")])):
            continue
        try:
            os.unlink(p)
        except OSError:
            continue
        freed += size
        touched.add(p)
        marker = p + ".unavailable"
        if name.endswith(".png") and os.path.exists(marker):
            with contextlib.suppress(OSError):
                msize = os.lstat(marker).st_size
                os.unlink(marker)
                freed += msize
                touched.add(marker)
    # Emptied folders stay: removing one could pull it from under a writer between its mkdir and its
    # temp file, and a few empty folders cost nothing.
    return freed


def _write_png(path: Path, image, text: dict | None = None, unavailable: str | None = None) -> None:
    """atlas.pictures.drawing's PNG (its text chunks included), renamed into place atomically, without fsync (a cache
    can be remade). `unavailable`: why an image is missing from the picture; its marker is written before
    the PNG and removed after a whole one, so that a crash in between can only cause a redraw, never an
    incomplete picture served as whole."""
    from ..util.files import atomic_write_bytes
    from .drawing import write_png

    if unavailable:
        text = {**(text or {}), UNAVAILABLE: unavailable}
        atomic_write_bytes(_marker(path), unavailable.encode(), fsync=False)
    write_png(path, image, text, fsync=False)
    if not unavailable:
        _marker(path).unlink(missing_ok=True)
