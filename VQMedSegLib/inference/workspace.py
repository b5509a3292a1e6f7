"""Prediction as a workspace job (``vqmedseg predict --workspace WS``).

Each case's outputs are written into a staging folder and moved into
``predictions/<case>/`` only when complete; the workspace state then records them under
``predictions`` with the job and model that made them. Readers (the Slicer module) load
only what the state records, so a killed or failed job never leaves a prediction that
looks final: at worst a ``.staging-*`` folder, which the next run removes.
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


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` (two renames; ``final`` is never half-written)."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


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
    for stale in root.glob(".staging-*"):
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
        final = ws.prediction_dir(case_id)
        _swap_in(staging, final)
        record = {
            "job": ctx.job_id,
            "model": entry["id"],
            "method": entry["method"],
            "created": time.time(),
            "files": {role: f"predictions/{final.name}/{Path(p).name}" for role, p in files.items()},
            "voxels": int(pred.label.array.sum()),
            "postprocessing": pred.label.metadata["postprocessing"],
        }

        def remember(st: dict, case_id=case_id, record=record) -> None:
            st.setdefault("predictions", {})[case_id] = record

        ws.update(remember)
        written[case_id] = record
        ctx.emit("result", kind="prediction", case=case_id, model=entry["id"], files=record["files"], voxels=record["voxels"])
    ctx.progress(1000 * len(cases), 1000 * len(cases), "done", force=True)
    return {"model": entry["id"], "predictions": written}
