"""Supervised training of the 2-D U-Net baseline on the labelled slices of a workspace.

Resumable: every ``checkpoint_interval`` iterations the model, optimiser, scheduler,
iteration and random states go to ``checkpoints/supervised/last.pt`` (atomically). A
restarted job continues from there if the configuration and the labelled set are the
same, so a kill costs at most one checkpoint interval. The finished model goes to
``models/`` and is recorded in ``state.json`` only when training completed; a cancelled
or crashed run never looks finished.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from .. import _monai  # noqa: F401  (before MONAI; see _monai.py)
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandAffined, RandGaussianNoised, RandScaleIntensityd, RandShiftIntensityd

from ..config import TrainConfig
from ..errors import InputError
from ..jobs.checkpoints import load_resume_checkpoint, save_checkpoint
from ..jobs.runner import JobContext
from ..jobs.workspace import Workspace
from ..models.unet import build_from_spec, model_spec
from .distributed import DistInfo, barrier, cancel_check, shard
from .distributed import current as current_dist
from .slices import SliceSet, labelled_signature, load_labelled_slices

METHOD = "supervised"


# mild rotation, scaling and translation (no left-right flips: anatomy is not symmetric)
AFFINE = {"prob": 0.7, "rotate_range": (0.2,), "scale_range": (0.12, 0.12), "translate_range": (8, 8), "padding_mode": "zeros"}


def augmentation(seed: int) -> Compose:
    """Mild geometric and intensity augmentation of labelled slices (:data:`AFFINE`)."""
    t = Compose(
        [
            RandAffined(keys=("image", "label"), mode=("bilinear", "nearest"), **AFFINE),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.3),
            RandGaussianNoised(keys="image", std=0.02, prob=0.3),
        ]
    )
    t.set_random_state(seed=seed)
    return t


class BatchSampler:
    """Random batches with a guaranteed share of slices that contain the target."""

    def __init__(self, data: SliceSet, batch_size: int, foreground_fraction: float, rng: np.random.Generator):
        self.data = data
        self.batch_size = batch_size
        self.fg = data.foreground_indices()
        self.fraction = foreground_fraction if len(self.fg) else 0.0
        self.rng = rng

    def indices(self) -> np.ndarray:
        n_fg = int(round(self.batch_size * self.fraction))
        picks = [self.rng.choice(self.fg, n_fg)] if n_fg else []
        picks.append(self.rng.integers(0, len(self.data), self.batch_size - n_fg))
        return np.concatenate(picks)


def make_batch(data: SliceSet, idx: np.ndarray, transform: Compose | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for i in idx:
        item = {"image": data.images[i], "label": data.labels[i][None].astype(np.float32)}
        if transform is not None:
            item = transform(item)
        images.append(torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32))
        labels.append(torch.as_tensor(np.asarray(item["label"])).round().long())
    return torch.stack(images), torch.stack(labels)


@torch.no_grad()
def validation_dice(model: torch.nn.Module, data: SliceSet, device: torch.device, batch: int = 16) -> float:
    """Dice of the target over all validation slices pooled (a 2-D proxy of the 3-D score)."""
    model.eval()
    inter = total = 0.0
    for start in range(0, len(data), batch):
        x = torch.as_tensor(data.images[start : start + batch], device=device)
        pred = model(x).argmax(1).cpu().numpy().astype(bool)
        ref = data.labels[start : start + batch].astype(bool)
        inter += float((pred & ref).sum())
        total += float(pred.sum() + ref.sum())
    model.train()
    return 1.0 if total == 0 else 2 * inter / total


def train_supervised(ctx: JobContext, ws: Workspace, config: TrainConfig, device: torch.device, dist_info: DistInfo | None = None) -> dict:
    """Train (or resume) the baseline; returns the recorded model entry (``{}`` on ranks
    other than 0 under torchrun, see :mod:`.distributed`)."""
    info = dist_info or current_dist()
    torch.manual_seed(config.seed)
    train_set, val_set = load_labelled_slices(ws, config.slice_size, config.validation_cases)
    if len(train_set) == 0:
        raise InputError(f"workspace {ws.root}: every annotated case is a validation case; nothing left to train on")
    signature = labelled_signature(ws.labelled_slices())
    spec = model_spec(1, 2, config.features, config.dropout)
    model = build_from_spec(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=config.iterations, power=config.poly_power)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=False, lambda_dice=1.0, lambda_ce=1.0)
    rng = np.random.default_rng(config.seed)
    # every rank draws the same global batch (same sampler seed); augmentation streams differ per rank
    transform = augmentation(config.seed + info.rank) if config.augment else None

    ckpt_dir = ws.checkpoint_dir(METHOD)
    last_path = ckpt_dir / "last.pt"
    start_iter, best_dice, best_state, history = 0, -1.0, None, []
    if last_path.exists():
        ckpt = load_resume_checkpoint(last_path, methods=(METHOD,))
        if ckpt.get("config") == config.to_json() and ckpt.get("labelled_signature") == signature:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            start_iter = int(ckpt["iteration"])
            best_dice = float(ckpt.get("best_dice", -1.0))
            best_state = ckpt.get("best_state_dict")
            history = list(ckpt.get("history", []))
            rng = np.random.default_rng([config.seed, start_iter])
            transform = augmentation(config.seed + start_iter + info.rank) if config.augment else None
            ctx.emit("resumed", iteration=start_iter, checkpoint=str(last_path.relative_to(ws.root)))
        else:
            ctx.warn("found a checkpoint from another configuration or labelled set; starting afresh")
    sampler = BatchSampler(train_set, config.batch_size, config.foreground_fraction, rng)
    net = model
    if info.enabled:
        if config.batch_size % info.world:
            raise InputError(f"batch_size {config.batch_size}: expected a multiple of the {info.world} processes")
        from torch.nn.parallel import DistributedDataParallel

        # wrapping broadcasts rank 0's weights; every rank has loaded the same checkpoint anyway
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx.emit(
        "info",
        processes=info.world,
        method=METHOD,
        train_slices=len(train_set),
        val_slices=len(val_set),
        device=str(device),
        parameters=sum(p.numel() for p in model.parameters()),
    )

    def save(iteration: int) -> None:
        if not info.is_main:
            return  # checkpoints are written once, by rank 0
        save_checkpoint(
            last_path,
            {
                "method": METHOD,
                "model": spec,
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "iteration": iteration,
                "config": config.to_json(),
                "labelled_signature": signature,
                "best_dice": best_dice,
                "best_state_dict": best_state,
                "history": history,
                "task": ws.task,
            },
        )
        ctx.emit("checkpoint", iteration=iteration)

    model.train()
    t0 = time.monotonic()
    running = None
    check_cancel = cancel_check(ctx, info)
    for it in range(start_iter, config.iterations):
        check_cancel()
        x, y = make_batch(train_set, shard(sampler.indices(), info), transform)
        x, y = x.to(device), y.to(device)
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        running = value if running is None else 0.9 * running + 0.1 * value
        done = it + 1
        if done % 10 == 0 or done == config.iterations:
            ctx.emit("loss", iteration=done, loss=value, loss_smoothed=running, lr=scheduler.get_last_lr()[0])
        if info.is_main and len(val_set) and (done % config.val_interval == 0 or done == config.iterations):
            dice = validation_dice(model, val_set, device)
            history.append({"iteration": done, "val_dice": dice})
            ctx.emit("metric", iteration=done, val_dice=dice)
            if dice > best_dice:
                best_dice = dice
                best_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
        ctx.progress(done, config.iterations, loss=running)
        if done % config.checkpoint_interval == 0 and done < config.iterations:
            save(done)

    if not info.is_main:
        barrier(info)
        return {}
    final_state = best_state if best_state is not None else model.state_dict()
    model_id = f"{METHOD}-{time.strftime('%Y%m%d-%H%M%S')}"
    model_path = ws.root / "models" / f"{model_id}.pt"
    save_checkpoint(
        model_path,
        {
            "method": METHOD,
            "model": spec,
            "state_dict": {k: v.cpu() for k, v in final_state.items()},
            "config": config.to_json(),
            "task": ws.task,
            "preprocessing": {"slice_size": config.slice_size, "modality": "CT"},
            "labelled_signature": signature,
            "val_dice": best_dice if best_dice >= 0 else None,
        },
    )
    entry = ws.record_model(
        model_id,
        model_path,
        METHOD,
        val_dice=best_dice if best_dice >= 0 else None,
        iterations=config.iterations,
        train_slices=len(train_set),
        seconds=time.monotonic() - t0,
    )
    last_path.unlink(missing_ok=True)
    ctx.emit("result", model=entry["path"], model_id=model_id, val_dice=entry["val_dice"])
    barrier(info)
    return entry


def model_path_of(ws: Workspace, entry: dict) -> Path:
    return ws.resolve(entry["path"])
