"""A quick health check of a data set: sizes, spacing, labels and their intensities.

Used before training (``vqmedseg dataset check``, exit code 1 when a case has a problem)
to catch the problems that otherwise surface hours later: labels on a different grid
than the image, empty label maps, CT values that are not Hounsfield units; and to note
what does not stop training (unknown spacing, unlabelled cases).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..errors import InputError
from .datasets import CaseRef, discover_cases, load_case
from .volume import Volume

log = logging.getLogger(__name__)

__all__ = ["check_dataset", "check_case", "format_report"]


def _label_stats(image: Volume, label: Volume) -> dict[str, dict[str, Any]]:
    values = label.array.ravel().astype(np.int64, copy=False)
    counts = np.bincount(values)
    sums = np.bincount(values, weights=image.array.ravel().astype(np.float64, copy=False))
    stats: dict[str, dict[str, Any]] = {}
    for value in np.nonzero(counts)[0]:
        n = int(counts[value])
        stats[str(int(value))] = {"voxels": n, "mean_intensity": round(float(sums[value] / n), 4)}
    return stats


def _label_counts(label: Volume) -> dict[str, dict[str, Any]]:
    counts = np.bincount(label.array.ravel().astype(np.int64, copy=False))
    return {str(int(v)): {"voxels": int(counts[v]), "mean_intensity": None} for v in np.nonzero(counts)[0]}


def check_case(ref: CaseRef) -> dict[str, Any]:
    """Check one case; never raises for problems in the data (they go to ``problems``)."""
    entry: dict[str, Any] = {
        "id": ref.case_id,
        "modality": ref.modality,
        "image": str(ref.image),
        "label": None if ref.label is None else str(ref.label),
        "shape": None,
        "spacing": None,
        "labels": {},
        "problems": [],
        "notes": [],
    }
    problems: list[str] = entry["problems"]
    notes: list[str] = entry["notes"]
    try:
        image, label = load_case(ref, check_geometry=False)
    except InputError as exc:
        problems.append(f"could not load: {exc}")
        return entry

    entry["shape"] = list(image.size_ijk)
    entry["spacing"] = [round(float(s), 6) for s in image.spacing]
    entry["dtype"] = str(image.array.dtype)
    entry["intensity_range"] = [float(np.min(image.array)), float(np.max(image.array))]
    if not image.metadata.get("spacing_known", True):
        notes.append(
            "voxel spacing unknown (the file stores none; (1, 1, 1) used): millimetre metrics are not available"
        )
    for warning in image.metadata.get("warnings", []):
        problems.append(str(warning))
    if ref.modality == "CT":
        lo, hi = entry["intensity_range"]
        if lo > -500 or hi < 100:
            problems.append(
                f"CT intensities {lo:g}..{hi:g} do not look like Hounsfield units (expected air near -1000)"
            )

    if label is None:
        notes.append("no label map (unlabelled case)")
        return entry
    for warning in label.metadata.get("warnings", []):
        problems.append(f"label: {warning}")
    mismatch = image.geometry_mismatch(label)
    if mismatch:
        problems.append("label geometry differs from the image: " + "; ".join(mismatch) + " (label != image)")
    if label.shape == image.shape:
        entry["labels"] = _label_stats(image, label)
    else:
        entry["labels"] = _label_counts(label)
    if not any(key != "0" for key in entry["labels"]):
        problems.append("no labelled voxel (the label map is all background)")
    return entry


def check_dataset(
    path: str | os.PathLike,
    *,
    modality: str | None = None,
    limit: int | None = None,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Load every case under ``path`` and report what was found.

    Sizes and spacings use the same axis order, ``(i, j, k)`` = (columns, rows,
    slices), as ITK/Slicer report them: ``shape`` is the image size in voxels and
    ``spacing`` the voxel size in millimetres along those axes. (Arrays in this library
    are indexed ``[k, j, i]``, so ``shape`` is the array shape reversed.)

    Args:
        path: anything :func:`~VQMedSegLib.data.datasets.discover_cases` accepts.
        modality: passed to ``discover_cases``.
        limit: check only the first ``limit`` cases (``None`` = all).
        progress: a tqdm bar on stderr, one step a case; ``None`` shows it only when
            stderr is a terminal (as the command line does).

    Returns:
        ``{"path", "layout", "n_cases", "n_checked", "cases": [...]}``; each case has
        ``id``, ``modality``, ``image``, ``label``, ``shape``, ``spacing``, ``dtype``,
        ``intensity_range``, ``labels`` (``{"<value>": {"voxels", "mean_intensity"}}``,
        background ``"0"`` included; ``mean_intensity`` is ``None`` when the label grid
        differs from the image), ``problems`` (what stops the case from training or being
        scored as it is: unreadable, label off the image, no labelled voxel, a CT not in
        Hounsfield units, uneven slices; empty when fine) and ``notes`` (what does not: a
        spacing the file does not store, an unlabelled case); ``n_with_problems`` counts
        the cases with a problem.

    Raises:
        InputError: when ``path`` holds no recognisable data set, or ``limit`` < 1.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit {limit!r}: expected a positive integer or None")
    refs = discover_cases(path, modality)
    selected = refs if limit is None else refs[:limit]
    from tqdm.auto import tqdm

    cases = []
    for ref in tqdm(selected, desc="check", unit="case", disable=None if progress is None else not progress):
        log.debug("checking %s", ref.case_id)
        cases.append(check_case(ref))
    return {
        "path": str(path),
        "layout": refs[0].layout if refs else None,
        "n_cases": len(refs),
        "n_checked": len(cases),
        "n_with_problems": sum(1 for case in cases if case["problems"]),
        "cases": cases,
    }


def _fmt_floats(values: Any, digits: int = 3) -> str:
    if values is None:
        return "-"
    return "x".join(f"{float(v):.{digits}g}" for v in values)


def _problem_lines(cases: list[dict[str, Any]], key: str = "problems", named: int = 3) -> list[str]:
    """One line a distinct problem (or note, ``key``), in the order first met: a problem
    of one case names it; one shared by several names the first ``named`` and counts the rest."""
    where: dict[str, list[str]] = {}
    for case in cases:
        for problem in case.get(key, []):
            where.setdefault(problem, []).append(str(case.get("id")))
    lines = []
    for problem, ids in where.items():
        if len(ids) == 1:
            lines.append(f"  {ids[0]}: {problem}")
            continue
        shown = ", ".join(ids[:named]) + (f" and {len(ids) - named} more" if len(ids) > named else "")
        lines.append(f"  {len(ids)} cases ({shown}): {problem}")
    return lines


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`check_dataset`'s result, problems and then notes
    listed below it (one shared by several cases once, with how many; the JSON lists
    every case's)."""
    header = ["case", "mod", "size i x j x k", "spacing mm", "labels value:voxels(mean)"]
    rows = []
    for case in result.get("cases", []):
        labels = case.get("labels") or {}
        label_text = " ".join(
            f"{value}:{info['voxels']}"
            + (f"({info['mean_intensity']:.4g})" if info.get("mean_intensity") is not None else "")
            for value, info in sorted(labels.items(), key=lambda kv: int(kv[0]))
        ) or "-"
        shape = case.get("shape")
        rows.append([
            str(case.get("id")),
            str(case.get("modality")),
            "x".join(str(s) for s in shape) if shape else "-",
            _fmt_floats(case.get("spacing"), 4),
            label_text,
        ])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        f"Data set {result.get('path')} ({result.get('layout')}): "
        f"{result.get('n_checked', len(rows))} of {result.get('n_cases', len(rows))} case(s) checked",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    problem_lines = _problem_lines(result.get("cases", []))
    lines.append("")
    lines.append("Problems:" if problem_lines else "No problems found.")
    lines += problem_lines
    note_lines = _problem_lines(result.get("cases", []), "notes")
    if note_lines:
        lines += ["", "Notes:", *note_lines]
    return "\n".join(lines) + "\n"
