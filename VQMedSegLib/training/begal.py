"""VQ-BEGAL training: the phased schedule that sends each kind of slice to its part of
the network.

Per round (after the first):

1. **encoder phase** (``encoder_iterations``): low-uncertainty slices (purpose
   ``encoder``) plus slices of no particular purpose (the initial set, slices annotated
   by hand). Trainable: E_c, E_m, their projections, the codebook and D. Frozen (and in
   eval mode, so the codebook is not revived and dropout is off): fusion and decoder.
   Loss: ``5 seg + 0.5 VQ + 0.25 disc + 0.2 commit``; the VQ, commitment and D terms also
   use unlabelled pool slices, which need no label.
2. **decoder phase** (``decoder_iterations``): high-uncertainty slices (purpose
   ``decoder``) plus the no-purpose slices. Trainable: fusion and decoder; everything
   else frozen. Loss: ``5 seg`` (the other terms have no trainable parameter here).
3. **joint phase** (``joint_iterations``, 0 by default): every labelled slice, every
   parameter, every loss.

Round 0, EGAL and the baseline strategies train **end to end** on every labelled slice
for the same number of iterations as a BEGAL round, so strategies differ only in what
they select and how they use it. Weights carry over from round to round (the network
keeps learning as the labelled set grows); each parameter group has its own AdamW
optimiser with a constant learning rate.

Under ``torchrun`` (:mod:`.distributed`) every rank draws the same global batches and
trains on its share (``batch_size`` and ``unlabelled_batch`` must be multiples of the
number of processes). A step's loss is one forward pass of :class:`BEGALObjective`; each
phase wraps it in DistributedDataParallel over the parameters that phase trains, so the
frozen half is never synchronised. The codebook's usage statistics are summed over the
ranks and revived codes are taken from rank 0's features (:mod:`..models.quantizers`),
so the ranks keep one codebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from .. import _monai  # noqa: F401  (before MONAI; see _monai.py)
from monai.losses import DiceCELoss

from ..active_learning.pool import SlicePool
from ..active_learning.strategies import BOTH, DECODER, ENCODER
from ..config import BEGALConfig
from ..errors import InputError
from ..models.begal import CT, MR, VQBEGALNet
from .distributed import SINGLE, DistInfo, shard
from .supervised import augmentation


@dataclass
class Phase:
    name: str  # "initial", "encoder", "decoder", "joint" or "end-to-end"
    iterations: int
    trainable: str  # "all", "encoder" or "decoder"
    samples: np.ndarray  # pool indices of the labelled slices this phase draws from


def build_model(config: BEGALConfig) -> VQBEGALNet:
    return VQBEGALNet(
        features=tuple(config.features),
        code_dim=config.code_dim,
        num_codes=config.num_codes,
        decoder_dropout=config.decoder_dropout,
        mr_dropout=config.mr_dropout,
        adversarial_scale=config.adversarial_scale,
    )


def model_spec(config: BEGALConfig) -> dict:
    return {"kind": "vqbegal2d", "config": config.to_json()}


def make_optimizers(model: VQBEGALNet, config: BEGALConfig) -> dict[str, torch.optim.Optimizer]:
    def params(mods: list[nn.Module]):
        return [p for m in mods for p in m.parameters()]

    return {
        "encoder": torch.optim.AdamW(params(model.encoder_modules()), lr=config.learning_rate, weight_decay=config.weight_decay),
        "decoder": torch.optim.AdamW(params(model.decoder_modules()), lr=config.learning_rate, weight_decay=config.weight_decay),
    }


def round_schedule(method: str, round_index: int, labelled: dict[int, str], config: BEGALConfig) -> list[Phase]:
    """The phases of one round for ``method`` (``begal`` phases; anything else end to end)."""
    everything = np.array(sorted(labelled), dtype=np.int64)
    if round_index == 0:
        return [Phase("initial", config.initial_iterations, "all", everything)]
    if method != "begal":
        return [Phase("end-to-end", config.round_iterations, "all", everything)]
    common = [i for i, p in labelled.items() if p == BOTH]
    enc = np.array(sorted(common + [i for i, p in labelled.items() if p == ENCODER]), dtype=np.int64)
    dec = np.array(sorted(common + [i for i, p in labelled.items() if p == DECODER]), dtype=np.int64)
    phases = []
    if config.encoder_iterations and len(enc):
        phases.append(Phase("encoder", config.encoder_iterations, "encoder", enc))
    if config.decoder_iterations and len(dec):
        phases.append(Phase("decoder", config.decoder_iterations, "decoder", dec))
    if config.joint_iterations:
        phases.append(Phase("joint", config.joint_iterations, "all", everything))
    if not phases:
        phases.append(Phase("end-to-end", config.round_iterations, "all", everything))
    return phases


def set_trainable(model: VQBEGALNet, trainable: str) -> None:
    """Freeze the other group: no gradients, and eval mode (no codebook revival, no dropout)."""
    model.train(True)  # the top-level flag drives MR dropout in training
    groups = {"encoder": model.encoder_modules(), "decoder": model.decoder_modules()}
    for name, mods in groups.items():
        on = trainable in ("all", name)
        for m in mods:
            m.train(on)
            for p in m.parameters():
                p.requires_grad_(on)


class BEGALObjective(nn.Module):
    """The loss of one phase step (``5 seg + 0.5 VQ + 0.25 disc + 0.2 commit``; ``5 seg``
    alone when only the decoder trains) as one forward pass, which DDP can wrap."""

    def __init__(self, model: VQBEGALNet, config: BEGALConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, ct, mr, present, y, trainable: str, u_ct=None, u_mr=None):
        cfg = self.config
        out = self.model(ct, mr, present)
        seg = self.seg_loss(out.logits, y)
        losses = {"seg": seg}
        total = cfg.seg_weight * seg
        if trainable in ("all", "encoder"):
            disc = F.cross_entropy(out.disc_ct, torch.full((ct.shape[0],), CT, device=ct.device))
            if out.disc_mr is not None and len(out.disc_mr):
                disc = 0.5 * (disc + F.cross_entropy(out.disc_mr, torch.full((out.disc_mr.shape[0],), MR, device=ct.device)))
            cb, commit = out.codebook_loss, out.commitment_loss
            if u_ct is not None:
                ucb, ucommit, udisc = self.model.unlabelled_losses(u_ct, u_mr)
                cb, commit, disc = 0.5 * (cb + ucb), 0.5 * (commit + ucommit), 0.5 * (disc + udisc)
            total = total + cfg.vq_weight * cb + cfg.disc_weight * disc + cfg.commit_weight * commit
            losses.update(vq=cb, commit=commit, disc=disc, perplexity=out.perplexity, utilisation=out.utilisation)
        return total, losses


class PhaseTrainer:
    """Runs phases over a pool whose ``labels`` hold the annotations of the labelled slices."""

    def __init__(self, model: VQBEGALNet, config: BEGALConfig, pool: SlicePool, device: torch.device, seed: int,
                 dist_info: DistInfo = SINGLE):
        if pool.labels is None:
            raise ValueError("PhaseTrainer needs a pool with labels for the labelled slices")
        if dist_info.enabled:
            uneven = {k: getattr(config, k) for k in ("batch_size", "unlabelled_batch") if getattr(config, k) % dist_info.world}
            if uneven:
                raise InputError(f"VQ-BEGAL batch sizes {uneven}: expected multiples of the {dist_info.world} processes")
        self.model = model.to(device)
        self.config = config
        self.pool = pool
        self.device = device
        self.info = dist_info
        self.optimizers = make_optimizers(model, config)
        self.rng = np.random.default_rng(seed)
        # every rank draws the same global batch (same rng); augmentation streams differ per rank
        self.transform = augmentation(seed + dist_info.rank) if config.augment else None
        self.objective = BEGALObjective(self.model, config)
        self.step_loss: nn.Module = self.objective

    def _wrap(self) -> None:
        """DDP over the parameters that require a gradient now (call after :func:`set_trainable`)."""
        if not self.info.enabled:
            return
        from torch.nn.parallel import DistributedDataParallel

        # MR-less batches leave E_m idle, hence find_unused_parameters
        self.step_loss = DistributedDataParallel(self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                                 find_unused_parameters=True)

    def _labelled_batch(self, samples: np.ndarray):
        idx = shard(self.rng.choice(samples, self.config.batch_size), self.info)
        ct, mr, present = self.pool.batch(idx)
        labels = self.pool.labels[idx]
        if self.transform is not None:
            images, masks = [], []
            for img, lab in zip(ct, labels):
                item = self.transform({"image": img, "label": lab[None].astype(np.float32)})
                images.append(np.asarray(item["image"], np.float32))
                masks.append(np.asarray(item["label"]).round().astype(np.int64))
            ct, y = np.stack(images), np.stack(masks)
        else:
            y = labels[:, None]
        t = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        return t(ct), (t(mr) if mr is not None else None), t(present), t(y)

    def step(self, phase: Phase) -> dict[str, float]:
        cfg = self.config
        ct, mr, present, y = self._labelled_batch(phase.samples)
        u_ct = u_mr = None
        if phase.trainable in ("all", "encoder") and cfg.unlabelled_batch:
            u = shard(self.rng.integers(0, len(self.pool), cfg.unlabelled_batch), self.info)
            u_ct, u_mr, _ = self.pool.batch(u)
            u_ct = torch.as_tensor(u_ct, device=self.device)
            u_mr = torch.as_tensor(u_mr, device=self.device) if u_mr is not None else None
        total, losses = self.step_loss(ct, mr, present, y, phase.trainable, u_ct, u_mr)
        groups = ("encoder", "decoder") if phase.trainable == "all" else (phase.trainable,)
        for g in groups:
            self.optimizers[g].zero_grad(set_to_none=True)
        total.backward()
        for g in groups:
            self.optimizers[g].step()
        losses["total"] = total
        return {k: float(v.detach()) for k, v in losses.items()}

    def run(
        self,
        phases: list[Phase],
        start: int = 0,
        on_step: Callable[[int, int, str, dict], None] | None = None,
        check_cancel: Callable[[], None] | None = None,
    ) -> int:
        """Run ``phases`` from global iteration ``start``; returns the iterations done."""
        total = sum(p.iterations for p in phases)
        offset = 0
        for phase in phases:
            if start >= offset + phase.iterations:
                offset += phase.iterations
                continue
            set_trainable(self.model, phase.trainable)
            self._wrap()
            for it in range(max(start, offset), offset + phase.iterations):
                if check_cancel is not None:
                    check_cancel()
                losses = self.step(phase)
                if on_step is not None:
                    on_step(it + 1, total, phase.name, losses)
            offset += phase.iterations
        set_trainable(self.model, "all")
        self.step_loss = self.objective
        self.model.eval()
        return total

    def state(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state(self, state: dict) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


@torch.no_grad()
def predict_pool(model: VQBEGALNet, pool: SlicePool, idx: np.ndarray, device: torch.device, batch: int = 32) -> np.ndarray:
    """Argmax label slices ``(len(idx), S, S)`` for pool indices ``idx`` (with MR where paired)."""
    model.eval()
    out = np.empty((len(idx), pool.size, pool.size), np.uint8)
    for start in range(0, len(idx), batch):
        b = idx[start : start + batch]
        logits = model(*pool.tensors(b, device)).logits
        out[start : start + len(b)] = logits.argmax(1).cpu().numpy().astype(np.uint8)
    return out


def case_dice(model: VQBEGALNet, pool: SlicePool, device: torch.device, cases: list[str] | None = None) -> dict[str, float]:
    """3-D Dice per case over all its slices (at model resolution)."""
    assert pool.labels is not None
    result = {}
    for case in cases or pool.cases():
        idx = np.flatnonzero(pool.case_ids == case)
        pred = predict_pool(model, pool, idx, device).astype(bool)
        ref = pool.labels[idx].astype(bool)
        denom = pred.sum() + ref.sum()
        result[case] = 1.0 if denom == 0 else float(2 * (pred & ref).sum() / denom)
    return result
