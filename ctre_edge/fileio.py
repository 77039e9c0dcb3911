"""Atomic file writes: a temp file in the target's directory, fsync, rename, fsync the directory.

A reader never sees a half-written output, and an existing output is replaced only when the caller
says so (``force=True``). ``FileLock`` and ``lock_output`` keep two processes off one output (or off
one kernel cache while it is being filled).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from .errors import ModelFileError, OutputExistsError, OutputWriteError

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same content gives the same bytes


def refuse_overwrite(path, force: bool) -> None:
    """Raise OutputExistsError (exit code 6) if ``path`` exists and ``force`` is false: the one message."""
    if not force and Path(path).exists():
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it or choose another path")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, force: bool = False) -> Path:
    """Write ``path`` by calling ``write(fileobj)`` on a temp file, then rename it into place.

    Raises OutputExistsError if ``path`` exists and ``force`` is false, and OutputWriteError
    (with the reason and the fix) when the directory is missing, read-only or full. On any
    failure the temp file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    refuse_overwrite(path, force)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OutputWriteError(f"cannot write {path}: directory {directory} does not exist")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point("write")  # test hook: a kill here leaves only the temp file behind
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def write_archive(path, fmt: str, version: int, arrays: dict, meta: dict, *, force: bool = False) -> Path:
    """Write arrays and a JSON header as an uncompressed zip of .npy members, atomically.

    The header carries the format name and version and a SHA-256 over every array, checked by
    ``read_archive``. Readable with ``numpy.load`` (no pickle).
    """
    header = dict(meta, format=fmt, format_version=version, sha256=array_digest(arrays))
    header_bytes = json.dumps(header, sort_keys=True, indent=1).encode()

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(zipfile.ZipInfo("meta.json", _ZIP_TIME), header_bytes)
            for name, arr in arrays.items():
                # zip64 only where needed: its headers differ between Python patch releases, and
                # the same model should give the same bytes everywhere.
                big = arr.nbytes > (1 << 31) - (1 << 20)
                with z.open(zipfile.ZipInfo(name + ".npy", _ZIP_TIME), "w", force_zip64=big) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)

    return atomic_write(path, write, force=force)


def read_archive(path, fmt: str, version: int, what: str = "model") -> tuple[dict, dict]:
    """(arrays, meta) of a file written by ``write_archive``; ModelFileError (one line) on any defect."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} file {path} not found")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "meta.json" not in names:
                raise ModelFileError(f"{path} is not a ctre-edge {what} (no meta.json)")
            meta = json.loads(z.read("meta.json"))
            if not isinstance(meta, dict) or meta.get("format") != fmt:
                raise ModelFileError(f"{path} is not a ctre-edge {what}")
            found = meta.get("format_version")
            if not isinstance(found, int):
                raise ModelFileError(f"{path} has no valid format version")
            if found > version:
                raise ModelFileError(f"{path} uses {what} format {found}, newer than this ctre-edge reads "
                                     f"({version}); upgrade ctre-edge")
            arrays = {}
            for name in sorted(names - {"meta.json"}):
                with z.open(name) as f:
                    arrays[name[:-4]] = np.lib.format.read_array(f, allow_pickle=False)
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged bytes surface as many types (zlib, struct, Memory...)
        raise ModelFileError(f"{path} is not a valid ctre-edge {what} or is corrupt "
                             f"({type(e).__name__}: {e})") from None
    if array_digest(arrays) != meta.get("sha256"):
        raise ModelFileError(f"{path} is corrupt: its arrays do not match the stored checksum")
    return arrays, meta


def array_digest(arrays: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the arrays, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(arr.dtype.str.encode())
        h.update(str(arr.shape).encode())
        h.update(memoryview(arr).cast("B") if arr.size else b"")
    return h.hexdigest()


def fault_point(name: str) -> None:
    """Test hook: CTRE_EDGE_KILL_AT=name:n sends SIGKILL to this process the n-th time it passes ``name``.

    The crash-recovery tests use it to kill a run at exact places (inside a checkpoint write,
    during a topology update); without the variable it does nothing.
    """
    spec = os.environ.get("CTRE_EDGE_KILL_AT")
    if not spec or not spec.startswith(name + ":"):
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


_fault_counts: dict = {}


class FileLock:
    """An exclusive advisory lock (``fcntl.flock``) on a lock file, held for a ``with`` block.

    ``wait=False`` raises ``Locked`` (with the holder's pid, which the holder writes into the file)
    instead of waiting; ``on_wait()`` is called once before a blocking wait. flock locks belong to the
    open file, so the kernel drops them when the holder exits or is killed: a lock is never stale.
    ``remove=True`` deletes the lock file on release (while still holding it); a process that locked
    the deleted file checks that its file is still the one at the path, and retries if not.

    Fallback: where ``fcntl`` is missing (not POSIX), or the lock file cannot be created or locked (a
    read-only directory, a filesystem without locks), ``held`` is False and nothing is locked; the
    caller goes on as before locks existed (writes stay atomic, only the collision goes unnoticed).
    """

    def __init__(self, path, *, wait: bool = True, on_wait: Callable[[], None] | None = None, remove: bool = False):
        self.path, self.wait, self.on_wait, self.remove = Path(path), wait, on_wait, remove
        self.fd, self.held = None, False

    def __enter__(self) -> "FileLock":
        try:
            import fcntl  # POSIX only: elsewhere the fallback above
        except ImportError:
            return self
        for _ in range(100):  # each retry means another process removed the file we had locked
            fd = self._lock(fcntl)
            if fd is None:
                return self
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except OSError:
                pass
            os.close(fd)
        else:
            return self
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the other process's message
        self.fd, self.held = fd, True
        return self

    def _lock(self, fcntl) -> int | None:
        """An open, locked descriptor of the lock file; None when locking is unavailable here."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    raise Locked(self.path, _holder(fd)) from None
                if self.on_wait is not None:
                    self.on_wait()
                    self.on_wait = None
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            if isinstance(e, Locked):
                raise
            return None  # ENOLCK, EOPNOTSUPP (some network filesystems): no lock
        except BaseException:
            os.close(fd)
            raise
        return fd

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            if self.remove:
                try:
                    self.path.unlink()
                except OSError:
                    pass
            os.close(self.fd)  # closing the file releases the lock
            self.fd, self.held = None, False
        return False


class Locked(BlockingIOError):
    """``FileLock(wait=False)`` found the lock held by another process (``pid``, when it wrote one)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(errno.EWOULDBLOCK, f"{path} is locked" + (f" by pid {pid}" if pid else ""))
        self.path, self.pid = path, pid


def _holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def lock_path(path) -> Path:
    """The lock file that guards output ``path``: ``.NAME.lock`` in the same directory."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def lock_output(path) -> Iterator[FileLock]:
    """Hold ``path`` for this process (``with lock_output(out):``) so a second run on it stops at once.

    Raises OutputWriteError (exit code 6) when another process holds it. The lock file is removed
    when the run ends.
    """
    lock = FileLock(lock_path(path), wait=False, remove=True)
    try:
        lock.__enter__()
    except Locked as e:
        who = f"another ctre-edge run (pid {e.pid})" if e.pid else "another ctre-edge run"
        raise OutputWriteError(f"cannot write {path}: {who} is writing it now; wait for that run to end "
                               f"or choose another output path") from None
    try:
        yield lock
    finally:
        lock.__exit__()
