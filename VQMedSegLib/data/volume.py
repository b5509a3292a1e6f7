"""A 3-D image with its physical geometry.

Arrays are indexed ``[k, j, i]`` (slice, row, column), as SimpleITK's
``GetArrayFromImage`` returns them. Geometry follows ITK: ``spacing``, ``origin`` and
``direction`` are given in ``(i, j, k)`` order in LPS patient coordinates, so a voxel
index ``(i, j, k)`` sits at ``origin + direction @ (spacing * (i, j, k))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclass
class Volume:
    """An image array together with the geometry that places it in patient space.

    Attributes:
        array: voxel values, shape ``(K, J, I)``.
        spacing: voxel size in millimetres, ``(i, j, k)`` order.
        origin: LPS position of voxel ``(0, 0, 0)`` in millimetres.
        direction: 3x3 direction cosines; column ``n`` is the LPS direction of index axis ``n``.
        metadata: free-form facts about where the volume came from (``modality``,
            ``source``, ``spacing_known`` ...). Never used for geometry.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(
                f"Volume array: found {self.array.ndim} dimensions (shape {self.array.shape}), "
                "expected 3 (slices, rows, columns)"
            )
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("Volume spacing and origin: expected three values each")

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along ``(i, j, k)``."""
        k, j, i = self.array.shape
        return (int(i), int(j), int(k))

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """Map continuous indices ``(..., 3)`` in ``(i, j, k)`` order to LPS millimetres."""
        ijk = np.asarray(ijk, dtype=float)
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.direction.T

    def physical_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`index_to_physical`."""
        xyz = np.asarray(xyz, dtype=float) - np.asarray(self.origin)
        return (xyz @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing)

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix from ``(i, j, k, 1)`` to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def same_geometry(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when both volumes sample exactly the same grid."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def geometry_mismatch(self, other: "Volume", tol: float = 1e-4) -> list[str]:
        """Human-readable list of the geometry fields that differ (empty if none)."""
        problems = []
        if self.shape != other.shape:
            problems.append(f"shape {other.shape} != {self.shape}")
        if not np.allclose(self.spacing, other.spacing, atol=tol):
            problems.append(f"spacing {_fmt(other.spacing)} != {_fmt(self.spacing)}")
        if not np.allclose(self.origin, other.origin, atol=tol * 10):
            problems.append(f"origin {_fmt(other.origin)} != {_fmt(self.origin)}")
        if not np.allclose(self.direction, other.direction, atol=tol):
            problems.append("direction differs")
        return problems

    def with_array(self, array: np.ndarray, **metadata: Any) -> "Volume":
        """A new volume on the same grid holding ``array``."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"with_array: shape {array.shape} does not match grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(), {**self.metadata, **metadata})

    # --------------------------------------------------------------- conversion
    def to_sitk(self) -> sitk.Image:
        arr = self.array
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction.ravel().tolist())
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, **metadata: Any) -> "Volume":
        if image.GetDimension() != 3:
            raise ValueError(
                f"expected a 3-D image, found {image.GetDimension()}-D of size {image.GetSize()}"
            )
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"expected one value per voxel, found {image.GetNumberOfComponentsPerPixel()} components"
            )
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.array(image.GetDirection()).reshape(3, 3),
            dict(metadata),
        )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def label_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of a label map, sorted: what ``np.unique`` returns, found in a
    few passes over the voxels when they span a short range of integers, as label maps
    do (0 and 1: two, against 0.12 s for ``np.unique`` at 512 x 512 x 150)."""
    array = np.asarray(array)
    if array.size == 0 or array.dtype.kind not in "biu":
        return np.unique(array)
    lo, hi = array.min(), array.max()
    if int(hi) - int(lo) > 16:
        return np.unique(array)
    between = [v for v in range(int(lo) + 1, int(hi)) if (array == v).any()]
    values = [lo] + [array.dtype.type(v) for v in between] + ([hi] if hi != lo else [])
    return np.array(values, dtype=array.dtype)


def finite_range(array: np.ndarray) -> tuple[float, float]:
    """A display window over the finite values of ``array``: their smallest and largest,
    ``(v, v + 1)`` when they are all ``v``, ``(0, 1)`` when none is finite. Reads the
    array in place (no copy of one that is all finite, as maps usually are)."""
    array = np.asarray(array)
    finite = np.isfinite(array)
    if not finite.all():
        array = array[finite]
    if array.size == 0:
        return 0.0, 1.0
    lo, hi = float(array.min()), float(array.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)
