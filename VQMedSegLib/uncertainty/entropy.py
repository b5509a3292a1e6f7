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
    p = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    return torch.special.entr(p.clamp(0.0, 1.0)).sum(dim=axis).numpy()


def binary_entropy(p_target: np.ndarray | torch.Tensor) -> np.ndarray:
    """Entropy in nats of a two-class softmax from the target's probability alone (float32).

    Equals :func:`predictive_entropy` of ``[1 - p, p]`` without building the second
    channel: half the memory and time on a full-resolution grid.
    """
    p = torch.as_tensor(np.asarray(p_target, dtype=np.float32)).clamp(0.0, 1.0)
    out = torch.special.entr(p)
    out += torch.special.entr(1.0 - p)
    return out.numpy()
