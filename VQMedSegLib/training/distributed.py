"""Multi-process training with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node N -m VQMedSegLib train --workspace WS ...`` starts N copies
of the command; :func:`from_environment` reads the ranks torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the process group: NCCL with one GPU
per process when CUDA is present, Gloo on CPU. Nothing here runs in a single-process job.

The conventions every distributed code path follows:

* **One global batch.** Every rank draws the same global batch (same seeded sampler) and
  trains on its share ``batch[rank::world]``; DistributedDataParallel averages the
  gradients, so a step equals a single-process step on the whole batch.
* **Rank 0 writes.** Only rank 0 holds the workspace lock, emits events, and writes
  checkpoints and models; the others run with a :class:`FollowerContext`.
* **Everyone stops together.** A cancel seen by rank 0 is broadcast every step.
* **Resume.** Every rank reads the same last checkpoint.
* **Pool scoring** is sharded (:func:`shard`) and gathered (:func:`gather_scores`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..errors import JobCancelled


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def from_environment(device: torch.device | None = None) -> tuple[DistInfo, torch.device | None]:
    """Join torchrun's process group if ``WORLD_SIZE`` > 1; returns the ranks and the
    device this rank should use (its own GPU under CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info, device


@contextmanager
def process_group(device: torch.device | None = None):
    """:func:`from_environment`, then leave the process group on the way out.

    A process that exits while still in a Gloo group can be aborted by the C++ runtime
    ("terminate called without an active exception") as the group's threads are torn
    down at interpreter exit; leaving it explicitly avoids that. After work that ended
    well the ranks first meet at a barrier, so that none tears its connections down while
    another is still in its last collective (the abort was seen once more, in one rank of a
    2-process test run that left the group without a barrier; when in the run it happened
    is not known). After an error there is no barrier: the other ranks may never reach it,
    and torchrun stops them."""
    info, device = from_environment(device)
    try:
        yield info, device
        if info.enabled and dist.is_initialized():
            dist.barrier()
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def exit_without_finalization(code: int) -> None:
    """End a torchrun rank at once, after its work is done and it has left the process group.

    A rank on Gloo could be aborted by the C++ runtime after its work had ended well
    ("terminate called without an active exception", SIGABRT), and torchrun then reported
    the run as failed. It happened in 2 of 64 runs of a 2-process CPU job (the VQ-BEGAL
    phases of the tests), after every ``atexit`` handler had run: in the interpreter's
    finalization, where some owner of a still-running Gloo thread is destroyed. With this
    exit, 0 of 99 runs. ``os._exit`` skips that finalization once logging and the standard
    streams are flushed; every file the job wrote is already whole (written to a temporary
    name and renamed)."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def current() -> DistInfo:
    """The ranks of the initialised process group (a single process otherwise)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def shard(items: np.ndarray, info: DistInfo | None = None) -> np.ndarray:
    """This rank's share of ``items``: every ``world``-th item from ``rank``."""
    info = info or current()
    return items[info.rank :: info.world] if info.enabled else items


def gather_scores(local: np.ndarray, n: int, info: DistInfo | None = None) -> np.ndarray:
    """Reassemble per-item results computed on :func:`shard` shares into the original order."""
    info = info or current()
    if not info.enabled:
        return local
    parts: list = [None] * info.world
    dist.all_gather_object(parts, np.asarray(local))
    out = np.empty((n, *np.asarray(local).shape[1:]), dtype=np.asarray(local).dtype)
    for rank, part in enumerate(parts):
        out[rank::info.world] = part
    return out


def stop_together(cancel_requested: bool, info: DistInfo) -> None:
    """Raise :class:`JobCancelled` on every rank when rank 0 saw a cancel request."""
    if not info.enabled:
        if cancel_requested:
            raise JobCancelled("cancel requested")
        return
    flag = torch.tensor([1 if (info.is_main and cancel_requested) else 0])
    dist.broadcast(flag, src=0)
    if int(flag.item()):
        raise JobCancelled("cancel requested" + ("" if info.is_main else " (by rank 0)"))


def cancel_check(ctx, info: DistInfo) -> Callable[[], None]:
    """A job's between-steps cancel check: ``ctx.check_cancel`` in one process; under
    torchrun, rank 0's answer on every rank (:func:`stop_together`)."""
    if not info.enabled:
        return ctx.check_cancel
    return lambda: stop_together(ctx.cancel_requested(), info)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class FollowerContext:
    """The job context of ranks other than 0: no lock, no events, no files."""

    def __init__(self, workspace, kind: str, info: DistInfo):
        self.workspace, self.kind, self.info = workspace, kind, info
        self.job_id = os.environ.get("VQMEDSEG_JOB_ID", f"{kind}-rank{info.rank}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def cancel_requested(self) -> bool:
        return False

    def check_cancel(self) -> None:
        pass

    def emit(self, type: str, **fields) -> dict:
        return {}

    def progress(self, *args, **kwargs) -> None:
        pass

    def warn(self, message: str) -> None:
        pass
