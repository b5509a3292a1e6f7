"""Semi-supervised experiments (``vqmedseg ssl``): supervised-only against VQ-Seg and its
ablations, at a fraction of labelled training slices, over seeds.

Splits are by patient: no patient is in both training and test. A dataset folder with a
``test.list`` (ACDC's published split lists) puts the patients listed there in the test
set; otherwise the last quarter of the patients, in sorted order, is the test set. A list
given with ``test_list`` (``--test-list FILE``) replaces the folder's.
Within the training cases, ``labeled_fraction`` of the slices (at least one) are labelled
at random, the rest are the unlabelled pool; ``supervised-full`` labels every training
slice (the ceiling). VQ-Seg is tested with its EMA teacher; ``supervised-ema`` and
``supervised-full-ema`` train as the U-Net rows do and are tested with the moving average
of their weights, kept by the teacher's rule. Scores are 3-D, on each test case's original grid: the model's slice
probabilities are mapped back (:func:`slices_to_volume`) before the argmax, then Dice and
HD95 of every structure (millimetres when the spacing is known, else voxels) come from
:mod:`VQMedSegLib.metrics.segmentation`. A case's Dice is the mean over the structures.
Every prediction is scored twice: as predicted, and (``largest_component``) with each
structure reduced to its largest connected component (:mod:`VQMedSegLib.inference.postprocess`).

With ``validation_patients`` > 0 the last patients of the training set (sorted), or with
``validation_list`` (``--validation-list FILE``) the patients it names, are held out as a
validation set, as in the papers' 70/10/20 splits: every row is scored on them
(3-D Dice) every ``validate_every`` iterations and at the last, and the weights with the
best validation Dice are the ones tested (the released VQ-Seg code keeps its best
validation checkpoint the same way). The test scores of the last iteration's weights are
recorded beside them (``last_iteration``), so the choice's effect is visible. The
validation patients also choose, per structure, whether the largest-piece clean-up is kept
(:func:`choose_largest_piece`); ``post_processing`` holds the test scores with that choice.

Each row and seed also keeps its training losses (``training_losses``): the mean of every
term its trainer reports (VQ-Seg's labelled, unlabelled, codebook and alignment terms and
the codebook's perplexity; the U-Net's total loss) over each tenth of its iterations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from .. import _monai  # noqa: F401  (before MONAI; see _monai.py)
from monai.losses import DiceLoss

from ..config import VQSegConfig
from ..data.preprocessing import extract_label_slices, extract_slices, normalize, plan_slices, slices_to_volume
from ..data.volume import Volume, label_values
from ..errors import InputError
from ..tasks import get_task
from ..files import atomic_files, atomic_write_json, atomic_write_text, read_json, read_text
from ..inference.postprocess import keep_largest_component
from ..metrics.segmentation import dice_masks, mean_std_text, score_volumes, spread_words, summarize
from ..models.unet_parts import UNetDecoder, UNetEncoder
from ..provenance import compute_environment, software_versions, versions_differ
from .ssl_report import FIGURES, patient_of, per_case_table, write_figures
from .vqseg import VQSegTrainer, foundation_features, labelled_loss

log = logging.getLogger("vqmedseg")

METHODS = {
    "supervised": {},
    "supervised-full": {},  # every training slice labelled: the ceiling
    # the same two rows tested with an exponential moving average of their weights, kept by
    # VQ-Seg's teacher rule: VQ-Seg is tested with its EMA teacher, so these size how much
    # of its margin the averaging alone would give
    "supervised-ema": {},
    "supervised-full-ema": {},
    "vqseg": {},
    "vqseg-noqpm": {"use_qpm": False},
    "vqseg-nodb": {"use_reconstruction": False},
    "vqseg-nopfa": {"use_pfa": False},
    "vqseg-dropout": {"perturbation": "dropout"},
    # the alignment (eq. 11) on the chosen codewords: its gradient trains the codebook
    # mapping instead of pushing the encoder's features away from their codes
    "vqseg-pfacodes": {"pfa_source": "codewords"},
    # lambda_a falling along a half cosine to 0 at the last iteration: whether the
    # alignment's pull on the encoder late in training is what costs Dice
    "vqseg-pfadecay": {"lambda_a_schedule": "cosine"},
    # the supervised warm-up at one sixth of the schedule, the share the quick preset gives
    # its own 600 iterations: a longer schedule (acdc-10-val's 3,000) kept 100, 1/30 of it
    "vqseg-warmup": {},
    # VQ-Seg's network on the labelled slices alone (no teacher, no unlabelled slice, no
    # PFA): what the quantised network costs or gains before any semi-supervision
    "vqseg-labelled": {"use_pfa": False},
}


# vqseg-warmup's supervised warm-up: the iterations divided by this (quick: 600 / 6 = 100)
WARMUP_SHARE = 6


def labels_every_slice(method: str) -> bool:
    """Whether the row is a ceiling: every training slice labelled."""
    return method in ("supervised-full", "supervised-full-ema")


def method_config(method: str, config: VQSegConfig, seed: int) -> VQSegConfig:
    """The configuration one row of the experiment trains with."""
    cfg = config.replace(seed=seed, **METHODS[method])
    if method == "vqseg-labelled":  # the semi-supervised terms never start
        cfg = cfg.replace(warmup_supervised=cfg.iterations)
    if method == "vqseg-warmup":
        cfg = cfg.replace(warmup_supervised=cfg.iterations // WARMUP_SHARE)
    return cfg


def check_method_names(methods: list[str]) -> None:
    """Refuse a row ``METHODS`` does not hold, before anything looks it up."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")


def rows_reading(methods: list[str], config: VQSegConfig) -> dict[str, list[str]]:
    """For each setting the command line may give every row (``perturbation``,
    ``dropout_rate``, ``strong_augment``, ``foundation``), the rows of ``methods`` that
    read it under ``config``: a setting no row reads would change nothing. A row
    ``METHODS`` does not hold is refused, not looked up."""
    check_method_names(methods)
    readers: dict[str, list[str]] = {"perturbation": [], "dropout_rate": [], "strong_augment": [], "foundation": []}
    for method in methods:
        if not method.startswith("vqseg"):
            continue  # the U-Net rows
        cfg = method_config(method, config, config.seed)
        if cfg.use_pfa:
            readers["foundation"].append(method)
        if method == "vqseg-labelled":
            continue  # no unlabelled slice: no perturbation, no strong view
        readers["strong_augment"].append(method)
        if cfg.use_qpm and "perturbation" not in METHODS[method]:
            readers["perturbation"].append(method)
        if cfg.use_qpm and cfg.perturbation == "dropout":  # use_qpm off means no perturbation at all
            readers["dropout_rate"].append(method)
    return readers


# the structures scored on the named real datasets: label value -> name
ACDC_STRUCTURES = {1: "RV", 2: "Myo", 3: "LV"}
CHAOS_MR_STRUCTURES = {1: "liver"}


@dataclass
class Case:
    case_id: str
    image: Volume
    label: Volume  # structure values (0 background) on the image grid
    modality: str


@dataclass
class SSLData:
    cases: list[Case]
    structures: dict[int, str]  # label value in Case.label -> name
    test_list: set[str] | None  # case ids of the published test split, if any
    ct_window: tuple[float, float] = get_task("liver").ct_window  # the HU window of CT cases (the task's)


def load_cases(dataset: str) -> SSLData:
    """Cases and their scored structures for the named datasets or a folder."""
    if dataset in ("phantom-liver", "phantom-lung"):
        from ..data.phantoms import make_dataset

        cases = make_dataset(dataset, 8, seed=2000)
        task = get_task("liver" if dataset == "phantom-liver" else "lung-tumour")
        return SSLData([Case(c.case_id, c.ct, c.ct_label.with_array((c.ct_label.array == 1).astype(np.uint8)), "CT")
                        for c in cases], {1: task.segment_name.lower()}, None, task.ct_window)
    from ..data.datasets import dataset_json_labels, discover_cases, load_case
    from ..data.paths import shared_data_dir

    if dataset in ("acdc", "chaos-mr"):
        root = shared_data_dir()
        if root is None:
            raise InputError(f"--dataset {dataset}: real scans not found; set VQMEDSEG_DATA or place them in ../shared/data")
        path = root / ("acdc" if dataset == "acdc" else "chaos_mr_t2")
        structures = ACDC_STRUCTURES if dataset == "acdc" else CHAOS_MR_STRUCTURES
        # CHAOS MR T2 is in the pairs layout, which cannot tell MR from CT: say so, not guess
        modality = "MR" if dataset == "chaos-mr" else None
    else:
        path, structures, modality = Path(dataset), None, None
        if not path.exists():
            raise InputError(f"--dataset {dataset!r}: expected phantom-liver, phantom-lung, acdc, chaos-mr or a dataset folder")
    loaded = []
    for ref in discover_cases(path, modality):
        image, label = load_case(ref)
        if label is not None:
            loaded.append((ref, image, label))
    if structures is None:  # a folder: every label value found is a structure, named as its dataset.json names it
        values = sorted({int(v) for _, _, label in loaded for v in label_values(label.array)} - {0})
        names = dataset_json_labels(path) if path.is_dir() else None
        structures = {v: (names or {}).get(v, f"label {v}") for v in values}
    out = []
    for ref, image, label in loaded:
        arr = np.asarray(label.array)
        scored = np.where(np.isin(arr, list(structures)), arr, 0).astype(np.uint8)  # other labels count as background
        out.append(Case(ref.case_id, image, label.with_array(scored), ref.modality))
    test_list = None
    if path.is_dir() and (path / "test.list").is_file():
        test_list = {line.strip() for line in (path / "test.list").read_text(encoding="utf-8").splitlines() if line.strip()}
    return SSLData(out, structures, test_list)


def split_by_patient(cases: list[Case], test_share: float = 0.25, test_list: set[str] | None = None,
                     source: str = "test.list", strict: bool = False) -> tuple[list[Case], list[Case]]:
    """Training and test cases, never a patient on both sides.

    With ``test_list`` (case or patient ids, read from ``source``), the patients of the
    listed cases are the test set; otherwise the last ``test_share`` of the patients in
    sorted order. ``strict`` refuses a list that names a patient the cases do not hold
    (for a user's list, where a typo would silently move a patient to the training side)."""
    patients = sorted({patient_of(c.case_id) for c in cases})
    if test_list is not None:
        listed = {patient_of(c) for c in test_list}
        if strict:
            _refuse_unknown(listed, patients, source)
        test = listed & set(patients)
        if not test or test == set(patients):
            raise InputError(f"{source} names {len(test)} of the {len(patients)} patients found; expected some, not all")
    else:
        n_test = max(1, int(round(test_share * len(patients))))
        test = set(patients[-n_test:])
    return _partition(cases, test)


def _refuse_unknown(named: set[str], patients: list[str], source: str) -> None:
    """Refuse a list (read from ``source``) that names a patient the dataset's ``patients``
    do not hold: a typo would otherwise move a patient silently."""
    unknown = sorted(named - set(patients))
    if unknown:
        raise InputError(f"{source} names {len(unknown)} patient(s) not in the dataset ({', '.join(unknown)}); "
                         f"its patients are {', '.join(patients)}")


def read_test_list(path: Path, what: str = "test") -> set[str]:
    """The case or patient ids in a list file (``--test-list``, or ``what="validation"``
    for ``--validation-list``), one per line (blank lines and lines starting with ``#``
    skipped)."""
    text = read_text(path, expected=f"a list of {what} case or patient ids, one per line")
    ids = {line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}
    if not ids:
        raise InputError(f"{path}: found no case or patient id, expected one per line")
    return ids


def _partition(cases: list[Case], held: set[str]) -> tuple[list[Case], list[Case]]:
    """(cases of the other patients, cases of the ``held`` patients), in their order."""
    return [c for c in cases if patient_of(c.case_id) not in held], [c for c in cases if patient_of(c.case_id) in held]


def hold_out_patients(cases: list[Case], n: int) -> tuple[list[Case], list[Case]]:
    """(training, validation) cases: the last ``n`` patients of ``cases`` in sorted order,
    with all their frames, are the validation set."""
    patients = sorted({patient_of(c.case_id) for c in cases})
    if not 0 <= n < len(patients):
        raise InputError(f"--validation-patients {n}: expected 0 to {len(patients) - 1} "
                         f"(the training set has {len(patients)} patients)")
    return _partition(cases, set(patients[len(patients) - n:]))


def hold_out_listed(cases: list[Case], listed: set[str], test_cases: list[Case], source: str) -> tuple[list[Case], list[Case]]:
    """(training, validation) cases: the patients of the ``listed`` case or patient ids
    (read from ``source``), with all their frames, are the validation set. A listed test
    patient or one the dataset does not hold is refused, as is a list of every training
    patient."""
    patients = sorted({patient_of(c.case_id) for c in cases})
    named = {patient_of(c) for c in listed}
    in_test = sorted(named & {patient_of(c.case_id) for c in test_cases})
    if in_test:
        raise InputError(f"{source} names {len(in_test)} test patient(s) ({', '.join(in_test)}); "
                         f"expected training patients only: {', '.join(patients)}")
    _refuse_unknown(named, sorted(set(patients) | {patient_of(c.case_id) for c in test_cases}), source)
    if named == set(patients):
        raise InputError(f"{source} names all {len(patients)} training patients; expected some, not all")
    return _partition(cases, named)


class BestOnValidation:
    """Model selection during training: called after every iteration (the ``on_step``
    signature of the trainers), it scores ``model`` with ``score()`` every ``every``
    iterations and at the last (``total``), in eval mode, and keeps a copy of the weights
    with the best score (the first of equal scores)."""

    def __init__(self, model: nn.Module, score: Callable[[], float], every: int, total: int):
        if every < 1:
            raise InputError(f"--validate-every {every}: expected at least 1")
        self.model, self.score, self.every, self.total = model, score, every, total
        self.iterations: list[int] = []
        self.dice: list[float] = []
        self.best_state: dict | None = None
        self.best_iteration, self.best_dice = 0, float("-inf")

    def __call__(self, iteration: int, total: int | None = None, losses: dict | None = None) -> None:
        if iteration % self.every and iteration != self.total:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            value = float(self.score())
        finally:
            self.model.train(was_training)
        self.iterations.append(iteration)
        self.dice.append(value)
        if value > self.best_dice:
            self.best_iteration, self.best_dice = iteration, value
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> None:
        """Load the best weights back into the model."""
        if self.best_state is None:
            raise RuntimeError("no validation score yet: nothing to restore")
        self.model.load_state_dict(self.best_state)

    def record(self) -> dict:
        return {"iterations": self.iterations, "dice": self.dice, "best_iteration": self.best_iteration,
                "best_dice": self.best_dice}


class RowProgress:
    """The ``on_step`` of one row and seed: calls the validation ``selector`` (if any),
    advances the run's tqdm bar, and logs every tenth of the row's iterations with the
    best validation Dice so far, so that a run of hours shows where it is also in a log.
    It also keeps the mean of each training loss over each tenth (:meth:`record`): a term
    reported for none of a tenth's iterations (one that starts after the warm-up) is
    ``None`` there."""

    def __init__(self, bar, method: str, seed: int, total: int, selector: BestOnValidation | None = None):
        self.bar, self.method, self.seed, self.total, self.selector = bar, method, seed, total, selector
        self.every = max(1, total // 10)
        self.t0 = time.monotonic()
        self.tenths: list[tuple[int, dict[str, float]]] = []  # (last iteration, each term's mean)
        self._sums: dict[str, list[float]] = {}  # term -> [sum, count] since the last tenth

    def record(self) -> dict:
        terms = dict.fromkeys(k for _, means in self.tenths for k in means)  # in the order first reported
        return {"iterations": [it for it, _ in self.tenths],
                "means": {k: [means.get(k) for _, means in self.tenths] for k in terms}}

    def __call__(self, iteration: int, total: int | None = None, losses: dict | None = None) -> None:
        if self.selector is not None:
            self.selector(iteration, total, losses)
        self.bar.update(1)
        for key, value in (losses or {}).items():
            acc = self._sums.setdefault(key, [0.0, 0])
            acc[0] += float(value)
            acc[1] += 1
        if iteration % self.every and iteration != self.total:
            return
        self.tenths.append((iteration, {k: total / count for k, (total, count) in self._sums.items()}))
        self._sums = {}
        best = (f"; best validation Dice {self.selector.best_dice:.4f} at iteration {self.selector.best_iteration}"
                if self.selector is not None and self.selector.iterations else "")
        log.info("%s seed %d: iteration %d of %d (%.0f s)%s", self.method, self.seed, iteration, self.total,
                 time.monotonic() - self.t0, best)
        self.bar.set_postfix_str(f"{self.method} seed {self.seed}{best}")


class SupervisedNet(nn.Module):
    """The same U-Net backbone without VQ (the ``supervised`` row)."""

    def __init__(self, features, num_classes: int = 2):
        super().__init__()
        self.encoder = UNetEncoder(1, features)
        self.decoder = UNetDecoder(features, num_classes)

    def forward(self, x):
        f = self.encoder(x)
        return self.decoder(f[4], f[:4])


def _slices(case: Case, size: int, ct_window: tuple[float, float]):
    plan = plan_slices(case.image, size)
    modality = "CT" if case.modality == "CT" else "MR"
    x = extract_slices(case.image, plan, values=normalize(case.image, modality, ct_window))[:, None]
    y = extract_label_slices(case.label, plan)
    return plan, x, y


def _prepare(cases: list[Case], size: int, ct_window: tuple[float, float]) -> list[tuple[Case, object, np.ndarray]]:
    """``(case, slice plan, network input slices)`` of each case, made once for every
    evaluation of a run."""
    return [(c, *_slices(c, size, ct_window)[:2]) for c in cases]


def _evaluate(predict_probs, prepared: list[tuple[Case, object, np.ndarray]],
              structures: dict[int, str]) -> tuple[list[dict], list[dict]]:
    """Per test case (:func:`_prepare`), the scores of every structure (by name): as
    predicted, and with each structure reduced to its largest connected component."""
    raw, largest = [], []
    for case, plan, x in prepared:
        on_grid = slices_to_volume(predict_probs(x), plan)
        label = on_grid.argmax(0).astype(np.uint8)
        for out, arr in ((raw, label), (largest, keep_largest_component(label, list(structures)))):
            pred = case.image.with_array(arr)
            out.append({name: score_volumes(pred, case.label, label=value) for value, name in structures.items()})
    return raw, largest


def _validation_dice(predict_probs, prepared: list[tuple[Case, object, np.ndarray]], structures: dict[int, str]) -> float:
    """3-D Dice on the validation cases (:func:`_prepare`): the mean over structures of
    each case, averaged over the cases."""
    per_case = []
    for case, plan, x in prepared:
        label = slices_to_volume(predict_probs(x), plan).argmax(0)
        per_case.append(np.mean([dice_masks(label == v, case.label.array == v) for v in structures]))
    return float(np.mean(per_case))


def choose_largest_piece(raw: list[dict], largest: list[dict], structures: dict[int, str]) -> tuple[dict, dict]:
    """Per structure, whether keeping only its largest connected piece raises the mean
    Dice over the validation cases (:func:`_evaluate`'s two lists), as nnU-Net decides its
    post-processing on validation data rather than on the test set; and those mean Dice
    (``{name: {"as_predicted": ..., "largest_piece": ...}}``)."""
    scores = {name: {"as_predicted": float(np.mean([c[name].dice for c in raw])),
                     "largest_piece": float(np.mean([c[name].dice for c in largest]))} for name in structures.values()}
    return {name: s["largest_piece"] > s["as_predicted"] for name, s in scores.items()}, scores


def with_choice(raw: list[dict], largest: list[dict], keep: dict[str, bool]) -> list[dict]:
    """Each case's scores (:func:`_evaluate`'s two lists) with every structure's own choice:
    its largest piece where ``keep`` says so, as predicted elsewhere."""
    return [{name: (lc if keep[name] else r)[name] for name in keep} for r, lc in zip(raw, largest)]


def _seed_summary(per_case: list[dict], structures: dict[int, str], case_ids: list[str]) -> dict:
    """One seed: the mean over structures of each case's Dice, averaged over cases, every
    structure's own summary, and each case's Dice and HD95 per structure (``cases``,
    ``cases_hd95``; HD95 ``None`` where undefined), for comparisons case by case or on a
    subset of the cases."""
    by_structure = {name: summarize([c[name] for c in per_case]) for name in structures.values()}
    units = next(iter(by_structure.values()))["units"]
    key = "hd95_mm_mean" if units == "mm" else "hd95_vox_mean"
    case_dice = [float(np.mean([c[name].dice for name in structures.values()])) for c in per_case]
    hd = [s[key] for s in by_structure.values() if s[key] is not None]
    return {
        "dice_mean": float(np.mean(case_dice)),
        "hd95_mean": float(np.mean(hd)) if hd else None,
        # (case, structure) pairs whose HD95 is undefined (an empty prediction or reference): left out of hd95_mean
        "hd95_undefined": int(sum(s["n_distance_undefined"] for s in by_structure.values())),
        "hd95_scored": len(per_case) * len(by_structure),
        "units": units,
        "n_cases": len(per_case),
        "structures": {name: {"dice_mean": s["dice_mean"], "dice_std_cases": s["dice_std"], "hd95_mean": s[key]}
                       for name, s in by_structure.items()},
        "cases": {c: {name: float(scores[name].dice) for name in structures.values()}
                  for c, scores in zip(case_ids, per_case)},
        "cases_hd95": {c: {name: None if scores[name].hd95 is None else float(scores[name].hd95)
                           for name in structures.values()} for c, scores in zip(case_ids, per_case)},
    }


def run_ssl(
    dataset: str,
    labeled_fraction: float,
    methods: list[str],
    seeds: list[int],
    config: VQSegConfig,
    out: Path,
    device: torch.device,
    preset: str = "custom",
    validation_patients: int = 0,
    validate_every: int = 0,
    test_list: Path | None = None,
    validation_list: Path | None = None,
) -> dict:
    """Train and score every method for every seed; write results.json, results.md, run.json.

    ``validation_patients`` > 0 holds that many training patients out for model selection
    (see the module's description); ``validate_every`` (0: a twentieth of the iterations)
    is how often they are scored. ``test_list``: a file of case or patient ids whose
    patients are the test set, in place of the dataset folder's ``test.list``.
    ``validation_list``: a file of case or patient ids whose patients are the validation
    set, in place of ``validation_patients``."""
    check_method_names(methods)
    if not 0 < labeled_fraction <= 1:
        raise InputError(f"--labeled-fraction {labeled_fraction}: expected a value in (0, 1]")
    if validation_list is not None and validation_patients:
        raise InputError(f"--validation-patients {validation_patients} and --validation-list {validation_list}: "
                         "expected one of them")
    if validate_every < 0 or (validate_every and validation_patients <= 0 and validation_list is None):
        raise InputError(f"--validate-every {validate_every}: expected a positive number of iterations, "
                         f"with --validation-patients above 0 (found {validation_patients}) or --validation-list")
    t0 = time.monotonic()
    test_list = Path(test_list) if test_list is not None else None
    listed = read_test_list(test_list) if test_list is not None else None
    validation_list = Path(validation_list) if validation_list is not None else None
    val_listed = read_test_list(validation_list, "validation") if validation_list is not None else None
    out.mkdir(parents=True, exist_ok=True)
    data = load_cases(dataset)
    if len(data.cases) < 3:
        raise InputError(f"--dataset {dataset}: found {len(data.cases)} labelled cases, expected at least 3")
    if not data.structures:
        raise InputError(f"--dataset {dataset}: the labels hold no structure (all background)")
    structures = data.structures
    config = config.replace(num_classes=max(structures) + 1)
    if listed is not None:
        train_cases, test_cases = split_by_patient(data.cases, test_list=listed, source=str(test_list), strict=True)
        rule = f"the patients listed in {test_list.name}"
    else:
        train_cases, test_cases = split_by_patient(data.cases, test_list=data.test_list)
        rule = "test.list patients" if data.test_list is not None else "last quarter of the patients (sorted)"
    if val_listed is not None:
        train_cases, val_cases = hold_out_listed(train_cases, val_listed, test_cases, str(validation_list))
        validation_patients = len({patient_of(c.case_id) for c in val_cases})
        validation_rule = f"the patients listed in {validation_list.name}"
    else:
        train_cases, val_cases = hold_out_patients(train_cases, validation_patients)
        validation_rule = f"the last {validation_patients} training patient(s), sorted"
    if validation_patients and not validate_every:
        validate_every = max(1, config.iterations // 20)
    size = config.slice_size
    val_prepared, test_prepared = _prepare(val_cases, size, data.ct_window), _prepare(test_cases, size, data.ct_window)
    test_ids = [c.case_id for c in test_cases]
    xs, ys = [], []
    for c in train_cases:
        _, x, y = _slices(c, size, data.ct_window)
        xs.append(x)
        ys.append(y)
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)

    foundation, fm_all, fm_channels = None, None, 0
    fm_rows = np.arange(len(x_all))
    uses_pfa = any(m.startswith("vqseg") and METHODS[m].get("use_pfa", config.use_pfa) for m in methods)
    if uses_pfa and config.foundation != "none":
        from ..models.foundation import build_foundation

        foundation = build_foundation(config.foundation)
        t = time.monotonic()
        if config.pfa_slices and config.pfa_slices < len(x_all):
            fm_rows = np.sort(np.random.default_rng(12345).choice(len(x_all), config.pfa_slices, replace=False))
        fm_all = foundation_features(foundation, x_all[fm_rows], config.pfa_grid)
        fm_channels = fm_all.shape[1]
        log.info("foundation features of %d slices in %.0f s", len(fm_rows), time.monotonic() - t)
    elif uses_pfa:  # a row would have used PFA, but there is no foundation model
        log.warning("PFA is off: no foundation model (--foundation none)")

    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    n_lab = max(1, int(round(labeled_fraction * len(x_all))))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(seeds) * len(methods) * config.iterations, desc="ssl", unit="it", disable=None)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        lab = np.sort(rng.choice(len(x_all), n_lab, replace=False))
        unl = np.setdiff1d(np.arange(len(x_all)), lab)
        for method in methods:
            t = time.monotonic()
            cfg = method_config(method, config, seed)
            if method.startswith("supervised"):
                rows = np.arange(len(x_all)) if labels_every_slice(method) else lab
                student = _supervised_net(cfg, device)
                # an -ema row keeps and tests the moving average; the student trains as in the plain row
                ema = _supervised_net(cfg, device) if method.endswith("-ema") else None
                model = student if ema is None else ema
                logits = model

                def train(on_step, student=student, ema=ema, rows=rows, cfg=cfg):
                    _train_supervised(student, cfg, x_all[rows], y_all[rows], device, on_step, ema=ema)
            else:
                use_fm = fm_all is not None and cfg.use_pfa
                # foundation features of the unlabelled slices that have them
                in_unl = np.isin(fm_rows, unl)
                position = np.searchsorted(unl, fm_rows[in_unl])
                trainer = VQSegTrainer(cfg, x_all[lab], y_all[lab], x_all[unl], fm_all[in_unl] if use_fm else None,
                                       fm_channels if use_fm else 0, device, fm_slices=position)
                model = trainer.teacher  # the EMA model is the one that is kept

                def logits(x, model=model):
                    return model(x, reconstruct=False).logits

                def train(on_step, trainer=trainer):
                    trainer.run(on_step=on_step)
            predict = _probabilities(logits, device)
            selector = None
            if val_cases:
                selector = BestOnValidation(model, lambda: _validation_dice(predict, val_prepared, structures),
                                            validate_every, cfg.iterations)
            progress = RowProgress(bar, method, seed, cfg.iterations, selector)
            train(progress)
            model.eval()
            extra = {}
            if selector is not None:
                last, _ = _evaluate(predict, test_prepared, structures)
                selector.restore()
                extra = {"validation": selector.record(), "last_iteration": _seed_summary(last, structures, test_ids)}
            raw, largest = _evaluate(predict, test_prepared, structures)
            if selector is not None:
                keep, val_scores = choose_largest_piece(*_evaluate(predict, val_prepared, structures), structures)
                extra["post_processing"] = {"largest_piece": keep, "validation_dice": val_scores,
                                            **_seed_summary(with_choice(raw, largest, keep), structures, test_ids)}
            s = _seed_summary(raw, structures, test_ids)
            per_method[method].append({"seed": seed, **s, "largest_component": _seed_summary(largest, structures, test_ids),
                                       **extra, "training_losses": progress.record(), "seconds": time.monotonic() - t,
                                       **({} if labels_every_slice(method) else {"labelled_rows": [int(r) for r in lab]})})
            log.info("%s seed %d: Dice %.4f (%.0f s)%s", method, seed, s["dice_mean"], time.monotonic() - t,
                     f"; best validation Dice {selector.best_dice:.4f} at iteration {selector.best_iteration}, "
                     f"Dice at the last iteration {extra['last_iteration']['dice_mean']:.4f}" if selector else "")

    bar.close()
    results = _results(per_method, structures, labeled_fraction, len(x_all), n_lab, bool(val_cases))
    split = {"rule": rule, "train_cases": [c.case_id for c in train_cases], "test_cases": [c.case_id for c in test_cases]}
    if val_cases:
        split["validation_cases"] = [c.case_id for c in val_cases]
        split["validation_rule"] = validation_rule
    _write(out, results, {
        "dataset": dataset, "structures": {str(k): v for k, v in structures.items()}, "methods": methods, "seeds": seeds,
        "labeled_fraction": labeled_fraction, "preset": preset, "config": config.to_json(), "split": split,
        "validation_patients": validation_patients, "validate_every": validate_every if val_cases else 0,
        "test_list": test_list.name if test_list is not None else None,
        "validation_list": validation_list.name if validation_list is not None else None,
        "train_slices": int(len(x_all)), "labelled_slices": n_lab, "seconds": time.monotonic() - t0,
        **({"ct_window": list(data.ct_window)} if any(c.modality == "CT" for c in data.cases) else {}),
        **compute_environment(device), "versions": software_versions(),
    })
    return results


def _results(per_method: dict[str, list[dict]], structures: dict[int, str], labeled_fraction: float,
             train_slices: int, n_lab: int, validated: bool) -> dict:
    """Each method's summary over its seeds' rows (``per_seed``)."""
    results = {}
    for method, runs in per_method.items():
        summary = _summary_over_seeds(runs, structures)
        results[method] = {
            "labeled_fraction": 1.0 if labels_every_slice(method) else labeled_fraction,
            "labelled_slices": int(train_slices) if labels_every_slice(method) else n_lab,
            **summary,
            "hd95_mm_mean": summary["hd95_mean"] if summary["hd95_units"] == "mm" else None,
            "largest_component": _summary_over_seeds([r["largest_component"] for r in runs], structures),
            "per_seed": runs,
        }
        if validated:
            results[method]["validation_best_iteration"] = [r["validation"]["best_iteration"] for r in runs]
            results[method]["last_iteration"] = _summary_over_seeds([r["last_iteration"] for r in runs], structures)
            if all("post_processing" in r for r in runs):  # (runs made before it was chosen on validation lack it)
                results[method]["post_processing"] = {
                    **_summary_over_seeds([r["post_processing"] for r in runs], structures),
                    "largest_piece_seeds": {name: sum(r["post_processing"]["largest_piece"][name] for r in runs)
                                            for name in structures.values()}}
    return results


def _write(out: Path, results: dict, run: dict) -> None:
    """results.json, results.md (with the per-case table), the figures of :mod:`.ssl_report`
    and run.json, each written whole, and all replacing an earlier run's together or not
    at all (:func:`~VQMedSegLib.files.atomic_files`)."""
    out.mkdir(parents=True, exist_ok=True)
    structures = {int(k): v for k, v in run["structures"].items()}
    split = run["split"]
    with atomic_files() as stage:
        atomic_write_json(stage(out / "results.json"), results)
        atomic_write_text(stage(out / "results.md"),
                          _table(results, run["dataset"], structures, run["labeled_fraction"], run["seeds"], run["preset"],
                                 len(split["train_cases"]), len(split["test_cases"]), split["rule"], run["seconds"],
                                 split.get("validation_cases", []), run.get("validate_every", 0)) + per_case_table(results))
        figures = write_figures(results, out, title=Path(str(run["dataset"])).name, stage=stage)
        atomic_write_json(stage(out / "run.json"), run)
    for stale in sorted({out / name for name in FIGURES} - set(figures)):  # an earlier run's, which this run did not draw
        try:
            stale.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: could not delete this figure of an earlier run (%s); it does not belong to %s",
                        stale, exc.strerror, out / "results.json")


# what must agree for rows of separate runs to be one experiment
SAME_EXPERIMENT = ("dataset", "structures", "labeled_fraction", "preset", "config", "split", "validation_patients",
                   "validate_every", "train_slices", "labelled_slices")


def merge_ssl(sources: list[Path], out: Path, methods: list[str] | None = None) -> dict:
    """One experiment from runs of it spread over processes or machines (``vqmedseg ssl
    --seed-ids`` or ``--methods`` per run): the rows of every (method, seed) are gathered,
    the summaries over seeds recomputed, and the three files written as one run's.

    The runs must agree on everything that defines the experiment (:data:`SAME_EXPERIMENT`;
    the configuration as today's code reads it, so a run recorded before a key existed
    agrees with one that records the key's default), hold no (method, seed) twice, and
    give every method the same seeds. The methods keep the order of ``methods`` (which
    must name exactly those found), else of their first appearance. ``seconds`` is the
    sum of the runs' times (compute, not wall time); ``merged_from`` lists the runs."""
    if len(sources) < 2:
        raise InputError(f"ssl-merge: found {len(sources)} result folder(s), expected at least 2")
    runs, rows = [], {}
    for src in sources:
        files = {name: read_json(Path(src) / name, expected="the output folder of a finished `vqmedseg ssl` run")
                 for name in ("run.json", "results.json")}
        run, results = files["run.json"], files["results.json"]
        if run.get("config") is not None:
            run = {**run, "config": VQSegConfig.as_read_today(run["config"])}
        if runs:
            for key in SAME_EXPERIMENT:
                if run.get(key) != runs[0].get(key):
                    raise InputError(f"{Path(src) / 'run.json'}: '{key}' differs from {Path(sources[0]) / 'run.json'}'s; "
                                     "expected runs of one experiment")
        runs.append(run)
        for method, r in results.items():
            if not isinstance(r, dict) or not isinstance(r.get("per_seed"), list):
                raise InputError(f"{Path(src) / 'results.json'}: {method} has no 'per_seed' rows; expected the results "
                                 "of `vqmedseg ssl`")
            for row in r["per_seed"]:
                if (method, row["seed"]) in rows:
                    raise InputError(f"{Path(src) / 'results.json'}: {method} seed {row['seed']} is also in an earlier "
                                     "folder; expected each (method, seed) once")
                rows[method, row["seed"]] = row
    found = list(dict.fromkeys(m for m, _ in rows))
    if methods is not None and sorted(methods) != sorted(found):
        raise InputError(f"--methods {','.join(methods)}: the folders hold {','.join(found)}; expected the same methods")
    methods = methods or found
    seeds = {m: sorted(s for mm, s in rows if mm == m) for m in methods}
    if len({tuple(v) for v in seeds.values()}) > 1:
        raise InputError("ssl-merge: the methods have different seeds "
                         f"({'; '.join(f'{m}: {v}' for m, v in seeds.items())}); expected the same seeds for every method")
    for seed in next(iter(seeds.values()), []):  # rows compared seed by seed must have trained on the same slices
        drawn = {m: rows[m, seed]["labelled_rows"] for m in methods if "labelled_rows" in rows[m, seed]}
        first_method = next(iter(drawn), None)
        for m, labelled in drawn.items():
            if labelled != drawn[first_method]:
                raise InputError(f"ssl-merge: seed {seed}: {first_method} and {m} trained on different labelled slices "
                                 "(their runs drew them differently); expected the slices one seed draws, the same in "
                                 "every run, for rows compared seed by seed")
    first = runs[0]
    per_method = {m: [rows[m, s] for s in seeds[m]] for m in methods}
    structures = {int(k): v for k, v in first["structures"].items()}
    results = _results(per_method, structures, first["labeled_fraction"], first["train_slices"], first["labelled_slices"],
                       bool(first["split"].get("validation_cases")))
    versions = [r["versions"] for r in runs]
    if any(v != versions[0] for v in versions):
        differ = sorted({k for v in versions[1:] for k in versions_differ(versions[0], v)})
        log.warning("ssl-merge: the runs' software versions differ (%s); rows of other installs can differ by "
                    "points; run.json records each run's", ", ".join(differ) or "packages recorded by some runs only")
    _write(out, results, {
        **first, "methods": methods, "seeds": seeds[methods[0]], "seconds": sum(r["seconds"] for r in runs),
        "device": _shared_or_listed([r["device"] for r in runs]),
        **{key: _shared_or_listed([r.get(key) for r in runs]) for key in ("threads", "cpu_capability", "cpu_model")},
        "merged_from": [{"folder": str(src), "methods": r["methods"], "seeds": r["seeds"], "seconds": r["seconds"],
                         "device": r["device"], "threads": r.get("threads"), "cpu_capability": r.get("cpu_capability"),
                         "cpu_model": r.get("cpu_model"), "versions": r["versions"]}
                        for src, r in zip(sources, runs)],
    })
    return results


def _shared_or_listed(values: list):
    """The one value the runs share, else each distinct value in order ("2, 1"); None if none recorded it."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    return None if not distinct else distinct[0] if len(distinct) == 1 else ", ".join(map(str, distinct))


def _summary_over_seeds(runs: list[dict], structures: dict[int, str]) -> dict:
    """Mean and std over seeds of per-seed summaries (:func:`_seed_summary`)."""
    hd = [r["hd95_mean"] for r in runs if r["hd95_mean"] is not None]
    counted = all("hd95_undefined" in r for r in runs)  # not in rows written before it was counted
    return {**_mean_std([r["dice_mean"] for r in runs], "dice"), "hd95_mean": float(np.mean(hd)) if hd else None,
            "hd95_undefined": sum(r["hd95_undefined"] for r in runs) if counted else None,
            "hd95_scored": sum(r["hd95_scored"] for r in runs) if counted else None,
            "hd95_units": runs[0]["units"],
            "structures": {name: _mean_std([r["structures"][name]["dice_mean"] for r in runs], "dice")
                           for name in structures.values()}}


def _mean_std(values: list[float], name: str) -> dict:
    arr = np.asarray(values, dtype=float)
    return {f"{name}_mean": float(arr.mean()), f"{name}_std": float(arr.std())}


def _supervised_net(cfg: VQSegConfig, device) -> SupervisedNet:
    torch.manual_seed(cfg.seed)
    return SupervisedNet(tuple(cfg.features), cfg.num_classes).to(device)


def _train_supervised(net: SupervisedNet, cfg: VQSegConfig, x: np.ndarray, y: np.ndarray, device,
                      on_step: Callable[[int, int, dict], None] | None = None, ema: SupervisedNet | None = None) -> None:
    """Train ``net`` on the slices ``x`` and labels ``y``. With ``ema`` (a network of the
    same shape), keep in it the moving average of ``net``'s weights by VQ-Seg's teacher
    rule, which does not change what ``net`` learns."""
    from .slices import SliceSet
    from .supervised import BatchSampler, augmentation, make_batch
    from .vqseg import ema_update

    if ema is not None:
        ema.load_state_dict(net.state_dict())
        ema.eval().requires_grad_(False)

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
    net.train()
    for iteration in range(1, cfg.iterations + 1):
        xb, yb = make_batch(sampler.data, sampler.indices(), aug)
        loss = labelled_loss(net(xb.to(device)), yb[:, 0].to(device), dice, cfg.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema_update(ema, net, min(cfg.ema_decay, 1.0 - 1.0 / iteration))
        if on_step is not None:
            on_step(iteration, cfg.iterations, {"total": float(loss.detach())})
    net.eval()


def _probabilities(logits: Callable[[torch.Tensor], torch.Tensor], device, batch: int = 16):
    """``predict(slices) -> class probabilities`` of a network given as ``logits(x)``."""

    @torch.no_grad()
    def predict(xs):
        return np.concatenate([torch.softmax(logits(torch.as_tensor(xs[i : i + batch], device=device)), 1).cpu().numpy()
                               for i in range(0, len(xs), batch)])

    return predict


def _table(results, dataset, structures, fraction, seeds, preset, n_train, n_test, rule, seconds,
           validation_cases=(), validate_every=0) -> str:
    names = list(structures.values())
    per_structure = len(names) > 1
    selection = (f" Weights chosen on held-out training patients (validation: case {', '.join(validation_cases)}; "
                 f"scored every {validate_every} iterations); *last iteration*: the test Dice of the last weights."
                 if validation_cases else "")
    lines = [
        f"# Semi-supervised segmentation on `{dataset}` ({', '.join(names)})",
        "",
        f"{n_train} training and {n_test} test cases, split by patient ({rule}); {100 * fraction:g}% of the training "
        f"slices labelled (`supervised-full`: all); preset `{preset}`; seeds {seeds}; {seconds / 60:.1f} min. "
        f"3-D scores on the original grids, {spread_words(len(seeds))}. *Largest component*: the same "
        "predictions with each structure reduced to its largest connected component." + selection,
        "",
        "| method | labelled slices | Dice (%) |" + "".join(f" {n} Dice (%) |" for n in names if per_structure)
        + " HD95 | Dice (%), largest component | HD95, largest component |"
        + (" best iteration (validation) | Dice (%), last iteration | Dice (%), clean-up chosen on validation |"
           if validation_cases else ""),
        "|---|---|---|" + "---|" * (len(names) if per_structure else 0) + "---|---|---|" + ("---|---|---|" if validation_cases else ""),
    ]
    def hd(r):
        text = "n/a" if r["hd95_mean"] is None else f"{r['hd95_mean']:.2f} {'mm' if r['hd95_units'] == 'mm' else 'voxels'}"
        if r.get("hd95_undefined"):
            text += (f" (undefined in {r['hd95_undefined']} of {r['hd95_scored']}: an empty prediction or reference, "
                     "left out)")
        return text

    for m, r in results.items():
        n_seeds = len(r["per_seed"])

        def dice(summary):
            return mean_std_text(summary["dice_mean"], summary["dice_std"], n_seeds)

        cells = "".join(f" {dice(r['structures'][n])} |" for n in names if per_structure)
        lc = r["largest_component"]
        chosen = ""
        if "last_iteration" in r:
            li = r["last_iteration"]
            pp = r.get("post_processing")
            cleanup = "n/a" if pp is None else (
                f"{dice(pp)} (largest piece kept: "
                + ", ".join(f"{n} in {k} of {n_seeds}" for n, k in pp["largest_piece_seeds"].items())
                + (" seed)" if n_seeds == 1 else " seeds)"))
            chosen = (f" {' / '.join(str(i) for i in r['validation_best_iteration'])} "
                      f"| {dice(li)} | {cleanup} |")
        lines.append(f"| {m} | {r['labelled_slices']} | {dice(r)} |{cells} {hd(r)} | {dice(lc)} | {hd(lc)} |{chosen}")
    return "\n".join(lines) + "\n"
