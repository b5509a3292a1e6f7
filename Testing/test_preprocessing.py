"""Slice extraction and its exact inverse; intensity normalisation."""

import numpy as np
import pytest

from VQMedSegLib.data.preprocessing import (
    ct_window,
    extract_ct_slices,
    extract_label_slices,
    extract_slices,
    mr_normalize,
    orientation_to_lps,
    plan_slices,
    slices_to_volume,
)
from VQMedSegLib.data.volume import Volume
from VQMedSegLib.errors import InputError


def _permuted_flipped_direction():
    # index i runs superior, j runs left, k runs anterior (negative P)
    return np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], dtype=float)


def test_orientation_identity_and_permutation():
    assert orientation_to_lps(np.eye(3)) == ((0, 1, 2), (1, 1, 1))
    axes, signs = orientation_to_lps(_permuted_flipped_direction())
    # L is index axis 1 (+), P is index axis 2 (-), S is index axis 0 (+)
    assert axes == (1, 2, 0) and signs == (1, -1, 1)


def test_canonical_slices_follow_patient_axes():
    """A marker at the superior, posterior, left corner lands at the last slice, last row, last column."""
    k, j, i = 5, 6, 7  # array [k, j, i] with index axes (i, j, k) = (S, L, A)
    arr = np.zeros((k, j, i), np.float32)
    # superior = max i, left = max j, posterior = min k (k runs anterior)
    arr[0, j - 1, i - 1] = 1
    vol = Volume(arr, direction=_permuted_flipped_direction())
    plan = plan_slices(vol, 16)
    assert plan.canonical_shape == (7, 5, 6)  # (S, P, L)
    sl = extract_slices(vol, plan)
    s, r, c = np.unravel_index(np.argmax(sl), sl.shape)
    assert s == 6 and r > 8 and c > 8


def _square_pixels(volume: Volume) -> Volume:
    """``volume`` with square in-plane pixels (0.8 mm): its slices are padded, not resampled."""
    return Volume(volume.array, (0.8, 0.8, 2.5), volume.origin, volume.direction)


def test_round_trip_is_exact_on_oblique_grid(oblique_volume):
    """Probabilities made from the slices map back onto the very same voxels."""
    oblique_volume = _square_pixels(oblique_volume)
    plan = plan_slices(oblique_volume, 32)
    assert plan.padded == (32, 32)  # padding only: the round trip must be the identity
    label = (oblique_volume.array > 0).astype(np.uint8)
    onehot = np.stack([1 - label, label]).astype(np.float32)  # [C, K, J, I]
    fwd = np.stack([extract_slices(oblique_volume, plan, values=onehot[c]) for c in range(2)], axis=1)
    back = slices_to_volume(fwd, plan)
    np.testing.assert_array_equal(back, onehot)


def test_downsampled_round_trip_returns_input_grid(oblique_volume):
    plan = plan_slices(oblique_volume, 16)
    fwd = extract_slices(oblique_volume, plan)[:, None]
    assert fwd.shape == (plan.n_slices, 1, 16, 16)
    back = slices_to_volume(fwd, plan)
    assert back.shape == (1, *oblique_volume.shape)
    # smooth content survives: correlation with a blurred input is high
    assert np.corrcoef(back[0].ravel(), oblique_volume.array.ravel())[0, 1] > 0.2


@pytest.mark.parametrize("size", [16, 48])  # downsampled (area) and upsampled (bilinear)
def test_chunked_transform_matches_transforming_the_whole_volume(size):
    """A voxel-wise ``transform`` applied chunk by chunk gives the very slices that
    transforming the whole array first gives, on a permuted and flipped grid."""
    rng = np.random.default_rng(3)
    arr = rng.normal(40, 300, size=(9, 23, 11)).astype(np.int16)  # canonical S = index i: 11 slices
    vol = Volume(arr, direction=_permuted_flipped_direction())
    plan = plan_slices(vol, size)
    assert plan.n_slices == 11
    window = (-160.0, 240.0)
    whole = extract_slices(vol, plan, values=ct_window(arr, window))
    for chunk in (1, 4, 11, 64):
        chunked = extract_slices(vol, plan, transform=lambda a: ct_window(a, window), chunk=chunk)
        assert chunked.dtype == np.float32
        if plan.size < max(plan.padded):  # area averaging: bit for bit
            np.testing.assert_array_equal(chunked, whole)
        else:  # torch's bilinear kernel rounds the last bit differently by batch size
            np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)
    # the transform sees at most ``chunk`` slices at a time, never the whole volume
    seen = []
    extract_slices(vol, plan, transform=lambda a: seen.append(a.shape) or a, chunk=4)
    assert [s[0] for s in seen] == [4, 4, 3]
    assert arr.dtype == np.int16 and vol.array is arr  # the input is left as it was


@pytest.mark.parametrize("size", [16, 32, 48])  # downsampled (area), padded only, upsampled (bilinear)
def test_ct_slices_scaled_after_resizing_are_the_windowed_volumes_slices(size):
    """extract_ct_slices clips first and scales once resized: the slices of the windowed
    volume, padding included (the window's floor, 0), on a padded, permuted, flipped grid."""
    rng = np.random.default_rng(4)
    arr = rng.normal(40, 300, size=(9, 32, 11)).astype(np.int16)
    vol = Volume(arr, direction=_permuted_flipped_direction())
    plan = plan_slices(vol, size)
    assert plan.padded == (32, 32) and plan.canonical_shape[1:] == (9, 32)  # rows are padded: 11 above, 12 below
    window = (-160.0, 240.0)
    expected = extract_slices(vol, plan, values=ct_window(arr, window))
    for chunk in (1, 4, 64):
        got = extract_ct_slices(vol, plan, window, chunk=chunk)
        assert got.dtype == np.float32 and got.shape == (11, size, size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got.min() == 0.0 and got.max() <= 1.0
    # what the clip stands for: clipped values, padded with the low end rather than 0
    clipped = extract_slices(vol, plan_slices(vol, 32), clip=(-160.0, 240.0))
    assert (clipped[:, :11] == -160.0).all() and (clipped[:, 20:] == -160.0).all()
    inside = np.clip(extract_slices(vol, plan_slices(vol, 32))[:, 11:20], -160.0, 240.0)
    assert inside.min() == -160.0 and inside.max() == 240.0  # the clip does clip
    np.testing.assert_array_equal(clipped[:, 11:20], inside)
    with pytest.raises(InputError, match="CT window"):
        extract_ct_slices(vol, plan, (240.0, -160.0))


def test_mapping_back_is_torchs_bilinear_resize_cropped(oblique_volume):
    """The slices' maps go back through exactly F.interpolate's bilinear resize, the crop
    and the reorientation, whatever the chunk of slices resized at a time; a threshold on
    the way gives exactly the thresholded map, as uint8."""
    import torch
    import torch.nn.functional as F

    oblique_volume = _square_pixels(oblique_volume)
    plan = plan_slices(oblique_volume, 16)
    maps = np.random.default_rng(5).random((plan.n_slices, 2, 16, 16)).astype(np.float32)
    square = F.interpolate(torch.from_numpy(maps).permute(1, 0, 2, 3).contiguous(), size=plan.padded,
                           mode="bilinear", align_corners=False).numpy()
    _, rows, cols = plan.canonical_shape
    r0, c0 = (plan.padded[0] - rows) // 2, (plan.padded[1] - cols) // 2
    expected_canonical = square[:, :, r0 : r0 + rows, c0 : c0 + cols]
    # undo the reorientation with the grid's own round trip: a volume of voxel indices
    index = np.arange(oblique_volume.array.size, dtype=np.float32).reshape(oblique_volume.shape)
    where = extract_slices(oblique_volume, plan_slices(oblique_volume, plan.padded[0]), values=index)
    where = where[:, r0 : r0 + rows, c0 : c0 + cols].astype(np.int64).ravel()
    expected = np.empty((2, index.size), np.float32)
    expected[:, where] = expected_canonical.reshape(2, -1)
    expected = expected.reshape(2, *oblique_volume.shape)
    for chunk in (1, 4, plan.n_slices):
        back = slices_to_volume(maps, plan, chunk=chunk)
        assert back.dtype == np.float32 and back.flags.c_contiguous
        np.testing.assert_allclose(back, expected, rtol=0, atol=1e-6)
        label = slices_to_volume(maps, plan, threshold=0.5, chunk=chunk)
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, (back > 0.5).astype(np.uint8))


def test_round_trip_identity_when_no_resize():
    rng = np.random.default_rng(0)
    arr = rng.random((3, 32, 20)).astype(np.float32)  # square side 32 = size: pad only
    vol = Volume(arr, direction=np.diag([-1.0, 1.0, -1.0]))
    plan = plan_slices(vol, 32)
    fwd = extract_slices(vol, plan)[:, None]
    np.testing.assert_array_equal(slices_to_volume(fwd, plan)[0], arr)


def test_downsampled_label_round_trip_keeps_shape_of_object():
    """A blob survives downsampling to the model size and back with Dice > 0.95."""
    zz, yy, xx = np.mgrid[0:4, 0:96, 0:80]
    blob = ((yy - 50) ** 2 / 30**2 + (xx - 35) ** 2 / 20**2 < 1).astype(np.uint8)
    vol = Volume(blob.astype(np.float32), spacing=(0.8, 0.8, 3.0))
    plan = plan_slices(vol, 48)
    lab = extract_label_slices(blob, plan)
    onehot = np.stack([lab == 0, lab == 1], axis=1).astype(np.float32)
    back = slices_to_volume(onehot, plan).argmax(0)
    dice = 2 * (back & blob).sum() / (back.sum() + blob.sum())
    assert dice > 0.95


def _centroid(weights):
    grid = np.indices(weights.shape[-2:], dtype=float)
    return np.array([(weights * g).sum() / weights.sum() for g in grid])


def _ellipse(shape, centre, radii):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 < 1


@pytest.mark.parametrize("rows,cols,size", [(512, 512, 128), (301, 280, 128), (256, 216, 128), (97, 90, 128), (128, 100, 128)])
def test_label_slices_line_up_with_the_image_slices(rows, cols, size):
    """The model's targets lie where its input shows the structure: each label's pixels
    on the model grid are centred where the image slices (area averaging down, bilinear
    up) put that structure's mask. Nearest-neighbour copied each block's first voxel, not
    its centre: (s - 1) / 2 voxels off at a shrink factor s, 1.5 voxels at 512 -> 128."""
    liver = _ellipse((rows, cols), (0.55 * rows, 0.45 * cols), (0.3 * rows, 0.25 * cols))
    ring = _ellipse((rows, cols), (0.4 * rows, 0.6 * cols), (0.2 * rows, 0.2 * cols)) & ~_ellipse(
        (rows, cols), (0.4 * rows, 0.6 * cols), (0.15 * rows, 0.15 * cols))
    label = np.zeros((2, rows, cols), np.uint8)
    label[:, liver] = 1
    label[:, ring] = 3  # a thin structure over the first, and a value that is not 2
    vol = Volume(label)
    plan = plan_slices(vol, size)
    slices = extract_label_slices(vol, plan)
    assert slices.shape == (2, size, size) and slices.dtype == np.int64
    assert set(np.unique(slices)) == {0, 1, 3}
    for value in (1, 3):
        as_image = extract_slices(Volume((label == value).astype(np.float32)), plan)[0]
        found, shown = slices[0] == value, as_image > 0.5
        # the pixels the image shows as mostly that structure (was 0.855 to 0.972)
        assert (found & shown).sum() / (found | shown).sum() > 0.98, value
    # and the large structure is centred where the image puts it (was 0.25 to 0.6 model pixels off)
    as_image = extract_slices(Volume((label == 1).astype(np.float32)), plan)[0]
    assert np.abs(_centroid(slices[0] == 1) - _centroid(as_image)).max() < 0.15


def test_label_slices_mapped_back_land_on_the_label():
    """Targets taken to the model grid and back (as predictions are) stay on the label:
    a network that learnt them perfectly would score Dice 0.99, not 0.977."""
    label = np.zeros((1, 512, 512), np.uint8)
    label[0, _ellipse((512, 512), (281.3, 230.6), (120, 90))] = 1
    vol = Volume(label, spacing=(0.7, 0.7, 2.5))
    plan = plan_slices(vol, 128)
    slices = extract_label_slices(vol, plan)
    onehot = np.stack([slices == 0, slices == 1], axis=1).astype(np.float32)
    back = slices_to_volume(onehot, plan).argmax(0)
    assert np.abs(_centroid(back[0]) - _centroid(label[0])).max() < 0.25  # CT voxels (was 1.6)
    assert 2 * (back & label).sum() / (back.sum() + label.sum()) > 0.99


def test_ct_window_and_mr_normalisation():
    hu = np.array([-1000, -160, 40, 240, 3000], np.float32)
    np.testing.assert_allclose(ct_window(hu, (-160, 240)), [0, 0, 0.5, 1, 1])
    with pytest.raises(InputError, match="lower < upper"):
        ct_window(hu, (10, 10))
    rng = np.random.default_rng(1)
    mr = np.concatenate([np.zeros(5000), rng.normal(300, 50, 20000)]).astype(np.float32)
    out = mr_normalize(mr)
    assert out.min() == 0 and out.max() == 1
    assert 0.4 < np.median(out[5000:]) < 0.6


def test_plan_rejects_bad_size(oblique_volume):
    with pytest.raises(InputError, match="multiple of 16"):
        plan_slices(oblique_volume, 30)


def _ball(spacing, direction, shape_kji, radius_mm=30.0) -> Volume:
    """A ball of ``radius_mm`` at the centre of a grid of ``shape_kji`` voxels."""
    k, j, i = np.indices(shape_kji)
    grid = Volume(np.zeros(shape_kji, np.int16), spacing, (0.0, 0.0, 0.0), direction)
    xyz = grid.index_to_physical(np.stack([i, j, k], -1).astype(float))
    centre = grid.index_to_physical((np.array(shape_kji[::-1]) - 1) / 2)
    return grid.with_array(np.where(np.linalg.norm(xyz - centre, axis=-1) < radius_mm, 200, -100).astype(np.int16))


def test_model_pixels_are_square_in_millimetres_whatever_the_storage():
    """A volume acquired sagittally (0.75 mm in-plane, 3 mm between planes) has axial
    slices of 0.75 mm rows and 3 mm columns. They were padded to a square of voxels and
    resized as if the pixels were square, so a ball reached the network four times
    narrower than it is tall. The padded slice is now a square in millimetres, and the
    map back still lands on the input grid."""
    sagittal = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # i = P, j = -S, k = L
    shapes = {}
    for name, volume in (("axial", _ball((0.75, 0.75, 3.0), np.eye(3), (30, 128, 128))),
                         ("sagittal", _ball((0.75, 0.75, 3.0), sagittal, (30, 128, 128)))):
        plan = plan_slices(volume, 128)
        slices = extract_ct_slices(volume, plan, (-160.0, 240.0))
        middle = slices[plan.n_slices // 2] > 0.5
        rows, cols = np.flatnonzero(middle.any(1)), np.flatnonzero(middle.any(0))
        shapes[name] = (np.ptp(rows) + 1, np.ptp(cols) + 1)
        back = slices_to_volume(np.stack([1 - slices, slices], 1), plan)[1] > 0.5
        truth = volume.array > 0
        assert 2 * (back & truth).sum() / (back.sum() + truth.sum()) > 0.97, name
    (ar, ac), (sr, sc) = shapes["axial"], shapes["sagittal"]
    assert abs(ar - ac) <= 2 and abs(sr - sc) <= 2, shapes  # round, not squashed
    # the sagittal volume spans 96 mm across its 3 mm planes and 96 mm along P: the same square, the same ball
    assert abs(sr - ar) <= 3, shapes
