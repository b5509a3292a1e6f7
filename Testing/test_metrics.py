"""Metrics against values worked out by hand, and the empty-mask conventions."""

import numpy as np
import pytest

from VQMedSegLib.data.volume import Volume
from VQMedSegLib.errors import InputError
from VQMedSegLib.metrics.segmentation import mean_std_text, per_slice_scores, score_masks, score_volumes, summarize


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_overlap_of_shifted_boxes():
    ref = _box((10, 10, 10), (2, 2, 2), (6, 6, 6))  # 64 voxels
    pred = _box((10, 10, 10), (3, 2, 2), (7, 6, 6))  # shifted by one slice: 48 shared
    s = score_masks(pred, ref, spacing=(1, 1, 1))
    assert s.dice == pytest.approx(0.75)
    assert s.jaccard == pytest.approx(48 / 80)


def test_distances_are_in_millimetres_along_anisotropic_axis():
    """Two full-width one-voxel slabs three slices apart at 2.5 mm: every surface point is 7.5 mm away."""
    ref = _box((10, 6, 6), (2, 0, 0), (3, 6, 6))
    pred = _box((10, 6, 6), (5, 0, 0), (6, 6, 6))
    s = score_masks(pred, ref, spacing=(2.5, 0.7, 0.7))
    assert s.dice == 0
    assert s.hd95 == pytest.approx(7.5)
    assert s.asd == pytest.approx(7.5)
    voxels = score_masks(pred, ref, spacing=None)
    assert voxels.units == "voxels" and voxels.hd95 == pytest.approx(3.0)


def test_identical_masks_score_perfectly():
    ref = _box((8, 8, 8), (1, 2, 3), (6, 7, 7))
    s = score_masks(ref, ref, spacing=(1, 2, 3))
    assert (s.dice, s.jaccard, s.hd95, s.asd, s.empty) == (1.0, 1.0, 0.0, 0.0, None)


def test_empty_conventions():
    empty = np.zeros((4, 4, 4), bool)
    full = _box((4, 4, 4), (1, 1, 1), (3, 3, 3))
    both = score_masks(empty, empty, (1, 1, 1))
    assert (both.dice, both.hd95, both.asd, both.empty) == (1.0, 0.0, 0.0, "both")
    missed = score_masks(empty, full, (1, 1, 1))
    assert (missed.dice, missed.jaccard, missed.hd95, missed.asd, missed.empty) == (0.0, 0.0, None, None, "prediction")
    spurious = score_masks(full, empty, (1, 1, 1))
    assert spurious.empty == "reference" and spurious.hd95 is None
    summary = summarize([both, missed, score_masks(full, full, (1, 1, 1))])
    assert summary["dice_mean"] == pytest.approx(2 / 3)
    assert summary["hd95_mm_mean"] == 0.0 and summary["n_distance_undefined"] == 1


def test_volume_scores_use_volume_spacing_and_check_grid():
    ref_arr = np.zeros((10, 6, 6), np.uint8)
    ref_arr[2] = 1
    pred_arr = np.zeros_like(ref_arr)
    pred_arr[5] = 1
    # Volume spacing is (i, j, k): the slice axis k has 2.5 mm
    ref = Volume(ref_arr, spacing=(0.7, 0.7, 2.5))
    pred = ref.with_array(pred_arr)
    assert score_volumes(pred, ref).hd95 == pytest.approx(7.5)
    unknown = Volume(ref_arr, spacing=(1, 1, 1), metadata={"spacing_known": False})
    assert score_volumes(unknown.with_array(pred_arr), unknown).units == "voxels"
    shifted = Volume(pred_arr, spacing=(0.7, 0.7, 2.5), origin=(0, 0, 5))
    with pytest.raises(InputError, match="origin"):
        score_volumes(shifted, ref)


def test_per_slice_scores():
    ref_arr = np.zeros((3, 8, 8), np.uint8)
    ref_arr[1, 2:6, 2:6] = 1
    pred_arr = np.zeros_like(ref_arr)
    pred_arr[1, 2:6, 3:7] = 1
    pred_arr[2, 0, 0] = 1
    ref = Volume(ref_arr, spacing=(0.5, 0.5, 3.0))
    rows = per_slice_scores(ref.with_array(pred_arr), ref)
    assert [r["empty"] for r in rows] == ["both", None, "reference"]
    assert rows[1]["dice"] == pytest.approx(0.75)
    assert rows[1]["hd95_mm"] == pytest.approx(0.5)


def test_per_slice_scores_number_slices_as_the_workspace_does_whatever_the_storage_order():
    """Slices are counted along the axial axis, as suggestions and annotations number them:
    the same scan stored with its axial axis first (index i) once gave one row per coronal
    plane, numbered differently from every other slice number of the tool."""
    from VQMedSegLib.data.preprocessing import plan_slices

    rng = np.random.default_rng(5)
    ref_arr = (rng.random((4, 10, 12)) > 0.6).astype(np.uint8)
    pred_arr = (rng.random((4, 10, 12)) > 0.6).astype(np.uint8)
    axial = Volume(ref_arr, spacing=(0.7, 0.8, 3.0))
    rows = per_slice_scores(axial.with_array(pred_arr), axial)
    # stored with index i running superior (array [j, k, i] -> the last array axis is axial)
    direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # i -> S, j -> P, k -> L
    stored = Volume(np.ascontiguousarray(np.transpose(ref_arr, (2, 1, 0))), spacing=(3.0, 0.8, 0.7), direction=direction)
    assert plan_slices(stored, 16).slice_axis == 0
    permuted = per_slice_scores(stored.with_array(np.ascontiguousarray(np.transpose(pred_arr, (2, 1, 0)))), stored)
    assert len(permuted) == 4 == plan_slices(stored, 16).n_slices
    assert [r["slice"] for r in permuted] == [0, 1, 2, 3]
    for a, b in zip(rows, permuted):
        assert a["dice"] == pytest.approx(b["dice"]) and a["hd95_mm"] == pytest.approx(b["hd95_mm"])


def test_dice_alone_agrees_with_the_full_scores_and_their_empty_conventions():
    from VQMedSegLib.metrics.segmentation import dice_masks

    rng = np.random.default_rng(3)
    pred, ref = rng.random((6, 20, 20)) > 0.6, rng.random((6, 20, 20)) > 0.5
    assert dice_masks(pred, ref) == pytest.approx(score_masks(pred, ref, (2.0, 1.0, 1.0)).dice)
    empty = np.zeros((6, 20, 20), bool)
    assert dice_masks(empty, empty) == 1.0 and dice_masks(empty, ref) == 0.0 and dice_masks(pred, empty) == 0.0
    with pytest.raises(InputError, match=r"prediction shape \(6, 20, 20\) does not match reference shape \(6, 20\)"):
        dice_masks(pred, ref[:, 0])


def test_mean_and_spread_are_shown_only_where_there_is_a_spread():
    assert mean_std_text(0.61264, 0.04021, 3) == "61.26 ± 4.02"
    # one seed has no spread: its std of 0 would read as a measured, perfectly steady figure
    assert mean_std_text(0.61264, 0.0, 1) == "61.26"
    assert mean_std_text(2.49, 2.0, 3, scale=1, sign=True) == "+2.49 ± 2.00"
    assert mean_std_text(-0.19, 0.0, 1, scale=1, sign=True) == "-0.19"


# MONAI's own distance metrics pass its deprecated argument (Project-MONAI/MONAI#9059)
@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
@pytest.mark.parametrize("shape, spacing", [((20, 40, 36), (2.5, 0.8, 0.7)), ((20, 40, 36), None), ((48, 40), (1.2, 0.9))])
def test_scores_equal_monais_on_the_whole_image(shape, spacing):
    """score_masks cuts both masks to the box around them and finds their surfaces once
    for HD95 and ASD; every figure must still be MONAI's on the whole image, for blobs
    inside the image and for ones cut by its border."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou
    from scipy import ndimage

    rng = np.random.default_rng(sum(shape))
    for trial in range(6):
        blobs = [ndimage.gaussian_filter(rng.random(shape), 3) for _ in range(2)]
        pred, ref = (b > np.quantile(b, 0.8 if trial % 2 else 0.95) for b in blobs)
        if trial >= 4:  # a mask that reaches the image's edge
            pred[0], ref[..., -1] = True, True
        p, r = (torch.as_tensor(m, dtype=torch.float32)[None, None] for m in (pred, ref))
        expected = {
            "dice": float(compute_dice(p, r, include_background=True)[0, 0]),
            "jaccard": float(compute_iou(p, r, include_background=True)[0, 0]),
            "hd95": float(compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)[0, 0]),
            "asd": float(compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing)[0, 0]),
        }
        got = score_masks(pred, ref, spacing)
        for key, value in expected.items():
            assert getattr(got, key) == pytest.approx(value, rel=1e-6, abs=1e-6), (trial, key)
