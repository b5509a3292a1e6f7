"""Semi-supervised experiments (``vqmedseg ssl``): supervised-only against VQ-Seg and its
ablations, at a fraction of labelled training slices, over seeds.

Splits are by case (patient): no case is in both training and test. Within the training
cases, ``labeled_fraction`` of the slices (at least one) are labelled at random, the rest
are the unlabelled pool. Scores are 3-D, on each test case's original grid: the model's
slice probabilities are mapped back (:func:`slices_to_volume`) before the argmax, then
Dice and HD95 (millimetres when the spacing is known, else voxels) come from
:mod:`VQMedSegLib.metrics.segmentation`.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.losses import DiceLoss

from .. import __version__
from ..config import VQSegConfig
from ..data.preprocessing import extract_label_slices, extract_slices, normalize, plan_slices, slices_to_volume
from ..data.volume import Volume
from ..errors import InputError
from ..files import atomic_write_json, atomic_write_text
from ..metrics.segmentation import score_volumes, summarize
from ..models.unet_parts import UNetDecoder, UNetEncoder
from .vqseg import VQSegTrainer, foundation_features, labelled_loss

log = logging.getLogger("vqmedseg")

METHODS = {
    "supervised": {},
    "vqseg": {},
    "vqseg-noqpm": {"use_qpm": False},
    "vqseg-nodb": {"use_reconstruction": False},
    "vqseg-nopfa": {"use_pfa": False},
    "vqseg-dropout": {"perturbation": "dropout"},
}


@dataclass
class Case:
    case_id: str
    image: Volume
    label: Volume  # binary target on the image grid
    modality: str


def load_cases(dataset: str) -> tuple[list[Case], str]:
    """Cases with a binary target for the named datasets or a folder."""
    if dataset in ("phantom-liver", "phantom-lung"):
        from ..data.phantoms import make_dataset

        cases = make_dataset(dataset, 8, seed=2000)
        return [Case(c.case_id, c.ct, c.ct_label.with_array((c.ct_label.array == 1).astype(np.uint8)), "CT") for c in cases], (
            "liver" if dataset == "phantom-liver" else "lung tumour"
        )
    from ..data.datasets import discover_cases, load_case
    from ..data.paths import shared_data_dir

    if dataset in ("acdc", "chaos-mr"):
        root = shared_data_dir()
        if root is None:
            raise InputError(f"--dataset {dataset}: real scans not found; set VQMEDSEG_DATA or place them in ../shared/data")
        path = root / ("acdc" if dataset == "acdc" else "chaos_mr_t2")
        target = "left ventricle (label 3)" if dataset == "acdc" else "liver (label 1)"
        value = 3 if dataset == "acdc" else 1
    else:
        path, target, value = Path(dataset), "label 1", 1
        if not path.exists():
            raise InputError(f"--dataset {dataset!r}: expected phantom-liver, phantom-lung, acdc, chaos-mr or a dataset folder")
    out = []
    for ref in discover_cases(path):
        image, label = load_case(ref)
        if label is None:
            continue
        out.append(Case(ref.case_id, image, label.with_array((label.array == value).astype(np.uint8)), ref.modality))
    return out, target


def patient_of(case_id: str) -> str:
    """ACDC frames of one patient share a patient: ``patient001_frame01`` -> ``patient001``."""
    return case_id.split("_frame")[0]


def split_by_patient(cases: list[Case], test_share: float = 0.25) -> tuple[list[Case], list[Case]]:
    """The last quarter of the patients (in sorted order) is the test set; never a patient on both sides."""
    patients = sorted({patient_of(c.case_id) for c in cases})
    n_test = max(1, int(round(test_share * len(patients))))
    test = set(patients[-n_test:])
    return [c for c in cases if patient_of(c.case_id) not in test], [c for c in cases if patient_of(c.case_id) in test]


class SupervisedNet(nn.Module):
    """The same U-Net backbone without VQ (the ``supervised`` row)."""

    def __init__(self, features):
        super().__init__()
        self.encoder = UNetEncoder(1, features)
        self.decoder = UNetDecoder(features, 2)

    def forward(self, x):
        f = self.encoder(x)
        return self.decoder(f[4], f[:4])


def _slices(case: Case, size: int):
    plan = plan_slices(case.image, size)
    modality = "CT" if case.modality == "CT" else "MR"
    x = extract_slices(case.image, plan, values=normalize(case.image, modality, (-160.0, 240.0)))[:, None]
    y = (extract_label_slices(case.label, plan) > 0).astype(np.int64)
    return plan, x, y


def _evaluate(predict_probs, cases: list[Case], size: int):
    scores = []
    for case in cases:
        plan, x, _ = _slices(case, size)
        probs = predict_probs(x)
        on_grid = slices_to_volume(probs, plan)
        pred = case.image.with_array((on_grid[1] > on_grid[0]).astype(np.uint8))
        scores.append(score_volumes(pred, case.label))
    return scores


def run_ssl(
    dataset: str,
    labeled_fraction: float,
    methods: list[str],
    seeds: list[int],
    config: VQSegConfig,
    out: Path,
    device: torch.device,
    preset: str = "custom",
) -> dict:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
    if not 0 < labeled_fraction <= 1:
        raise InputError(f"--labeled-fraction {labeled_fraction}: expected a value in (0, 1]")
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    cases, target = load_cases(dataset)
    if len(cases) < 3:
        raise InputError(f"--dataset {dataset}: found {len(cases)} labelled cases, expected at least 3")
    train_cases, test_cases = split_by_patient(cases)
    size = config.slice_size
    xs, ys = [], []
    for c in train_cases:
        _, x, y = _slices(c, size)
        xs.append(x)
        ys.append(y)
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)

    foundation, fm_all, fm_channels = None, None, 0
    fm_rows = np.arange(len(x_all))
    if any(m != "supervised" and METHODS[m].get("use_pfa", config.use_pfa) for m in methods) and config.foundation != "none":
        from ..models.foundation import build_foundation

        foundation = build_foundation(config.foundation)
        t = time.monotonic()
        if config.pfa_slices and config.pfa_slices < len(x_all):
            fm_rows = np.sort(np.random.default_rng(12345).choice(len(x_all), config.pfa_slices, replace=False))
        fm_all = foundation_features(foundation, x_all[fm_rows], config.pfa_grid)
        fm_channels = fm_all.shape[1]
        log.info("foundation features of %d slices in %.0f s", len(fm_rows), time.monotonic() - t)
    elif any(m != "supervised" for m in methods) and config.use_pfa:
        log.warning("PFA is off: no foundation model (--foundation none)")

    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        n_lab = max(1, int(round(labeled_fraction * len(x_all))))
        lab = np.sort(rng.choice(len(x_all), n_lab, replace=False))
        unl = np.setdiff1d(np.arange(len(x_all)), lab)
        for method in methods:
            t = time.monotonic()
            cfg = config.replace(seed=seed, **METHODS.get(method, {}))
            if method == "supervised":
                predict = _train_supervised(cfg, x_all[lab], y_all[lab], device)
            else:
                use_fm = fm_all is not None and cfg.use_pfa
                # foundation features of the unlabelled slices that have them
                in_unl = np.isin(fm_rows, unl)
                position = np.searchsorted(unl, fm_rows[in_unl])
                trainer = VQSegTrainer(cfg, x_all[lab], y_all[lab], x_all[unl], fm_all[in_unl] if use_fm else None,
                                       fm_channels if use_fm else 0, device, fm_slices=position)
                trainer.run()
                net = trainer.teacher.eval()

                @torch.no_grad()
                def predict(x, net=net):
                    return np.concatenate([torch.softmax(net(torch.as_tensor(x[i : i + 16], device=device), reconstruct=False).logits, 1).cpu().numpy()
                                           for i in range(0, len(x), 16)])
            scores = _evaluate(predict, test_cases, size)
            s = summarize(scores)
            per_method[method].append({"seed": seed, **s, "seconds": time.monotonic() - t})
            log.info("%s seed %d: Dice %.4f", method, seed, s["dice_mean"])

    results = {}
    for method, runs in per_method.items():
        dice = np.array([r["dice_mean"] for r in runs])
        hd_key = "hd95_mm_mean" if runs[0]["units"] == "mm" else "hd95_vox_mean"
        hd = np.array([r[hd_key] for r in runs if r[hd_key] is not None], dtype=float)
        results[method] = {
            "labeled_fraction": labeled_fraction,
            "dice_mean": float(dice.mean()),
            "dice_std": float(dice.std()),
            "hd95_mm_mean": float(hd.mean()) if (len(hd) and runs[0]["units"] == "mm") else None,
            "hd95_mean": float(hd.mean()) if len(hd) else None,
            "hd95_units": runs[0]["units"],
            "per_seed": runs,
        }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", _table(results, dataset, target, labeled_fraction, seeds, preset, len(train_cases), len(test_cases)))
    atomic_write_json(out / "run.json", {
        "dataset": dataset, "target": target, "methods": methods, "seeds": seeds, "preset": preset,
        "config": config.to_json(), "train_cases": [c.case_id for c in train_cases], "test_cases": [c.case_id for c in test_cases],
        "train_slices": int(len(x_all)), "seconds": time.monotonic() - t0, "device": str(device),
        "versions": {"vqmedseg": __version__, "torch": torch.__version__, "python": platform.python_version()},
    })
    return results


def _train_supervised(cfg: VQSegConfig, x: np.ndarray, y: np.ndarray, device):
    from .slices import SliceSet
    from .supervised import BatchSampler, augmentation, make_batch

    torch.manual_seed(cfg.seed)
    net = SupervisedNet(tuple(cfg.features)).to(device)
    # the same optimiser, learning rates and labelled loss as the VQ-Seg student
    opt = torch.optim.AdamW(
        [{"params": net.encoder.parameters(), "lr": cfg.backbone_lr},
         {"params": net.decoder.parameters(), "lr": cfg.backbone_lr * cfg.head_lr_factor}],
        weight_decay=cfg.weight_decay,
    )
    dice = DiceLoss(to_onehot_y=True, softmax=True, batch=True)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=cfg.iterations, power=cfg.poly_power)
    aug = augmentation(cfg.seed)
    sampler = BatchSampler(SliceSet(x, y), cfg.labelled_batch, cfg.foreground_fraction, np.random.default_rng(cfg.seed))
    for _ in range(cfg.iterations):
        xb, yb = make_batch(sampler.data, sampler.indices(), aug)
        loss = labelled_loss(net(xb.to(device)), yb[:, 0].to(device), dice, cfg.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()

    @torch.no_grad()
    def predict(xs):
        return np.concatenate([torch.softmax(net(torch.as_tensor(xs[i : i + 16], device=device)), 1).cpu().numpy() for i in range(0, len(xs), 16)])

    return predict


def _table(results, dataset, target, fraction, seeds, preset, n_train, n_test) -> str:
    lines = [
        f"# Semi-supervised segmentation on `{dataset}` ({target})",
        "",
        f"{n_train} training and {n_test} test cases (split by case); {100 * fraction:.0f}% of the training slices labelled; "
        f"preset `{preset}`; seeds {seeds}. 3-D scores on the original grids, mean ± std over seeds.",
        "",
        "| method | Dice (%) | HD95 |",
        "|---|---|---|",
    ]
    for m, r in results.items():
        hd = "n/a" if r["hd95_mean"] is None else f"{r['hd95_mean']:.2f} {'mm' if r['hd95_units'] == 'mm' else 'voxels'}"
        lines.append(f"| {m} | {100 * r['dice_mean']:.2f} ± {100 * r['dice_std']:.2f} | {hd} |")
    return "\n".join(lines) + "\n"
