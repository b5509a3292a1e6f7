"""A one-page PNG overview of a prediction: CT slices with contours and the uncertainty map.

Drawn with matplotlib's Agg canvas directly (no pyplot, no GUI, no global state), so it
works in a worker process, a headless server or inside Slicer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.volume import Volume, finite_range
from ..errors import InputError
from .figures import agg_figure, save_png

PREDICTION_COLOUR = "#ff8c1a"
REFERENCE_COLOUR = "#00e5ff"


def write_overview_png(
    path: str | os.PathLike,
    ct: Volume,
    label: Volume,
    uncertainty: Volume,
    *,
    reference: Volume | None = None,
    n_slices: int = 4,
    window: tuple[float, float] = (-160.0, 240.0),
    title: str | None = None,
    colormap: str = "viridis",
    dpi: int = 100,
) -> Path:
    """Write a PNG with two rows of axial slices: contours on CT, and uncertainty on CT.

    Args:
        path: destination ``.png`` (written atomically).
        ct: CT volume ``[k, j, i]``; ``label``, ``uncertainty`` and ``reference`` must
            share its grid.
        label: predicted labels (any non-zero value is foreground).
        uncertainty: per-voxel uncertainty; one colour scale spans its finite range.
        reference: optional ground truth, contoured in a second colour.
        n_slices: number of axial slices (columns); they are spread over the extent of
            the reference (or prediction) foreground, taking the largest cross-section in
            each part, or spread over the whole volume when there is no foreground.
        window: CT display range ``(lower, upper)`` in HU.
        title: figure title.
        colormap: matplotlib colormap for the uncertainty.
        dpi: resolution of the PNG.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"overview file {path}: found suffix {path.suffix!r}, expected '.png'")
    for name, other in (("label", label), ("uncertainty", uncertainty), ("reference", reference)):
        if other is not None and other.shape != ct.shape:
            raise InputError(f"overview {name}: found shape {other.shape}, expected the CT's shape {ct.shape}")
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise InputError(f"n_slices: found {n_slices!r}, expected a positive integer")
    lower, upper = (float(w) for w in window)
    if not upper > lower:
        raise InputError(f"window: found {window}, expected (lower, upper) with lower < upper")

    foreground = (reference.array if reference is not None else label.array) != 0
    slices = choose_slices(foreground, int(n_slices))
    u_range = finite_range(uncertainty.array)
    aspect = ct.spacing[1] / ct.spacing[0]  # row (j) spacing over column (i) spacing

    n = len(slices)
    fig = agg_figure(2.6 * n + 1.0, 5.8, dpi=dpi)
    axes = fig.subplots(2, n, squeeze=False)
    ct_style = dict(cmap="gray", vmin=lower, vmax=upper, interpolation="nearest", aspect=aspect)
    overlay = None
    for column, k in enumerate(slices):
        ct_slice = _oriented(ct, ct.array[k])
        pred = _oriented(ct, label.array[k] != 0)
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(ct_slice, **ct_style)
        _contour(top, pred, PREDICTION_COLOUR, 1.4)
        if reference is not None:
            _contour(top, _oriented(ct, reference.array[k] != 0), REFERENCE_COLOUR, 1.4)
        top.set_title(f"slice k={k}", fontsize=9)
        bottom.imshow(ct_slice, **ct_style)
        overlay = bottom.imshow(
            _oriented(ct, np.asarray(uncertainty.array[k], dtype=float)),
            cmap=colormap, norm=Normalize(*u_range), alpha=0.6, interpolation="nearest", aspect=aspect,
        )
        _contour(bottom, pred, "white", 0.8)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("CT + contours", fontsize=9)
    axes[1, 0].set_ylabel("CT + uncertainty", fontsize=9)

    handles = [Line2D([], [], color=PREDICTION_COLOUR, label="prediction")]
    if reference is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOUR, label="reference"))
    fig.legend(handles=handles, loc="outside upper right", fontsize=8, frameon=False, ncols=len(handles))
    fig.colorbar(overlay, ax=list(axes[1]), fraction=0.04, pad=0.01, label="uncertainty")
    if title:
        fig.suptitle(title, fontsize=11)

    return save_png(fig, path)


def choose_slices(foreground: np.ndarray, n_slices: int) -> list[int]:
    """Pick up to ``n_slices`` axial indices that show a structure well.

    The slices holding foreground are split into ``n_slices`` consecutive groups and the
    slice with the largest cross-section is taken from each, so the picks cover the
    structure from end to end. Without foreground, slices are spread over the volume.

    Args:
        foreground: boolean array ``[k, j, i]``.
        n_slices: how many slices are wanted.

    Returns:
        Sorted, distinct slice indices ``k``.
    """
    depth = foreground.shape[0]
    area = foreground.reshape(depth, -1).sum(axis=1)
    occupied = np.flatnonzero(area)
    if occupied.size == 0:
        count = min(n_slices, depth)
        return sorted({int(round(x)) for x in np.linspace(0, depth - 1, count + 2)[1:-1]} or {depth // 2})
    groups = np.array_split(occupied, min(n_slices, occupied.size))
    return sorted(int(group[np.argmax(area[group])]) for group in groups)


def _oriented(volume: Volume, plane: np.ndarray) -> np.ndarray:
    # Radiological display: patient left on the image right, anterior at the top. The
    # library's arrays are LPS-indexed, so flip an axis whose index runs the other way.
    if volume.direction[0, 0] < 0:
        plane = plane[:, ::-1]
    if volume.direction[1, 1] < 0:
        plane = plane[::-1, :]
    return plane


def _contour(ax, mask: np.ndarray, colour: str, width: float) -> None:
    if mask.any() and not mask.all():  # matplotlib warns when a level is absent
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width)
