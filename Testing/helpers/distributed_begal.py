"""Run under torchrun: VQ-BEGAL phase training (end to end, encoder phase, decoder phase)
on a phantom pool, each rank on its share of every global batch; rank 0 saves the
weights. Called in one process, the same function gives the reference.

    torchrun --standalone --nproc_per_node 2 Testing/helpers/distributed_begal.py OUT.pt [SEED [REVIVE]]

With REVIVE (a usage threshold above 1), the quantiser revives codes at every step; rank 0
also saves whether every rank ended with the same codebook.
"""

import sys

import numpy as np
import torch

from VQMedSegLib.active_learning.pool import build_pool, target_case
from VQMedSegLib.active_learning.strategies import BOTH, DECODER, ENCODER
from VQMedSegLib.config import begal_config_from_preset
from VQMedSegLib.data.phantoms import make_dataset
from VQMedSegLib.training.begal import Phase, PhaseTrainer, build_model
from VQMedSegLib.training.distributed import current, exit_without_finalization, process_group


def train_phases(seed: int = 0, iterations: int = 3, revive: float = 0.0) -> dict:
    """Weights after ``iterations`` steps of each phase; no randomness but the batch draws
    (no augmentation, no dropout, CT only), so ranks and one process see the same batches."""
    cases = make_dataset("phantom-liver", 2, seed=5, ct_shape=(12, 48, 48))
    inputs = [target_case(c.case_id, c.ct, c.ct_label) for c in cases]
    pool = build_pool(inputs, 32, (-160, 240), seed=0)
    config = begal_config_from_preset("tiny", batch_size=4, unlabelled_batch=2, augment=False, mr_dropout=0.0,
                                      decoder_dropout=0.0, seed=seed)
    torch.manual_seed(seed)
    model = build_model(config)
    if revive:
        model.quantizer.dead_threshold = revive
    trainer = PhaseTrainer(model, config, pool, torch.device("cpu"), seed=seed, dist_info=current())
    every = np.arange(0, len(pool), 2)
    purposes = {int(i): (ENCODER, DECODER, BOTH)[k % 3] for k, i in enumerate(every)}
    enc = np.array([i for i, p in purposes.items() if p != DECODER])
    dec = np.array([i for i, p in purposes.items() if p != ENCODER])
    phases = [Phase("initial", iterations, "all", every), Phase("encoder", iterations, "encoder", enc),
              Phase("decoder", iterations, "decoder", dec)]
    # DDP copies rank 0's weights when each phase wraps the model: end with a phase that
    # revives codes, so a codebook that drifted apart would still differ at the end
    trainer.run(phases[:2] if revive else phases)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    revive = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    with process_group(torch.device("cpu")) as (info, _):
        state = train_phases(seed, revive=revive)
        codebooks = [None] * info.world
        torch.distributed.all_gather_object(codebooks, state["quantizer.codebook"])
    if info.is_main:
        same = all(torch.equal(c, codebooks[0]) for c in codebooks)
        torch.save({"state_dict": state, "world": info.world, "codebooks_equal": same}, sys.argv[1])
    exit_without_finalization(0)  # as `python -m VQMedSegLib` does under torchrun
