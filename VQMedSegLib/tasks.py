"""Segmentation targets: which label to learn, how to show it, how to window the CT.

A task fixes the intensity preset, the segment's name and colour, a standard
terminology entry (DICOM SCT codes, as Slicer's Segment Editor uses them) and whether the
target is one connected piece (predictions then keep only their largest component).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Task:
    name: str
    segment_name: str
    color: tuple[float, float, float]
    ct_window: tuple[float, float]  # (lower, upper) HU
    terminology: str
    description: str
    # one connected piece of tissue: predictions keep only their largest connected
    # component (see VQMedSegLib.inference.postprocess); False where several pieces are
    # expected, such as tumours
    single_component: bool


TASKS: dict[str, Task] = {
    "liver": Task(
        name="liver",
        segment_name="Liver",
        color=(221 / 255, 130 / 255, 101 / 255),
        ct_window=(-160.0, 240.0),  # abdominal window: level 40, width 400
        terminology="Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^",
        description="Liver on contrast-enhanced abdominal CT",
        single_component=True,
    ),
    "lung-tumour": Task(
        name="lung-tumour",
        segment_name="Lung tumour",
        color=(144 / 255, 238 / 255, 144 / 255),
        ct_window=(-1000.0, 400.0),  # lung window wide enough to keep soft-tissue tumour contrast
        terminology="Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^49755003^Morphologically Altered Structure~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~SCT^39607008^Lung~^^",
        description="Solid tumour in the lung on chest CT",
        single_component=False,
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"task {name!r}: expected one of {', '.join(sorted(TASKS))}") from None


def target_segment(names: list[str], task: str, source: str) -> int | None:
    """Which of a segmentation's segments (by name, in order) holds ``task``'s target.

    The segment named as the task's segment (``Liver``; any case) is the target, whatever
    its label value. ``None`` when there is no such segment and at most one segment: the
    labels are then taken as they are. Several segments and none (or more than one)
    named for the task is an :class:`InputError` naming ``source`` and listing them.
    """
    wanted = get_task(task).segment_name
    named = [i for i, name in enumerate(names) if str(name).strip().casefold() == wanted.casefold()]
    if len(named) == 1:
        return named[0]
    if len(names) < 2 and not named:
        return None
    raise InputError(f"{source}: segments {', '.join(repr(str(n)) for n in names)}; "
                     f"{'none is' if not named else 'more than one is'} named {wanted!r} for task {task!r}; "
                     f"name the target's segment {wanted!r}")
