"""The site folder: atomic file writes, hardlinked pictures, and what to skip on a re-export.

The site keeps its own record of what it wrote: `.atlas-export.json`, for every
file of the last finished export the key of the inputs it was made from, and,
while an export runs, `.atlas-export.journal`, one line per file that export is
about to write (appended before the file is created). A file whose key is
unchanged (and that is still there) is not written again; files an earlier
export wrote that this one no longer produces are removed, those of an export
that was killed half-way too (its journal names them); nothing else in the
folder is touched. Pictures that many pages show (a deep unit's patch, which is the whole image, in the
top-k of many channels) are shared: named by their content's hash (`link_shared`), written once, and
reached from what they were made from through the record's `aliases` (inputs' key -> file).
Files are written one by one, each atomically (temp file + rename), pictures before the pages that show them, so a reader never sees half
a page or a page whose pictures are missing. The temp files a killed export
left beside the files it was writing are removed by the next one (the export
holds the site's writer lock, so no other writer's temp file can be among them).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..errors import AtlasError
from ..util import files as fsutil

STATE = ".atlas-export.json"
JOURNAL = ".atlas-export.journal"


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Site:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.state: dict[str, Any] = {}
        self.files: dict[str, str] = {}     # relpath -> key, of this export
        self.written = 0
        self.linked = 0
        self.skipped = 0
        self.interrupted: set[str] = set()  # what a killed export was writing (its journal)
        self._journal = None
        self._noted: set[str] = set()
        if self.root.exists():
            if not self.root.is_dir():
                raise AtlasError(f"site folder '{self.root}' exists and is not a folder")
            st = self.root / STATE
            if st.is_file():
                try:
                    self.state = json.loads(st.read_text())
                except ValueError:
                    self.state = {}
            elif not (self.root / JOURNAL).is_file() and any(self.root.iterdir()):  # a journal: ours, killed
                raise AtlasError(f"'{self.root}' is not empty and is not an exported atlas site: export into a new "
                                 "or empty folder (or one an earlier `atlas export` wrote)")
            self.interrupted = _read_journal(self.root / JOURNAL)
        self.old: dict[str, str | None] = dict(self.state.get("files") or {})
        self.old_aliases: dict[str, str] = dict(self.state.get("aliases") or {})
        self.aliases: dict[str, str] = {}   # inputs' key -> shared file, of this export
        for rel in self.interrupted:  # written by an export that never finished: content unknown
            self.old[rel] = None

    # -- skipping ---------------------------------------------------------------
    def fresh(self, rel: str, key: str) -> bool:
        """True when `rel` is already there from inputs with this key (then it is kept as is)."""
        if self.old.get(rel) == key and (self.root / rel).is_file():
            self.files[rel] = key
            self.skipped += 1
            return True
        return False

    def shared(self, key: str) -> str | None:
        """The shared file an earlier export made from inputs `key` (link_shared), when it is still there
        as written; it is then kept (and this export's record says so)."""
        rel = self.aliases.get(key) or self.old_aliases.get(key)
        if rel is None:
            return None
        if rel not in self.files and not (self.old.get(rel) is not None and self.fresh(rel, self.old[rel])):
            return None
        self.aliases[key] = rel
        return rel

    # -- writing ----------------------------------------------------------------
    def _note(self, rel: str) -> None:
        """Record `rel` in the journal before it is written, so that an export killed after writing it
        still leaves a record of it (and of its temp file) for the next export to act on."""
        if rel in self._noted:
            return
        if self._journal is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._journal = open(self.root / JOURNAL, "a", encoding="utf-8")
        self._journal.write(json.dumps(rel) + "\n")
        self._journal.flush()  # to the kernel: a killed process loses nothing (no fsync: a power cut may)
        self._noted.add(rel)

    def write_text(self, rel: str, key: str, make: Callable[[], str]) -> None:
        if self.fresh(rel, key):
            return
        text = make()
        self._note(rel)
        atomic_write(self.root / rel, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.files[rel] = key
        self.written += 1

    def write_json(self, rel: str, key: str, make: Callable[[], Any]) -> None:
        # compact: a twin is read by programs (a whole resnet50 layer4's 2048 twins: 12 MB indented, 8 as here)
        self.write_text(rel, key, lambda: json.dumps(make(), sort_keys=True, ensure_ascii=False, default=str,
                                                     separators=(",", ":")) + "\n")

    def link(self, rel: str, key: str, src: Path) -> None:
        """Put file `src` (a cached picture) at `rel`: a hardlink where possible, else a copy."""
        if self.fresh(rel, key):
            return
        dest = self.root / rel

        def put(tmp: Path) -> None:
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)

        self._note(rel)
        atomic_write(dest, put)
        self.files[rel] = key
        self.linked += 1

    def link_shared(self, key: str, src: Path, folder: str) -> str:
        """Put `src` into `folder` under the hash of its bytes, once however many inputs make the same
        bytes (the same image patch of many channels); `key` names these inputs. Returns the file's rel."""
        h = hashlib.sha256(src.read_bytes()).hexdigest()[:20]
        rel = f"{folder}/{h}{src.suffix}"
        if rel not in self.files:
            self.link(rel, h, src)
        self.aliases[key] = rel
        return rel

    # -- finishing --------------------------------------------------------------
    def remove_temps(self) -> int:
        """Remove the temp files earlier exports left beside the files they were writing: only the
        temps of files this site's record names (and of the record itself)."""
        by_dir: dict[Path, set[str]] = {self.root: {STATE, JOURNAL}}
        for rel in set(self.old) | self.interrupted:
            p = self.root / rel
            by_dir.setdefault(p.parent, set()).add(p.name)
        return sum(fsutil.remove_temp_files(d, names=names, recursive=False) for d, names in by_dir.items()
                   if _inside(self.root, d))

    def prune(self) -> int:
        """Remove files an earlier export wrote that this one did not (only files the record names)."""
        n = 0
        for rel in sorted(set(self.old) - set(self.files)):
            p = self.root / rel
            if _inside(self.root, p) and p.is_file():
                p.unlink()
                n += 1
                d = p.parent
                while d != self.root and _inside(self.root, d):
                    try:
                        d.rmdir()
                    except OSError:
                        break
                    d = d.parent
        return n

    def save(self, **extra: Any) -> None:
        self.state = {**extra, "files": self.files, "aliases": self.aliases}
        write_record(self.root / STATE, self.state)
        self.close()
        (self.root / JOURNAL).unlink(missing_ok=True)  # the record now holds all this export wrote

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def write_record(path: Path, state: dict[str, Any]) -> None:
    """The site's record, compact: it names every file of the site (some 20 a channel, 4 MB indented for a
    whole resnet50 layer4)."""
    text = json.dumps(state, sort_keys=True, default=str, separators=(",", ":")) + "\n"
    fsutil.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_journal(path: Path) -> set[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return set()
    out = set()
    for line in lines:
        try:
            rel = json.loads(line)
        except ValueError:
            continue  # the last line of a killed writer may be torn
        if isinstance(rel, str) and rel:
            out.add(rel)
    return out


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """atlas.util.files.atomic_write without fsync: a site can be exported again; what matters is that a
    reader never sees a half-written file."""
    fsutil.atomic_write(path, write, fsync=False)


def _inside(root: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
