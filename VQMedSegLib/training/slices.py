"""Labelled 2-D slices gathered from a workspace, ready for training.

Each case's CT is normalised with the task's window, reoriented and resized once
(:mod:`VQMedSegLib.data.preprocessing`); only the slices someone annotated are kept.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..data.preprocessing import extract_ct_slices, extract_label_slices, plan_slices
from ..errors import InputError
from ..jobs.workspace import Workspace
from ..tasks import get_task


@dataclass
class SliceSet:
    """``images (N, 1, S, S)`` float32 in [0, 1]; ``labels (N, S, S)`` int64 in {0, 1}."""

    images: np.ndarray
    labels: np.ndarray
    cases: list[str] = field(default_factory=list)
    slices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def empty(cls, size: int) -> "SliceSet":
        return cls(np.zeros((0, 1, size, size), np.float32), np.zeros((0, size, size), np.int64))

    def foreground_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labels.reshape(len(self), -1).any(axis=1))


def labelled_signature(labelled: dict[str, list[int]]) -> str:
    """A short hash of which slices are labelled: a resumed run must train on the same set."""
    blob = json.dumps({k: sorted(v) for k, v in sorted(labelled.items())}).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_labelled_slices(
    ws: Workspace, size: int, validation_cases: list[str] | tuple[str, ...] = ()
) -> tuple[SliceSet, SliceSet]:
    """(training slices, validation slices) from every annotated case of the workspace."""
    task = get_task(ws.task)
    labelled = ws.labelled_slices()
    if not labelled:
        raise InputError(
            f"workspace {ws.root}: no annotated slice yet; annotate slices first ('vqmedseg workspace annotate')"
        )
    unknown = sorted(set(validation_cases) - set(labelled))
    if unknown:
        raise InputError(f"validation case(s) {unknown}: not annotated in workspace {ws.root}")
    train, val = [], []
    for case_id, slice_ids in sorted(labelled.items()):
        ct = ws.load_ct(case_id)
        annotation = ws.load_annotation(case_id)
        plan = plan_slices(ct, size)
        images = extract_ct_slices(ct, plan, task.ct_window)
        labels = extract_label_slices(annotation.array > 0, plan)  # every annotated structure is the target
        canonical = [plan.index_to_canonical_slice(s) for s in slice_ids]
        part = SliceSet(images[canonical, None], labels[canonical], [case_id] * len(canonical), list(slice_ids))
        (val if case_id in validation_cases else train).append(part)
    return _concat(train, size), _concat(val, size)


def _concat(parts: list[SliceSet], size: int) -> SliceSet:
    if not parts:
        return SliceSet.empty(size)
    return SliceSet(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        sum((p.cases for p in parts), []),
        sum((p.slices for p in parts), []),
    )
