"""VQ-Seg semi-supervised training (eq. 7-12) with an EMA teacher.

Each iteration draws ``labelled_batch`` labelled and ``unlabelled_batch`` unlabelled
slices (paper: 8 + 4):

* labelled (eq. 8): ``L_l = L1(x_l, x^_l) + CE(y_l, y^_l)`` on a weakly augmented view
  (random affine and intensity jitter).
* unlabelled (eq. 9): the EMA teacher (alpha = 0.996) predicts the weak view; its argmax
  is the pseudo-label (optionally only where its confidence reaches
  ``confidence_threshold``; 0 keeps every pixel, the paper's setting). The student
  learns it from its QPM-perturbed codes and from a CutMix strong view (a box of another
  unlabelled slice pasted in, with its own pseudo-label pasted likewise), plus the L1
  reconstruction of ``x_u``: ``L_u = L1 + CE(QPM view) + CE(CutMix view)``.
  With ``strong_augment`` (the paper's "random rotation, color jittering, and CutMix"
  for unlabelled data, as in UniMatch), the unlabelled slices are first rotated, scaled
  and shifted like the labelled ones (the teacher and the student see the same
  geometry), and the CutMix view is built from strong views: brightness and contrast
  jitter (x 0.5-1.5, probability 0.8, torchvision's ``ColorJitter(0.5, 0.5)`` on a
  greyscale slice), Gaussian blur (sigma 0.1-2, probability 0.5), clipped to the weak
  view's range. Intensity changes keep the geometry, so the pseudo-labels still fit.
* PFA (eq. 11): the quantised features of ``pfa_batch`` unlabelled slices (intensity
  jitter only, no geometric change), adapted to the foundation model's grid, against
  that model's features of the same slices. ``pfa_source`` says which quantised
  features: the straight-through output (the default; the alignment's gradient passes
  to the encoder, and the codebook follows through its own loss) or the chosen
  codewords (the gradient trains the codebook mapping and the adapter, and the encoder
  follows through the commitment loss). The foundation model is slow on a CPU
  (about 1 s a slice for LiteMedSAM), so its features are computed once for
  ``pfa_slices`` unlabelled slices (0: all of them) and cached at ``pfa_grid`` x
  ``pfa_grid``.
* total (eq. 12): ``L_l + lambda_u L_u + lambda_a L_align`` plus the quantiser's
  codebook, commitment (0.25) and entropy terms. ``lambda_a_schedule`` "cosine" (not the
  paper) lets lambda_a fall from its value to 0 over the semi-supervised iterations.

AdamW, separate learning rates for the backbone (encoder) and the heads, poly decay 0.9.
Switches ``use_qpm``, ``use_reconstruction`` and ``use_pfa`` give the ablations of the
paper's Table 2.

Under ``torchrun`` (:mod:`.distributed`) every rank draws the same global batches and
trains on its share of each (``labelled_batch``, ``unlabelled_batch`` and ``pfa_batch``
must be multiples of the number of processes); the loss of a step is one forward pass of
:class:`VQSegObjective` wrapped in DistributedDataParallel, which averages the gradients.
CutMix pastes within a rank's share. The teacher is updated identically on every rank.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from .. import _monai  # noqa: F401  (before MONAI; see _monai.py)
from monai.losses import DiceLoss
from monai.transforms import (Compose, RandAffined, RandGaussianSmoothd, RandScaleIntensityd, RandScaleIntensityFixedMeand,
                              RandShiftIntensityd)

from ..config import VQSegConfig
from ..errors import InputError
from ..models.vqseg import VQSegNet, patch_info_nce
from .distributed import SINGLE, DistInfo, shard
from .slices import SliceSet
from .supervised import AFFINE, BatchSampler, augmentation, make_batch


def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``theta_t <- decay * theta_t + (1 - decay) * theta_s``; buffers are copied."""
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(s)


def cutmix_boxes(batch: int, size: int, rng: np.random.Generator, area: tuple[float, float] = (0.1, 0.4)) -> torch.Tensor:
    """``(B, 1, S, S)`` masks, 1 inside one random box per image."""
    masks = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        a = rng.uniform(*area) * size * size
        ratio = rng.uniform(0.5, 2.0)
        h = int(min(size, max(1, round(np.sqrt(a * ratio)))))
        w = int(min(size, max(1, round(np.sqrt(a / ratio)))))
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        masks[b, :, y : y + h, x : x + w] = 1
    return masks


AUGMENTATION_STREAMS = 4  # weak (labelled), intensity and geometric (unlabelled), strong (CutMix view)


def strong_intensity(seed: int) -> Compose:
    """UniMatch's strong view of a greyscale slice: brightness and contrast jitter, blur."""
    t = Compose([RandScaleIntensityd(keys="image", factors=0.5, prob=0.8),
                 RandScaleIntensityFixedMeand(keys="image", factors=0.5, prob=0.8),
                 RandGaussianSmoothd(keys="image", sigma_x=(0.1, 2.0), sigma_y=(0.1, 2.0), prob=0.5)])
    t.set_random_state(seed=seed)
    return t


def cutmix(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``images[perm]`` into ``images`` inside ``masks``; labels follow the same pixels."""
    mixed = images * (1 - masks) + images[perm] * masks
    mixed_labels = torch.where(masks[:, 0].bool(), labels[perm], labels)
    return mixed, mixed_labels


def labelled_loss(logits: torch.Tensor, target: torch.Tensor, dice: DiceLoss, dice_weight: float) -> torch.Tensor:
    """The segmentation loss on labelled slices: cross-entropy plus ``dice_weight`` times
    the batch-pooled Dice loss (``target``: ``(B, H, W)`` class indices)."""
    loss = F.cross_entropy(logits, target)
    if dice_weight:
        loss = loss + dice_weight * dice(logits, target[:, None])
    return loss


def alignment_weight(iteration: int, config: VQSegConfig) -> float:
    """Eq. 12's lambda_a at ``iteration``: 0 in the supervised warm-up, then lambda_a
    (``lambda_a_schedule`` "constant", the paper) or lambda_a falling along a half cosine
    to 0 at ``iterations`` ("cosine")."""
    start = config.warmup_supervised
    if iteration < start:
        return 0.0
    if config.lambda_a_schedule == "constant" or config.iterations <= start:
        return config.lambda_a
    progress = min(1.0, (iteration - start) / (config.iterations - start))
    return 0.5 * config.lambda_a * (1.0 + math.cos(math.pi * progress))


def rampup_weight(iteration: int, start: int, length: int) -> float:
    """Laine and Aila's sigmoid ramp ``exp(-5 (1 - t)^2)`` from ``start`` over ``length``
    iterations (1 at once when ``length`` is 0)."""
    if iteration < start:
        return 0.0
    if length <= 0:
        return 1.0
    t = min(1.0, (iteration - start) / length)
    return float(np.exp(-5.0 * (1.0 - t) ** 2))


def build_vqseg(config: VQSegConfig, fm_channels: int) -> VQSegNet:
    return VQSegNet(
        features=tuple(config.features),
        code_dim=config.code_dim,
        num_codes=config.num_codes,
        epsilon=config.epsilon,
        perturbation=config.perturbation if config.use_qpm else "none",
        dropout_rate=config.dropout_rate,
        reconstruction=config.use_reconstruction,
        fm_channels=fm_channels if config.use_pfa else 0,
        num_classes=config.num_classes,
    )


@torch.no_grad()
def foundation_features(foundation: nn.Module, images: np.ndarray, grid: int, batch: int = 4,
                        progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Foundation features of every slice, average-pooled to ``grid x grid``, float16.

    ``progress(done, total)`` is called after each batch (LiteMedSAM takes seconds a
    slice on a CPU); it may raise to stop, as a job's cancel check does."""
    out = []
    for start in range(0, len(images), batch):
        f = foundation(torch.as_tensor(images[start : start + batch]))
        out.append(F.adaptive_avg_pool2d(f, grid).half().numpy())
        if progress is not None:
            progress(min(start + batch, len(images)), len(images))
    return np.concatenate(out) if out else np.zeros((0, 1, grid, grid), np.float16)


@dataclass
class UnlabelledViews:
    """One step's unlabelled slices, the teacher's pseudo-labels and confidence weights,
    and the CutMix view with its mixed labels and weights."""

    x: torch.Tensor
    pseudo: torch.Tensor
    weight: torch.Tensor
    x_mix: torch.Tensor
    y_mix: torch.Tensor
    w_mix: torch.Tensor


class VQSegObjective(nn.Module):
    """The loss of one VQ-Seg step (eq. 8-12) as one forward pass of the student."""

    def __init__(self, student: VQSegNet, config: VQSegConfig):
        super().__init__()
        self.student = student
        self.cfg = config
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, batch=True)

    def alignment(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        net = self.student
        if self.cfg.pfa_source == "codewords":  # only the choice of codes comes from the encoder
            with torch.no_grad():
                indices = net.quantizer(net.pre_quant(net.encoder(x)[4])).indices
            q = net.quantizer.codebook()[indices].permute(0, 3, 1, 2)
        else:
            q = net.quantizer(net.pre_quant(net.encoder(x)[4])).quantized
        return patch_info_nce(net.adapt(q, target.shape[-1]), target, self.cfg.temperature)

    def forward(self, x_l, y_l, unlabelled: UnlabelledViews | None = None,
                align: tuple[torch.Tensor, torch.Tensor] | None = None, ramp: float = 0.0, lambda_a: float | None = None):
        cfg, net = self.cfg, self.student
        out_l = net(x_l, perturb=False)
        seg_l = labelled_loss(out_l.logits, y_l, self.dice, cfg.dice_weight)
        rec_l = F.l1_loss(out_l.reconstruction, x_l) if out_l.reconstruction is not None else x_l.new_zeros(())
        vq = out_l.vq.codebook_loss + cfg.commitment * out_l.vq.commitment_loss + cfg.entropy_weight * out_l.vq.entropy_loss
        total = seg_l + rec_l + vq
        losses = {"seg_l": seg_l, "rec_l": rec_l, "vq": vq, "perplexity": out_l.vq.perplexity, "utilisation": out_l.vq.utilisation}
        if unlabelled is not None:
            u = unlabelled
            out_u = net(u.x, perturb=True)
            seg_qpm = (F.cross_entropy(out_u.logits, u.pseudo, reduction="none") * u.weight).mean()
            rec_u = F.l1_loss(out_u.reconstruction, u.x) if out_u.reconstruction is not None else u.x.new_zeros(())
            out_a = net(u.x_mix, perturb=False, reconstruct=False)
            seg_mix = (F.cross_entropy(out_a.logits, u.y_mix, reduction="none") * u.w_mix).mean()
            loss_u = rec_u + seg_qpm + seg_mix
            total = total + ramp * cfg.lambda_u * loss_u + out_u.vq.codebook_loss + cfg.commitment * out_u.vq.commitment_loss
            losses.update(seg_qpm=seg_qpm, seg_cutmix=seg_mix, rec_u=rec_u, ramp=ramp)
            if align is not None:
                loss_a = self.alignment(*align)
                weight = cfg.lambda_a if lambda_a is None else lambda_a
                total = total + weight * loss_a
                losses.update(align=loss_a, lambda_a=weight)
        return total, losses


class VQSegTrainer:
    def __init__(self, config: VQSegConfig, labelled_x, labelled_y, unlabelled_x, fm_features, fm_channels: int, device,
                 fm_slices: np.ndarray | None = None, dist_info: DistInfo = SINGLE):
        """``fm_features[n]`` are the foundation features of ``unlabelled_x[fm_slices[n]]``
        (``fm_slices`` defaults to every unlabelled slice)."""
        self.cfg = config
        self.device = device
        self.info = dist_info
        if dist_info.enabled:
            uneven = {k: getattr(config, k) for k in ("labelled_batch", "unlabelled_batch", "pfa_batch") if getattr(config, k) % dist_info.world}
            if uneven:
                raise InputError(f"VQ-Seg batch sizes {uneven}: expected multiples of the {dist_info.world} processes")
        self.lx, self.ly, self.ux = labelled_x, labelled_y, unlabelled_x
        self.fm = fm_features
        self.fm_slices = np.arange(len(unlabelled_x)) if fm_slices is None else np.asarray(fm_slices)
        self.rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        self.student = build_vqseg(config, fm_channels).to(device)
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        heads = self.student.head_parameters()
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.student.backbone_parameters(), "lr": config.backbone_lr},
                {"params": heads, "lr": config.backbone_lr * config.head_lr_factor},
            ],
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.PolynomialLR(self.optimizer, total_iters=config.iterations, power=config.poly_power)
        # four augmentation streams a rank, seeded apart: rank 0 keeps seed .. seed + 3
        stream = config.seed + AUGMENTATION_STREAMS * dist_info.rank
        self.weak = augmentation(stream) if config.augment else None
        self.intensity = Compose([RandScaleIntensityd(keys="image", factors=0.1, prob=0.5), RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5)])
        self.intensity.set_random_state(seed=stream + 1)
        self.geometric = self.strong = None
        if config.strong_augment:
            self.geometric = RandAffined(keys="image", mode="bilinear", **AFFINE)
            self.geometric.set_random_state(seed=stream + 2)
            self.strong = strong_intensity(stream + 3)
        self.iteration = 0
        self.objective = VQSegObjective(self.student, config)
        self.step_loss: nn.Module = self.objective
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # one forward per step; parameters idle in a step (PFA during the warm-up) are allowed
            self.step_loss = DistributedDataParallel(self.objective, device_ids=[device.index] if device.type == "cuda" else None,
                                                     find_unused_parameters=True)
        # small targets (a lung tumour) appear in few labelled slices: keep them in every batch
        self.sampler = BatchSampler(SliceSet(labelled_x, labelled_y), config.labelled_batch, config.foreground_fraction, self.rng)

    def _labelled(self):
        x, y = make_batch(self.sampler.data, shard(self.sampler.indices(), self.info), self.weak)
        return x.to(self.device), y[:, 0].to(self.device)

    def _intensity_view(self, idx: np.ndarray, geometric: bool = False) -> torch.Tensor:
        """Intensity-jittered unlabelled slices; with ``geometric`` (and ``strong_augment``)
        also rotated, scaled and shifted. The PFA batch never is: its cached foundation
        features are of the slices as stored."""
        xs = []
        for i in idx:
            item = {"image": self.ux[i]}
            if geometric and self.geometric is not None:
                item = self.geometric(item)
            xs.append(np.asarray(self.intensity(item)["image"], np.float32))
        return torch.as_tensor(np.stack(xs), device=self.device)

    def _strong_view(self, x: torch.Tensor) -> torch.Tensor:
        """Each slice's strong view, clipped to its weak view's range."""
        out = []
        for s in x.cpu().numpy():
            v = np.asarray(self.strong({"image": s})["image"], np.float32)
            out.append(np.clip(v, s.min(), s.max()))
        return torch.as_tensor(np.stack(out), device=self.device)

    def alignment_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``pfa_batch`` unlabelled slices whose foundation features are cached, and those features."""
        pick = shard(self.rng.integers(0, len(self.fm), min(self.cfg.pfa_batch, len(self.fm))), self.info)
        return self._intensity_view(self.fm_slices[pick]), torch.as_tensor(self.fm[pick].astype(np.float32), device=self.device)

    def unlabelled_batch(self) -> UnlabelledViews:
        """The teacher's pseudo-labels of ``unlabelled_batch`` slices and their CutMix view."""
        cfg = self.cfg
        x_u = self._intensity_view(shard(self.rng.integers(0, len(self.ux), cfg.unlabelled_batch), self.info), geometric=True)
        with torch.no_grad():
            probs = torch.softmax(self.teacher(x_u, reconstruct=False).logits, dim=1)
            conf, pseudo = probs.max(1)
            weight = (conf >= cfg.confidence_threshold).float()
        perm = torch.as_tensor(self.rng.permutation(len(x_u)), device=self.device)
        masks = cutmix_boxes(len(x_u), x_u.shape[-1], self.rng).to(self.device)
        x_a, y_a = cutmix(self._strong_view(x_u) if self.strong is not None else x_u, pseudo, masks, perm)
        w_a = torch.where(masks[:, 0].bool(), weight[perm], weight)
        return UnlabelledViews(x_u, pseudo, weight, x_a, y_a, w_a)

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        self.student.train()
        x_l, y_l = self._labelled()
        unlabelled, align, ramp = None, None, 0.0
        lambda_a = alignment_weight(self.iteration, cfg)
        if self.iteration >= cfg.warmup_supervised and len(self.ux):
            unlabelled = self.unlabelled_batch()
            ramp = rampup_weight(self.iteration, cfg.warmup_supervised, cfg.rampup)
            if self.fm is not None and len(self.fm) and self.student.pfa is not None:
                align = self.alignment_batch()
        total, losses = self.step_loss(x_l, y_l, unlabelled, align, ramp, lambda_a)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        # Tarvainen & Valpola's ramp: the teacher tracks the student closely at first, so
        # short CPU runs do not keep a teacher that is mostly its random initialisation
        ema_update(self.teacher, self.student, min(cfg.ema_decay, 1.0 - 1.0 / (self.iteration + 1)))
        self.iteration += 1
        losses["total"] = total
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}

    def run(self, on_step: Callable[[int, int, dict], None] | None = None, check_cancel: Callable[[], None] | None = None) -> None:
        while self.iteration < self.cfg.iterations:
            if check_cancel is not None:
                check_cancel()
            losses = self.step()
            if on_step is not None:
                on_step(self.iteration, self.cfg.iterations, losses)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch: int = 16, model: nn.Module | None = None) -> np.ndarray:
        """Argmax slices of the teacher (the EMA model is the one that is kept)."""
        net = (model or self.teacher).eval()
        out = []
        for start in range(0, len(images), batch):
            logits = net(torch.as_tensor(images[start : start + batch], device=self.device), reconstruct=False).logits
            out.append(logits.argmax(1).cpu().numpy().astype(np.uint8))
        return np.concatenate(out)
