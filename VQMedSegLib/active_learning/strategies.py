"""Selection strategies: score the unlabelled pool, pick the slices to annotate.

Every strategy is a scoring function over pool indices plus a selection rule, all under
one interface (:func:`select`) and one budget, so the paper's comparison can be rerun:

=========== ==================================================== ========================
strategy    score                                                selection
=========== ==================================================== ========================
begal       entropy of D's modality output (eq. 5)               n highest (decoder) + n
                                                                 lowest (encoders), eq. 6-7
egal        same score                                           2n highest, end to end
random      none                                                 uniform, seeded
entropy     mean pixel entropy of the segmentation softmax       highest
mcdropout   mean pixel entropy of the mean of T dropout passes   highest
coreset     pooled CT-encoder bottleneck features                k-centre greedy
=========== ==================================================== ========================

Scoring streams over the pool in batches: only one score (or one small feature vector
for coreset) per slice is kept, so memory does not grow with the number of pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import InputError
from .pool import SlicePool

STRATEGIES = ("begal", "egal", "random", "entropy", "mcdropout", "coreset")
Progress = Callable[[int, int], None]  # (slices scored, slices to score), after each batch
ENCODER, DECODER, BOTH = "encoder", "decoder", "both"


@dataclass
class Selection:
    index: int  # pool index
    score: float
    purpose: str  # "encoder", "decoder" or "both"


def _batches(idx: np.ndarray, batch: int):
    for start in range(0, len(idx), batch):
        yield idx[start : start + batch]


def _stream(idx: np.ndarray, batch: int, score: Callable[[np.ndarray], torch.Tensor],
            progress: Progress | None = None) -> np.ndarray:
    """One score per pool index, computed ``batch`` slices at a time (memory flat in the pool size);
    ``progress(done, total)`` after each batch, counting this process's share.

    Under torchrun each rank scores its share of ``idx`` and the scores are gathered back
    into ``idx``'s order on every rank (:mod:`VQMedSegLib.training.distributed`)."""
    from ..training.distributed import current, gather_scores, shard

    info = current()
    mine = shard(idx, info)
    out = np.empty(len(mine), np.float32)
    pos = 0
    for b in _batches(mine, batch):
        out[pos : pos + len(b)] = score(b).float().cpu().numpy()
        pos += len(b)
        if progress is not None:
            progress(pos, len(mine))
    return gather_scores(out, len(idx), info)


@torch.no_grad()
def modality_scores(model: nn.Module, pool: SlicePool, idx: np.ndarray, device: torch.device, batch: int = 32,
                    progress: Progress | None = None) -> np.ndarray:
    """Eq. 5 for each pool slice (one encoder pass, no decoder)."""
    model.eval()
    return _stream(idx, batch, lambda b: model.modality_uncertainty(*pool.tensors(b, device)[:2]), progress)


def _pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(1).mean(dim=(1, 2))


@torch.no_grad()
def prediction_entropy_scores(model: nn.Module, pool: SlicePool, idx: np.ndarray, device: torch.device, batch: int = 32,
                              progress: Progress | None = None) -> np.ndarray:
    model.eval()
    return _stream(idx, batch, lambda b: _pixel_entropy(torch.softmax(model(*pool.tensors(b, device)).logits, dim=1)),
                   progress)


def _enable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout3d)):
            m.train()


@torch.no_grad()
def mc_dropout_scores(
    model: nn.Module, pool: SlicePool, idx: np.ndarray, device: torch.device, samples: int = 10, batch: int = 32,
    progress: Progress | None = None,
) -> np.ndarray:
    """Predictive entropy of the mean of ``samples`` stochastic passes (dropout on)."""
    model.eval()
    _enable_dropout(model)
    if not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.p > 0 for m in model.modules()):
        raise InputError("mcdropout: the model has no active dropout layer, so every pass would be identical")

    def score(b: np.ndarray) -> torch.Tensor:
        inputs = pool.tensors(b, device)
        mean = sum(torch.softmax(model(*inputs).logits, dim=1) for _ in range(samples))
        return _pixel_entropy(mean / samples)

    out = _stream(idx, batch, score, progress)
    model.eval()
    return out


@torch.no_grad()
def bottleneck_features(model: nn.Module, pool: SlicePool, idx: np.ndarray, device: torch.device, batch: int = 32,
                        progress: Progress | None = None) -> np.ndarray:
    from ..training.distributed import current, gather_scores, shard

    model.eval()
    info = current()
    feats = []
    mine = shard(idx, info)
    for b in _batches(mine, batch):
        feats.append(model.ct_encoder(pool.tensors(b, device)[0])[4].mean(dim=(2, 3)).float().cpu().numpy())
        if progress is not None:
            progress(sum(len(f) for f in feats), len(mine))
    width = model.ct_encoder.features[4] if hasattr(model.ct_encoder, "features") else 1
    local = np.concatenate(feats) if feats else np.zeros((0, width), np.float32)
    return gather_scores(local, len(idx), info)


def kcenter_greedy(candidates: np.ndarray, centres: np.ndarray, n: int) -> list[int]:
    """Sener & Savarese's k-centre greedy: repeatedly take the candidate farthest from
    every centre so far (the labelled slices, then each pick). Returns positions into
    ``candidates``."""
    n = min(n, len(candidates))
    if n <= 0:
        return []
    d = np.full(len(candidates), np.inf)
    for start in range(0, len(centres), 256):
        c = centres[start : start + 256]
        d = np.minimum(d, ((candidates[:, None, :] - c[None]) ** 2).sum(-1).min(1))
    chosen: list[int] = []
    while len(chosen) < n:
        i = int(np.argmax(d)) if len(centres) or chosen else 0
        chosen.append(i)
        d = np.minimum(d, ((candidates - candidates[i]) ** 2).sum(-1))
    return chosen


def bimodal_select(scores: np.ndarray, n_total: int) -> tuple[list[int], list[int]]:
    """Eq. 6-7: positions of the ``ceil(n/2)`` highest and ``floor(n/2)`` lowest scores.

    With fewer candidates than asked for, takes them all. Ties break by position, so
    the result is deterministic.
    """
    n_total = min(n_total, len(scores))
    n_high = math.ceil(n_total / 2)
    n_low = n_total - n_high
    order = np.argsort(-scores, kind="stable")
    high = order[:n_high].tolist()
    taken = set(high)
    rest = [i for i in np.argsort(scores, kind="stable").tolist() if i not in taken]
    low = rest[:n_low]
    return high, low


def select(
    strategy: str,
    model: nn.Module | None,
    pool: SlicePool,
    unlabelled: np.ndarray,
    labelled: np.ndarray,
    n: int,
    device: torch.device,
    rng: np.random.Generator,
    mc_samples: int = 10,
    batch: int = 32,
    progress: Progress | None = None,
) -> list[Selection]:
    """Choose ``n`` slices from ``unlabelled`` (pool indices) with ``strategy``; the scoring
    of ``unlabelled`` reports to ``progress(done, total)`` after each batch."""
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    n = min(n, len(unlabelled))
    if n <= 0:
        return []
    if strategy == "random" or model is None:
        picks = rng.choice(len(unlabelled), n, replace=False)
        return [Selection(int(unlabelled[p]), 0.0, BOTH) for p in picks]
    if strategy in ("begal", "egal"):
        scores = modality_scores(model, pool, unlabelled, device, batch, progress)
        if strategy == "begal":
            high, low = bimodal_select(scores, n)
            return [Selection(int(unlabelled[p]), float(scores[p]), DECODER) for p in high] + [
                Selection(int(unlabelled[p]), float(scores[p]), ENCODER) for p in low
            ]
        top = np.argsort(-scores, kind="stable")[:n]
        return [Selection(int(unlabelled[p]), float(scores[p]), BOTH) for p in top]
    if strategy == "coreset":
        cand = bottleneck_features(model, pool, unlabelled, device, batch, progress)
        centres = bottleneck_features(model, pool, labelled, device, batch) if len(labelled) else np.zeros((0, cand.shape[1]))
        picks = kcenter_greedy(cand, centres, n)
        return [Selection(int(unlabelled[p]), 0.0, BOTH) for p in picks]
    if strategy == "entropy":
        scores = prediction_entropy_scores(model, pool, unlabelled, device, batch, progress)
    else:
        scores = mc_dropout_scores(model, pool, unlabelled, device, mc_samples, batch, progress)
    top = np.argsort(-scores, kind="stable")[:n]
    return [Selection(int(unlabelled[p]), float(scores[p]), BOTH) for p in top]
