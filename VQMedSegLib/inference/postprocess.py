"""Post-processing of predicted labels: each structure keeps its largest connected piece.

An organ such as the liver (or the left ventricle) is one connected piece of tissue, so a
predicted island apart from its main body is a false positive, typically a structure of
similar brightness elsewhere in the scan. Such islands cost little Dice but dominate the
surface distances (HD95). Keeping only the largest connected component of each structure
is the standard clean-up for these targets; targets that may come in several pieces,
such as lung tumours, are never post-processed this way (see ``Task.single_component``).

The components come from MONAI's ``get_largest_connected_component_mask`` (the function
behind its ``KeepLargestConnectedComponent`` transform, called here on numpy arrays
directly). Voxels are neighbours when they share a face, as in nnU-Net's
"remove all but the largest component": pieces that touch only at an edge or a corner
are separate pieces. The search runs inside the bounding box of the label, which on a CT
is a fraction of the volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from .. import _monai  # noqa: F401  (before MONAI; see _monai.py)
from monai.transforms import get_largest_connected_component_mask

LARGEST_COMPONENT = "largest connected component"


def _bounding_box(mask_any) -> tuple[slice, ...] | None:
    """The smallest box holding every non-zero voxel of a 3-D array, or None if empty."""
    k = np.flatnonzero(mask_any.any(axis=(1, 2)))
    if k.size == 0:
        return None
    sub = mask_any[k[0] : k[-1] + 1]
    j = np.flatnonzero(sub.any(axis=(0, 2)))
    i = np.flatnonzero(sub.any(axis=(0, 1)))
    return slice(k[0], k[-1] + 1), slice(j[0], j[-1] + 1), slice(i[0], i[-1] + 1)


def keep_largest_component(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``label`` (a 3-D array of structure values, 0 background) with each of ``values``
    reduced to its largest connected component; other values are left as they are.

    Returns a new array of the same shape and dtype."""
    arr = np.asarray(label)
    if arr.ndim != 3:
        raise ValueError(f"keep_largest_component: expected a 3-D label array, got shape {arr.shape}")
    values = [int(v) for v in values if int(v) != 0]
    out = arr.copy()
    box = _bounding_box(arr)
    if box is None or not values:
        return out
    crop = out[box]  # a view: edits land in ``out``
    for value in values:
        mask = crop == value
        if mask.any():
            crop[mask & ~get_largest_connected_component_mask(mask, connectivity=1)] = 0
    return out
