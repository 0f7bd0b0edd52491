"""Publishing files so that a reader never sees half of one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp path beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files are as readable as any other
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def temp_files(folder: str | os.PathLike):
    """The temporary files atomic_write leaves under `folder` when its process is killed mid-write."""
    return (f for f in Path(folder).rglob(".*.tmp") if f.is_file())


def remove_temp_files(folder: str | os.PathLike, older_than_s: float | None = None) -> int:
    """Remove what `temp_files` finds (only those not modified for `older_than_s`, when given: where
    writers run without a lock, a younger one may still be written). Returns how many."""
    import time

    now, n = time.time(), 0
    for f in list(temp_files(folder)):
        try:
            if older_than_s is None or now - f.stat().st_mtime > older_than_s:
                f.unlink()
                n += 1
        except FileNotFoundError:
            pass  # its writer renamed or removed it meanwhile
    return n


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_parquet(path: str | os.PathLike, table, **kwargs) -> Path:
    import pyarrow.parquet as pq

    kwargs.setdefault("compression", "zstd")
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, **kwargs))


def publish_dir(staging: Path, target: Path, overwrite: bool = False) -> None:
    """Rename a finished staging folder to `target`; an existing target is replaced only if asked."""
    if target.exists():
        if not overwrite:
            raise FileExistsError(target)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
