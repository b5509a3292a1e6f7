"""Predictive entropy: how unsure the network's softmax is, voxel by voxel.

``H(p) = -sum_c p_c log p_c`` in nats; 0 where the model is certain, ``log C`` where all
``C`` classes are equally likely (0.693 for two classes). It measures the model's own
doubt at a voxel, not its error: a confidently wrong voxel has low entropy.
"""

from __future__ import annotations

import numpy as np
import torch


def predictive_entropy(probs: np.ndarray | torch.Tensor, axis: int = 0) -> np.ndarray:
    """Entropy in nats along the class ``axis`` of a probability array (float32)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return (-(p * np.log(p)).sum(axis=axis)).astype(np.float32)
