"""U-Net encoder and decoder halves built from MONAI's BasicUNet blocks.

The VQ models need the two halves apart: the quantiser sits between them, and VQ-BEGAL
runs two encoders into one decoder. The blocks (``TwoConv``, ``Down``, ``UpCat``) are
MONAI's, so the networks match the supervised :func:`~VQMedSegLib.models.unet.build_unet`
baseline level for level.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from .. import _monai  # noqa: F401  (before MONAI; see _monai.py)
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat

ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
NORM = ("instance", {"affine": True})


class UNetEncoder(nn.Module):
    """Input ``(B, in_channels, H, W)`` with ``H, W`` multiples of 16.

    Returns the five feature maps ``[x0 .. x4]``, ``x_l`` of shape
    ``(B, features[l], H / 2^l, W / 2^l)``; ``x4`` is the bottleneck.
    """

    def __init__(self, in_channels: int = 1, features: tuple[int, ...] = (16, 32, 64, 128, 256), dropout: float = 0.0):
        super().__init__()
        f = tuple(features)
        if len(f) != 5:
            raise ValueError(f"UNetEncoder features: found {len(f)} values, expected 5")
        self.features = f
        self.conv_0 = TwoConv(2, in_channels, f[0], ACT, NORM, True, dropout)
        self.downs = nn.ModuleList(Down(2, f[i], f[i + 1], ACT, NORM, True, dropout) for i in range(4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.conv_0(x)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        return feats


class UNetDecoder(nn.Module):
    """Upsamples a bottleneck ``(B, features[4], H/16, W/16)`` with encoder skips
    ``[x0 .. x3]`` to logits ``(B, out_channels, H, W)``.

    ``skips`` may be ``None`` (a decoder without skip connections, e.g. for image
    reconstruction from the quantised bottleneck alone); ``dropout`` applies inside the
    decoder blocks, which MC-dropout uses at inference.
    """

    def __init__(
        self,
        features: tuple[int, ...] = (16, 32, 64, 128, 256),
        out_channels: int = 2,
        dropout: float = 0.0,
        use_skips: bool = True,
    ):
        super().__init__()
        f = tuple(features)
        self.use_skips = use_skips
        cat = (lambda c: c) if use_skips else (lambda c: 0)
        self.ups = nn.ModuleList(
            [
                UpCat(2, f[4], cat(f[3]), f[3], ACT, NORM, True, dropout, halves=True),
                UpCat(2, f[3], cat(f[2]), f[2], ACT, NORM, True, dropout, halves=True),
                UpCat(2, f[2], cat(f[1]), f[1], ACT, NORM, True, dropout, halves=True),
                UpCat(2, f[1], cat(f[0]), f[0], ACT, NORM, True, dropout, halves=False),
            ]
        )
        self.final_conv = nn.Conv2d(f[0], out_channels, kernel_size=1)

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = bottleneck
        for level, up in zip((3, 2, 1, 0), self.ups):
            x = up(x, skips[level] if (self.use_skips and skips is not None) else None)
        return self.final_conv(x)
