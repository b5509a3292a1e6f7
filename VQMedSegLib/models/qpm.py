"""Quantized Perturbation Module (VQ-Seg, eq. 3-6).

Each token's code ``i`` stays with probability ``1 - eps``; otherwise it moves to a code
``j != i`` with probability proportional to ``exp(-d(c_i, c_j))``::

    pi(j | i) = 1 - eps                                   if j == i
              = eps * exp(-d(c_i, c_j)) / Z_i             otherwise,
    Z_i = sum_{k != i} exp(-d(c_i, c_k))

with ``d`` the Euclidean distance between codewords. Only the codes present in the batch
need a row of distances, and the rows are computed ``chunk`` codes at a time, so memory
is ``chunk x K`` floats, never ``K x K`` (at K = 16,384 a full matrix would be 1 GiB).

:func:`qpm_kl` gives eq. 6, the KL divergence between the uniform prior over codes and
the perturbed marginal Q, for the current codebook and ``eps`` (chunked the same way).
:func:`dropout_kl` is eq. 1, the dropout counterpart, for the paper's Figure 1 comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _neg_distance_rows(codebook: torch.Tensor, rows: torch.Tensor, codebook_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``-d(c_r, c_j)`` for the codes ``rows`` against the whole codebook: ``(len(rows), K)``.

    One ``addmm`` and in-place updates: a single ``len(rows) x K`` buffer."""
    c = codebook[rows]
    sq_all = (codebook * codebook).sum(1) if codebook_sq is None else codebook_sq
    out = torch.addmm(sq_all[None, :], c, codebook.t(), alpha=-2.0)
    out += (c * c).sum(1, keepdim=True)
    return out.clamp_min_(0.0).sqrt_().neg_()


def transition_rows(codebook: torch.Tensor, rows: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``pi(. | i)`` for each code ``i`` in ``rows``: ``(len(rows), K)``, rows sum to 1."""
    logits = _neg_distance_rows(codebook, rows)
    logits[torch.arange(len(rows), device=codebook.device), rows] = float("-inf")
    probs = torch.softmax(logits, dim=1) * epsilon
    probs[torch.arange(len(rows), device=codebook.device), rows] = 1.0 - epsilon
    return probs


class QuantizedPerturbation(nn.Module):
    """QPM on code indices.

    Args:
        epsilon: perturbation strength, the probability that a code moves (paper: 0.7).
        chunk: codes whose distance rows are computed together.

    ``forward(indices (B, H, W), codebook (K, D)) -> perturbed indices (B, H, W)``.
    Sampling runs without gradient; the decoder then reads ``codebook[perturbed]``.
    """

    def __init__(self, epsilon: float = 0.7, chunk: int = 64):
        super().__init__()
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"QPM epsilon: found {epsilon}, expected a value in [0, 1]")
        self.epsilon = float(epsilon)
        self.chunk = int(chunk)

    @torch.no_grad()
    def forward(self, indices: torch.Tensor, codebook: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.epsilon == 0.0:
            return indices.clone()
        flat = indices.reshape(-1)
        device = flat.device
        move = torch.rand(flat.shape, device=device, generator=generator) < self.epsilon
        out = flat.clone()
        if not bool(move.any()):
            return out.reshape(indices.shape)
        moving = flat[move]
        codes, inverse = torch.unique(moving, return_inverse=True)
        # rank of each moving token among the tokens with the same code
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=len(codes))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=device) - starts[inverse[order]]
        new = torch.empty_like(moving)
        cb = codebook.detach().float()
        cb_sq = (cb * cb).sum(1)
        for lo in range(0, len(codes), self.chunk):
            rows = codes[lo : lo + self.chunk]
            logits = _neg_distance_rows(cb, rows, cb_sq)
            logits[torch.arange(len(rows), device=device), rows] = float("-inf")  # j != i
            probs = torch.softmax(logits, dim=1)
            del logits
            draws = torch.multinomial(probs, int(counts[lo : lo + self.chunk].max()), replacement=True, generator=generator)
            sel = (inverse >= lo) & (inverse < lo + len(rows))
            new[sel] = draws[inverse[sel] - lo, rank[sel]]
        out[move] = new
        return out.reshape(indices.shape)


@torch.no_grad()
def qpm_marginal(codebook: torch.Tensor, epsilon: float, chunk: int = 256) -> torch.Tensor:
    """Q(c_j | eps) of eq. 5 for every code ``j``: ``(K,)``, sums to 1."""
    k = codebook.shape[0]
    q = torch.zeros(k, dtype=torch.float64, device=codebook.device)
    cb = codebook.detach().float()
    for lo in range(0, k, chunk):
        rows = torch.arange(lo, min(lo + chunk, k), device=codebook.device)
        q += transition_rows(cb, rows, epsilon).double().sum(0)
    return q / k


def qpm_kl(codebook: torch.Tensor, epsilon: float, chunk: int = 256) -> float:
    """Eq. 6: ``KL(P || Q) = -(1/K) sum_j log(K Q(c_j | eps))`` with P uniform."""
    q = qpm_marginal(codebook, epsilon, chunk)
    k = codebook.shape[0]
    return float(-(torch.log(k * q.clamp_min(1e-300))).mean())


def dropout_kl(p: float) -> float:
    """Eq. 1: the KL approximation for feature dropout with rate ``p``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout rate {p}: expected a value in (0, 1)")
    return 0.5 * (p / (1.0 - p) + math.log(1.0 - p))
