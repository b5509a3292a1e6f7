"""The VQ-BEGAL network (Du et al., sections 2.2-2.3).

::

    x_c --E_c--> F_c --1x1--> VQ (shared, cosine) --> z_c --+--> concat --1x1--> decoder --> logits
    x_m --E_m--> F_m --1x1--> VQ (shared, cosine) --> z_m --+        ^ skips from E_c
                                        z_c, z_m --GRL--> D --> p (CT vs MR)

* ``ct_encoder`` (E_c) and ``mr_encoder`` (E_m) are U-Net encoders (eq. 1).
* ``quantizer`` is one shared :class:`CosineVectorQuantizer` with K = 1024 (eq. 2-3).
* ``modality_discriminator`` (D, eq. 4) classifies each quantised map as CT or MR. It
  sees the features through a gradient-reversal layer: D learns to tell the modalities
  apart while the encoders learn codes it cannot, which pulls the CT and MR codes into
  one shared space (the paper's Fig. 1A/3 goal). The uncertainty of a pair (eq. 5) is
  the entropy of D's two-class output, averaged over the CT and the MR map.
* The segmentation decoder reads the concatenated quantised features, with skip
  connections from the CT encoder only: the prediction lives on the CT grid.

**Missing MR.** MR is optional in the clinic. Without an MR slice, the MR half of the
concatenation is filled with the CT's own quantised features ``z_c``: since the codebook
is shared and aligned across modalities, ``z_c`` is the best available stand-in for
``z_m``. Training uses the same substitution at random (``mr_dropout``, default 0.3), so
the decoder has learnt to work from CT alone; a CT-only prediction is therefore a
prediction the network was trained to make, not an out-of-distribution input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizers import CosineVectorQuantizer
from .unet_parts import UNetDecoder, UNetEncoder

CT, MR = 0, 1  # modality classes of the discriminator


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return _GradientReversal.apply(x, scale)


class ModalityDiscriminator(nn.Module):
    """D: quantised features ``(B, D, h, w)`` -> modality logits ``(B, 2)`` (CT, MR)."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 2),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def binary_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax over the last axis: eq. 5, ``H(p) = -sum p_i log p_i``."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class BEGALOutput(NamedTuple):
    logits: torch.Tensor  # (B, 2, H, W) segmentation logits
    z_ct: torch.Tensor  # (B, D, h, w) quantised CT features
    z_mr: torch.Tensor  # (B, D, h, w) quantised MR features (z_ct where MR is missing)
    disc_ct: torch.Tensor  # (B, 2) D's logits on z_ct
    disc_mr: torch.Tensor | None  # (B', 2) D's logits on the real MR maps (None without MR)
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    utilisation: torch.Tensor
    bottleneck: torch.Tensor  # (B, C) pooled CT bottleneck features (coreset)


class VQBEGALNet(nn.Module):
    """Dual-encoder VQ segmentation network of VQ-BEGAL.

    Args:
        features: channel widths of the five U-Net levels.
        code_dim: dimension of the quantised features.
        num_codes: codebook size K (paper: 1024).
        decoder_dropout: dropout inside the decoder (MC-dropout needs it at inference).
        mr_dropout: probability, in training, of replacing a slice's MR features by its
            CT features (teaches CT-only inference).
        adversarial_scale: gradient-reversal strength from D into the encoders.
    """

    def __init__(
        self,
        features: tuple[int, ...] = (16, 32, 64, 128, 256),
        code_dim: int = 64,
        num_codes: int = 1024,
        out_channels: int = 2,
        decoder_dropout: float = 0.1,
        mr_dropout: float = 0.3,
        adversarial_scale: float = 1.0,
    ):
        super().__init__()
        f = tuple(features)
        self.ct_encoder = UNetEncoder(1, f)
        self.mr_encoder = UNetEncoder(1, f)
        self.ct_project = nn.Conv2d(f[4], code_dim, 1)
        self.mr_project = nn.Conv2d(f[4], code_dim, 1)
        self.quantizer = CosineVectorQuantizer(num_codes, code_dim)
        self.modality_discriminator = ModalityDiscriminator(code_dim)
        self.fuse = nn.Conv2d(2 * code_dim, f[4], 1)
        self.decoder = UNetDecoder(f, out_channels, dropout=decoder_dropout)
        self.mr_dropout = mr_dropout
        self.adversarial_scale = adversarial_scale

    # parameter groups of the BEGAL schedule ------------------------------------------------
    def encoder_modules(self) -> list[nn.Module]:
        """Trained by low-uncertainty slices: E_c, E_m, their projections, the codebook, D."""
        return [self.ct_encoder, self.mr_encoder, self.ct_project, self.mr_project, self.quantizer, self.modality_discriminator]

    def decoder_modules(self) -> list[nn.Module]:
        """Trained by high-uncertainty slices: the fusion layer and the decoder."""
        return [self.fuse, self.decoder]

    def forward(self, ct: torch.Tensor, mr: torch.Tensor | None = None, mr_present: torch.Tensor | None = None) -> BEGALOutput:
        """
        Args:
            ct: ``(B, 1, H, W)`` CT slices.
            mr: ``(B, 1, H, W)`` MR slices paired with them, or ``None`` (CT only).
            mr_present: optional ``(B,)`` bool mask of which MR slices are real.
        """
        ct_feats = self.ct_encoder(ct)
        q_ct = self.quantizer(self.ct_project(ct_feats[4]))
        z_ct = q_ct.quantized
        cb_loss, commit, perplexity, util = q_ct.codebook_loss, q_ct.commitment_loss, q_ct.perplexity, q_ct.utilisation
        disc_mr = None
        if mr is not None:
            q_mr = self.quantizer(self.mr_project(self.mr_encoder(mr)[4]))
            z_mr_real = q_mr.quantized
            cb_loss = 0.5 * (cb_loss + q_mr.codebook_loss)
            commit = 0.5 * (commit + q_mr.commitment_loss)
            perplexity = 0.5 * (perplexity + q_mr.perplexity)
            util = 0.5 * (util + q_mr.utilisation)
            keep = torch.ones(ct.shape[0], dtype=torch.bool, device=ct.device) if mr_present is None else mr_present.to(ct.device)
            if self.training and self.mr_dropout > 0:
                keep = keep & (torch.rand(ct.shape[0], device=ct.device) >= self.mr_dropout)
            z_mr = torch.where(keep[:, None, None, None], z_mr_real, z_ct)
            present = mr_present.to(ct.device) if mr_present is not None else torch.ones_like(keep)
            disc_mr = self.modality_discriminator(grad_reverse(z_mr_real[present], self.adversarial_scale))
        else:
            z_mr = z_ct
        disc_ct = self.modality_discriminator(grad_reverse(z_ct, self.adversarial_scale))
        logits = self.decoder(self.fuse(torch.cat([z_ct, z_mr], dim=1)), ct_feats[:4])
        pooled = ct_feats[4].mean(dim=(2, 3))
        return BEGALOutput(logits, z_ct, z_mr, disc_ct, disc_mr, cb_loss, commit, perplexity, util, pooled)

    def unlabelled_losses(self, ct: torch.Tensor, mr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codebook, commitment and discriminator losses on unlabelled slices (no decoder pass).

        The quantiser and D need no segmentation label, so every slice of the pool can
        train them.
        """
        q_ct = self.quantizer(self.ct_project(self.ct_encoder(ct)[4]))
        cb, commit = q_ct.codebook_loss, q_ct.commitment_loss
        disc = F.cross_entropy(self.modality_discriminator(grad_reverse(q_ct.quantized, self.adversarial_scale)), torch.full((ct.shape[0],), CT, device=ct.device))
        if mr is not None:
            q_mr = self.quantizer(self.mr_project(self.mr_encoder(mr)[4]))
            cb, commit = 0.5 * (cb + q_mr.codebook_loss), 0.5 * (commit + q_mr.commitment_loss)
            logits = self.modality_discriminator(grad_reverse(q_mr.quantized, self.adversarial_scale))
            disc = 0.5 * (disc + F.cross_entropy(logits, torch.full((mr.shape[0],), MR, device=mr.device)))
        return cb, commit, disc

    @torch.no_grad()
    def modality_uncertainty(self, ct: torch.Tensor, mr: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 5 per pair: mean entropy of D on the CT and the MR quantised maps, ``(B,)``."""
        z_ct = self.quantizer(self.ct_project(self.ct_encoder(ct)[4])).quantized
        h = binary_entropy_from_logits(self.modality_discriminator(z_ct))
        if mr is not None:
            z_mr = self.quantizer(self.mr_project(self.mr_encoder(mr)[4])).quantized
            h = 0.5 * (h + binary_entropy_from_logits(self.modality_discriminator(z_mr)))
        return h
