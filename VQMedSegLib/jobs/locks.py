"""Advisory file locks that die with their holder.

The operating system releases an ``flock`` (POSIX) or ``msvcrt`` lock when the process
that holds it exits, however it exits, so a crashed or killed job never blocks the
workspace forever.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ..files import storage_error

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int, blocking: bool) -> bool:
        mode = msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, mode, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(fd: int, blocking: bool) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class HeldLock:
    """An exclusive lock on a file, held until :meth:`release` or process exit."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Whether the lock is now ours (False: another process holds it).

        Raises:
            StorageError: the lock file cannot be created or opened for writing (a
                read-only file system, no permission): what it guards cannot be written either.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(self.path, exc) from exc
        if _lock(fd, blocking=False):
            self.fd = fd
            return True
        os.close(fd)
        return False

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock, found without writing anything: the
        file is opened for reading, so a workspace on a read-only disk (an archive, a
        snapshot) can still be looked at. No file: nobody holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(self.path, exc) from exc
        try:
            if _lock(fd, blocking=False):
                _unlock(fd)
                return False
            return True
        finally:
            os.close(fd)

    def write_info(self, text: str) -> None:
        """Record who holds the lock (read by :func:`read_lock_info`)."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, text.encode("utf-8"))

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            _unlock(self.fd)
            os.close(self.fd)
            self.fd = None


def read_lock_info(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Block until the lock on ``path`` is ours; release it on exit.

    Raises:
        StorageError: when the lock file cannot be created or opened (a read-only or full
            file system, no permission): the writes it guards cannot happen either.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    try:
        _lock(fd, blocking=True)
        yield
    finally:
        _unlock(fd)
        os.close(fd)
