"""Publishing files so that a reader never sees half of one."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Call `write(tmp)` on a temp path beside `path` (unique per process and thread), then rename it into
    place: a reader sees the old file or the whole new one, never half of one.

    fsync: flush the file and the rename to disk first, for what is expensive to remake (an atlas's
    tables, a checkpoint); a cache or a site, which can be made again, skips it (one fsync per picture
    costs more than drawing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files are as readable as any other
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # rename(2) onto a hardlink of the same file does nothing and leaves the temp name in place (a site's
    # picture linked again from the cache it already is a link of)
    tmp.unlink(missing_ok=True)
    if fsync:
        _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:  # makes the rename itself durable; some file systems cannot open a folder: then no more is possible
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# the temp names atomic_write makes (mkstemp: .NAME.XXXXXXXX.tmp) and older writers made (.NAME.PID.tmp);
# the tag never holds a dot, so NAME is what is left
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def remove_temp_files(folder: str | os.PathLike, *, older_than_s: float | None = None,
                      names: set[str] | None = None, recursive: bool = True) -> int:
    """Remove the temp files that writers killed mid-write left under `folder` (in it alone unless
    `recursive`): all of them under a writer's lock; where writers run without one (a cache), only
    those not modified for `older_than_s`; with `names`, only the temps of those file names. Returns
    how many went."""
    now, n = time.time(), 0
    folders = [Path(folder)]
    if recursive:
        folders += [p for p in Path(folder).rglob("*") if p.is_dir() and not p.is_symlink()]
    for d in folders:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            m = TEMP_NAME.match(e.name)
            if not m or (names is not None and m.group("name") not in names):
                continue
            try:
                if not e.is_file(follow_symlinks=False):
                    continue
                if older_than_s is not None and now - e.stat(follow_symlinks=False).st_mtime < older_than_s:
                    continue
                os.unlink(e.path)
                n += 1
            except OSError:
                pass  # gone already (another writer swept it), or not ours to remove
    return n


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_parquet(path: str | os.PathLike, table, **kwargs) -> Path:
    import pyarrow.parquet as pq

    kwargs.setdefault("compression", "zstd")
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, **kwargs))


def publish_dir(staging: Path, target: Path, overwrite: bool = False) -> None:
    """Rename a finished staging folder to `target`; an existing target is replaced only if asked.

    Replacing takes two renames (target aside to `.NAME.old-PID`, staging in); a process killed between
    them leaves no target. `recover_replace` (run by the next command that takes the target's lock)
    finishes or undoes that."""
    if target.exists():
        if not overwrite:
            raise FileExistsError(target)
        old = target.with_name(f"{OLD_PREFIX.format(name=target.name)}{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


OLD_PREFIX = ".{name}.old-"  # + the pid of the process that moved the replaced folder aside


def set_aside(target: Path) -> list[Path]:
    """The folders a replacement of `target` moved aside and did not remove (newest last)."""
    prefix = OLD_PREFIX.format(name=target.name)
    try:
        found = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()
                 and p.is_dir() and not p.is_symlink()]  # a link placed there is never moved into the target's place
    except OSError:
        return []
    return sorted(found, key=lambda p: p.lstat().st_mtime)


def recover_replace(target: Path, staging: Path | None = None, finished: str = "manifest.json") -> str | None:
    """Finish or undo a replacement of `target` that a killed process left half done (publish_dir); the
    caller holds the target's lock. With the target there, the replaced copies set aside are removed;
    without it, the finished staging folder (it holds `finished`) goes in, else the newest copy set aside
    comes back. Returns what was done, for one line of the caller's, or None."""
    aside = set_aside(target)
    if not aside:
        return None
    if target.exists() or target.is_symlink():
        done = f"removed {len(aside)} replaced cop{'y' if len(aside) == 1 else 'ies'} of '{target}' that an " \
               "interrupted replacement left"
    elif staging is not None and (staging / finished).is_file():
        os.replace(staging, target)
        done = f"finished the interrupted replacement of '{target}' (the new version is in place)"
    else:
        os.replace(aside.pop(), target)
        done = f"undid the interrupted replacement of '{target}' (the previous version is back)"
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)
    return done


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save, atomically. Into memory first: torch.save names the archive after the file, so a temp
    name would change the bytes."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def link_outside(root: Path, skip: tuple[str, ...] = ()) -> tuple[Path, Path] | None:
    """The first link under `root` (its top-level folders `skip` aside) that leads outside it, as (the link,
    where it leads), or None. Folders from someone else (an atlas, a comparison) may hold such links; what
    is read from them must stay inside them."""
    root = Path(root).resolve()
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in skip]
        for name in dirs + files:
            entry = Path(folder, name)
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                return entry, entry.resolve()
    return None

