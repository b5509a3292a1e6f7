"""Writing a prediction: a Slicer segmentation plus one volume per uncertainty map."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..data.io import write_segmentation, write_volume
from ..errors import VQMedSegError
from ..files import atomic_path
from ..tasks import get_task


def segments_for(task_name: str) -> list[dict]:
    """The segment description (name, colour, terminology) of a task's label 1."""
    task = get_task(task_name)
    return [{"value": 1, "name": task.segment_name, "color": task.color, "terminology": task.terminology}]


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
    writes = [lambda path: write_segmentation(prediction.label, path, segments_for(task_name))]
    for i, (name, volume) in enumerate(prediction.uncertainty.items()):
        files[f"uncertainty_{name}" if i else "uncertainty"] = out_dir / ("uncertainty.nrrd" if i == 0 else f"uncertainty_{name}.nrrd")
        writes.append(lambda path, volume=volume: write_volume(volume, path))
    with contextlib.ExitStack() as renames:  # on leaving: every temporary renamed, or on an error every one deleted
        for path, write in zip(files.values(), writes):
            tmp = renames.enter_context(atomic_path(path))
            try:
                write(tmp)
            except VQMedSegError as exc:  # name the file the user asked for, not its temporary
                raise type(exc)(str(exc).replace(str(tmp), str(path))) from exc
    return files
