"""Prediction on a whole volume: slices in, label and uncertainty maps out, on the input grid.

The label of a task whose target is one connected piece (the liver) keeps only its
largest connected component (:mod:`.postprocess`), judged on the model's slice grid; the
probability map (``Prediction.probability()``, made on request) is the one behind that
label, and the uncertainty maps stay the model's own, so a piece removed from the label
still shows in them.

Uncertainty maps:

* ``entropy`` (every model): predictive entropy of the softmax, in nats.
* ``qpm`` (VQ-Seg models): the QPM perturbation uncertainty. Each of ``QPM_DECODINGS``
  decodings re-draws the bottleneck codes with QPM at the trained strength; the map is
  the fraction of decodings whose label differs from the unperturbed prediction: 0 where
  the answer does not depend on which nearby codes encode the image, up to 1 where it
  flips. The draws come from a generator seeded with ``QPM_SEED``, so the same model on
  the same volume gives the same map every time (and the global RNG is left alone). It perturbs within the learned codebook, so it asks "would a similar-looking
  image be segmented differently?" rather than "is this network unsure?".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..data.preprocessing import SlicePlan, extract_ct_slices, plan_slices, slices_to_volume
from ..data.volume import Volume
from ..errors import InputError
from ..jobs.checkpoints import load_checkpoint
from ..models.unet import build_from_spec
from ..tasks import get_task
from ..uncertainty.entropy import binary_entropy
from .postprocess import LARGEST_COMPONENT, keep_largest_component

log = logging.getLogger("vqmedseg")

SUPPORTED_METHODS = ("supervised", "begal", "vqseg")
QPM_DECODINGS = 8
QPM_SEED = 0


@dataclass
class Prediction:
    label: Volume  # uint8, 1 = target, on the CT grid
    uncertainty: dict[str, Volume]  # name -> float32 map (nats for "entropy")
    target_slices: np.ndarray  # [S, 1, size, size] target probability on the model's slices, after the clean-up
    plan: SlicePlan  # how those slices map onto the CT grid

    def probability(self) -> Volume:
        """The target probability behind the label, on the CT grid (float32).

        Made on request (4 bytes per voxel): ``label`` is exactly ``probability() > 0.5``.
        """
        return self.label.with_array(slices_to_volume(self.target_slices, self.plan)[0], kind="probability")


def _build(spec: dict) -> torch.nn.Module:
    if spec.get("kind") == "vqseg2d":
        from ..config import VQSegConfig
        from ..training.vqseg import build_vqseg

        return build_vqseg(VQSegConfig.from_json(spec["config"], source="checkpoint configuration"), int(spec.get("fm_channels", 0)))
    if spec.get("kind") == "vqbegal2d":
        from ..config import BEGALConfig
        from ..training.begal import build_model

        return build_model(BEGALConfig.from_json(spec["config"], source="checkpoint configuration"))
    return build_from_spec(spec)


def load_model(path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    ckpt = load_checkpoint(path, methods=SUPPORTED_METHODS, map_location=device)
    model = _build(ckpt["model"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"checkpoint {path}: weights do not fit the recorded model ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    return model, ckpt


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    ckpt: dict,
    ct: Volume,
    device: torch.device,
    mr: Volume | None = None,
    batch_size: int = 16,
    progress=None,
    largest_component: bool | None = None,
) -> Prediction:
    """Segment ``ct`` slice by slice; probabilities are mapped back before the argmax.

    The supervised baseline is CT-only and ignores ``mr`` (logged). A VQ-BEGAL model
    pairs each CT slice with the MR slice at the same relative position in the body, or
    runs CT-only when ``mr`` is ``None`` (see :mod:`VQMedSegLib.models.begal`).
    ``largest_component`` keeps only the label's largest connected component; ``None``
    (the default) does so when the task's target is one piece (``Task.single_component``).
    """
    task = get_task(ckpt.get("task", "liver"))
    size = int(ckpt.get("preprocessing", {}).get("slice_size") or ckpt["config"]["slice_size"])
    plan = plan_slices(ct, size)
    begal = ckpt["model"].get("kind") == "vqbegal2d"
    if begal:
        from ..active_learning.pool import CaseInput, build_pool

        pool = build_pool([CaseInput("input", ct, None, mr)], size, task.ct_window)
    else:
        if mr is not None:
            log.info("the %s model is CT-only; the MR is not used", ckpt["method"])
        slices = extract_ct_slices(ct, plan, task.ct_window)
    vqseg = ckpt["model"].get("kind") == "vqseg2d"
    probs = np.empty((plan.n_slices, 2, size, size), np.float32)
    disagreement = np.zeros((plan.n_slices, 1, size, size), np.float32) if vqseg else None
    draws = torch.Generator(device=device).manual_seed(QPM_SEED) if vqseg else None
    for start in range(0, plan.n_slices, batch_size):
        if vqseg:
            x = torch.as_tensor(slices[start : start + batch_size, None], device=device)
            logits = model(x, perturb=False, reconstruct=False).logits
            label = logits.argmax(1)
            for _ in range(QPM_DECODINGS):
                moved = model(x, perturb=True, reconstruct=False, generator=draws).logits.argmax(1)
                disagreement[start : start + batch_size, 0] += (moved != label).float().cpu().numpy() / QPM_DECODINGS
        elif begal:
            logits = model(*pool.tensors(np.arange(start, min(start + batch_size, plan.n_slices)), device)).logits
        else:
            logits = model(torch.as_tensor(slices[start : start + batch_size, None], device=device))
        probs[start : start + batch_size] = torch.softmax(logits, dim=1).float().cpu().numpy()
        if progress is not None:
            progress(min(start + batch_size, plan.n_slices), plan.n_slices)
    # Two classes: only the target's probability is mapped back (bilinear resizing keeps
    # p0 + p1 = 1, so p1 > p0 exactly where p1 > 0.5), and thresholded on the way, so the
    # full-resolution probability is never held (see Prediction.probability). The entropy
    # is computed on the model's slices and resampled, as the QPM map is: the
    # full-resolution grid then costs one resize instead of two passes of logarithms.
    entropy_slices = binary_entropy(probs[:, 1:2])
    if task.single_component if largest_component is None else largest_component:
        # judged on the model's slice grid, 1/16 of a 512 x 512 CT's voxels: the target
        # probability of every other piece is set to 0 before the mapping, so the mapped
        # label holds the kept piece alone (a bilinear stencil spans two pieces only where
        # they touch at a corner, and there the kept piece's edge moves by a voxel at most)
        target_slices = probs[:, 1]
        found = (target_slices > 0.5).view(np.uint8)
        target_slices[(found > keep_largest_component(found, [1]))] = 0.0
        postprocessing = LARGEST_COMPONENT
    else:
        postprocessing = "none"
    target_slices = np.ascontiguousarray(probs[:, 1:2])
    del probs
    label = slices_to_volume(target_slices, plan, threshold=0.5)[0]  # [K, J, I] uint8
    entropy = slices_to_volume(entropy_slices, plan)[0]
    meta = {"task": task.name, "method": ckpt["method"]}
    maps = {"entropy": ct.with_array(entropy, **meta, kind="uncertainty", units="nats")}
    if disagreement is not None:
        qpm_map = np.clip(slices_to_volume(disagreement, plan)[0], 0.0, 1.0).astype(np.float32)
        maps["qpm"] = ct.with_array(qpm_map, **meta, kind="uncertainty", units="fraction of QPM decodings")
    return Prediction(
        label=ct.with_array(label, **meta, kind="label", postprocessing=postprocessing),
        uncertainty=maps,
        target_slices=target_slices,
        plan=plan,
    )
