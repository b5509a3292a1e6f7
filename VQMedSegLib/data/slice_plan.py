"""The slice view's geometry: which index axis the 2-D slices run along, and how a volume
is permuted and flipped into the radiological view (LPS) and back.

NumPy alone, so that the Slicer module can plan a case's slices on its GUI thread
without importing torch and MONAI (seconds); :mod:`.preprocessing` cuts and resizes the
slices along this plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .volume import Volume

__all__ = ["SlicePlan", "plan_slices", "orientation_to_lps"]


# --------------------------------------------------------------------- orientation
def orientation_to_lps(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """For each LPS axis, the index axis closest to it and its sign.

    Returns ``(axis_for_lps, sign_for_lps)``: index axis ``axis_for_lps[a]`` runs along
    LPS axis ``a`` (0 = L, 1 = P, 2 = S) in direction ``sign_for_lps[a]``. The assignment
    maximises the summed alignment over all six permutations, so an oblique direction
    maps to one well-defined permutation.
    """
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    best, best_score = None, -np.inf
    for perm in itertools.permutations(range(3)):
        # perm[a] = index axis assigned to LPS axis a; direction[:, n] is axis n in LPS.
        score = sum(abs(direction[a, perm[a]]) for a in range(3))
        if score > best_score + 1e-12:
            best, best_score = perm, score
    assert best is not None
    signs = tuple(1 if direction[a, best[a]] >= 0 else -1 for a in range(3))
    return tuple(best), signs  # type: ignore[return-value]


def _to_canonical(array: np.ndarray, axis_for_lps, sign_for_lps) -> np.ndarray:
    """Permute/flip the last three axes of ``[..., k, j, i]`` into ``[..., S, P, L]`` order."""
    lead = array.ndim - 3
    # numpy axis holding index axis n is lead + (2 - n); canonical order is (S, P, L) = LPS axes (2, 1, 0)
    order = [lead + 2 - axis_for_lps[a] for a in (2, 1, 0)]
    out = np.transpose(array, list(range(lead)) + order)
    for pos, a in enumerate((2, 1, 0)):
        if sign_for_lps[a] < 0:
            out = np.flip(out, axis=lead + pos)
    return out


def _from_canonical(array: np.ndarray, axis_for_lps, sign_for_lps) -> np.ndarray:
    """Inverse of :func:`_to_canonical`."""
    lead = array.ndim - 3
    for pos, a in enumerate((2, 1, 0)):
        if sign_for_lps[a] < 0:
            array = np.flip(array, axis=lead + pos)
    order = [lead + 2 - axis_for_lps[a] for a in (2, 1, 0)]
    inverse = np.argsort(order)
    return np.transpose(array, list(range(lead)) + [lead + int(p) for p in inverse])


# ---------------------------------------------------------------------- slice plan
@dataclass(frozen=True)
class SlicePlan:
    """Everything needed to go from a volume to model slices and back.

    Attributes:
        grid: the input volume's geometry (an empty-array :class:`Volume` is not kept;
            shape, spacing, origin and direction are).
        axis_for_lps, sign_for_lps: the reorientation (see :func:`orientation_to_lps`).
        canonical_shape: ``(S, P, L)`` shape after reorientation.
        padded: ``(rows, columns)`` of the zero-padded slice: a square in millimetres, so
            that the model's pixels are square whatever the voxels (an axial slice of a
            sagittal acquisition has 3 mm columns and 0.75 mm rows); with square voxels,
            a square of max(rows, columns) voxels.
        size: side of the model slice.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    axis_for_lps: tuple[int, int, int]
    sign_for_lps: tuple[int, int, int]
    canonical_shape: tuple[int, int, int]
    padded: tuple[int, int]
    size: int

    @property
    def n_slices(self) -> int:
        return self.canonical_shape[0]

    @property
    def in_square(self) -> tuple[slice, slice]:
        """Where a canonical slice's rows and columns sit in its padded slice: centred, as
        MONAI's symmetric padding puts them (the extra row or column, if any, after)."""
        _, rows, cols = self.canonical_shape
        r0, c0 = (self.padded[0] - rows) // 2, (self.padded[1] - cols) // 2
        return slice(r0, r0 + rows), slice(c0, c0 + cols)

    @property
    def slice_axis(self) -> int:
        """Index axis (0 = i, 1 = j, 2 = k) that the model slices run along."""
        return self.axis_for_lps[2]

    def canonical_to_index_slice(self, s: int) -> int:
        """Index along :attr:`slice_axis` of canonical (inferior-to-superior) slice ``s``."""
        return s if self.sign_for_lps[2] > 0 else self.canonical_shape[0] - 1 - s

    def index_to_canonical_slice(self, k: int) -> int:
        return self.canonical_to_index_slice(k)  # the mapping is its own inverse

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "axis_for_lps": list(self.axis_for_lps),
            "sign_for_lps": list(self.sign_for_lps),
            "canonical_shape": list(self.canonical_shape),
            "padded": list(self.padded),
            "size": self.size,
        }


def plan_slices(volume: Volume, size: int) -> SlicePlan:
    """Plan the slice view of ``volume`` at ``size x size`` pixels."""
    if int(size) < 16 or int(size) % 16:
        raise InputError(f"slice size {size}: expected a multiple of 16, at least 16")
    axis_for_lps, sign_for_lps = orientation_to_lps(volume.direction)
    canonical_shape = _to_canonical(np.empty(volume.shape, dtype=np.uint8), axis_for_lps, sign_for_lps).shape
    # the rows of a canonical slice run along P, its columns along L
    spacing_rows, spacing_cols = (float(volume.spacing[axis_for_lps[a]]) for a in (1, 0))
    return SlicePlan(
        shape=volume.shape,
        spacing=tuple(volume.spacing),
        origin=tuple(volume.origin),
        direction=tuple(float(v) for v in volume.direction.ravel()),
        axis_for_lps=axis_for_lps,
        sign_for_lps=sign_for_lps,
        canonical_shape=tuple(int(s) for s in canonical_shape),  # type: ignore[arg-type]
        padded=_padded(canonical_shape[1:], spacing_rows, spacing_cols),
        size=int(size),
    )


# in-plane spacings closer than this are taken as square pixels (no resampling for rounding)
SQUARE_PIXEL_TOLERANCE = 0.01


def _padded(shape: tuple[int, int], spacing_rows: float, spacing_cols: float) -> tuple[int, int]:
    """``(rows, columns)`` of the padded slice: the smallest square in millimetres that
    holds the slice (each side at least the slice's own)."""
    rows, cols = int(shape[0]), int(shape[1])
    if abs(spacing_rows / spacing_cols - 1.0) <= SQUARE_PIXEL_TOLERANCE:
        side = max(rows, cols)
        return side, side
    side_mm = max(rows * spacing_rows, cols * spacing_cols)
    return max(rows, int(round(side_mm / spacing_rows))), max(cols, int(round(side_mm / spacing_cols)))
