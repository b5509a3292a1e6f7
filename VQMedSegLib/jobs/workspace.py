"""A workspace: one folder per project, everything a job needs and everything it made.

Layout::

    WS/
      state.json              format version, task, cases, labelled slices, models, jobs
      events.jsonl            numbered events of every job (see events.py)
      inputs/<case>/ct.nrrd   registered input volumes (copied, so the folder is self-contained)
      inputs/<case>/mr.nrrd
      annotations/<case>.nrrd annotated label volume on the CT grid
      checkpoints/<job-kind>/ resumable training state
      models/<model-id>.pt    finished models
      predictions/<case>/<job-id>/  prediction.seg.nrrd, uncertainty.nrrd (the one state.json names)
      jobs/<job-id>/          log of one job, its cancel request
      job.lock                held by the running job (released by the OS if it dies)
      .inputs.lock, .annotations.lock, .state.lock   held while inputs, annotations, state.json are written

Every file is written under a hidden temporary name and renamed into place. A writer
killed in between leaves that hidden file; the next job removes it
(:meth:`Workspace.remove_stale_temporaries`).

``state.json`` is only ever replaced atomically, under a short lock, so a Slicer session
marking a slice as annotated and a training job recording a model never overwrite each
other. Labelled slices are indices along the case's ``slice_axis`` in the CT's own voxel
index space; an annotated slice with no foreground is labelled (it says "nothing here"),
unlike a slice nobody looked at.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..data.volume import Volume, label_values
from ..errors import InputError, WorkspaceError
from ..files import atomic_write_json, read_json, remove_temporaries, safe_id
from ..tasks import get_task
from .events import EventLog
from .locks import file_lock

FORMAT_VERSION = 1
# what every state.json holds, and of which JSON type (optional keys, such as budget, are not listed)
STATE_KEYS = {"task": str, "cases": dict, "annotations": dict, "rounds": list, "models": list, "jobs": list}


class Workspace:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.root / "job.lock"

    def case_dir(self, case_id: str) -> Path:
        return self.root / "inputs" / safe_id(case_id)

    def annotation_path(self, case_id: str) -> Path:
        return self.root / "annotations" / f"{safe_id(case_id)}.nrrd"

    def prediction_dir(self, case_id: str) -> Path:
        return self.root / "predictions" / safe_id(case_id)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / safe_id(job_id, "job identifier")

    def checkpoint_dir(self, kind: str) -> Path:
        return self.root / "checkpoints" / safe_id(kind, "checkpoint kind")

    def resolve(self, relative: str) -> Path:
        """A path recorded in ``state.json``, guaranteed to stay inside the workspace."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents and path != self.root.resolve():
            raise WorkspaceError(f"workspace {self.root}: recorded path {relative!r} points outside the workspace")
        return path

    def events(self, job: str | None = None) -> EventLog:
        return EventLog(self.events_path, job)

    # ------------------------------------------------------------ life cycle
    @classmethod
    def create(cls, root: str | os.PathLike, task: str = "liver", exist_ok: bool = True) -> "Workspace":
        ws = cls(root)
        get_task(task)
        if ws.state_path.exists():
            if not exist_ok:
                raise WorkspaceError(f"workspace {ws.root}: already exists")
            existing = ws.load_state()
            if existing["task"] != task:
                raise WorkspaceError(
                    f"workspace {ws.root}: holds task {existing['task']!r}, asked for {task!r}; use another folder"
                )
            return ws
        try:
            ws.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(f"workspace {ws.root}: cannot create the folder ({exc.strerror})") from None
        now = time.time()
        state = {
            "format_version": FORMAT_VERSION,
            "created": now,
            "updated": now,
            "task": task,
            "cases": {},
            "annotations": {},
            "rounds": [],
            "models": [],
            "jobs": [],
        }
        try:
            atomic_write_json(ws.state_path, state)
        except OSError as exc:
            raise WorkspaceError(f"workspace {ws.root}: cannot write state.json ({exc.strerror})") from None
        return ws

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Workspace":
        ws = cls(root)
        ws.load_state()
        return ws

    def load_state(self) -> dict:
        state = read_json(self.state_path, WorkspaceError,
                          expected="a VQMedSeg workspace; create one with 'vqmedseg workspace init'")
        not_ours = (f"workspace {self.state_path}: {{found}}; expected the state of a VQMedSeg workspace (a JSON object "
                    f"with format_version and {', '.join(STATE_KEYS)}); is this folder another program's?")
        if not isinstance(state, dict):
            raise WorkspaceError(not_ours.format(found=f"holds a JSON {type(state).__name__}"))
        version = state.get("format_version")
        if "format_version" not in state or isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise WorkspaceError(not_ours.format(found=f"format_version {version!r}" if "format_version" in state
                                                 else "no format_version"))
        if version > FORMAT_VERSION:
            raise WorkspaceError(
                f"workspace {self.state_path}: format version {version!r} is newer than this VQMedSeg "
                f"understands (up to {FORMAT_VERSION}); update VQMedSeg"
            )
        wrong = [key for key, kind in STATE_KEYS.items() if not isinstance(state.get(key), kind)]
        if wrong:
            raise WorkspaceError(not_ours.format(found=f"{', '.join(wrong)} missing or of another type"))
        return state

    @contextmanager
    def edit_state(self) -> Iterator[dict]:
        """Read-modify-write ``state.json`` under the state lock; written only if the block succeeds."""
        with file_lock(self.root / ".state.lock"):
            state = self.load_state()
            yield state
            state["updated"] = time.time()
            try:
                atomic_write_json(self.state_path, state)
            except OSError as exc:
                raise WorkspaceError(f"workspace {self.state_path}: cannot write ({exc.strerror})") from None

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporary files that writers killed mid-write left in the workspace
        (see :func:`~VQMedSegLib.files.remove_temporaries`); return their paths relative
        to the workspace.

        Call only while holding the job lock, as a job does when it starts: with the job
        lock and the inputs, annotations and state locks held, no writer is at work in these
        folders. They are taken in that order, the order ``annotate`` nests the last two
        in; no writer holds a later one while it waits for an earlier one.
        """
        removed = []
        with file_lock(self.root / ".inputs.lock"), file_lock(self.root / ".annotations.lock"), \
                file_lock(self.root / ".state.lock"):
            removed += remove_temporaries(self.root)  # state.json, suggestions.json
            for folder in ("inputs", "annotations", "checkpoints", "models", "predictions"):
                removed += remove_temporaries(self.root / folder, recursive=True)
        return [p.relative_to(self.root).as_posix() for p in removed]

    @property
    def task(self) -> str:
        return self.load_state()["task"]

    # ------------------------------------------------------------------ cases
    def add_case(self, case_id: str, ct: Volume, mr: Volume | None = None, slice_size: int = 128) -> dict:
        """Register a case: copy its volumes into ``inputs/`` and record their geometry.

        Adding a case again is safe. With the same CT (grid and voxel values) the case, its
        annotations and predictions are kept; an MR given now is stored, and one stored
        before is kept when none is given. Another CT under the same id is refused: the
        annotations were drawn on the stored one.
        """
        from ..data.io import write_volume  # local: keeps `import workspace` light (no torch)
        from ..data.slice_plan import plan_slices  # NumPy only: no torch on the GUI thread

        safe_id(case_id)
        cases = self.cases()
        known = cases.get(case_id)
        if known is not None:
            return self._add_case_again(case_id, known, ct, mr)
        _refuse_same_folded(case_id, cases)
        case_dir = self.case_dir(case_id)
        with file_lock(self.root / ".inputs.lock"):  # see remove_stale_temporaries
            write_volume(ct, case_dir / "ct.nrrd")
            if mr is not None:
                write_volume(mr, case_dir / "mr.nrrd")
        plan = plan_slices(ct, slice_size)
        entry = {
            "ct": f"inputs/{case_id}/ct.nrrd",
            "mr": f"inputs/{case_id}/mr.nrrd" if mr is not None else None,
            "shape": list(ct.shape),
            "spacing": list(ct.spacing),
            "slice_axis": plan.slice_axis,
            "n_slices": plan.n_slices,
            "added": time.time(),
        }
        with self.edit_state() as state:
            _refuse_same_folded(case_id, state["cases"])  # another process may have added it meanwhile
            state["cases"][case_id] = entry
        self.events().emit("case_added", case=case_id, has_mr=mr is not None)
        return entry

    def _add_case_again(self, case_id: str, known: dict, ct: Volume, mr: Volume | None) -> dict:
        from ..data.io import write_volume

        stored = self.load_ct(case_id)
        problems = stored.geometry_mismatch(ct)
        if not problems and not np.array_equal(stored.array, ct.array):
            problems = ["the voxel values differ"]
        if problems:
            labelled = len(self.labelled_slices().get(case_id, []))
            raise WorkspaceError(
                f"case {case_id!r}: the workspace already holds another CT under this id ({'; '.join(problems)}; "
                f"given against stored), with {labelled} annotated slices drawn on it; register this CT under "
                "another case id"
            )
        if mr is None:
            return known
        if known.get("mr"):
            old = self.load_mr(case_id)
            if old is not None and old.same_geometry(mr) and np.array_equal(old.array, mr.array):
                return known
        with file_lock(self.root / ".inputs.lock"):
            write_volume(mr, self.case_dir(case_id) / "mr.nrrd")
        with self.edit_state() as state:
            entry = state["cases"][case_id]
            entry["mr"] = f"inputs/{case_id}/mr.nrrd"
            entry["mr_added"] = time.time()
        self.events().emit("case_mr_added", case=case_id, replaced=bool(known.get("mr")))
        return entry

    def cases(self) -> dict[str, dict]:
        return self.load_state()["cases"]

    def case(self, case_id: str) -> dict:
        cases = self.cases()
        if case_id not in cases:
            raise InputError(
                f"case {case_id!r}: not in workspace {self.root}; known cases: {', '.join(sorted(cases)) or 'none'}"
            )
        return cases[case_id]

    def load_ct(self, case_id: str) -> Volume:
        from ..data.io import read_volume

        return read_volume(self.resolve(self.case(case_id)["ct"]), modality="CT")

    def load_mr(self, case_id: str) -> Volume | None:
        from ..data.io import read_volume

        rel = self.case(case_id).get("mr")
        return read_volume(self.resolve(rel), modality="MR") if rel else None

    # ------------------------------------------------------------ annotations
    def annotate(
        self,
        case_id: str,
        label: Volume,
        slices: list[int] | None = None,
        label_value: int | None = None,
        replace: bool = False,
    ) -> list[int]:
        """Store annotated slices of ``case_id`` and mark them labelled.

        Args:
            label: a label volume on the case's CT grid. Foreground is ``label_value``
                when given, else any non-zero voxel.
            slices: indices along the case's slice axis that the annotator looked at.
                ``None`` means every slice of ``label`` (a fully annotated volume).
            replace: with ``slices=None``, store the label map even over stored slices
                that hold the target where it has none. Without it that is refused: a
                label map drawn on a few slices, given without ``slices``, would
                otherwise erase the annotations of every other slice.
        Returns the sorted list of all labelled slices of the case.
        """
        from ..data.io import read_geometry, read_label, write_volume

        entry = self.case(case_id)
        shape, spacing, origin, direction = read_geometry(self.resolve(entry["ct"]))  # the header: no voxel
        ct_geometry = Volume(np.zeros(shape, np.uint8), spacing, origin, direction)
        problems = ct_geometry.geometry_mismatch(label)
        if problems:
            raise InputError(f"annotation for case {case_id!r}: its grid differs from the CT: " + "; ".join(problems))
        axis = entry["slice_axis"]
        n = entry["n_slices"]
        wanted = list(range(n)) if slices is None else sorted({int(s) for s in slices})
        bad = [s for s in wanted if not 0 <= s < n]
        if bad:
            raise InputError(f"annotated slices {_indices_text(bad)} of case {case_id!r}: expected indices in 0..{n - 1}")
        if label_value is not None and label_value <= 0:
            raise InputError(f"annotation for case {case_id!r}: label value {label_value}: 0 is the background and values "
                             "are not negative; expected the positive value of the target (--label-value)")
        present = label_values(label.array)
        if label_value is None:
            extra = [int(v) for v in present if v not in (0, 1)]
            if extra:
                raise InputError(
                    f"annotation for case {case_id!r}: found label values {extra[:10]}; expected 0 (background) and 1 "
                    f"({get_task(self.task).segment_name}) for task {self.task!r}. Pass --label-value to say which value is the target"
                )
        if label_value is not None and label_value not in present and np.any(present != 0):
            raise InputError(
                f"annotation for case {case_id!r}: label value {label_value} occurs nowhere in the label map, whose values "
                f"are {[int(v) for v in present if v != 0][:10]}; expected one of them (--label-value). If the target is "
                "absent from this scan, annotate with a label map of zeros and --slices")
        fg = (label.array == label_value) if label_value is not None else (label.array != 0)
        if slices is None and not fg.any():
            raise InputError(
                f"annotation for case {case_id!r}: the label map has no labelled voxel"
                + (f" of value {label_value}" if label_value is not None else "")
                + "; expected at least one. To record slices you looked at where the target is absent, name them with --slices"
            )
        with file_lock(self.root / ".annotations.lock"):
            path = self.annotation_path(case_id)
            stored = read_label(path).array.copy() if path.exists() else np.zeros(entry["shape"], np.uint8)
            index = [slice(None)] * 3
            np_axis = 2 - axis  # numpy axis of index axis `axis`
            if slices is None and not replace:
                others = tuple(a for a in range(3) if a != np_axis)
                erased = np.flatnonzero(np.any(stored != 0, axis=others) & ~np.any(fg, axis=others)).tolist()
                if erased:
                    raise InputError(
                        f"annotation for case {case_id!r}: the label map has no target on {len(erased)} slice(s) whose stored "
                        f"annotation has it ({_indices_text(erased)}), and would erase them; expected the slices this label "
                        "map annotates (--slices), or --replace to store it over the whole case")
            for s in wanted:
                index[np_axis] = s
                stored[tuple(index)] = fg[tuple(index)].astype(np.uint8)
            write_volume(ct_geometry.with_array(stored), path)
            with self.edit_state() as state:
                record = state["annotations"].setdefault(case_id, {"file": f"annotations/{case_id}.nrrd", "slices": []})
                record["slices"] = sorted(set(record["slices"]) | set(wanted))
                labelled = record["slices"]
        self.events().emit("annotated", case=case_id, slices=wanted, labelled=len(labelled))
        return labelled

    def labelled_slices(self) -> dict[str, list[int]]:
        return {c: rec["slices"] for c, rec in self.load_state()["annotations"].items() if rec["slices"]}

    def load_annotation(self, case_id: str) -> Volume | None:
        from ..data.io import read_label

        rec = self.load_state()["annotations"].get(case_id)
        return read_label(self.resolve(rec["file"])) if rec else None

    # ----------------------------------------------------------------- models
    def record_model(self, model_id: str, path: Path, method: str, also: Callable[[dict], None] | None = None,
                     **info: Any) -> dict:
        """Record a model file written inside the workspace; ``path`` is absolute or relative to
        the working directory (as ``self.root`` is), and is stored relative to the workspace.
        ``also(state)`` edits the state in the same write (a VQ-BEGAL round records its round
        with its model: a job killed between two writes would leave one without the other)."""
        root = self.root.resolve()
        target = Path(path).resolve()
        if root not in target.parents:
            raise WorkspaceError(f"workspace {self.root}: model {model_id!r} at {path} is outside the workspace")
        entry = {
            "id": model_id,
            "method": method,
            "path": target.relative_to(root).as_posix(),
            "created": time.time(),
            **info,
        }
        with self.edit_state() as state:
            state["models"] = [m for m in state["models"] if m["id"] != model_id] + [entry]
            if also is not None:
                also(state)
        return entry

    def latest_model(self, method: str | None = None) -> dict | None:
        models = [m for m in self.load_state()["models"] if method is None or m["method"] == method]
        return models[-1] if models else None

    def update(self, fn: Callable[[dict], None]) -> None:
        with self.edit_state() as state:
            fn(state)


def _indices_text(indices: list[int]) -> str:
    """A list of indices as a message shows it: whole up to 10, else its first five and last."""
    return str(indices) if len(indices) <= 10 else f"{str(indices[:5])[:-1]}, ... {indices[-1]}] ({len(indices)} indices)"


def _refuse_same_folded(case_id: str, cases: dict) -> None:
    """A new case id may not differ from a known one by letter case alone: on Windows and
    macOS (case-insensitive file systems) both would name the same ``inputs/`` and
    ``annotations/`` files, and the second would overwrite the first's."""
    for other in cases:
        if other != case_id and other.casefold() == case_id.casefold():
            raise WorkspaceError(
                f"case {case_id!r}: the workspace holds case {other!r}, which differs only in letter case "
                "(the two would share their files on Windows and macOS); expected that id, for the same "
                "patient, or another one"
            )
