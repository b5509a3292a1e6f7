"""Predictive entropy, for any number of classes and from the target probability alone."""

import numpy as np
import pytest

from VQMedSegLib.uncertainty.entropy import binary_entropy, predictive_entropy


def test_entropy_is_zero_when_certain_and_log_c_when_uniform():
    probs = np.array([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]], np.float32)
    np.testing.assert_allclose(predictive_entropy(probs, axis=0), [0.0, np.log(2), np.log(3)], rtol=1e-6, atol=1e-7)


def test_binary_entropy_equals_the_two_channel_entropy():
    p = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    p[0, 0, :2] = [0.0, 1.0]
    expected = predictive_entropy(np.stack([1 - p, p]), axis=0)
    got = binary_entropy(p)
    assert got.dtype == np.float32 and got.shape == p.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got[0, 0, 0] == 0.0 and got[0, 0, 1] == 0.0
    assert binary_entropy(np.array([0.5], np.float32))[0] == pytest.approx(np.log(2), rel=1e-6)
