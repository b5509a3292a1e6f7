"""The workspace's event log: one JSON object per line, numbered.

Writers append complete lines (``write`` + ``fsync``) under an exclusive file lock, each
with a ``seq`` one above the previous line in the file. Readers use ``seq`` to notice a
gap (lines lost) and tolerate a truncated last line (a writer killed mid-write): both are
reported, never fatal.

Event types: ``started``, ``progress``, ``loss``, ``metric``, ``warning``, ``checkpoint``,
``result``, ``cancelled``, ``error``, ``finished``, plus workspace records
(``case_added``, ``case_mr_added``, ``annotated``). A ``started`` event lists, in
``removed_temporary_files``, the temporary files of killed writers the job deleted. An ``error`` has status ``failed`` (inside its job) or
``refused`` (the command line refused the job before it began; see
:func:`~VQMedSegLib.jobs.runner.record_refusal`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .locks import file_lock

__all__ = ["EventLog", "EventsRead", "read_events"]


def _last_seq(path: Path) -> int:
    """The ``seq`` of the last complete, valid line (0 for a new log)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    block = 1 << 16
    with open(path, "rb") as f:
        start = max(0, size - block)
        while True:
            f.seek(start)
            data = f.read(size - start)
            lines = data.split(b"\n")
            complete = lines[:-1] if not data.endswith(b"\n") else lines
            for raw in reversed(complete if start == 0 else complete[1:]):
                try:
                    return int(json.loads(raw)["seq"])
                except (ValueError, KeyError, TypeError):
                    continue
            if start == 0:
                return 0
            start = max(0, start - block)


class EventLog:
    """Append-only writer for ``events.jsonl``."""

    def __init__(self, path: str | os.PathLike, job: str | None = None):
        self.path = Path(path)
        self.job = job
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, type: str, **fields: Any) -> dict:
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            seq = _last_seq(self.path) + 1
            event = {"seq": seq, "time": time.time(), "type": type}
            if self.job:
                event["job"] = self.job
            event.update(fields)
            line = json.dumps(event, allow_nan=False, default=_json_default) + "\n"
            with open(self.path, "ab") as f:
                # A killed writer can leave a truncated line with no newline; start afresh.
                if f.tell() > 0 and not _ends_with_newline(self.path):
                    f.write(b"\n")
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        return event


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"event field of type {type(obj).__name__} is not JSON")


@dataclass
class EventsRead:
    events: list[dict] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (last seq seen, next seq seen)
    truncated_tail: bool = False
    bad_lines: int = 0
    offset: int = 0  # byte offset after the last complete line, for incremental reads


def read_events(path: str | os.PathLike, offset: int = 0, after_seq: int = 0) -> EventsRead:
    """Read events from byte ``offset`` on, skipping ``seq <= after_seq``.

    Incremental readers (the Slicer module's timer) pass back ``result.offset`` and
    the last ``seq`` they saw.
    """
    path = Path(path)
    out = EventsRead(offset=offset)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return out
    last_complete = data.rfind(b"\n")
    if last_complete < len(data) - 1:
        out.truncated_tail = bool(data[last_complete + 1 :].strip())
    body = data[: last_complete + 1] if last_complete >= 0 else b""
    out.offset = offset + len(body)
    prev = after_seq
    for raw in body.split(b"\n"):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
            seq = int(event["seq"])
        except (ValueError, KeyError, TypeError):
            out.bad_lines += 1
            continue
        if seq <= after_seq:
            continue
        if prev and seq != prev + 1:
            out.gaps.append((prev, seq))
        prev = seq
        out.events.append(event)
    return out
