"""QPM (VQ-Seg eq. 3-6): transition frequencies, limits, memory, and the KL formula."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from VQMedSegLib.models.qpm import QuantizedPerturbation, dropout_kl, qpm_kl, transition_rows

REPO = Path(__file__).resolve().parents[1]


def _codebook(k=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g)


def test_empirical_transitions_match_pi():
    codebook = _codebook()
    eps = 0.7
    n = 200_000
    idx = torch.cat([torch.zeros(n, dtype=torch.long), torch.full((n,), 3, dtype=torch.long)]).reshape(2, n // 100, 100 * 1)
    g = torch.Generator().manual_seed(1)
    out = QuantizedPerturbation(eps, chunk=2)(idx.reshape(2, -1, 100), codebook, generator=g).reshape(2, -1)
    for row, code in ((0, 0), (1, 3)):
        freq = torch.bincount(out[row], minlength=5).double() / n
        pi = transition_rows(codebook, torch.tensor([code]), eps)[0].double()
        se = torch.sqrt(pi * (1 - pi) / n)
        assert torch.all((freq - pi).abs() <= 5 * se + 1e-9), (freq, pi)
    # eq. 4 by hand for one entry: moves are proportional to exp(-distance)
    d = torch.cdist(codebook, codebook)[0]
    w = torch.exp(-d)
    w[0] = 0
    torch.testing.assert_close(transition_rows(codebook, torch.tensor([0]), eps)[0, 1:], (eps * w / w.sum())[1:])


def test_epsilon_zero_is_identity_and_one_never_keeps():
    codebook = _codebook(16, 4)
    idx = torch.randint(0, 16, (4, 8, 8))
    assert torch.equal(QuantizedPerturbation(0.0)(idx, codebook), idx)
    moved = QuantizedPerturbation(1.0)(idx, codebook)
    assert not torch.any(moved == idx)
    assert moved.shape == idx.shape and moved.min() >= 0 and moved.max() < 16


def test_rows_are_distributions():
    codebook = _codebook(50, 8)
    rows = transition_rows(codebook, torch.tensor([0, 7, 49]), 0.3)
    torch.testing.assert_close(rows.sum(1), torch.ones(3))
    assert torch.allclose(rows[torch.arange(3), torch.tensor([0, 7, 49])], torch.full((3,), 0.7))


def test_kl_matches_direct_computation():
    codebook = _codebook(12, 4, seed=3)
    k = 12
    for eps in (0.0, 0.3, 0.7, 1.0):
        d = torch.cdist(codebook.double(), codebook.double())
        w = torch.exp(-d)
        w.fill_diagonal_(0)
        pi = eps * w / w.sum(1, keepdim=True)
        pi += torch.eye(k, dtype=torch.float64) * (1 - eps)
        q = pi.mean(0)  # Q(c_j) = sum_i P(c_i) pi(j|i), P uniform
        direct = float((1 / k * torch.log((1 / k) / q)).sum())
        assert qpm_kl(codebook, eps, chunk=5) == pytest.approx(direct, rel=1e-5, abs=1e-9)
    assert qpm_kl(codebook, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_dropout_kl_grows_sharply_with_rate():
    assert dropout_kl(0.3) < dropout_kl(0.5) < dropout_kl(0.7) < dropout_kl(0.9)
    assert dropout_kl(0.5) == pytest.approx(0.5 * (1 + np.log(0.5)))


def test_memory_at_k16384_stays_far_below_a_k_by_k_matrix():
    """A K x K float matrix at K = 16,384 is 1 GiB; QPM on a batch of 8 x 16 x 16 tokens,
    every token a different code, must add under 100 MB to the process's peak memory."""
    script = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from VQMedSegLib.models.qpm import QuantizedPerturbation
torch.set_num_threads(1)
K = 16384
codebook = torch.randn(K, 64)
idx = torch.randperm(K)[: 8 * 16 * 16].reshape(8, 16, 16)
qpm = QuantizedPerturbation(0.7)
qpm(idx[:1, :1], codebook)  # warm up allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = qpm(idx, codebook)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (after - before) / 1024, "moved": float((out != idx).float().mean())}))
"""
    r = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["extra_mb"] < 100, result
    assert 0.6 < result["moved"] < 0.8
