"""Overlap and surface-distance metrics in 3-D and per slice, in millimetres.

The numbers come from MONAI (``compute_dice``, ``compute_iou``, and the surface
distances of ``get_edge_surface_distance`` reduced as ``compute_hausdorff_distance`` and
``compute_average_surface_distance`` reduce them); this module fixes the conventions
around them, the ones papers rarely state:

* **Spacing.** Distances use the voxel spacing of the reference, so HD95 and ASD are in
  millimetres. When the spacing is unknown (ACDC HDF5 files), the result says
  ``"units": "voxels"`` instead of pretending.
* **HD95.** MONAI's convention: the 95th percentile of the surface distances from
  prediction to reference and from reference to prediction, taken separately, then the
  larger of the two. (medpy pools both directions before the percentile; its value is
  usually a little smaller.)
* **ASD.** Symmetric mean surface distance: the mean over the surface points of both
  masks of the distance to the other mask's surface.
* **Empty masks.** Both empty: Dice = Jaccard = 1, HD95 = ASD = 0 (nothing to find,
  nothing found). Exactly one empty: Dice = Jaccard = 0, and HD95 / ASD are undefined:
  they are reported as ``None`` (JSON ``null``) with ``"empty": "prediction"`` or
  ``"reference"``, never as a made-up large number. Summaries average distances over
  the cases where they are defined and count the others.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from .. import _monai  # noqa: F401  (before MONAI; see _monai.py)
from monai.metrics import compute_dice, compute_iou
from monai.metrics.utils import get_edge_surface_distance

from ..errors import InputError

__all__ = ["SegmentationScores", "dice_masks", "score_masks", "score_volumes", "per_slice_scores", "summarize"]


@dataclass
class SegmentationScores:
    """Scores of one binary structure; distances in ``units``."""

    dice: float
    jaccard: float
    hd95: float | None
    asd: float | None
    empty: str | None  # None, "both", "prediction" or "reference"
    units: str = "mm"
    pred_voxels: int = 0
    ref_voxels: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        # keys named with their unit, the form reports and the demo's metrics.json use
        suffix = "_mm" if self.units == "mm" else "_vox"
        d[f"hd95{suffix}"] = d.pop("hd95")
        d[f"asd{suffix}"] = d.pop("asd")
        return d


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def dice_masks(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks of the same shape, with this module's empty-mask
    conventions (both empty: 1, one empty: 0); no distances, so cheap enough to run on a
    validation set during training."""
    pred = np.asarray(pred).astype(bool)
    ref = np.asarray(ref).astype(bool)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} does not match reference shape {ref.shape}")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 or n_ref == 0:
        return 1.0 if n_pred == n_ref else 0.0
    return float(compute_dice(_as_batch(pred), _as_batch(ref), include_background=True, ignore_empty=False)[0, 0])


def score_masks(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None,
) -> SegmentationScores:
    """Score a binary prediction against a binary reference of the same shape.

    Args:
        pred, ref: boolean or 0/1 arrays, 2-D or 3-D, identical shapes.
        spacing: voxel size per array axis (same order as the array's axes), or
            ``None`` when unknown (distances are then in voxels).
    """
    pred = np.asarray(pred).astype(bool)
    ref = np.asarray(ref).astype(bool)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} does not match reference shape {ref.shape}")
    if spacing is not None and len(spacing) != pred.ndim:
        raise InputError(f"spacing {tuple(spacing)}: expected {pred.ndim} values, one per array axis")
    units = "mm" if spacing is not None else "voxels"
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 and n_ref == 0:
        return SegmentationScores(1.0, 1.0, 0.0, 0.0, "both", units, 0, 0)
    if n_pred == 0 or n_ref == 0:
        return SegmentationScores(0.0, 0.0, None, None, "prediction" if n_pred == 0 else "reference", units, n_pred, n_ref)
    pred, ref = _crop_to_union(pred, ref)
    p, r = _as_batch(pred), _as_batch(ref)
    dice = float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])
    jaccard = float(compute_iou(p, r, include_background=True, ignore_empty=False)[0, 0])
    hd95, asd = surface_scores(p[0, 0], r[0, 0], spacing)
    return SegmentationScores(dice, jaccard, hd95, asd, None, units, n_pred, n_ref)


def surface_scores(pred: torch.Tensor, ref: torch.Tensor, spacing: Sequence[float] | None) -> tuple[float, float]:
    """HD95 and symmetric ASD of two non-empty masks from one finding of their surfaces
    and distances (MONAI's ``get_edge_surface_distance``), reduced as MONAI's
    ``compute_hausdorff_distance(percentile=95)`` and ``compute_average_surface_distance
    (symmetric=True)`` reduce them (the tests hold the two equal); each of those finds the
    surfaces again, which doubled the time."""
    sp = None if spacing is None else [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated argument here and warns on every call
        # (Project-MONAI/MONAI#9059); any other warning still shows
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        _, distances, _ = get_edge_surface_distance(pred, ref, spacing=sp, symmetric=True)
    hd95 = max(float(torch.quantile(d.float(), 0.95)) for d in distances)  # each direction's 95th percentile, the larger
    asd = float(torch.cat(distances).float().mean())
    return hd95, asd


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the box around either's voxels, one voxel wider where the image
    allows. Every score is the same as on the whole image, for MONAI crops the same way
    before it finds the surfaces; but a liver in a 512 x 512 x 150 CT fills a tenth of it,
    and the scores take a tenth of the time (the Slicer module scores on its GUI thread)."""
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    return pred[tuple(box)], ref[tuple(box)]


def _array_spacing(spacing_ijk: Sequence[float], spacing_known: bool) -> list[float] | None:
    return [float(s) for s in reversed(tuple(spacing_ijk))] if spacing_known else None


def score_volumes(pred, ref, label: int = 1) -> SegmentationScores:
    """3-D scores of ``label`` between two :class:`Volume` objects on the same grid."""
    problems = ref.geometry_mismatch(pred)
    if problems:
        raise InputError("prediction and reference are on different grids: " + "; ".join(problems))
    known = bool(ref.metadata.get("spacing_known", True))
    return score_masks(pred.array == label, ref.array == label, _array_spacing(ref.spacing, known))


def per_slice_scores(pred, ref, label: int = 1) -> list[dict]:
    """2-D scores on every axial slice: along the index axis closest to the patient's
    superior axis, numbered by that index, as the workspace numbers its slices (the
    suggestions, the annotations). For a volume stored axially that is ``k``.

    Returns one dict per slice with ``slice`` (the index) and the scores; slices where
    both masks are empty are included and marked ``"empty": "both"``.
    """
    from ..data.slice_plan import orientation_to_lps

    problems = ref.geometry_mismatch(pred)
    if problems:
        raise InputError("prediction and reference are on different grids: " + "; ".join(problems))
    known = bool(ref.metadata.get("spacing_known", True))
    np_axis = 2 - orientation_to_lps(ref.direction)[0][2]  # numpy axis of the axial index axis
    sp = _array_spacing(ref.spacing, known)
    sp2 = None if sp is None else [s for a, s in enumerate(sp) if a != np_axis]
    out = []
    for k in range(ref.shape[np_axis]):
        s = score_masks(np.take(pred.array, k, axis=np_axis) == label, np.take(ref.array, k, axis=np_axis) == label, sp2)
        out.append({"slice": k, **s.to_json()})
    return out


def summarize(scores: Iterable[SegmentationScores]) -> dict:
    """Mean and standard deviation over cases; undefined distances are counted, not averaged."""
    scores = list(scores)
    if not scores:
        raise InputError("summarize: found no scores, expected at least one case")
    units = scores[0].units

    def stats(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        arr = np.asarray(values, dtype=float)
        return float(arr.mean()), float(arr.std())

    dice_m, dice_s = stats([s.dice for s in scores])
    jac_m, jac_s = stats([s.jaccard for s in scores])
    hd_vals = [s.hd95 for s in scores if s.hd95 is not None and math.isfinite(s.hd95)]
    asd_vals = [s.asd for s in scores if s.asd is not None and math.isfinite(s.asd)]
    hd_m, hd_s = stats(hd_vals)
    asd_m, asd_s = stats(asd_vals)
    suffix = "_mm" if units == "mm" else "_vox"
    return {
        "n": len(scores),
        "dice_mean": dice_m,
        "dice_std": dice_s,
        "jaccard_mean": jac_m,
        "jaccard_std": jac_s,
        f"hd95{suffix}_mean": hd_m,
        f"hd95{suffix}_std": hd_s,
        f"asd{suffix}_mean": asd_m,
        f"asd{suffix}_std": asd_s,
        "n_distance_undefined": len(scores) - len(hd_vals),
        "units": units,
    }


def mean_std_text(mean: float, std: float, n: int, scale: float = 100.0, sign: bool = False) -> str:
    """``mean ± std`` (times ``scale``, two decimals) over ``n`` runs, or the mean alone
    when ``n`` is 1: one run has no spread, and "± 0.00" would read as a perfectly steady figure."""
    value = f"{scale * mean:{'+' if sign else ''}.2f}"
    return value if n < 2 else f"{value} ± {scale * std:.2f}"


def spread_words(n: int) -> str:
    """How a table over ``n`` seeds states its spread."""
    return ("one seed, so no spread is shown" if n < 2
            else "mean ± population standard deviation (ddof 0) over seeds")
