"""Atomic file writes: a temp file in the target's directory, fsync, rename, fsync the directory.

A reader never sees a half-written output, and an existing output is replaced only when the caller
says so (``force=True``).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, BinaryIO

from .errors import OutputExistsError, OutputWriteError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, force: bool = False) -> Path:
    """Write ``path`` by calling ``write(fileobj)`` on a temp file, then rename it into place.

    Raises OutputExistsError if ``path`` exists and ``force`` is false, and OutputWriteError
    (with the reason and the fix) when the directory is missing, read-only or full. On any
    failure the temp file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it or choose another path")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OutputWriteError(f"cannot write {path}: directory {directory} does not exist")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(directory)
    except OSError as e:
        raise OutputWriteError(_explain(path, e)) from e
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _explain(path: Path, e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return f"cannot write {path}: no space left on device; free some space or write elsewhere"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: the directory is read-only or not writable; choose another output path"
    return f"cannot write {path}: {e.strerror or e}"
