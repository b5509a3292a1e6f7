"""What the Slicer module does, on any MRML scene, without Qt or the Slicer application.

:class:`WorkflowLogic` is the body of the module's Logic. It needs only MRML (the Slicer
app's scene, or slicer-core's in the tests), so the whole loop runs and is tested
without a GUI:

1. :meth:`~WorkflowLogic.prepare` copies the CT (and optional MR) volume nodes into the
   workspace as a case, with their geometry, and makes an annotation segmentation for
   the Segment Editor.
2. :meth:`~WorkflowLogic.start_query`, :meth:`~WorkflowLogic.start_training` and
   :meth:`~WorkflowLogic.start_prediction` launch background jobs (``python -m
   VQMedSegLib ...`` in their own process group); :meth:`~WorkflowLogic.poll`, called by
   the module's timer, reads their events and reports progress, losses, and how the job
   ended. Nothing here blocks: a caller may poll as often as it likes.
3. :meth:`~WorkflowLogic.suggestions` lists the slices to annotate;
   :meth:`~WorkflowLogic.slice_center` gives the point that centres the slice views on
   one; :meth:`~WorkflowLogic.mark_annotated` stores the segmentation on those slices (an
   empty slice counts: it says "no target here").
4. When a prediction job has finished, :meth:`~WorkflowLogic.load_results` imports the
   segmentation (named, coloured, with terminology) and the uncertainty maps, under the
   CT's subject-hierarchy folder. Only predictions the workspace state records as
   complete are loaded; a crashed or cancelled job's partial output never is. After a
   prediction job, its files are read on the worker thread and a later poll makes the
   nodes; the job counts as ended once they are made.
5. What would hold up Slicer's GUI runs on one worker thread, and the module's timers
   read the answers: :meth:`~WorkflowLogic.start_prepare` writes a case's volumes into
   the workspace, :meth:`~WorkflowLogic.start_loading` reads a recorded prediction,
   :meth:`~WorkflowLogic.start_scoring` scores the loaded prediction against a reference
   segmentation.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.volume import Volume
from ..errors import InputError, WorkspaceError
from ..files import read_json, sanitize_id
from ..jobs.events import read_events
from ..jobs.runner import cancel as cancel_job
from ..jobs.runner import interrupted, kill_tree, launch, running_job
from ..jobs.workspace import Workspace
from ..tasks import get_task, target_segment

CASE_ATTRIBUTE = "VQMedSeg.CaseID"
"""Node attribute naming the workspace case a CT, MR or annotation node belongs to."""

ANNOTATION_ROLE = "annotation"
SEGMENT_EDITOR_TAG = "SegmentEditor"  # the singleton tag of the Segment Editor module's parameter node
TERMINAL = ("finished", "cancelled", "error")
EXIT_GRACE = 10.0  # seconds a job may take to exit after its final event before its process tree is killed

# the line ``vqmedseg COMMAND: error: MESSAGE`` the command line ends with when it refuses its input
REFUSAL = re.compile(r"^vqmedseg [\w-]+: error: (.+)$", re.MULTILINE)

STRATEGIES = ("begal", "egal", "random", "entropy", "mcdropout", "coreset")
METHODS = {"begal": "VQ-BEGAL round", "vqseg": "VQ-Seg semi-supervised", "supervised": "supervised baseline"}


@dataclass
class JobState:
    """A job the logic started (or found running) and follows through its events."""

    kind: str
    job_id: str
    proc: subprocess.Popen | None = None
    status: str = "running"  # running | done | failed | cancelled | crashed
    reason: str = ""
    fraction: float = 0.0
    message: str = ""
    offset: int = 0
    last_seq: int = 0
    started: float = field(default_factory=time.time)
    results: list[dict] = field(default_factory=list)
    gaps: int = 0
    kill_at: float | None = None  # monotonic time after which a cancelled job's tree is killed
    checkpoints: int = 0
    resumed_from: int | None = None
    final: dict | None = None  # the job's last event, read while its process may still be exiting
    final_at: float | None = None  # monotonic time it was read
    loading: dict[str, Future] | None = None  # by case, a prediction's files being read on the worker; the job ends once loaded

    @property
    def finished(self) -> bool:
        return self.status != "running" and self.loading is None


@dataclass
class Preparing:
    """A case being copied into the workspace by :meth:`WorkflowLogic.start_prepare`."""

    case_id: str
    future: Future
    ct_node: Any
    mr_node: Any
    workspace: Workspace  # the Logic's workspace once the copy has ended well; until then it keeps its own

    def done(self) -> bool:
        return self.future.done()


@dataclass
class PollUpdate:
    """What changed since the last :meth:`WorkflowLogic.poll`."""

    job: JobState | None
    lines: list[str]
    ended: bool  # the job ended during this poll
    errors: list[str] = field(default_factory=list)  # what went wrong that the user must see (a result that could not be loaded)


class WorkflowLogic:
    """The module's logic on ``scene`` (a ``vtkMRMLScene``).

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in Slicer).
        python: the interpreter that runs jobs (Slicer's ``PythonSlicer`` by default in
            the module; any environment with VQMedSegLib and torch, e.g. on a GPU box).
        device: ``auto``, ``cpu`` or ``cuda``, passed to every job.
        preset: configuration preset passed to every job (``tiny`` for self-tests).
    """

    def __init__(self, scene: Any, python: str | None = None, device: str = "auto", preset: str = "quick"):
        self.scene = scene
        self.python = python
        # the environment of the job processes (None: this process's); the module gives an outside Python
        # Slicer's startup environment, without the PYTHONHOME and library paths of Slicer's own Python
        self.env: dict[str, str] | None = None
        self.device = device
        self.preset = preset
        self.workspace: Workspace | None = None
        self.job: JobState | None = None
        self._queue: list[tuple[str, list[str]]] = []
        self.loaded: dict[str, dict[str, Any]] = {}
        self.shown: tuple[str, int] | None = None  # the suggested slice last shown for annotation
        # one worker thread for what would hold up the GUI: copying a case, the metrics; made on first use
        self._background: ThreadPoolExecutor | None = None
        self._scoring: Future | None = None
        self.preparing: Preparing | None = None  # a case being copied into the workspace

    # ------------------------------------------------------------------ workspace
    def open_workspace(self, folder: str | os.PathLike, task: str = "liver") -> Workspace:
        """Open the workspace at ``folder``, creating it for ``task`` if it is new."""
        self._refuse_while_running("opening a workspace")
        self._refuse_while_preparing()
        self.workspace = self._workspace_at(folder, task)
        return self.workspace

    @staticmethod
    def _workspace_at(folder: str | os.PathLike, task: str) -> Workspace:
        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise InputError(f"workspace {folder}: exists but is not a folder")
        if (folder / "state.json").exists():
            ws = Workspace.open(folder)
            if ws.task != task:
                raise WorkspaceError(f"workspace {folder}: made for target {ws.task!r}, not {task!r}; choose another folder")
        else:
            ws = Workspace.create(folder, task=task)
        return ws

    def _refuse_while_running(self, action: str) -> None:
        """The job is followed through its workspace's events: no other workspace, and no
        new case, while it runs."""
        if self.job is not None and not self.job.finished:
            raise WorkspaceError(f"a {self.job.kind} job ({self.job.job_id}) is running on workspace {self._ws().root}; "
                                 f"wait for it or cancel it before {action}")

    def _ws(self) -> Workspace:
        if self.workspace is None:
            raise WorkspaceError("no workspace is open: choose a workspace folder first")
        return self.workspace

    def prepare(self, ct_node: Any, mr_node: Any = None, task: str = "liver", folder: str | os.PathLike | None = None,
                case_id: str | None = None) -> str:
        """Copy the CT (and MR) nodes into the workspace as a case; returns the case id.

        A case already in the workspace under that id is kept (its annotations too) when
        the CT is the same, and takes an MR picked now; another CT is an error, never an
        overwrite (:meth:`Workspace.add_case`). Waits for the copy; the module's widget
        uses :meth:`start_prepare` and :meth:`finish_prepare`.
        """
        self.start_prepare(ct_node, mr_node, task, folder, case_id)
        return self.finish_prepare()

    def start_prepare(self, ct_node: Any, mr_node: Any = None, task: str = "liver", folder: str | os.PathLike | None = None,
                      case_id: str | None = None) -> Preparing:
        """:meth:`prepare` without waiting: the inputs are checked, the workspace opened and
        the volumes copied out of the scene here (MRML belongs to the calling thread); the
        files are written on a worker thread. Call :meth:`finish_prepare` once
        :attr:`preparing` is done. Until then no job starts, no other case is prepared, and
        the Logic stays on the workspace it had: it moves to ``folder`` only once the case
        is there."""
        from ..data.io import check_image
        from ..export.mrml import volume_from_node

        if ct_node is None:
            raise InputError("CT volume: none selected, expected a scalar volume node")
        if mr_node is not None and mr_node is ct_node:
            raise InputError(f"MR volume {mr_node.GetName()!r}: is the CT volume; expected a different node or none")
        self._refuse_while_running("preparing a case")
        self._refuse_while_preparing()
        # before any folder is made: a node that cannot be read, or that no file would pass
        # as the CT or the MR (read_volume's checks), changes nothing
        ct = check_image(volume_from_node(ct_node), f"CT volume {ct_node.GetName()!r}", "CT")
        mr = check_image(volume_from_node(mr_node), f"MR volume {mr_node.GetName()!r}", "MR") if mr_node is not None else None
        ws = self._workspace_at(folder, task) if folder is not None else self._ws()
        case_id = case_id or ct_node.GetAttribute(CASE_ATTRIBUTE) or sanitize_id(ct_node.GetName())
        future = self._worker().submit(_add_case, ws, case_id, ct, mr, ct_node.GetName())
        self.preparing = Preparing(case_id, future, ct_node, mr_node, ws)
        return self.preparing

    def finish_prepare(self) -> str:
        """The case id once the copy :meth:`start_prepare` began has ended (waiting for it
        if need be); the Logic then moves to the case's workspace and the nodes are marked
        as the case's. A copy that failed raises its error here, and the Logic keeps the
        workspace it had."""
        preparing = self.preparing
        if preparing is None:
            raise WorkspaceError("no case is being prepared")
        try:
            case_id = preparing.future.result()
        finally:
            self.preparing = None
        self.workspace = preparing.workspace
        preparing.ct_node.SetAttribute(CASE_ATTRIBUTE, case_id)
        if preparing.mr_node is not None:
            preparing.mr_node.SetAttribute(CASE_ATTRIBUTE, case_id)
            preparing.mr_node.SetAttribute("VQMedSeg.Modality", "MR")
        return case_id

    def _refuse_while_preparing(self) -> None:
        if self.preparing is not None:
            raise WorkspaceError(f"case {self.preparing.case_id!r} is still being copied into workspace "
                                 f"{self.preparing.workspace.root}; wait for it")

    def _worker(self) -> ThreadPoolExecutor:
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="VQMedSeg-worker")
        return self._background

    def status(self) -> dict[str, Any]:
        """Rounds done, labelled slices, the last model, predictions, a running job."""
        ws = self._ws()
        state = ws.load_state()
        labelled = ws.labelled_slices()
        total = sum(c["n_slices"] for c in state["cases"].values())
        models = state["models"]
        return {
            "task": state["task"],
            "cases": sorted(state["cases"]),
            "labelled_slices": sum(len(v) for v in labelled.values()),
            "total_slices": total,
            "budget": int(state.get("budget", total)),
            "rounds": len(state.get("rounds", [])),
            "last_model": models[-1] if models else None,
            "predictions": sorted(state.get("predictions", {})),
            "running_job": (running := running_job(ws)),
            "last_job": (interrupted(state.get("jobs", []), (running or {}).get("job")) or [None])[-1],
        }

    # ----------------------------------------------------------------- annotation
    def case_nodes(self, case_id: str, role: str = "image") -> list[Any]:
        out = []
        for i in range(self.scene.GetNumberOfNodes()):
            node = self.scene.GetNthNode(i)
            if node.GetAttribute(CASE_ATTRIBUTE) == case_id and (node.GetAttribute("VQMedSeg.Role") or "image") == role:
                out.append(node)
        return out

    def _scene_ct(self, case_id: str) -> Any:
        """The case's CT node if the scene holds it, else None."""
        return next((node for node in self.case_nodes(case_id)
                     if node.IsA("vtkMRMLScalarVolumeNode") and node.GetAttribute("VQMedSeg.Modality") != "MR"), None)

    def ct_node(self, case_id: str) -> Any:
        """The case's CT node in the scene; loaded from the workspace if it is not there."""
        node = self._scene_ct(case_id)
        if node is not None:
            return node
        from ..export.mrml import add_volume

        node = add_volume(self.scene, self._ws().load_ct(case_id), f"{case_id} CT", window=get_task(self._ws().task).ct_window)
        node.SetAttribute(CASE_ATTRIBUTE, case_id)
        return node

    def annotation_node(self, case_id: str) -> Any:
        """The segmentation the annotator edits for ``case_id`` (made on first use, with the
        target's segment and the case's stored annotation)."""
        for node in self.case_nodes(case_id, ANNOTATION_ROLE):
            return node
        from ..export.mrml import add_segmentation
        from ..export.prediction import segments_for

        ws = self._ws()
        ct_node = self.ct_node(case_id)
        stored = ws.load_annotation(case_id)
        if stored is None:
            from ..export.mrml import volume_from_node

            ct = volume_from_node(ct_node)
            stored = ct.with_array(np.zeros(ct.shape, np.uint8))
        node = add_segmentation(self.scene, stored, segments_for(ws.task), reference_node=ct_node, name=f"{case_id} annotation")
        node.SetAttribute(CASE_ATTRIBUTE, case_id)
        node.SetAttribute("VQMedSeg.Role", ANNOTATION_ROLE)
        return node

    def mark_annotated(self, case_id: str, slices: list[int], segmentation_node: Any = None) -> list[int]:
        """Store the annotation of ``slices`` (indices along the case's slice axis) from
        ``segmentation_node`` (default: the case's annotation node); returns all labelled
        slices of the case. An empty slice is stored as annotated background."""
        node = segmentation_node if segmentation_node is not None else self.annotation_node(case_id)
        return self._ws().annotate(case_id, self._target_label(node, case_id), slices=slices)

    def annotated_slices(self, segmentation_node: Any, case_id: str) -> list[int]:
        """Slices of the case's slice axis on which ``segmentation_node``'s target segment has any voxel."""
        label = self._target_label(segmentation_node, case_id).array
        axis = self._ws().case(case_id)["slice_axis"]
        other = tuple(a for a in range(3) if a != 2 - axis)
        return [int(s) for s in np.flatnonzero((label != 0).any(axis=other))]

    def _target_label(self, node: Any, case_id: str) -> Volume:
        """``node`` on the case's CT grid as 0/1: its segment named for the task (the annotator
        may add segments of their own), or every segment when it has only one
        (:func:`~VQMedSegLib.tasks.target_segment`)."""
        from ..export.mrml import labelmap_from_segmentation

        segmentation = node.GetSegmentation()
        names = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
                 for i in range(segmentation.GetNumberOfSegments())]
        index = target_segment(names, self._ws().task, f"segmentation {node.GetName()!r}")
        label = labelmap_from_segmentation(node, self.ct_node(case_id), only=None if index is None else names[index])
        return label.with_array((label.array != 0).astype(np.uint8))

    def slice_center(self, case_id: str, slice_index: int) -> tuple[float, float, float]:
        """RAS point at the centre of slice ``slice_index`` of the case's CT."""
        from ..export.mrml import node_geometry

        entry = self._ws().case(case_id)
        if not 0 <= slice_index < entry["n_slices"]:
            raise InputError(f"slice {slice_index} of case {case_id!r}: expected 0..{entry['n_slices'] - 1}")
        spacing, origin, direction = node_geometry(self.ct_node(case_id))  # geometry only: no voxel copy per click
        ijk = (np.array(entry["shape"][::-1], float) - 1) / 2.0  # (i, j, k) centre
        ijk[entry["slice_axis"]] = slice_index
        lps = np.asarray(origin) + np.asarray(direction) @ (np.asarray(spacing) * ijk)
        return (float(-lps[0]), float(-lps[1]), float(lps[2]))

    def jump_to_slice(self, case_id: str, slice_index: int) -> tuple[float, float, float]:
        """Centre every slice view on the slice (the Segment Editor is then on it)."""
        import slicer

        r, a, s = self.slice_center(case_id, slice_index)
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return r, a, s

    def show_for_annotation(self, case_id: str, slice_index: int) -> Any:
        """Show a suggested slice for drawing: centre the views on it and set the Segment
        Editor on the case's annotation and CT, so that what is drawn is what
        :meth:`mark_shown_annotated` stores. The editor's node is made as the Segment Editor
        module makes it when the user has not opened that module yet (it would otherwise
        pick the scene's first segmentation, perhaps a prediction). Returns the editor node."""
        self.jump_to_slice(case_id, slice_index)
        editor = self.scene.GetSingletonNode(SEGMENT_EDITOR_TAG, "vtkMRMLSegmentEditorNode")
        if editor is None:
            editor = self.scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            editor.UnRegister(None)
            editor.SetSingletonTag(SEGMENT_EDITOR_TAG)
            editor = self.scene.AddNode(editor)
        editor.SetAndObserveSegmentationNode(self.annotation_node(case_id))
        editor.SetAndObserveSourceVolumeNode(self.ct_node(case_id))
        self.shown = (case_id, int(slice_index))
        return editor

    def mark_shown_annotated(self) -> tuple[str, list[int]]:
        """Store the slice last shown by :meth:`show_for_annotation` from the case's
        annotation node; returns the case and all its labelled slices. A slice is marked
        once per showing, so a second click can never store a slice nobody has looked at."""
        if self.shown is None:
            raise InputError("Mark annotated: no suggested slice is shown; click one in the table, draw on it, then mark it")
        case_id, slice_index = self.shown
        labelled = self.mark_annotated(case_id, [slice_index])
        self.shown = None
        return case_id, labelled

    def suggestions(self) -> list[dict]:
        """The last query's suggestions that are not labelled yet (``case``, ``slice``,
        ``score``, ``purpose``, ``rank``)."""
        ws = self._ws()
        path = ws.root / "suggestions.json"
        if not path.exists():
            return []
        data = read_json(path, expected="the suggestions of the last query; run the query again")
        labelled = {c: set(v) for c, v in ws.labelled_slices().items()}
        return [s for s in data.get("suggestions", []) if s["slice"] not in labelled.get(s["case"], set())]

    # ----------------------------------------------------------------------- jobs
    def _common(self) -> list[str]:
        """The options every job takes; no job is made while a case is being copied in (a
        queued job cannot be waiting then: no case is prepared while a job runs)."""
        self._refuse_while_preparing()
        return ["--workspace", str(self._ws().root), "--device", self.device]

    def start_query(self, strategy: str = "begal", n: int = 10, budget: int | None = None) -> JobState:
        if strategy not in STRATEGIES:
            raise InputError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        args = ["query", *self._common(), "--strategy", strategy, "--n", str(n), "--preset", self.preset]
        if budget is not None:
            args += ["--budget", str(budget)]
        return self._start("query", args)

    def training_args(self, method: str, iterations: int | None = None) -> list[str]:
        if method not in METHODS:
            raise InputError(f"method {method!r}: expected one of {', '.join(METHODS)}")
        args = ["train", *self._common(), "--method", method, "--preset", self.preset]
        if iterations and method != "begal":
            args += ["--iterations", str(int(iterations))]
        return args

    def prediction_args(self, case_id: str | None = None, keep_all_components: bool = False) -> list[str]:
        """Arguments of a predict job: every case, or ``case_id`` alone. By default a liver
        keeps only its largest connected piece; ``keep_all_components`` keeps every piece."""
        args = ["predict", *self._common()] + (["--case", case_id] if case_id else [])
        return args + (["--keep-all-components"] if keep_all_components else [])

    def start_training(self, method: str = "begal", iterations: int | None = None, then_predict: bool = True,
                       keep_all_components: bool = False) -> JobState:
        """Train; when it succeeds, predict every case (``then_predict``)."""
        job = self._start("train", self.training_args(method, iterations))
        if then_predict:
            self._queue.append(("predict", self.prediction_args(keep_all_components=keep_all_components)))
        return job

    def start_prediction(self, case_id: str | None = None, keep_all_components: bool = False) -> JobState:
        return self._start("predict", self.prediction_args(case_id, keep_all_components))

    def _start(self, kind: str, args: list[str]) -> JobState:
        ws = self._ws()
        if self.job is not None and not self.job.finished:
            raise WorkspaceError(f"a {self.job.kind} job ({self.job.job_id}) is still running; cancel it or wait")
        other = running_job(ws)
        if other is not None:
            raise WorkspaceError(f"workspace {ws.root} is busy with job {other.get('job')} ({other.get('kind', 'unknown kind')}); "
                                 "wait for it or cancel it")
        offset = ws.events_path.stat().st_size if ws.events_path.exists() else 0
        proc, job_id = launch(args, ws, kind, python=self.python, env=self.env)
        self.job = JobState(kind, job_id, proc, offset=offset)
        return self.job

    def attach(self) -> JobState | None:
        """Follow a job that is already running on the workspace (e.g. started before
        Slicer was restarted); it can be cancelled but it has no process handle here."""
        if self.job is not None and not self.job.finished:
            return self.job  # ours already (perhaps still starting up), with its process handle
        info = running_job(self._ws())
        if info is None or info.get("job") in (None, "unknown"):
            return None
        self.job = JobState(info.get("kind", "job"), info["job"])
        return self.job

    def cancel(self, grace: float = 10.0, block: bool = True, job_id: str | None = None) -> bool:
        """Ask the job to stop, with the jobs queued after it; kill its whole process tree
        if it has not stopped within ``grace`` s.

        ``block=False`` (the module's GUI) returns at once: :meth:`poll` kills the tree
        when the grace period is over and reports the end. ``job_id``: only that job (the
        one the user was asked about; it may have ended and the next begun since). Returns
        False if no job, or not that one, runs.
        """
        job = self.job
        if job is None or job.status != "running" or (job_id is not None and job.job_id != job_id):
            return False  # none, another, or one that has ended (its results may still be loading)
        self._queue.clear()
        if block and job.proc is not None:
            cancel_job(self._ws(), job.job_id, proc=job.proc, grace=grace)
        else:
            cancel_job(self._ws(), job.job_id)
            job.kill_at = time.monotonic() + grace
        return True

    def poll(self) -> PollUpdate:
        """Read the job's new events; start the next queued job when one succeeds."""
        job = self.job
        if job is None or job.finished:
            return PollUpdate(job, [], False)
        if job.loading is not None:
            return self._poll_loading(job)
        ws = self._ws()
        if job.kill_at is not None and time.monotonic() > job.kill_at and job.proc is not None and job.proc.poll() is None:
            kill_tree(job.proc.pid)
        # whether the process had ended is checked before reading, so that its last events are read
        exited = job.proc is not None and job.proc.poll() is not None
        released = job.proc is None and running_job(ws) is None  # an attached job without a process handle
        read = read_events(ws.events_path, job.offset, job.last_seq)
        job.offset = read.offset
        job.gaps += len(read.gaps)
        lines: list[str] = []
        for event in read.events:
            job.last_seq = max(job.last_seq, int(event["seq"]))
            if event.get("job") != job.job_id:
                continue
            kind = event["type"]
            if kind == "progress":
                job.fraction = float(event.get("fraction", 0.0))
                job.message = event.get("message") or job.message
            elif kind == "loss":
                lines.append(f"iteration {event.get('iteration')}: loss {event.get('loss', float('nan')):.4f}")
            elif kind == "metric":
                details = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in event.items()
                                    if k not in ("seq", "time", "type", "job"))
                lines.append(f"validation: {details}")
            elif kind == "checkpoint":
                job.checkpoints += 1
            elif kind == "resumed":
                job.resumed_from = int(event.get("iteration", 0))
                lines.append(f"resumed from the checkpoint at iteration {job.resumed_from}")
            elif kind == "warning":
                lines.append(f"warning: {event.get('message')}")
            elif kind == "result":
                job.results.append(event)
                if event.get("message"):
                    lines.append(str(event["message"]))
            elif kind in TERMINAL:
                job.final = event
        terminal = job.final
        if terminal is not None and job.proc is not None and not exited:
            # its last word is said and the process is exiting (torch shutting down takes a second or
            # more): ended at a later poll, never waited for here, on the GUI thread
            job.final_at = job.final_at or time.monotonic()
            job.message = "finishing"
            if time.monotonic() - job.final_at > EXIT_GRACE:
                kill_tree(job.proc.pid)
            return PollUpdate(job, lines, False)
        if terminal is not None:
            job.status = {"finished": "done", "cancelled": "cancelled", "error": "failed"}[terminal["type"]]
            job.reason = terminal.get("message") or terminal.get("reason") or ""
        elif exited and job.kill_at is not None:
            job.status = "cancelled"
            job.reason = "cancelled; the job did not stop within the grace period and was killed"
        elif exited and (refusal := self._refusal(job)):
            # refused before the job began with no event to say so (the parser's refusals; a workspace that could not record it)
            job.status = "failed"
            job.reason = refusal
        elif exited:
            # the process ended without a final event: killed, or died before its context
            job.status = "crashed"
            job.reason = f"the job process ended with exit code {job.proc.returncode} and no final event; " + self._log_tail(job)
        elif released:
            job.status = "crashed"
            job.reason = "the job no longer holds the workspace lock and wrote no final event"
        if not job.finished:
            return PollUpdate(job, lines, False)
        lines.append(f"{job.kind} job {job.status}" + (f": {job.reason}" if job.reason else ""))
        if job.status == "done" and job.kind == "predict":
            predicted = sorted({r["case"] for r in job.results if r.get("kind") == "prediction"})
            # only the cases on show: loading another would bring its CT back into the scene, on the GUI thread
            shown = [c for c in predicted if self._on_show(c)]
            if len(shown) < len(predicted):
                rest = [c for c in predicted if c not in shown]
                them = "it" if len(rest) == 1 else "them"
                lines.append(f"predicted {', '.join(rest)} too, whose CT is not in the scene; load {them} from the Results panel")
            if shown:
                # the files are read on the worker; a later poll makes their nodes, here, and ends the job
                job.loading = {c: self._worker().submit(self._read_results, c, ws) for c in shown}
                job.message = "loading the result"
                return PollUpdate(job, lines, False)
        return self._ended(job, lines)

    def _poll_loading(self, job: JobState) -> PollUpdate:
        """Make the nodes of the prediction files read on the worker, once read, then end the
        job. A case that cannot be loaded is reported, and the others are loaded all the same."""
        if not all(future.done() for future in job.loading.values()):
            return PollUpdate(job, [], False)
        loading, job.loading = job.loading, None
        job.message = ""
        lines: list[str] = []
        errors: list[str] = []
        for case_id, future in loading.items():
            if not self._on_show(case_id):
                lines.append(f"the CT of {case_id} left the scene while its prediction was read; load it from the Results panel")
                continue
            try:
                self.load_results(case_id, read=future.result())
            except Exception as exc:  # a file that cannot be read, a node that cannot be made
                errors.append(f"the prediction of {case_id} could not be loaded: {exc}")
                lines.append(errors[-1])
            else:
                lines.append(f"loaded the prediction of {case_id}")
        return self._ended(job, lines, errors)

    def _ended(self, job: JobState, lines: list[str], errors: list[str] | None = None) -> PollUpdate:
        """The job has ended: start the next queued one after a success, else drop the queue."""
        if job.status == "done" and self._queue:
            kind, args = self._queue.pop(0)
            self._start(kind, args)
            lines.append(f"started the {kind} job")
            return PollUpdate(self.job, lines, True, errors or [])
        self._queue.clear()
        return PollUpdate(job, lines, True, errors or [])

    def _on_show(self, case_id: str) -> bool:
        """Whether the case's CT or its loaded results are in the scene (not gone with a closed scene)."""
        loaded = self.loaded.get(case_id)
        return (loaded is not None and loaded["segmentation"].GetScene() is not None) or self._scene_ct(case_id) is not None

    def wait(self, timeout: float = 600.0, interval: float = 0.2) -> JobState:
        """Poll until no job is running (used from the Python console and in tests)."""
        deadline = time.monotonic() + timeout
        while self.job is not None and not self.job.finished:
            self.poll()
            if self.job is not None and self.job.finished:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.job.kind} job {self.job.job_id} still running after {timeout:.0f} s")
            time.sleep(interval)
        assert self.job is not None
        return self.job

    def _log(self, job: JobState) -> str | None:
        """The job process's output (``jobs/<id>/log.txt``), or None when it has none."""
        try:
            return (self._ws().job_dir(job.job_id) / "log.txt").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def _refusal(self, job: JobState) -> str:
        """The error the command line printed when it exited with a refusal's code, else ''."""
        if job.proc is None or job.proc.returncode not in (InputError.exit_code, WorkspaceError.exit_code):
            return ""
        errors = REFUSAL.findall(self._log(job) or "")
        return errors[-1] if errors else ""

    def _log_tail(self, job: JobState, lines: int = 5) -> str:
        text = self._log(job)
        if text is None:
            return "no log"
        tail = text.strip().splitlines()[-lines:]
        return "last log lines: " + " | ".join(tail) if tail else "empty log"

    # -------------------------------------------------------------------- results
    def available_predictions(self) -> dict[str, dict]:
        """Predictions the workspace records as complete, by case."""
        return dict(self._ws().load_state().get("predictions", {}))

    def start_loading(self, case_id: str) -> Future:
        """Read the recorded prediction of ``case_id`` on the worker thread; the answer is
        what :meth:`load_results` takes as ``read`` to make the nodes (on this thread). A
        case with no recorded prediction is refused here, at once."""
        ws = self._ws()
        self._prediction_record(case_id, ws)
        return self._worker().submit(self._read_results, case_id, ws)

    @staticmethod
    def _prediction_record(case_id: str, ws: Workspace) -> dict:
        """The workspace's record of the case's finished prediction; refused when it has none."""
        record = ws.load_state().get("predictions", {}).get(case_id)
        if record is None:
            raise WorkspaceError(f"case {case_id!r}: no finished prediction in workspace {ws.root}; run a prediction first")
        return record

    def _read_results(self, case_id: str, ws: Workspace | None = None) -> tuple[dict, Volume, dict[str, Volume]]:
        """The recorded prediction of ``case_id`` in ``ws`` (default: the open workspace) read
        from its files: the record, the label, and the uncertainty maps by name. Touches no
        node: the worker may run it (given the workspace when it was asked)."""
        from ..data.io import read_label, read_volume

        ws = ws if ws is not None else self._ws()
        record = self._prediction_record(case_id, ws)
        files = record["files"]
        label = read_label(ws.resolve(files["segmentation"]))
        maps = {("entropy" if role == "uncertainty" else role.split("_", 1)[1]): read_volume(ws.resolve(rel))
                for role, rel in files.items() if role.startswith("uncertainty")}
        return record, label, maps

    def load_results(self, case_id: str, uncertainty: str | None = None, opacity: float = 0.4,
                     read: tuple[dict, Volume, dict[str, Volume]] | None = None) -> dict[str, Any]:
        """Import the recorded prediction of ``case_id``: a segmentation node and one
        overlay volume per uncertainty map, under the CT's subject-hierarchy folder; the
        chosen map (default: the first) is shown as the foreground of the slice views.
        ``read``: its files as :meth:`_read_results` read them (on the worker), else read here."""
        import slicer

        from ..export.mrml import add_segmentation, add_uncertainty_overlay, show_in_slice_views
        from ..export.prediction import segments_for

        ws = self._ws()
        record, label, maps = read if read is not None else self._read_results(case_id)
        self.unload_results(case_id)
        ct_node = self.ct_node(case_id)
        seg = add_segmentation(self.scene, label, segments_for(ws.task), reference_node=ct_node,
                               name=f"{case_id} {get_task(ws.task).segment_name} ({record['method']})")
        seg.SetAttribute(CASE_ATTRIBUTE, case_id)
        seg.SetAttribute("VQMedSeg.Role", "prediction")
        overlays = {}
        for name, volume in maps.items():
            node = add_uncertainty_overlay(self.scene, volume, f"{case_id} uncertainty ({name})")
            node.SetAttribute(CASE_ATTRIBUTE, case_id)
            overlays[name] = node
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        folder = None
        if sh is not None:
            parent = sh.GetItemParent(_sh_item(sh, ct_node)) or sh.GetSceneItemID()
            folder = sh.CreateFolderItem(parent, f"{case_id} results")
            for node in [seg, *overlays.values()]:
                sh.SetItemParent(_sh_item(sh, node), folder)
        shown = uncertainty if uncertainty in overlays else next(iter(overlays), None)
        show_in_slice_views(self.scene, ct_node, overlays.get(shown), opacity)
        self.loaded[case_id] = {"segmentation": seg, "overlays": overlays, "shown": shown, "record": record,
                                "folder": folder}
        return self.loaded[case_id]

    def forget_removed_results(self) -> list[str]:
        """Forget what of the loaded results has left the scene (deleted by the user, or the
        scene closed). An overlay deleted is forgotten alone: the segmentation, which the user
        may have edited, stays. A segmentation deleted forgets its case's results, removing
        their overlays. Returns the cases forgotten."""
        for loaded in self.loaded.values():
            loaded["overlays"] = {name: node for name, node in loaded["overlays"].items() if node.GetScene() is not None}
            if loaded.get("shown") not in loaded["overlays"]:
                loaded["shown"] = None  # it went from the slice views with its node
        gone = [case_id for case_id, loaded in self.loaded.items() if loaded["segmentation"].GetScene() is None]
        for case_id in gone:
            self.unload_results(case_id)
        return gone

    def unload_results(self, case_id: str) -> None:
        """Remove the loaded results of ``case_id``: their nodes and their subject-hierarchy folder."""
        import slicer
        from vtkmodules.vtkCommonCore import vtkIdList

        old = self.loaded.pop(case_id, None)
        if not old:
            return
        ours = [node for node in [old["segmentation"], *old["overlays"].values()] if node.GetScene() is not None]
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        folder = old.get("folder")
        if sh is not None and folder and sh.GetItemName(folder):
            # what the user filed in the folder is theirs: moved up a level, not removed with it;
            # then the folder and our items in it, their nodes removed below
            own = {sh.GetItemByDataNode(node) for node in ours}
            children = vtkIdList()
            sh.GetItemChildren(folder, children)
            for child in [children.GetId(n) for n in range(children.GetNumberOfIds())]:
                if child not in own:
                    sh.SetItemParent(child, sh.GetItemParent(folder))
            sh.RemoveItem(folder, False, True)
        for node in ours:
            self.scene.RemoveNode(node)

    def show_uncertainty(self, case_id: str, name: str, opacity: float = 0.4) -> Any:
        """Show another loaded uncertainty map (``entropy``, ``qpm`` ...) as the overlay."""
        from ..export.mrml import show_in_slice_views

        loaded = self.loaded.get(case_id)
        if not loaded or name not in loaded["overlays"]:
            raise InputError(f"uncertainty {name!r} of case {case_id!r}: not loaded; available: "
                             f"{', '.join(loaded['overlays']) if loaded else 'none'}")
        show_in_slice_views(self.scene, self.ct_node(case_id), loaded["overlays"][name], opacity)
        loaded["shown"] = name
        return loaded["overlays"][name]

    def score_against(self, case_id: str, reference_node: Any) -> dict[str, Any]:
        """Dice and HD95 (mm) of the loaded prediction against a reference segmentation's
        target segment (the one named for the task, or its only segment: a reference with
        more organs is scored on the target alone). Waits for the answer; the module's
        widget uses :meth:`start_scoring`."""
        return self._worker().submit(_score, *self._scoring_inputs(case_id, reference_node)).result()

    def start_scoring(self, case_id: str, reference_node: Any) -> Future:
        """:meth:`score_against` without waiting: the two segmentations are exported to
        labelmaps here (MRML belongs to the calling thread), the metrics run on a worker
        thread, and the returned future holds the scores. A reference that cannot be
        scored is refused here. A request of this method's still waiting behind a running
        one is cancelled: only the newest is wanted."""
        inputs = self._scoring_inputs(case_id, reference_node)
        if self._scoring is not None:
            self._scoring.cancel()  # no effect once it runs
        self._scoring = self._worker().submit(_score, *inputs)
        return self._scoring

    def _scoring_inputs(self, case_id: str, reference_node: Any) -> tuple[Volume, Volume]:
        """The prediction and the reference as 0/1 labelmaps on the case's CT grid."""
        loaded = self.loaded.get(case_id)
        if not loaded:
            raise WorkspaceError(f"case {case_id!r}: load its prediction first")
        return self._target_label(loaded["segmentation"], case_id), self._target_label(reference_node, case_id)


def _add_case(ws: Workspace, case_id: str, ct: Volume, mr: Volume | None, ct_name: str) -> str:
    """Write the case's volumes into the workspace, on the worker thread (SimpleITK's
    writer lets the GUI thread run meanwhile)."""
    known = case_id in ws.cases()
    try:
        ws.add_case(case_id, ct, mr)
    except WorkspaceError as exc:
        if not known:
            raise
        # the case id comes from the CT node's name
        raise WorkspaceError(f"{exc}: rename the CT volume {ct_name!r} or use another workspace") from None
    return case_id


def _score(pred: Volume, ref: Volume) -> dict[str, Any]:
    """The scores, on the worker thread: the metrics import MONAI and torch (seconds the
    first time), and that import happens here, off the GUI thread, too."""
    from ..metrics import segmentation

    return segmentation.score_volumes(pred, ref).to_json()


def _sh_item(sh: Any, node: Any) -> int:
    """The node's subject-hierarchy item, created under the scene if the app has not."""
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item
