"""Writing a prediction: a Slicer segmentation plus one volume per uncertainty map."""

from __future__ import annotations

from pathlib import Path

from ..data.io import write_segmentation, write_volume
from ..tasks import get_task


def segments_for(task_name: str) -> list[dict]:
    """The segment description (name, colour, terminology) of a task's label 1."""
    task = get_task(task_name)
    return [{"value": 1, "name": task.segment_name, "color": task.color, "terminology": task.terminology}]


def write_prediction(out_dir: Path, prediction, task_name: str | None = None) -> dict[str, Path]:
    """Write ``prediction.seg.nrrd`` and ``uncertainty.nrrd`` (plus ``uncertainty_<name>.nrrd``
    for every further map) atomically; returns the paths by role."""
    out_dir = Path(out_dir)
    task_name = task_name or prediction.label.metadata.get("task", "liver")
    files: dict[str, Path] = {}
    files["segmentation"] = out_dir / "prediction.seg.nrrd"
    write_segmentation(prediction.label, files["segmentation"], segments_for(task_name))
    for i, (name, volume) in enumerate(prediction.uncertainty.items()):
        path = out_dir / ("uncertainty.nrrd" if i == 0 else f"uncertainty_{name}.nrrd")
        write_volume(volume, path)
        files[f"uncertainty_{name}" if i else "uncertainty"] = path
    return files
