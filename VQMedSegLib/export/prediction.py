"""Writing a prediction: a Slicer segmentation plus one volume per uncertainty map."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from ..data.io import write_segmentation, write_volume
from ..errors import WorkspaceError
from ..files import atomic_files, remove_temporaries, storage_error
from ..jobs.locks import HeldLock, read_lock_info
from ..tasks import get_task

log = logging.getLogger("vqmedseg")

PREDICTION_LOCK = ".vqmedseg-predict.lock"  # in a `predict --out` folder while a prediction is written into it


def segments_for(task_name: str) -> list[dict]:
    """The segment description (name, colour, terminology) of a task's label 1."""
    task = get_task(task_name)
    return [{"value": 1, "name": task.segment_name, "color": task.color, "terminology": task.terminology}]


@contextlib.contextmanager
def prediction_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out_dir`` for one prediction (``predict --out DIR``, outside a workspace,
    whose job lock does this for its own folders) until the block ends.

    A second prediction into the same folder at the same time, which would leave one's
    segmentation beside the other's uncertainty, is refused before it starts. Once the
    folder is held, the hidden temporaries of a prediction killed mid-write (NRRD files
    named as :func:`~VQMedSegLib.files.atomic_path` names them) are deleted.

    Raises:
        WorkspaceError: another prediction holds the folder.
        StorageError: the folder or its lock file cannot be created.
    """
    out_dir = Path(out_dir)
    lock = HeldLock(out_dir / PREDICTION_LOCK)
    try:
        acquired = lock.try_acquire()
    except OSError as exc:
        raise storage_error(lock.path, exc) from exc
    if not acquired:
        raise WorkspaceError(f"--out {out_dir}: another prediction is being written into this folder "
                             f"({read_lock_info(lock.path).strip() or 'unknown process'}); expected one prediction at a "
                             "time per folder; wait for it to finish or give another --out")
    try:
        lock.write_info(json.dumps({"command": "predict", "pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.time()}))
        removed = remove_temporaries(out_dir, suffix=".nrrd")
        if removed:
            log.info("%s: deleted %d temporary file(s) a killed prediction left", out_dir, len(removed))
        yield out_dir
    finally:
        lock.release()


def write_prediction(out_dir: Path, prediction, task_name: str | None = None) -> dict[str, Path]:
    """Write ``prediction.seg.nrrd`` and ``uncertainty.nrrd`` (plus ``uncertainty_<name>.nrrd``
    for every further map); returns the paths by role.

    Every file is written to a hidden temporary name first, and all are renamed into place
    only once each is complete: a failure part way (a full disk while the large
    uncertainty map is written) leaves the folder's previous prediction whole, never a new
    segmentation beside an older case's uncertainty.
    """
    out_dir = Path(out_dir)
    task_name = task_name or prediction.label.metadata.get("task", "liver")
    files: dict[str, Path] = {"segmentation": out_dir / "prediction.seg.nrrd"}
    with atomic_files() as stage:
        write_segmentation(prediction.label, stage(files["segmentation"]), segments_for(task_name))
        for i, (name, volume) in enumerate(prediction.uncertainty.items()):
            role = "uncertainty" if i == 0 else f"uncertainty_{name}"
            files[role] = out_dir / f"{role}.nrrd"
            write_volume(volume, stage(files[role]))
    return files
