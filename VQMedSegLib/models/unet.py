"""The supervised baseline: MONAI's 2-D BasicUNet (the papers' "Baseline (U-Net)" / "CT-only").

Input ``(B, 1, H, W)`` normalised CT slices, ``H`` and ``W`` multiples of 16; output
``(B, C, H, W)`` class logits (``C = 2``: background, target).
"""

from __future__ import annotations

import torch
from .. import _monai  # noqa: F401  (before MONAI; see _monai.py)
from monai.networks.nets import BasicUNet


def build_unet(
    in_channels: int = 1,
    out_channels: int = 2,
    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8),
    dropout: float = 0.0,
) -> torch.nn.Module:
    return BasicUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(features),
        dropout=dropout,
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm=("instance", {"affine": True}),
    )


def model_spec(in_channels: int, out_channels: int, features, dropout: float) -> dict:
    """JSON description stored in checkpoints, enough to rebuild the network."""
    return {"kind": "basicunet2d", "in_channels": in_channels, "out_channels": out_channels, "features": list(features), "dropout": dropout}


def build_from_spec(spec: dict) -> torch.nn.Module:
    if spec.get("kind") != "basicunet2d":
        from ..errors import InputError

        raise InputError(f"model kind {spec.get('kind')!r}: expected 'basicunet2d'")
    return build_unet(spec["in_channels"], spec["out_channels"], tuple(spec["features"]), spec.get("dropout", 0.0))
