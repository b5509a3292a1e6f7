"""Prediction as a workspace job (``vqmedseg predict --workspace WS``).

Each prediction of a case is written into a staging folder and renamed, complete, to a
folder of its own, ``predictions/<case>/<job>/``; the workspace state then points to it
(under ``predictions``, with the job and model that made it) in one write, and the case's
earlier prediction folders are deleted. Readers (the Slicer module) load only what the
state records, so a job killed at any point leaves the recorded prediction whole and never
one that looks final: at worst a ``.staging-*`` folder or a folder the state does not
name, which the next prediction job removes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from ..errors import InputError
from ..export.prediction import write_prediction
from ..jobs.runner import JobContext
from ..jobs.workspace import Workspace
from .predict import load_model, predict_volume


def _unrecorded(root: Path, recorded: set[str]) -> list[Path]:
    """The folders under ``root`` (``predictions/``) that no recorded prediction's files are
    in: what killed jobs left (``.staging-*``, a job folder not recorded yet or no longer,
    a ``.old-*`` folder of an earlier layout). Never a file, nor a folder the state names."""
    left = []
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if case_dir.name.startswith("."):
            left.append(case_dir)
            continue
        left += [sub for sub in sorted(case_dir.iterdir())
                 if sub.is_dir() and not any(r == sub or sub in r.parents for r in map(Path, recorded))]
    return left


def _recorded_folders(ws: Workspace) -> set[str]:
    records = ws.load_state().get("predictions", {})
    return {str(ws.resolve(f).parent) for r in records.values() for f in r.get("files", {}).values()}


def predict_workspace(
    ctx: JobContext,
    ws: Workspace,
    device: torch.device,
    case_ids: list[str] | None = None,
    model_id: str | None = None,
    largest_component: bool | None = None,
) -> dict:
    """Predict ``case_ids`` (default: every case) with ``model_id`` (default: the newest model).

    ``largest_component`` is passed to :func:`predict_volume` (``None``: the task decides)."""
    state = ws.load_state()
    models = state["models"]
    if not models:
        raise InputError(f"workspace {ws.root}: no trained model yet; train one first (vqmedseg train --workspace ...)")
    if model_id is None:
        entry = models[-1]
    else:
        found = [m for m in models if m["id"] == model_id]
        if not found:
            raise InputError(f"--model-id {model_id!r}: not a model of workspace {ws.root}; known: {', '.join(m['id'] for m in models)}")
        entry = found[0]
    cases = case_ids or sorted(state["cases"])
    for case_id in cases:
        ws.case(case_id)  # clear error for an unknown case
    model, ckpt = load_model(ws.resolve(entry["path"]), device)
    root = ws.root / "predictions"
    root.mkdir(parents=True, exist_ok=True)
    for stale in _unrecorded(root, _recorded_folders(ws)):  # what killed predictions left; this job holds the lock
        shutil.rmtree(stale, ignore_errors=True)
    written: dict[str, dict] = {}
    for n, case_id in enumerate(cases):
        ctx.check_cancel()
        ctx.progress(1000 * n, 1000 * len(cases), f"predicting {case_id}", force=True)
        ct, mr = ws.load_ct(case_id), ws.load_mr(case_id)

        def slices_done(done: int, total: int, n=n, case_id=case_id) -> None:  # per mille of each case
            ctx.progress(1000 * n + 1000 * done // max(total, 1), 1000 * len(cases), f"predicting {case_id}")
            ctx.check_cancel()

        pred = predict_volume(model, ckpt, ct, device, mr=mr, largest_component=largest_component, progress=slices_done)
        ctx.check_cancel()
        staging = root / f".staging-{ctx.job_id}-{case_id}"
        files = write_prediction(staging, pred, task_name=state["task"])
        final = ws.prediction_dir(case_id) / ctx.job_id
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)  # this job's own, from a case given twice
        os.replace(staging, final)  # complete, in one rename; the state points to it below
        record = {
            "job": ctx.job_id,
            "model": entry["id"],
            "method": entry["method"],
            "created": time.time(),
            "files": {role: final.joinpath(Path(p).name).relative_to(ws.root).as_posix() for role, p in files.items()},
            "voxels": int(pred.label.array.sum()),
            "postprocessing": pred.label.metadata["postprocessing"],
        }

        def remember(st: dict, case_id=case_id, record=record) -> None:
            st.setdefault("predictions", {})[case_id] = record

        ws.update(remember)  # one write: the new prediction, or (killed before it) the one recorded before
        recorded = _recorded_folders(ws)
        for earlier in _unrecorded(final.parent.parent, recorded):
            if earlier.parent == final.parent:
                shutil.rmtree(earlier, ignore_errors=True)
        if str(final.parent) not in recorded:  # the files of the earlier layout, predictions/<case>/*.nrrd
            for old in final.parent.glob("*.nrrd"):
                if old.name == "prediction.seg.nrrd" or old.name.startswith("uncertainty"):
                    old.unlink(missing_ok=True)
        written[case_id] = record
        ctx.emit("result", kind="prediction", case=case_id, model=entry["id"], files=record["files"], voxels=record["voxels"])
    ctx.progress(1000 * len(cases), 1000 * len(cases), "done", force=True)
    return {"model": entry["id"], "predictions": written}
