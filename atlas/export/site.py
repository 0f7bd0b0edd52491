"""The site folder: atomic file writes, hardlinked pictures, and what to skip on a re-export.

The site keeps its own manifest, `.atlas-export.json`: for every file it wrote,
the key of the inputs it was made from. A file whose key is unchanged (and that
is still there) is not written again; files of an earlier export that this one
no longer produces are removed. Files are written one by one, each atomically
(temp file + rename), pictures before the pages that show them, so a reader
never sees half a page or a page whose pictures are missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..errors import AtlasError
from ..fsutil import atomic_write_json

STATE = ".atlas-export.json"


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
        if self.root.exists():
            if not self.root.is_dir():
                raise AtlasError(f"site folder '{self.root}' exists and is not a folder")
            st = self.root / STATE
            if st.is_file():
                try:
                    self.state = json.loads(st.read_text())
                except ValueError:
                    self.state = {}
            elif any(self.root.iterdir()):
                raise AtlasError(f"'{self.root}' is not empty and is not an exported atlas site: export into a new "
                                 "or empty folder (or one an earlier `atlas export` wrote)")
        self.old: dict[str, str] = dict(self.state.get("files") or {})

    # -- skipping ---------------------------------------------------------------
    def fresh(self, rel: str, key: str) -> bool:
        """True when `rel` is already there from inputs with this key (then it is kept as is)."""
        if self.old.get(rel) == key and (self.root / rel).is_file():
            self.files[rel] = key
            self.skipped += 1
            return True
        return False

    # -- writing ----------------------------------------------------------------
    def write_text(self, rel: str, key: str, make: Callable[[], str]) -> None:
        if self.fresh(rel, key):
            return
        text = make()
        atomic_write(self.root / rel, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.files[rel] = key
        self.written += 1

    def write_json(self, rel: str, key: str, make: Callable[[], Any]) -> None:
        self.write_text(rel, key, lambda: json.dumps(make(), indent=1, sort_keys=True, ensure_ascii=False,
                                                     default=str) + "\n")

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

        atomic_write(dest, put)
        self.files[rel] = key
        self.linked += 1

    # -- finishing --------------------------------------------------------------
    def prune(self) -> int:
        """Remove files an earlier export wrote that this one did not (only files the state names)."""
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
        self.state = {**extra, "files": self.files}
        atomic_write_json(self.root / STATE, self.state)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file beside `path`, then rename it into place (no fsync: a site can be
    exported again; what matters is that a reader never sees a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _inside(root: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
