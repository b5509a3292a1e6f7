"""The VQ-Seg network (Yang, Xing, Zhu; sections 3.3-3.5).

::

    x --encoder--> z --1x1--> VQ (nearest codeword, eq. 2) --> q(z) --[QPM]--> q'(z)
                                                                |
                      +------------------+----------------------+
                      v                  v                      v
            D_s: segmentation    D_i: reconstruction     PFA: resize + 1x1 conv
            (with encoder skips) (from q alone, L1)      -> foundation-model grid

* **Quantiser** (:class:`MappedEuclideanQuantizer`): nearest codeword by Euclidean
  distance (eq. 2), K = 16,384 by default, straight-through estimator. The codewords
  are ``C W``: a fixed Gaussian base ``C`` times a learnable linear map ``W`` (codebook
  mapping), so every gradient step moves all codes and none goes dead; an entropy
  regulariser (low entropy per token, high entropy of the batch's average assignment)
  keeps utilisation high.
* **Where the perturbation acts.** QPM perturbs the quantised bottleneck. The
  segmentation decoder also reads the encoder's skip connections, which are not
  quantised (as in the released code, where VQ sits on the last feature level only);
  the reconstruction decoder reads the quantised bottleneck alone, so reconstruction
  cannot bypass the codebook.
* **PFA** (eq. 11): the quantised features are resized to the foundation model's grid
  and projected by a 1x1 convolution to its width; :func:`patch_info_nce` aligns them
  patch by patch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qpm import QuantizedPerturbation
from .unet_parts import UNetDecoder, UNetEncoder


class VQOutput(NamedTuple):
    quantized: torch.Tensor  # (B, D, h, w), straight-through
    indices: torch.Tensor  # (B, h, w)
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    entropy_loss: torch.Tensor
    perplexity: torch.Tensor
    utilisation: torch.Tensor


def euclidean_assign(flat: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Eq. 2: index of the nearest codeword (Euclidean) for each row of ``flat`` (N, D).

    ``|z|^2 + |c|^2 - 2 z.c`` in blocks of ``chunk`` rows: one matrix multiply per block,
    memory ``chunk x K``.
    """
    cb_sq = (codebook * codebook).sum(1)
    idx = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for lo in range(0, flat.shape[0], chunk):
        part = flat[lo : lo + chunk]
        # |z|^2 is constant per row and does not change the argmin
        idx[lo : lo + chunk] = torch.addmm(cb_sq[None], part, codebook.t(), alpha=-2.0).argmin(1)
    return idx


class MappedEuclideanQuantizer(nn.Module):
    """Nearest-codeword VQ (eq. 2) with codebook mapping and entropy regularisation.

    Args:
        num_codes: K (paper: 16,384).
        dim: code dimension.
        chunk: tokens per distance block (memory ``chunk x K``).
        entropy_temperature: softness of the assignment used by the entropy regulariser.
    """

    def __init__(self, num_codes: int = 16384, dim: int = 64, chunk: int = 4096, entropy_temperature: float = 0.01):
        super().__init__()
        self.num_codes = num_codes
        self.dim = dim
        self.chunk = chunk
        self.entropy_temperature = entropy_temperature
        self.register_buffer("base", torch.randn(num_codes, dim) * dim**-0.5)
        self.mapping = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.mapping.weight)

    def codebook(self) -> torch.Tensor:
        """The effective codewords ``C W``: ``(K, D)``."""
        return self.mapping(self.base)

    def _assign_with_entropy(self, flat: torch.Tensor, codebook: torch.Tensor, ent_terms: list) -> torch.Tensor:
        """Nearest codes plus the soft assignments the entropy regulariser needs (training)."""
        cb_sq = (codebook * codebook).sum(1)
        idx = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for lo in range(0, flat.shape[0], self.chunk):
            part = flat[lo : lo + self.chunk]
            dist = (part * part).sum(1, keepdim=True) + cb_sq[None] - 2 * part @ codebook.t()
            idx[lo : lo + self.chunk] = dist.argmin(1)
            ent_terms.append(F.softmax(-dist / self.entropy_temperature, dim=1))
        return idx

    def forward(self, z: torch.Tensor) -> VQOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.codebook()
        ent_terms = []
        if not self.training:
            idx = euclidean_assign(flat.detach(), codebook.detach(), self.chunk)
        else:
            idx = self._assign_with_entropy(flat, codebook, ent_terms)
        q = codebook[idx]
        commitment = F.mse_loss(flat, q.detach())
        codebook_loss = F.mse_loss(q, flat.detach())
        if ent_terms:
            probs = torch.cat(ent_terms)
            per_token = -(probs * torch.log(probs.clamp_min(1e-10))).sum(1).mean()
            avg = probs.mean(0)
            batch = -(avg * torch.log(avg.clamp_min(1e-10))).sum()
            entropy_loss = per_token - batch
        else:
            entropy_loss = z.new_zeros(())
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        utilisation = (counts > 0).float().mean()
        q_st = flat + (q - flat).detach()
        quantized = q_st.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return VQOutput(quantized, idx.reshape(b, h, w), commitment, codebook_loss, entropy_loss, perplexity, utilisation)


def patch_info_nce(adapted: torch.Tensor, target: torch.Tensor, temperature: float = 0.07, max_patches: int = 256) -> torch.Tensor:
    """Eq. 11: patch-wise InfoNCE between ``(B, C, H, W)`` maps on the same grid.

    For each patch ``i`` the positive is the target feature at ``i``; the negatives are
    the target features at the other patches of the same image. With more than
    ``max_patches`` patches a random subset of locations (the same for both maps) is
    used, which keeps the similarity matrix small on CPU.
    """
    if adapted.shape != target.shape:
        raise ValueError(f"patch_info_nce: shapes {tuple(adapted.shape)} and {tuple(target.shape)} differ")
    b, c, h, w = adapted.shape
    a = F.normalize(adapted.flatten(2), dim=1)  # (B, C, N)
    t = F.normalize(target.flatten(2), dim=1)
    n = h * w
    if n > max_patches:
        keep = torch.randperm(n, device=adapted.device)[:max_patches]
        a, t = a[:, :, keep], t[:, :, keep]
        n = max_patches
    logits = torch.einsum("bci,bcj->bij", a, t) / temperature  # (B, N, N)
    labels = torch.arange(n, device=adapted.device).expand(b, n)
    return F.cross_entropy(logits.reshape(b * n, n), labels.reshape(-1))


class VQSegOutput(NamedTuple):
    logits: torch.Tensor  # (B, 2, H, W)
    reconstruction: torch.Tensor | None  # (B, 1, H, W)
    vq: VQOutput
    quantized_used: torch.Tensor  # the (possibly perturbed) quantised map the decoders read


class VQSegNet(nn.Module):
    """Encoder, quantiser, QPM, segmentation and reconstruction decoders, PFA adapter.

    Args:
        features: U-Net channel widths (five levels).
        code_dim: quantised feature dimension.
        num_codes: K.
        epsilon: QPM strength.
        perturbation: ``"qpm"`` (the paper), ``"dropout"`` (Figure 1 baseline: channel
            dropout on the quantised map at ``dropout_rate``) or ``"none"``.
        reconstruction: build the image decoder (the dual branch, DB).
        fm_channels: foundation-model width for the PFA projection (0: no PFA).
        num_classes: segmentation outputs, background included.
    """

    def __init__(
        self,
        features: tuple[int, ...] = (16, 32, 64, 128, 256),
        code_dim: int = 64,
        num_codes: int = 16384,
        epsilon: float = 0.7,
        perturbation: str = "qpm",
        dropout_rate: float = 0.5,
        reconstruction: bool = True,
        fm_channels: int = 0,
        num_classes: int = 2,
    ):
        super().__init__()
        f = tuple(features)
        if perturbation not in ("qpm", "dropout", "none"):
            raise ValueError(f"perturbation {perturbation!r}: expected qpm, dropout or none")
        self.encoder = UNetEncoder(1, f)
        self.pre_quant = nn.Conv2d(f[4], code_dim, 1)
        self.quantizer = MappedEuclideanQuantizer(num_codes, code_dim)
        self.post_quant = nn.Conv2d(code_dim, f[4], 1)
        self.seg_decoder = UNetDecoder(f, num_classes)
        self.rec_decoder = UNetDecoder(f, 1, use_skips=False) if reconstruction else None
        self.qpm = QuantizedPerturbation(epsilon)
        self.perturbation = perturbation
        self.dropout_rate = dropout_rate
        self.pfa = nn.Conv2d(code_dim, fm_channels, 1) if fm_channels else None

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        backbone = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]

    def perturb(self, vq: VQOutput, generator: torch.Generator | None = None) -> torch.Tensor:
        """The student's perturbed quantised map (no gradient into the choice of codes);
        QPM's draws come from ``generator`` when one is given."""
        if self.perturbation == "qpm":
            idx = self.qpm(vq.indices, self.quantizer.codebook(), generator=generator)
            codebook = self.quantizer.codebook()
            moved = codebook[idx].permute(0, 3, 1, 2)
            keep = (idx == vq.indices)[:, None]
            return torch.where(keep, vq.quantized, moved)
        if self.perturbation == "dropout":
            return F.dropout2d(vq.quantized, self.dropout_rate, training=True)
        return vq.quantized

    def forward(self, x: torch.Tensor, perturb: bool = False, reconstruct: bool = True,
                generator: torch.Generator | None = None) -> VQSegOutput:
        feats = self.encoder(x)
        vq = self.quantizer(self.pre_quant(feats[4]))
        q = self.perturb(vq, generator) if perturb else vq.quantized
        bottleneck = self.post_quant(q)
        logits = self.seg_decoder(bottleneck, feats[:4])
        rec = torch.sigmoid(self.rec_decoder(bottleneck)) if (reconstruct and self.rec_decoder is not None) else None
        return VQSegOutput(logits, rec, vq, q)

    def adapt(self, quantized: torch.Tensor, grid: int) -> torch.Tensor:
        """PFA: resize the quantised map to the foundation grid, 1x1 conv to its width."""
        if self.pfa is None:
            raise RuntimeError("this VQSegNet was built without a PFA adapter (fm_channels=0)")
        return self.pfa(F.interpolate(quantized, size=(grid, grid), mode="bilinear", align_corners=False))
