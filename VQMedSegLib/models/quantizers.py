"""Vector quantisers with a straight-through estimator.

:class:`CosineVectorQuantizer` is VQ-BEGAL's quantiser (eq. 2-3): features and codewords
are compared by cosine similarity ``d(z, e_k) = z.e_k / (|z| |e_k|)`` and each feature is
replaced by its most similar codeword. Both live on the unit sphere, so the codebook and
commitment losses are squared distances between unit vectors (``2 - 2 cos``).

MONAI's ``VectorQuantizer``/``EMAQuantizer`` are Euclidean with EMA updates only; they
have no cosine option, hence this module.

Codebook health: the quantiser keeps an exponential moving average of how often each
code is used. During training, codes whose usage falls below ``dead_threshold`` are
revived by moving them onto randomly chosen current features, so utilisation does not
collapse onto a handful of codes. Under DistributedDataParallel the usage counts are
summed over the ranks and revived codes come from rank 0's features, so every rank keeps
the same codebook. Utilisation (share of codes used in the batch) and
perplexity (``exp`` of the entropy of code usage) are returned with every forward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, D, H, W) straight-through quantised features
    indices: torch.Tensor  # (B, H, W) code index per position
    codebook_loss: torch.Tensor  # scalar: pulls codewords towards features (|sg(z) - e|^2)
    commitment_loss: torch.Tensor  # scalar: keeps features near their codeword (|z - sg(e)|^2)
    perplexity: torch.Tensor  # scalar: exp(entropy of code usage in the batch)
    utilisation: torch.Tensor  # scalar: fraction of codes used in the batch


def cosine_assign(z_flat: torch.Tensor, codebook_normed: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the most cosine-similar codeword for each row of ``z_flat`` (N, D).

    ``codebook_normed`` (K, D) must have unit rows. Since the codebook is normalised, the
    argmax of ``z @ e.T`` equals the argmax of cosine similarity without normalising
    ``z``; rows are processed in chunks so memory stays at ``chunk x K``.
    """
    out = torch.empty(z_flat.shape[0], dtype=torch.long, device=z_flat.device)
    for start in range(0, z_flat.shape[0], chunk):
        out[start : start + chunk] = (z_flat[start : start + chunk] @ codebook_normed.t()).argmax(dim=1)
    return out


class CosineVectorQuantizer(nn.Module):
    """Cosine-similarity vector quantiser (VQ-BEGAL eq. 2-3), K = 1024 by default.

    Args:
        num_codes: codebook size K.
        dim: feature (and codeword) dimension D.
        dead_threshold: a code whose usage EMA falls below this (in expected
            assignments per batch) is revived during training; 0 disables revival.
        usage_decay: EMA decay of the usage statistics.

    Input ``(B, D, H, W)``; output :class:`QuantizerOutput` with ``quantized`` on the unit
    sphere (the straight-through estimator copies gradients from the quantised to the
    continuous, normalised features).
    """

    def __init__(self, num_codes: int = 1024, dim: int = 64, dead_threshold: float = 0.03, usage_decay: float = 0.99):
        super().__init__()
        self.num_codes = num_codes
        self.dim = dim
        self.dead_threshold = dead_threshold
        self.usage_decay = usage_decay
        self.codebook = nn.Parameter(F.normalize(torch.randn(num_codes, dim), dim=1))
        self.register_buffer("usage", torch.ones(num_codes))
        self.register_buffer("revived_total", torch.zeros((), dtype=torch.long))

    def normed_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        if d != self.dim:
            raise ValueError(f"CosineVectorQuantizer: input has {d} channels, expected {self.dim}")
        z_flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        codebook = self.normed_codebook()
        with torch.no_grad():
            idx = cosine_assign(z_flat.detach(), codebook.detach())
        q_flat = codebook[idx]
        codebook_loss = F.mse_loss(q_flat, z_flat.detach())
        commitment_loss = F.mse_loss(z_flat, q_flat.detach())
        q_st = z_flat + (q_flat - z_flat).detach()

        counts = torch.bincount(idx, minlength=self.num_codes).float()
        probs = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        utilisation = (counts > 0).float().mean()
        if self.training:
            self._update_usage(counts, z_flat.detach())

        quantized = q_st.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(quantized, idx.reshape(b, h, w), codebook_loss, commitment_loss, perplexity, utilisation)

    @torch.no_grad()
    def _update_usage(self, counts: torch.Tensor, z_flat: torch.Tensor) -> None:
        # usage in "expected assignments per code if usage were uniform" units, so the
        # threshold does not depend on batch size
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:  # under DDP: the usage of the global batch, the same on every rank
            counts = counts.clone()
            dist.all_reduce(counts)
        expected = counts * self.num_codes / counts.sum().clamp_min(1)
        self.usage.mul_(self.usage_decay).add_(expected, alpha=1 - self.usage_decay)
        if self.dead_threshold <= 0:
            return
        dead = torch.nonzero(self.usage < self.dead_threshold).flatten()
        if dead.numel() == 0:
            return
        pick = torch.randint(0, z_flat.shape[0], (dead.numel(),), device=z_flat.device)
        noise = 0.01 * torch.randn(dead.numel(), self.dim, device=z_flat.device)
        revived = F.normalize(z_flat[pick] + noise, dim=1)
        if distributed:  # every rank takes rank 0's choice, so the codebooks stay equal
            dist.broadcast(revived, src=0)
        self.codebook.data[dead] = revived
        self.usage[dead] = 1.0
        self.revived_total += dead.numel()
