"""Running a job: one process, its events, its cancel request, its lock.

Inside the job process, :class:`JobContext` takes the workspace's job lock (a second job
on the same workspace is refused), numbers and writes events, shows a tqdm bar on a
terminal, and turns a cancel request into :class:`~VQMedSegLib.errors.JobCancelled` at the
next safe point. A cancel request is either SIGTERM or a file ``jobs/<id>/cancel`` (or
``cancel`` at the workspace root, for "whatever is running").

Outside, :func:`launch` starts a job as ``python -m VQMedSegLib ...`` in its own process
group with an argument list (never a shell string), and :func:`cancel` asks it to stop,
then kills the whole process tree if it does not.

Exit codes: 0 done, 2 bad input or configuration, 3 workspace busy or broken,
130 cancelled (a cancel request, SIGTERM or Ctrl-C), 1 anything unexpected.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from ..errors import JobCancelled, VQMedSegError, WorkspaceError
from .events import EventLog
from .locks import HeldLock, read_lock_info
from .workspace import Workspace

__all__ = ["JobContext", "launch", "cancel", "running_job", "new_job_id", "record_refusal"]


def new_job_id(kind: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"


class JobContext:
    """The running job's handle. Use as a context manager around the job's work."""

    def __init__(
        self,
        workspace: Workspace,
        kind: str,
        job_id: str | None = None,
        params: dict[str, Any] | None = None,
        progress_bar: bool | None = None,
    ):
        self.workspace = workspace
        self.kind = kind
        self.job_id = job_id or os.environ.get("VQMEDSEG_JOB_ID") or new_job_id(kind)
        self.params = params or {}
        self.events: EventLog = workspace.events(self.job_id)
        self._lock = HeldLock(workspace.lock_path)
        self._cancel_signal = False
        self._previous_handler: Any = None
        self._bar = None
        self._bar_desc = ""
        self._progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self._last_progress_emit = 0.0
        self.status = "created"

    # ---------------------------------------------------------------- entering
    def _acquire(self, attempts: int = 10, pause: float = 0.05) -> bool:
        """The workspace lock, tried a few times over half a second: :func:`running_job`
        (``workspace status``, the Slicer module's poll) holds it for an instant to see
        whether a job runs, and a job starting in that instant must not be refused."""
        for attempt in range(attempts):
            if self._lock.try_acquire():
                return True
            if attempt < attempts - 1:
                time.sleep(pause)
        return False

    def __enter__(self) -> "JobContext":
        if not self._acquire():
            info = read_lock_info(self.workspace.lock_path)
            raise WorkspaceError(
                f"workspace {self.workspace.root} is busy: another job holds its lock ({info.strip() or 'unknown job'}); "
                "wait for it to finish or cancel it with 'vqmedseg cancel --workspace ...'"
            )
        self._lock.write_info(
            json.dumps({"job": self.job_id, "kind": self.kind, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        )
        self.job_dir.mkdir(parents=True, exist_ok=True)
        # a cancel asked for this job while it started up (its id is known from its launch) is
        # kept; a workspace-wide one left from before is not this job's
        self._clear_cancel_files(own=False)
        # what an earlier job (or `workspace add`, `annotate`) killed mid-write left behind
        removed = self.workspace.remove_stale_temporaries()
        if _in_main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.status = "running"
        self.events.emit("started", kind=self.kind, pid=os.getpid(), params=self.params,
                         **({"removed_temporary_files": removed} if removed else {}))
        _record_job(self.workspace, self.job_id, self.kind, "running")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._bar is not None:
            self._bar.close()
        try:
            reason = ""
            if exc_type is None:
                self.status = "done"
                self.events.emit("finished", status="done")
            elif issubclass(exc_type, (JobCancelled, KeyboardInterrupt)):
                # Ctrl-C at a terminal is the user's cancel, not a failure; checkpoints are written
                # atomically, so the job resumes from the last one like any cancelled job
                self.status = "cancelled"
                reason = "interrupted (Ctrl-C)" if issubclass(exc_type, KeyboardInterrupt) else str(exc) or "cancel requested"
                self.events.emit("cancelled", status="cancelled", reason=reason)
            elif issubclass(exc_type, VQMedSegError):
                self.status = "failed"
                reason = str(exc)
                self.events.emit("error", status="failed", message=reason)
            else:
                self.status = "failed"
                reason = f"{exc_type.__name__}: {exc}"
                self.events.emit(
                    "error",
                    status="failed",
                    message=reason,
                    traceback="".join(traceback.format_exception(exc_type, exc, tb))[-4000:],
                )
            if isinstance(exc, VQMedSegError):
                exc.job_id = self.job_id  # recorded here, so not a refusal (see record_refusal)
            _record_job(self.workspace, self.job_id, self.kind, self.status, reason)
        finally:
            self._clear_cancel_files()
            if self._previous_handler is not None and _in_main_thread():
                signal.signal(signal.SIGTERM, self._previous_handler)
            self._lock.release()
        return False

    # ------------------------------------------------------------ cancellation
    @property
    def job_dir(self) -> Path:
        return self.workspace.job_dir(self.job_id)

    def _cancel_files(self) -> list[Path]:
        return [self.job_dir / "cancel", self.workspace.root / "cancel"]

    def _clear_cancel_files(self, own: bool = True) -> None:
        for f in self._cancel_files()[0 if own else 1 :]:
            try:
                f.unlink()
            except FileNotFoundError:
                pass

    def _on_sigterm(self, signum, frame) -> None:
        self._cancel_signal = True

    def cancel_requested(self) -> bool:
        return self._cancel_signal or any(f.exists() for f in self._cancel_files())

    def check_cancel(self) -> None:
        """Raise :class:`JobCancelled` if a cancel was requested (call between steps)."""
        if self.cancel_requested():
            raise JobCancelled("cancel requested" + (" (SIGTERM)" if self._cancel_signal else ""))

    # ----------------------------------------------------------------- events
    def emit(self, type: str, **fields: Any) -> dict:
        return self.events.emit(type, **fields)

    def progress(self, done: int, total: int, message: str = "", force: bool = False, **fields: Any) -> None:
        """Report progress; events are throttled to about two a second."""
        if self._progress_bar:
            desc = f"{self.kind}: {message}" if message else self.kind
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True)
            elif self._bar.total != total or self._bar_desc != desc:  # a new stage (features, then iterations)
                self._bar.reset(total=total)
                self._bar.set_description_str(desc, refresh=False)
            self._bar_desc = desc
            self._bar.n = done
            if fields:
                self._bar.set_postfix({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}, refresh=False)
            self._bar.refresh()
        now = time.monotonic()
        if force or done >= total or now - self._last_progress_emit > 0.5:
            self._last_progress_emit = now
            self.events.emit("progress", done=done, total=total, fraction=done / max(total, 1), message=message, **fields)

    def warn(self, message: str) -> None:
        import logging

        logging.getLogger("vqmedseg").warning(message)
        self.events.emit("warning", message=message)


INTERRUPTED = "ended without a final status: killed, or its machine stopped"


def interrupted(jobs: list[dict], running: str | None) -> list[dict]:
    """``jobs`` (the job list) with every job recorded as running, other than ``running``
    (the job holding the workspace lock, if any), shown as ``interrupted``: a job killed
    with ``kill -9`` or by the out-of-memory killer writes no final status."""
    return [{**j, "status": "interrupted", "reason": INTERRUPTED} if j.get("status") == "running" and j.get("id") != running
            else j for j in jobs]


def _record_job(workspace: Workspace, job_id: str, kind: str, status: str, reason: str = "") -> None:
    """The job's line in the workspace's job list (the last 50 jobs), with the first line of
    the reason when it did not finish (the event log has all of it). A job starting holds
    the lock, so any other still recorded as running was interrupted, and is written so."""
    def update(state: dict) -> None:
        jobs = [j for j in state.get("jobs", []) if j.get("id") != job_id]
        if status == "running":
            jobs = interrupted(jobs, job_id)
        entry = {"id": job_id, "kind": kind, "status": status, "pid": os.getpid(), "updated": time.time()}
        first = next(iter(reason.strip().splitlines()), "")
        if first:
            entry["reason"] = first if len(first) <= 300 else first[:299] + "…"
        state["jobs"] = (jobs + [entry])[-50:]

    try:
        workspace.update(update)
    except VQMedSegError:
        pass  # the event log already says what happened


def record_refusal(workspace: Workspace, kind: str, message: str) -> str:
    """Record a job refused before it began (bad input, a busy workspace), which has no
    :class:`JobContext` to do it: an ``error`` event with status ``refused`` and the
    reason, and the job's line in the job list. The running job's lock is not needed, so
    a job refused because another holds it is recorded too. Returns the job's id."""
    job_id = os.environ.get("VQMEDSEG_JOB_ID") or new_job_id(kind)
    workspace.events(job_id).emit("error", status="refused", kind=kind, message=message)
    _record_job(workspace, job_id, kind, "refused", message)
    return job_id


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------- from the outside
def launch(
    args: list[str],
    workspace: Workspace,
    kind: str,
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m VQMedSegLib <args>`` as a job; returns the process and the job id.

    The process gets its own session/process group, so :func:`cancel` can end it with all
    its children; its output goes to ``jobs/<id>/log.txt``.
    """
    job_id = new_job_id(kind)
    job_dir = workspace.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    run_env = dict(os.environ if env is None else env)
    run_env["VQMEDSEG_JOB_ID"] = job_id
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    repo_root = str(Path(__file__).resolve().parents[2])
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, run_env.get("PYTHONPATH", "")) if p)
    cmd = [python or sys.executable, "-m", "VQMedSegLib", *[str(a) for a in args]]
    log = open(job_dir / "log.txt", "ab")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=run_env,
                                **own_process_group())
    finally:
        log.close()
    return proc, job_id


def own_process_group() -> dict[str, Any]:
    """``subprocess.Popen`` arguments that make the child lead a process group of its own
    (so that :func:`kill_tree` ends it with its children) while staying in the caller's
    session. Not a new session: Linux shares the CPU between sessions ("autogroups"), and a
    job in a session of its own got one core's share for its two threads whenever anything
    else ran, which made training ten times slower."""
    if os.name == "nt":  # pragma: no cover
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}  # Python 3.10


def running_job(workspace: Workspace) -> dict | None:
    """Who holds the workspace's job lock right now, or ``None``."""
    if not HeldLock(workspace.lock_path).held_elsewhere():
        return None
    try:
        return json.loads(read_lock_info(workspace.lock_path) or "{}") or {"job": "unknown"}
    except json.JSONDecodeError:
        return {"job": "unknown"}


def cancel(workspace: Workspace, job_id: str | None = None, proc: subprocess.Popen | None = None, grace: float = 15.0) -> bool:
    """Ask the running job to stop; kill its process tree if it has not within ``grace`` s.

    Returns True if a job was running.
    """
    info = running_job(workspace)
    target = job_id or (info or {}).get("job")
    if target and target != "unknown":
        workspace.job_dir(target).mkdir(parents=True, exist_ok=True)
        (workspace.job_dir(target) / "cancel").touch()
    else:
        (workspace.root / "cancel").touch()
    if proc is None:
        return info is not None
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.1)
    kill_tree(proc.pid)
    proc.wait(timeout=10)
    return True


def kill_tree(pid: int) -> None:
    """Kill a process and every process in its group (it was launched as a group leader)."""
    if os.name == "nt":  # pragma: no cover
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
