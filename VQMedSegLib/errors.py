"""Errors a user can act on.

Every message names the file or parameter, what was found and what was expected. The
command line turns them into one line on stderr and a non-zero exit code (see
``VQMedSegLib.cli.main``), never a traceback.
"""

from __future__ import annotations  # `str | None` below on Python 3.9 (3D Slicer 5.8)


class VQMedSegError(Exception):
    """Base class: a problem the user can fix (bad input, bad configuration, busy workspace)."""

    exit_code = 2
    job_id: str | None = None  # the job whose event log recorded this error, if one did


class InputError(VQMedSegError):
    """A file or parameter is missing, unreadable, or not what the task expects."""


class ConfigError(VQMedSegError):
    """A configuration has unknown keys, wrong types or out-of-range values."""


class WorkspaceError(VQMedSegError):
    """The workspace is missing, locked by another job, or of an incompatible version."""

    exit_code = 3


class StorageError(WorkspaceError):
    """A file could not be written: the disk is full, the folder is read-only, or access is denied."""


class JobCancelled(VQMedSegError):
    """Raised inside a job when a cancel was requested; the job stops cleanly."""

    exit_code = 130


def listed(names: list[str], most: int = 4) -> str:
    """Names as a message lists them: ``a``, ``a and b``, ``a, b and c``; beyond ``most``,
    the first ones and how many more (``a, b, c and 5 more``)."""
    if len(names) <= 1:
        return "".join(names)
    if len(names) <= most:
        return f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{', '.join(names[:most - 1])} and {len(names) - most + 1} more"
