"""File-system helpers that never leave a half-written file behind.

Every output goes to a temporary file in the destination folder and is renamed into
place only once complete (``os.replace`` is atomic on POSIX and Windows), so a reader
sees either the old file or the new one, even if the writer is killed. A writer killed
between the two (``kill -9``, the out-of-memory killer) leaves its temporary file, hidden
by a leading dot; :func:`remove_temporaries` clears them once no writer can be at work.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

import errno

from .errors import InputError, StorageError, VQMedSegError

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the final suffix (``.nrrd``, ``.seg.nrrd`` ...) so writers
    that choose a format from the extension still work. On an exception the temporary
    file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary(path.parent, f".{path.name.split('.')[0]}-", suffix)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    try:
        yield tmp
        _fsync_file(tmp)
        _keep_mode(path, tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in _STORAGE_ERRNOS:
            raise storage_error(path, exc) from exc
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_files() -> Iterator[Callable[[str | os.PathLike], Path]]:
    """Write several files that belong together (a prediction and its uncertainty maps, an
    experiment's results and the record of its settings): ``stage(path)`` gives the
    temporary to write ``path`` to, and every one is renamed into place once the block
    completes, or deleted if it fails, leaving the earlier files whole.

    A writer's error that names a temporary is raised again naming the file the user knows.
    """
    staged: dict[Path, Path] = {}
    with contextlib.ExitStack() as renames:  # on leaving: every temporary renamed, or every one deleted

        def stage(path: str | os.PathLike) -> Path:
            tmp = renames.enter_context(atomic_path(path))
            staged[tmp] = Path(path)
            return tmp

        try:
            yield stage
        except VQMedSegError as exc:
            message = str(exc)
            for tmp, path in staged.items():
                message = message.replace(str(tmp), str(path))
            if message == str(exc):
                raise
            raise type(exc)(message) from exc


# what _new_temporary names, for atomic_path: ".<the name up to its first dot>-<8 hex digits><suffix>"
_TEMPORARY = re.compile(r"^\.[^.]*-[0-9a-f]{8}\..+$")


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Make the output folder ``path`` (and any missing parent) before a long run, so a
    folder that cannot be made is an error in seconds, not after hours; if the run fails
    or is refused, the folders made here are removed again while they are still empty.
    A folder that was there before is never removed. Yields the folder's resolved path."""
    given = path = Path(path)
    path = path.resolve()  # `new/../existing` names `existing`, which must never count as made here
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{option} {given}: cannot make the folder ({exc.strerror or exc}); "
                           "expected a folder this user may write to") from exc
    try:
        yield path  # resolved: writing through `new/../existing` would make `new`
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()  # only an empty folder
            except OSError:
                break
        raise


def remove_temporaries(folder: str | os.PathLike, recursive: bool = False, suffix: str = "") -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` (and below it,
    with ``recursive``) when their writer was killed before renaming them; return them.
    With ``suffix``, only those of files whose names end with it.

    Only for a folder no writer is using at the time (its writers' locks held): a file
    being written looks the same as one left behind.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob(".*") if recursive else folder.glob(".*")):
        if _TEMPORARY.match(path.name) and path.name.endswith(suffix) and path.is_file() and not path.is_symlink():
            try:
                path.unlink()
            except OSError:  # best effort: gone already, or not ours to delete
                continue
            removed.append(path)
    return removed


def _new_temporary(folder: Path, prefix: str, suffix: str) -> Path:
    """A new, empty file in ``folder`` with the permissions of any file the user creates
    (0666 less the umask). ``tempfile.mkstemp`` gives 0600, and the rename would hand that
    on to the output, hiding it from the user's group."""
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, f"no free temporary name for {prefix}*{suffix}", str(folder))


def _keep_mode(path: Path, tmp: Path) -> None:
    """Give ``tmp`` the permission bits of the file it replaces, so that a rewrite keeps the
    mode the user gave ``path`` (a new file keeps the umask's). POSIX only, and best effort:
    a file system without permission bits (a network share) keeps its own rules."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def storage_error(path: Path, exc: OSError) -> StorageError:
    """A clear error for a write that the file system refused; the old file (if any) is intact."""
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for the file system"}.get(exc.errno, exc.strerror)
    return StorageError(f"{path}: could not write ({reason}); expected a writable folder with free space. "
                        "Nothing was half-written: the previous version of the file, if any, is unchanged")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_text(path: str | os.PathLike, error: type[Exception] = InputError, expected: str = "") -> str:
    """The UTF-8 text in ``path``; a missing, unreadable or non-UTF-8 file raises ``error``
    naming it, and ``expected`` ("expected ...") says what should have been there."""
    path = Path(path)
    hint = f"; expected {expected}" if expected else ""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: not found{hint}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text{hint}") from None
    except OSError as exc:
        raise error(f"{path}: could not be read ({exc.strerror}){hint}") from None


def read_json(path: str | os.PathLike, error: type[Exception] = InputError, expected: str = "") -> Any:
    """The JSON in ``path``; a missing, unreadable or corrupt file raises ``error`` naming it.

    ``expected`` finishes the message ("expected ...") with what should have been there,
    so that each caller says which file of which tool it was looking for.
    """
    text = read_text(path, error, expected)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = f"; expected {expected}" if expected else ""
        raise error(f"{Path(path)}: not valid JSON ({exc.msg} at line {exc.lineno}){hint}") from None


def safe_id(value: str, what: str = "case identifier") -> str:
    """Return ``value`` if it is safe as a single path component, else raise.

    Identifiers come from file names and user input; they must never reach outside the
    folder they are joined to (no ``..``, no separators, no leading dot).
    """
    if not isinstance(value, str) or not _SAFE_ID.match(value) or value in {".", ".."}:
        raise InputError(
            f"{what} {value!r}: expected letters, digits, '.', '_' or '-' (at most 128, "
            "not starting with '.' or '-'), so that it cannot name a path outside the workspace"
            f"; for example {_cleaned(value)!r}"
        )
    if _device_name(value):
        raise InputError(f"{what} {value!r}: a name Windows keeps for a device (CON, PRN, AUX, NUL, COM1-9, LPT1-9), "
                         f"so the workspace could not be used there; expected another, for example {_cleaned(value)!r}")
    return value


# names Windows gives to devices, whatever their case and extension ('nul.txt' is NUL)
_DEVICE_NAMES = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))})


def _device_name(value: str) -> bool:
    return value.split(".")[0].casefold() in _DEVICE_NAMES


def _cleaned(value: object) -> str:
    """``value`` with every run of other characters made one '_' (at most 128 characters),
    and ``_1`` after a device name of Windows."""
    cleaned = (re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._-") or "case")[:124]
    if _device_name(cleaned):
        stem, dot, rest = cleaned.partition(".")
        cleaned = f"{stem}_1{dot}{rest}"
    return cleaned


def sanitize_id(value: str) -> str:
    """Turn an arbitrary name (a file stem, a patient id) into a safe identifier."""
    return safe_id(_cleaned(value))


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; Windows cannot open a folder to sync it)."""
    if os.name == "posix":
        _fsync_file(path)
