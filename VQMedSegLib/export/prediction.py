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
from ..errors import InputError, WorkspaceError
from ..files import atomic_files, remove_temporaries
from ..jobs.locks import HeldLock, read_lock_info
from ..tasks import get_task

log = logging.getLogger("vqmedseg")

PREDICTION_LOCK = ".vqmedseg-predict.lock"  # in a `predict --out` folder while a prediction is written into it
WRITTEN = ".vqmedseg-predict.json"  # in a `predict --out` folder: the files the last prediction wrote, as it left them


def segments_for(task_name: str) -> list[dict]:
    """The segment description (name, colour, terminology) of a task's label 1."""
    task = get_task(task_name)
    return [{"value": 1, "name": task.segment_name, "color": task.color, "terminology": task.terminology}]


def _ours(path: Path) -> bool:
    return path.name == "prediction.seg.nrrd" or (path.name.startswith("uncertainty") and path.name.endswith(".nrrd"))


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def refuse_files_of_others(out_dir: Path) -> None:
    """Refuse to write a prediction over files of its names (``prediction.seg.nrrd``,
    ``uncertainty*.nrrd``) that an earlier prediction into ``out_dir`` did not leave as
    they are: a segmentation corrected in Slicer and saved over the file, say.

    Raises:
        InputError: naming the files.
    """
    from ..files import read_json

    written = out_dir / WRITTEN
    try:
        record = read_json(written, error=ValueError) if written.is_file() else {}
    except ValueError:  # an unreadable record vouches for nothing
        record = {}
    record = record if isinstance(record, dict) else {}
    others = sorted(p.name for p in out_dir.glob("*.nrrd") if p.is_file() and _ours(p) and record.get(p.name) != _stamp(p))
    if others:
        raise InputError(f"--out {out_dir}: {', '.join(others)} {'was' if len(others) == 1 else 'were'} not written by a "
                         "prediction into this folder, or changed since (edited and saved in Slicer?); expected a folder "
                         "without them, or --overwrite to replace them")


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
    if not lock.try_acquire():
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


def write_prediction(out_dir: Path, prediction, task_name: str | None = None, record: bool = False) -> dict[str, Path]:
    """Write ``prediction.seg.nrrd`` and ``uncertainty.nrrd`` (plus ``uncertainty_<name>.nrrd``
    for every further map); returns the paths by role.

    Every file is written to a hidden temporary name first, and all are renamed into place
    only once each is complete: a failure part way (a full disk while the large
    uncertainty map is written) leaves the folder's previous prediction whole, never a new
    segmentation beside an older case's uncertainty. Maps of an earlier prediction that
    this one does not make (a VQ-Seg model's QPM map, before a supervised model's
    prediction) are deleted just before the renames. With ``record`` (a ``predict --out``
    folder), the record of what was written (:data:`WRITTEN`, which
    :func:`refuse_files_of_others` checks) is renamed into place with the files.
    """
    out_dir = Path(out_dir)
    task_name = task_name or prediction.label.metadata.get("task", "liver")
    files: dict[str, Path] = {"segmentation": out_dir / "prediction.seg.nrrd"}
    with atomic_files() as stage:
        # staged first, renamed last: the record never names files before they are in place
        record_tmp = stage(out_dir / WRITTEN) if record else None
        staged = {"segmentation": stage(files["segmentation"])}
        write_segmentation(prediction.label, staged["segmentation"], segments_for(task_name))
        for i, (name, volume) in enumerate(prediction.uncertainty.items()):
            role = "uncertainty" if i == 0 else f"uncertainty_{name}"
            files[role] = out_dir / f"{role}.nrrd"
            staged[role] = stage(files[role])
            write_volume(volume, staged[role])
        if record_tmp is not None:  # a rename keeps a file's size and modification time
            record_tmp.write_text(
                json.dumps({files[role].name: _stamp(tmp) for role, tmp in staged.items()}), encoding="utf-8")
        for old in out_dir.glob("uncertainty*.nrrd"):
            if _ours(old) and old not in files.values():
                old.unlink(missing_ok=True)
    return files
