"""Active-learning simulation with the ground truth as the oracle (``vqmedseg simulate``).

Every strategy starts from the same random initial set for a given seed, trains the same
VQ-BEGAL network, and gets the same number of slices per round; only what it selects (and,
for BEGAL, which part of the network each slice trains) differs. After each round the
model is scored on held-out test slices: 3-D Dice per test case over its slices, at the
model's resolution, averaged over cases. Results are averaged over seeds (mean, std).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import BEGALConfig
from ..errors import InputError
from ..files import atomic_files, atomic_write_json, atomic_write_text
from ..metrics.segmentation import mean_std_text, spread_words
from ..provenance import compute_environment, software_versions
from ..tasks import get_task
from ..training.begal import PhaseTrainer, build_model, case_dice, round_schedule
from .budget import Budget, slice_count
from .pool import CaseInput, SlicePool, build_pool, target_case
from .strategies import BOTH, STRATEGIES, select

log = logging.getLogger("vqmedseg")


@dataclass
class SimulationData:
    pool: SlicePool
    candidates: np.ndarray  # pool indices the strategies may select from
    test: dict[str, np.ndarray]  # test group -> pool indices
    val: dict[str, np.ndarray]
    description: str


def _groups(pool: SlicePool, cases: list[str]) -> dict[str, np.ndarray]:
    return {c: np.flatnonzero(pool.case_ids == c) for c in cases}


def load_simulation_data(dataset: str, size: int, seed: int = 0, n_phantoms: int = 9) -> SimulationData:
    """Build the pool and the splits for ``phantom-liver``, ``chaos`` or a dataset folder."""
    task = get_task("liver")
    if dataset == "phantom-liver":
        from ..data.phantoms import make_dataset

        cases = make_dataset("phantom-liver", n_phantoms, seed=1000)
        inputs = [target_case(c.case_id, c.ct, c.ct_label, c.mr) for c in cases]
        pool = build_pool(inputs, size, task.ct_window, seed=seed)
        return _case_split(pool, [c.case_id for c in cases], test_share=0.25,
                           what="phantom cases (paired CT/MR, liver)")
    if dataset == "chaos":
        from ..data.paths import shared_data_dir

        root = shared_data_dir()
        if root is None:
            raise InputError("--dataset chaos: real scans not found; set VQMEDSEG_DATA or place them in ../shared/data")
        return _chaos_data(root, size, seed)
    path = Path(dataset)
    if not path.exists():
        raise InputError(f"--dataset {dataset!r}: expected phantom-liver, chaos, or an existing dataset folder")
    return _folder_data(path, size, seed)


def _chaos_data(root: Path, size: int, seed: int) -> SimulationData:
    """The CHAOS CT cases with their liver masks, plus the CHAOS MR T2 cases as auxiliary MR
    (unpaired: other patients); :func:`chaos_split` says which slices are pool and test."""
    from ..data.datasets import discover_cases, load_case

    ct_root = root / "chaos" / "Train_Sets" / "CT"
    ct_refs = discover_cases(ct_root) if ct_root.exists() else []
    if not ct_refs:
        raise InputError(f"CHAOS CT: no case found under {ct_root}; expected the challenge's layout, "
                         "a folder per case holding DICOM_anon/ and Ground/")
    inputs = []
    for ref in ct_refs:
        image, label = load_case(ref)
        inputs.append(target_case(ref.case_id, image, label))
    mr_root = root / "chaos_mr_t2"
    extra_mr = [(ref.case_id, load_case(ref)[0]) for ref in discover_cases(mr_root, modality="MR")]
    return chaos_split(inputs, extra_mr, size, seed)


SLAB = 8  # slices in a pool or test slab when the test slices come from the pool's patients


def chaos_split(inputs: list[CaseInput], extra_mr: list, size: int, seed: int) -> SimulationData:
    """Pool and test slices of CT cases with liver labels, ``extra_mr`` the auxiliary MR.

    With three or more CT patients, whole patients are held out (:func:`_case_split`: the
    last fifth test, the one before them validation), as the paper's figures are. With one
    or two, the test slices must come from the pool's own patients: each case's slices are
    cut into slabs of ``SLAB``, alternately pool and test, counted from the case's first
    slice. Neighbouring slabs are correlated, so those Dice values are optimistic against
    a patient-wise split; they compare strategies, they do not predict performance on new
    patients.
    """
    pool = build_pool(inputs, size, get_task("liver").ct_window, seed=seed, extra_mr=extra_mr)
    ids = [c.case_id for c in inputs]
    mr = f"{len(extra_mr)} CHAOS MR T2 cases as unpaired auxiliary MR"
    if len(ids) >= 3:
        return _case_split(pool, ids, test_share=0.2, what=f"CHAOS CT cases, held out by patient, with {mr}")
    candidates, test = [], {}
    for case_id in ids:
        rows = np.flatnonzero(pool.case_ids == case_id)
        in_test = (np.arange(len(rows)) // SLAB) % 2 == 1
        candidates.append(rows[~in_test])
        test[f"{case_id}-test-slabs"] = rows[in_test]
    return SimulationData(
        pool,
        np.concatenate(candidates),
        test,
        {},
        f"CHAOS CT case(s) {', '.join(ids)} (alternate {SLAB}-slice slabs as pool/test) with {mr}",
    )


def _folder_data(path: Path, size: int, seed: int) -> SimulationData:
    from ..data.datasets import dataset_json_labels, discover_cases, load_case

    task = get_task("liver")
    # a dataset folder per modality (what `vqmedseg phantom` writes): CT/, and MR/ beside it
    split = (path / "CT" / "dataset.json").is_file()
    ct_root = path / "CT" if split else path
    named = (dataset_json_labels(ct_root) or {}).get(1)
    if named is not None and named.lower() != "liver":
        raise InputError(f"--dataset {path}: {ct_root / 'dataset.json'} names label 1 {named!r}; simulate compares "
                         "strategies on the liver, label 1 of the CT cases")
    refs = discover_cases(ct_root, "CT" if split else None)
    if split and (path / "MR").is_dir():
        refs += discover_cases(path / "MR", "MR")
    ct_refs = [r for r in refs if r.modality == "CT" and r.label is not None]
    mr_refs = [r for r in refs if r.modality == "MR"]
    paired = {r.case_id for r in mr_refs} & {r.case_id for r in ct_refs}
    if len(ct_refs) < 3:
        raise InputError(f"--dataset {path}: found {len(ct_refs)} labelled CT cases, expected at least 3 (pool, validation, test)")
    inputs = []
    for ref in ct_refs:
        image, label = load_case(ref)
        inputs.append(target_case(ref.case_id, image, label))
    extra = [(r.case_id, load_case(r)[0]) for r in mr_refs]
    pool = build_pool(inputs, size, task.ct_window, seed=seed, extra_mr=extra)
    # build_pool pairs a CT with the MR of its own case id when there is one
    how = " (paired by case)" if paired == {r.case_id for r in ct_refs} else f" ({len(paired)} paired by case)" if paired else ""
    return _case_split(pool, [c.case_id for c in inputs], test_share=0.2,
                       what=f"CT cases of {path.name} with {len(extra)} MR cases{how}")


def _case_split(pool: SlicePool, ids: list[str], test_share: float, what: str) -> SimulationData:
    """The last ``test_share`` of the cases test, the one before them validation, the rest the pool."""
    n_test = max(1, int(len(ids) * test_share))
    train_ids, val_ids, test_ids = ids[: -n_test - 1], ids[-n_test - 1 : -n_test], ids[-n_test:]
    return SimulationData(
        pool,
        np.flatnonzero(np.isin(pool.case_ids, train_ids)),
        _groups(pool, test_ids),
        _groups(pool, val_ids),
        f"{len(train_ids)} pool, {len(val_ids)} validation and {len(test_ids)} test {what}",
    )


def _group_dice(model, pool: SlicePool, groups: dict[str, np.ndarray], device) -> float | None:
    if not groups:
        return None
    scores = []
    for idx in groups.values():
        sub = pool.subset(idx, group="group")
        scores.extend(case_dice(model, sub, device).values())
    return float(np.mean(scores))


def run_strategy(
    strategy: str,
    data: SimulationData,
    config: BEGALConfig,
    rounds: int,
    per_round: int,
    initial: np.ndarray,
    seed: int,
    device: torch.device,
    budget_total: int | None = None,
    progress=None,
) -> dict:
    """One strategy, one seed: returns per-round labelled fraction, test and validation Dice."""
    torch.manual_seed(seed)
    model = build_model(config)
    trainer = PhaseTrainer(model, config, data.pool, device, seed)
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
    labelled: dict[int, str] = {int(i): BOTH for i in initial}
    budget = Budget(budget_total if budget_total is not None else len(initial) + rounds * per_round, len(initial))
    fractions, test_dice, val_dice, selected = [], [], [], []
    best_val, stale = -1.0, 0
    method = "begal" if strategy == "begal" else "end-to-end"
    for r in range(rounds + 1):
        trainer.run(round_schedule(method, r, labelled, config))
        fractions.append(len(labelled) / len(data.candidates))
        test_dice.append(_group_dice(model, data.pool, data.test, device))
        val = _group_dice(model, data.pool, data.val, device)
        val_dice.append(val)
        if progress is not None:
            progress(strategy, seed, r, test_dice[-1])
        if r == rounds or budget.exhausted:
            break
        if config.patience and val is not None:
            if val > best_val + config.min_delta:
                best_val, stale = val, 0
            else:
                stale += 1
                if stale >= config.patience:
                    log.info("%s seed %d: validation Dice plateaued after round %d", strategy, seed, r)
                    break
        taken = np.array(sorted(labelled), dtype=np.int64)
        unlabelled = np.setdiff1d(data.candidates, taken)
        picks = select(strategy, model, data.pool, unlabelled, taken, budget.allowance(per_round), device, rng, config.mc_samples)
        budget.spend(len(picks), 0)
        for s in picks:
            labelled[s.index] = s.purpose
        selected.append([{"case": data.pool.key(s.index)[0], "slice": data.pool.key(s.index)[1], "score": s.score, "purpose": s.purpose} for s in picks])
    return {"labeled_fraction": fractions, "test_dice": test_dice, "val_dice": val_dice, "selected": selected}


def simulate(
    dataset: str,
    strategies: list[str],
    rounds: int,
    per_round: int | str,
    seeds: list[int],
    config: BEGALConfig,
    out: Path,
    device: torch.device,
    initial: int | str | None = None,
    preset: str = "custom",
) -> dict:
    """Run every strategy for every seed; write results.json, results.md, dice_vs_budget.png, run.json.

    ``per_round`` and ``initial`` (default: ``per_round``) are numbers of slices, or shares
    of the pool such as ``"10%"`` (:func:`~.budget.slice_count`)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise InputError(f"--strategies: unknown {unknown}; expected some of {', '.join(STRATEGIES)}")
    if rounds < 1:
        raise InputError(f"--rounds {rounds}: expected at least 1")
    initial = per_round if initial is None else initial
    t0 = time.monotonic()
    data = load_simulation_data(dataset, config.slice_size, seed=seeds[0])
    n_pool = len(data.candidates)
    n_round = slice_count(per_round, n_pool, "--per-round")
    n_initial = slice_count(initial, n_pool, "--initial")
    if n_initial + rounds * n_round > n_pool:
        raise InputError(
            f"--rounds {rounds} x --per-round {per_round} ({n_round} slices) + {n_initial} initial slices exceed "
            f"the pool of {n_pool} slices"
        )
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(seeds) * len(strategies) * (rounds + 1), desc="simulate", unit="round", disable=None)

    def progress(strategy, seed, r, dice):
        log.info("%s seed %d round %d: test Dice %.4f", strategy, seed, r, dice)
        bar.set_postfix_str(f"{strategy} seed {seed} round {r}: Dice {dice:.3f}")
        bar.update(1)

    runs: dict[str, list[dict]] = {s: [] for s in strategies}
    for seed in seeds:
        init = np.random.default_rng(seed).choice(data.candidates, n_initial, replace=False)
        for strategy in strategies:
            t = time.monotonic()
            result = run_strategy(strategy, data, config, rounds, n_round, init, seed, device, progress=progress)
            result["seconds"] = time.monotonic() - t
            runs[strategy].append(result)
    bar.close()
    results = summarise(runs)
    run_info = {
        "dataset": dataset,
        "description": data.description,
        "strategies": strategies,
        "rounds": rounds,
        "per_round": per_round,
        "initial": initial,
        "per_round_slices": n_round,
        "initial_slices": n_initial,
        "seeds": seeds,
        "preset": preset,
        "config": config.to_json(),
        "pool_slices": int(len(data.candidates)),
        "seconds": time.monotonic() - t0,
        **compute_environment(device),
        "versions": software_versions(),
        "runs": {s: [{k: v for k, v in r.items()} for r in rs] for s, rs in runs.items()},
    }
    with atomic_files() as stage:  # the results, their plot and run.json replace an earlier run's together
        atomic_write_json(stage(out / "results.json"), results)
        atomic_write_text(stage(out / "results.md"), results_table(results, dataset, data.description, seeds, preset))
        plot_dice_vs_budget(results, stage(out / "dice_vs_budget.png"), title=f"{dataset}: Dice vs labelled fraction")
        atomic_write_json(stage(out / "run.json"), run_info)
    return results


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Mean and std over seeds, round by round (up to the shortest run)."""
    out = {}
    for strategy, rs in runs.items():
        n = min(len(r["test_dice"]) for r in rs)
        dice = np.array([r["test_dice"][:n] for r in rs], dtype=float)
        frac = np.array([r["labeled_fraction"][:n] for r in rs], dtype=float)
        out[strategy] = {
            "labeled_fraction": frac.mean(0).tolist(),
            "dice_mean": dice.mean(0).tolist(),
            "dice_std": dice.std(0).tolist(),
            "dice_per_seed": dice.tolist(),
        }
    return out


NAMES = {
    "begal": "VQ + BEGAL (ours)",
    "egal": "VQ + EGAL",
    "random": "VQ + Random",
    "entropy": "VQ + Max Entropy",
    "mcdropout": "VQ + MC Dropout",
    "coreset": "VQ + Coreset",
}


def results_table(results: dict, dataset: str, description: str, seeds: list[int], preset: str) -> str:
    first = next(iter(results.values()))
    header = " | ".join(f"{100 * f:.1f}%" for f in first["labeled_fraction"])
    lines = [
        f"# Active learning on `{dataset}`",
        "",
        f"{description}. Preset `{preset}`, seeds {seeds}. Dice (%) on the test cases, {spread_words(len(seeds))}, "
        "by the fraction of the pool labelled (in the style of VQ-BEGAL Table 2).",
        "",
        f"| strategy | {header} |",
        "|---|" + "---|" * len(first["labeled_fraction"]),
    ]
    for strategy, r in results.items():
        cells = " | ".join(mean_std_text(m, s, len(seeds)) for m, s in zip(r["dice_mean"], r["dice_std"]))
        lines.append(f"| {NAMES.get(strategy, strategy)} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_dice_vs_budget(results: dict, path: Path, title: str) -> None:
    from ..export.figures import agg_figure, save_png

    fig = agg_figure(6.5, 4.2, layout=None)
    ax = fig.add_subplot()
    for strategy, r in results.items():
        x = 100 * np.asarray(r["labeled_fraction"])
        m = 100 * np.asarray(r["dice_mean"])
        s = 100 * np.asarray(r["dice_std"])
        ax.plot(x, m, marker="o", label=NAMES.get(strategy, strategy), linewidth=2.2 if strategy == "begal" else 1.4)
        ax.fill_between(x, m - s, m + s, alpha=0.15)
    ax.set_xlabel("labelled slices (% of pool)")
    ax.set_ylabel("test Dice (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
