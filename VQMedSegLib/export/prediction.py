"""Writing a prediction: a Slicer segmentation plus one volume per uncertainty map."""

from __future__ import annotations

from pathlib import Path

from ..data.io import write_segmentation, write_volume
from ..files import atomic_files
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
    with atomic_files() as stage:
        write_segmentation(prediction.label, stage(files["segmentation"]), segments_for(task_name))
        for i, (name, volume) in enumerate(prediction.uncertainty.items()):
            role, path = ("uncertainty", out_dir / "uncertainty.nrrd") if i == 0 else \
                (f"uncertainty_{name}", out_dir / f"uncertainty_{name}.nrrd")
            files[role] = path
            write_volume(volume, stage(path))
    return files
