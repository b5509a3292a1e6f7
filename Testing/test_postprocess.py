"""Largest-connected-component post-processing of predicted labels."""

import numpy as np
import pytest
import torch

from VQMedSegLib.data.volume import Volume
from VQMedSegLib.inference.postprocess import LARGEST_COMPONENT, keep_largest_component
from VQMedSegLib.inference.predict import predict_volume


def test_each_structure_keeps_its_largest_piece_and_nothing_else_changes():
    label = np.zeros((6, 20, 20), np.uint8)
    label[1:4, 2:10, 2:10] = 1  # liver body
    label[1:2, 15:17, 15:17] = 1  # island of the same structure
    label[4:6, 12:18, 2:8] = 2  # a second structure, bigger than the island
    label[0, 0, 19] = 2  # its own island
    label[5, 19, 19] = 3  # a value not listed: left alone
    out = keep_largest_component(label, [1, 2])
    expected = label.copy()
    expected[1:2, 15:17, 15:17] = 0
    expected[0, 0, 19] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == label.dtype
    assert label[1, 15, 15] == 1, "the input must not be modified"


def test_pieces_are_joined_by_faces_not_by_corners():
    label = np.zeros((4, 8, 8), np.uint8)
    label[0:2, 0:3, 0:3] = 1
    label[2, 2, 2] = 1  # shares a face with the block (next slice): one piece
    label[0, 3, 3] = 1  # touches the block only at an edge: a piece of its own
    expected = label.copy()
    expected[0, 3, 3] = 0
    np.testing.assert_array_equal(keep_largest_component(label, [1]), expected)


def test_empty_label_and_bad_shape():
    empty = np.zeros((3, 5, 5), np.uint8)
    np.testing.assert_array_equal(keep_largest_component(empty, [1]), empty)
    with pytest.raises(ValueError, match="3-D"):
        keep_largest_component(np.zeros((5, 5), np.uint8), [1])


class _BrightIsForeground(torch.nn.Module):
    """A stand-in network: foreground wherever the windowed CT is bright."""

    def forward(self, x):
        return torch.cat([-(x - 0.5), x - 0.5], dim=1) * 20


def _two_blob_ct():
    arr = np.full((8, 32, 32), -100, np.int16)
    arr[2:6, 4:16, 4:16] = 200  # large blob
    arr[3:4, 24:28, 24:28] = 200  # separate small blob
    return Volume(arr, (1.0, 1.0, 2.0))


@pytest.mark.parametrize("task, override, kept_island", [
    ("liver", None, False),  # the liver is one piece: the island goes
    ("liver", False, True),  # asked to keep every piece
    ("lung-tumour", None, True),  # tumours may be several: never removed by default
])
def test_prediction_label_follows_the_task(task, override, kept_island):
    ckpt = {"task": task, "method": "supervised", "config": {"slice_size": 32}, "model": {"kind": "unet2d"}}
    pred = predict_volume(_BrightIsForeground(), ckpt, _two_blob_ct(), torch.device("cpu"), largest_component=override)
    untouched = predict_volume(_BrightIsForeground(), ckpt, _two_blob_ct(), torch.device("cpu"), largest_component=False)
    label = pred.label.array
    assert label[4, 10, 10] == 1
    assert bool(label[3, 26, 26]) is kept_island
    # the uncertainty map stays the model's own
    np.testing.assert_array_equal(pred.uncertainty["entropy"].array, untouched.uncertainty["entropy"].array)
    assert untouched.label.array[3, 26, 26] == 1
    assert pred.label.metadata["postprocessing"] == ("none" if kept_island else LARGEST_COMPONENT)


def test_on_a_finer_grid_than_the_model_only_the_other_piece_is_removed():
    from skimage.measure import label as components

    arr = np.kron(_two_blob_ct().array, np.ones((1, 3, 3), np.int16))  # 8 x 96 x 96: the model sees a third
    ct = Volume(arr, (0.5, 0.5, 2.0))
    ckpt = {"task": "liver", "method": "supervised", "config": {"slice_size": 32}, "model": {"kind": "unet2d"}}
    pred = predict_volume(_BrightIsForeground(), ckpt, ct, torch.device("cpu")).label.array
    every = predict_volume(_BrightIsForeground(), ckpt, ct, torch.device("cpu"), largest_component=False).label.array
    pieces, n = components(every, return_num=True)
    assert n == 2
    main = pieces == pieces[4, 30, 30]
    np.testing.assert_array_equal(pred, main.astype(np.uint8))  # the main piece exactly, voxel for voxel


def test_the_probability_made_on_request_is_the_one_behind_the_label():
    """On a grid finer than the model's: ``probability()`` is on the CT grid, is zero on
    the removed piece, and ``label`` is exactly ``probability() > 0.5``."""
    arr = np.kron(_two_blob_ct().array, np.ones((1, 3, 3), np.int16))
    ct = Volume(arr, (0.5, 0.5, 2.0))
    ckpt = {"task": "liver", "method": "supervised", "config": {"slice_size": 32}, "model": {"kind": "unet2d"}}
    pred = predict_volume(_BrightIsForeground(), ckpt, ct, torch.device("cpu"))
    probability = pred.probability()
    assert probability.array.shape == ct.shape and probability.array.dtype == np.float32
    assert probability.metadata["kind"] == "probability"
    np.testing.assert_allclose(probability.spacing, ct.spacing)
    np.testing.assert_array_equal(pred.label.array, (probability.array > 0.5).astype(np.uint8))
    assert probability.array[4, 30, 30] > 0.9 and probability.array[3, 78, 78] == 0.0  # main piece; removed island
