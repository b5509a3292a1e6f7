"""Run under torchrun: score a phantom pool with VQ-BEGAL's modality uncertainty, sharded
across the ranks; rank 0 saves the gathered scores and each rank's share size.

    torchrun --standalone --nproc_per_node 2 Testing/helpers/distributed_scoring.py OUT.npz
"""

import sys

import numpy as np
import torch

from VQMedSegLib.active_learning.pool import CaseInput, build_pool
from VQMedSegLib.active_learning.strategies import modality_scores
from VQMedSegLib.config import begal_config_from_preset
from VQMedSegLib.data.phantoms import make_dataset
from VQMedSegLib.tasks import get_task
from VQMedSegLib.training.begal import build_model
from VQMedSegLib.training.distributed import current, exit_without_finalization, gather_scores, process_group, shard


def scores_and_shares():
    cases = make_dataset("phantom-liver", 2, seed=5, ct_shape=(12, 48, 48))
    pool = build_pool([CaseInput(c.case_id, c.ct, None, c.mr) for c in cases], 32, get_task("liver").ct_window)
    torch.manual_seed(0)
    model = build_model(begal_config_from_preset("tiny")).eval()
    idx = np.arange(len(pool))[::-1].copy()  # any order: the result follows idx
    scores = modality_scores(model, pool, idx, torch.device("cpu"), batch=5)
    info = current()
    shares = gather_scores(np.array([len(shard(idx, info))]), info.world, info)
    return idx, scores, shares


if __name__ == "__main__":
    with process_group(torch.device("cpu")) as (info, _):
        idx, scores, shares = scores_and_shares()
    if info.is_main:
        np.savez(sys.argv[1], idx=idx, scores=scores, shares=shares, world=info.world)
    exit_without_finalization(0)  # as `python -m VQMedSegLib` does under torchrun
