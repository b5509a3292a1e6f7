"""``vqmedseg train --workspace WS --method vqseg``: VQ-Seg on a workspace, as a job.

The labelled slices are the workspace's annotated slices; every other slice of every
case is unlabelled data. The job emits loss, utilisation and perplexity events,
checkpoints student, teacher, optimiser and iteration every ``checkpoint_interval``
iterations (atomically) and resumes from there; the finished model (the EMA teacher) is
recorded only when training completes.

Under ``torchrun`` every rank builds the same pool and trains on its share of each batch
(see :mod:`.vqseg`); only rank 0 writes checkpoints, events and the model, and every
rank resumes from rank 0's last checkpoint.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import VQSegConfig
from ..errors import InputError
from ..jobs.checkpoints import load_resume_checkpoint, save_checkpoint
from ..jobs.runner import JobContext
from ..jobs.workspace import Workspace
from ..models.qpm import qpm_kl
from .distributed import DistInfo, barrier, cancel_check, current
from .slices import labelled_signature
from .vqseg import VQSegTrainer, foundation_features

METHOD = "vqseg"
CHECKPOINT_INTERVAL = 50


def train_vqseg(ctx: JobContext, ws: Workspace, config: VQSegConfig, device: torch.device,
                dist_info: DistInfo | None = None) -> dict:
    """Train (or resume) VQ-Seg; returns the recorded model entry (``{}`` on ranks other
    than 0 under torchrun)."""
    from ..active_learning.rounds import workspace_pool

    info = dist_info or current()
    if config.validation_cases:  # from a --config file; the command line refuses the option itself
        raise InputError(f"config key 'validation_cases' {config.validation_cases}: not used by VQ-Seg in a workspace, which "
                         "trains on every annotated slice; remove it, or leave those cases unannotated to hold them out")

    pool, labelled = workspace_pool(ws, config.slice_size, config.seed)
    if not labelled:
        raise InputError(f"workspace {ws.root}: no labelled slice yet; annotate some slices first")
    lab = np.array(sorted(labelled), dtype=np.int64)
    unl = np.setdiff1d(np.arange(len(pool)), lab)
    fm, fm_channels, fm_rows = None, 0, None
    check = cancel_check(ctx, info)
    if config.use_pfa and config.foundation != "none":
        from ..models.foundation import build_foundation

        rows = unl if not config.pfa_slices or config.pfa_slices >= len(unl) else np.sort(
            np.random.default_rng(config.seed).choice(unl, config.pfa_slices, replace=False))
        ctx.progress(0, len(rows), "foundation features", force=True)

        def features_done(done: int, total: int) -> None:
            ctx.progress(done, total, "foundation features")
            check()  # a cancel need not wait for every slice's features

        fm = foundation_features(build_foundation(config.foundation), pool.ct[rows], config.pfa_grid, progress=features_done)
        fm_channels, fm_rows = fm.shape[1], np.searchsorted(unl, rows)
    elif config.use_pfa:
        ctx.warn("PFA is off: no foundation model (foundation 'none')")
    trainer = VQSegTrainer(config, pool.ct[lab], pool.labels[lab], pool.ct[unl], fm, fm_channels, device, fm_slices=fm_rows,
                           dist_info=info)
    signature = labelled_signature(ws.labelled_slices())
    last = ws.checkpoint_dir(METHOD) / "last.pt"
    if last.exists():
        ckpt = load_resume_checkpoint(last, methods=(METHOD,), map_location=device)
        if ckpt.get("config") == config.to_json() and ckpt.get("labelled_signature") == signature:
            trainer.student.load_state_dict(ckpt["state_dict"])
            trainer.teacher.load_state_dict(ckpt["teacher_state_dict"])
            trainer.optimizer.load_state_dict(ckpt["optimizer"])
            trainer.scheduler.load_state_dict(ckpt["scheduler"])
            trainer.iteration = int(ckpt["iteration"])
            trainer.rng = trainer.sampler.rng = np.random.default_rng([config.seed, trainer.iteration])
            ctx.emit("resumed", iteration=trainer.iteration)
        else:
            ctx.warn("found a VQ-Seg checkpoint from another configuration or labelled set; starting afresh")
    ctx.emit("info", method=METHOD, processes=info.world, labelled_slices=int(len(lab)), unlabelled_slices=int(len(unl)), device=str(device),
             qpm_kl=qpm_kl(trainer.student.quantizer.codebook(), config.epsilon) if config.use_qpm else None)

    def spec() -> dict:
        return {"kind": "vqseg2d", "config": config.to_json(), "fm_channels": fm_channels}

    def on_step(it: int, total: int, losses: dict) -> None:
        if it % 10 == 0 or it == total:
            ctx.emit("loss", iteration=it, **losses)
        ctx.progress(it, total, "vqseg", loss=losses["total"])
        if it % CHECKPOINT_INTERVAL == 0 and it < total and info.is_main:  # written once, by rank 0
            save_checkpoint(last, {
                "method": METHOD, "model": spec(), "state_dict": trainer.student.state_dict(),
                "teacher_state_dict": trainer.teacher.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(), "iteration": it, "config": config.to_json(),
                "labelled_signature": signature,
            })
            ctx.emit("checkpoint", iteration=it)

    t0 = time.monotonic()
    trainer.run(on_step=on_step, check_cancel=check)
    if not info.is_main:
        barrier(info)
        return {}
    model_id = f"{METHOD}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = ws.root / "models" / f"{model_id}.pt"
    save_checkpoint(path, {
        "method": METHOD, "model": spec(), "state_dict": trainer.teacher.state_dict(), "config": config.to_json(),
        "task": ws.task, "preprocessing": {"slice_size": config.slice_size, "modality": "CT"},
        "labelled_signature": signature,
    })
    entry = ws.record_model(model_id, path, METHOD, labelled=int(len(lab)), unlabelled=int(len(unl)), seconds=time.monotonic() - t0)
    last.unlink(missing_ok=True)
    ctx.emit("result", kind="train", method=METHOD, model=entry["path"], model_id=model_id)
    barrier(info)
    return entry
