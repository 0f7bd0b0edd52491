"""One writer at a time: a lock beside what a command writes (an atlas, a site, a training run).

`writer_lock(target, what)` holds an operating-system lock (flock) on `.NAME.lock` beside `target` for as
long as the command writes, with a record in it of who holds it (process id, host, start time, command).
A second writer is refused at once, in one line naming the holder, and touches nothing.

Why flock and a record both:
  * flock is released by the kernel when its holder dies, however it dies: a build killed with kill -9
    leaves a lock file that the next `--resume` takes over (its record names this host and the lock is
    free, so the holder is gone).
  * On a shared filesystem (NFS, Lustre: what multi-node torchrun builds need for --out) flock may be
    unreliable or not shared between hosts. There only rank 0 takes the lock, and a record that names
    another host is honoured even when flock says the lock is free: that host may be running. If it is
    not (its build died), the message says which file to delete to clear the stale lock.

The file is removed when the lock is released, so a finished atlas or site leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from ..errors import AtlasError
from .files import recover_replace


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of `target`: hidden, beside it (the target itself may not exist yet)."""
    # the real path: a symlink and its target are one thing to write, so one lock
    target = Path(os.path.realpath(target))
    name = target.name[:-len(".partial")] if target.name.endswith(".partial") else target.name
    return target.with_name(f".{name}.lock")


def _record(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        rec = json.loads(data) if data.strip() else None
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def _busy(target: Path, path: Path, rec: dict | None, what: str) -> AtlasError:
    if not rec:
        return AtlasError(f"'{target}' is being written by another process ({path} is locked): wait for it "
                          "to finish")
    who = f"process {rec.get('pid')} on {rec.get('host')}, since {rec.get('started')}"
    return AtlasError(f"{rec.get('what', 'a writer')} of '{target}' is running ({who}), so {what} cannot start: "
                      f"wait for it to finish; if that process is gone (a shared filesystem can keep a lock its "
                      f"holder lost), delete {path}")


# The lock descriptors this process holds. A forked child (a DataLoader's decoding worker) closes its
# copies at once: flock belongs to the open file, and a worker outliving its killed parent for the few
# seconds it takes to notice would otherwise keep the lock, and refuse the --resume that follows a kill -9.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, what: str, *, enabled: bool = True) -> Iterator[Path | None]:
    """Hold the writer lock of `target` for a `what` ("a build", "an export"...); AtlasError if taken.

    `enabled=False` is a no-op (torchrun ranks other than 0: rank 0 holds the lock for the job).
    """
    if not enabled:
        yield None
        return
    target = Path(target)
    path = lock_path(target)
    made = _make_folders(path.parent)  # an OSError says which path refused (the CLI: one line)
    try:
        fd = _take(path, target, what)
        _HELD.add(fd)
        try:
            # a replacement of the target killed between its two renames is finished or undone first
            done = recover_replace(target, target.with_name(target.name + ".partial"))
            if done:
                sys.stderr.write(f"{done}\n")
            yield path
        finally:
            with contextlib.suppress(OSError):
                path.unlink()  # before the unlock, so a waiter's samestat check sees it gone
            _HELD.discard(fd)
            os.close(fd)
    finally:
        for folder in made:  # a refused or failed command leaves no folder of ours behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a finished build's atlas lives there


def _take(path: Path, target: Path, what: str) -> int:
    """The locked, recorded file descriptor of the lock file `path`, or AtlasError naming the holder."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AtlasError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            rec = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _busy(target, path, rec, what) from None
            raise AtlasError(f"cannot lock {path}: {e.strerror or e}") from None
        # The file may have been removed by a holder releasing it between our open and our flock: then
        # this lock is on a file nobody else will see. Take a fresh one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        rec = _read(fd)
        if rec and rec.get("host") != socket.gethostname():
            # flock said free, but another host wrote this: on a shared filesystem it may still be running
            raise _busy(target, path, rec, what)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_record(what)).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it made, deepest first."""
    made = []
    p = folder
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def holds_writer_lock(what: str, target: str = "out"):
    """Decorator: run the function under the writer lock of its `target` argument (a folder it writes)."""
    import functools
    import inspect

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            folder = signature.bind(*args, **kwargs).arguments[target]
            with writer_lock(folder, what):
                return fn(*args, **kwargs)

        return locked

    return wrap
