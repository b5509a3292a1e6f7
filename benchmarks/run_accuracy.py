"""Accuracy on the real scans, side by side with the alternatives, in one run.

Usage::

    python benchmarks/run_accuracy.py --out acc-out                  # CPU presets, 3 seeds
    python benchmarks/run_accuracy.py --out acc-out --preset gpu     # the papers' settings
    python benchmarks/run_accuracy.py --out acc-out --only acdc-10,chaos-begal

reads the scans from ``$VQMEDSEG_DATA`` (or ``../shared/data``) and writes, per part,
``acc-out/<part>/`` (the ``vqmedseg ssl`` / ``simulate`` outputs: ``results.json``,
``results.md``, ``run.json`` with the preset, seeds, split, software versions and wall
time), then ``acc-out/accuracy.json`` and ``acc-out/accuracy.md`` with every part, the
targets of the accuracy benchmark and the seed-paired differences between rows. A part
whose ``run.json`` already records the same settings (data, methods, seeds, every value
of the preset) is read back instead of rerun (the parts take hours on 2 CPU cores); pass
``--fresh`` to rerun it.

Parts:

* ``acdc-5``, ``acdc-10``: VQ-Seg against the same U-Net trained on the labelled slices
  only, at 5% and 10% labelled slices, and (``acdc-10``) the fully supervised ceiling;
  Dice per structure (RV, myocardium, LV) and their mean. Split: ACDC's published
  ``test.list`` patients are the test set, the other patients the training set.
* ``acdc-10-long`` (CPU preset only): ``acdc-10`` with three times the training
  iterations (1,800; the warm-up and the ramp of the semi-supervised terms unchanged):
  how much of VQ-Seg's shortfall is the CPU schedule's length.
* ``acdc-10-val`` (CPU preset only): ``acdc-10``'s rows trained for 3,000 iterations
  with two of the training patients held out for validation (the papers' protocol):
  each row is scored on them every 100 iterations and tested with its weights of best
  validation Dice, so the schedule's length is chosen without the test patients.
* ``acdc-5-val`` (CPU preset only): ``acdc-10-val``'s supervised and VQ-Seg rows at 5%
  labelled slices, set against ``acdc-10-val``'s ceiling.
* ``acdc-10-val-pfacodes`` (CPU preset only): ``acdc-10-val``'s VQ-Seg row with the
  alignment of eq. 11 on the chosen codewords (``vqseg-pfacodes``), paired seed by seed
  with ``acdc-10-val``'s rows and set against its ceiling.
* ``acdc-10-val-5seeds`` (CPU preset only): ``acdc-10-val``'s rows and
  ``acdc-10-val-pfacodes``' over seeds 0 to 4, whatever ``--seeds`` says (the two parts'
  folders merged with a run of seeds 3 and 4): how far three seeds' figures hold.
* ``acdc-10-val-nopfa`` (CPU preset only): ``acdc-10-val``'s rows trained again in one
  install with VQ-Seg without PFA (``vqseg-nopfa``) beside them, each set against the
  part's own ceiling and paired within the part.
* ``acdc-10-val-pfadecay`` (CPU preset only): ``acdc-10-val``'s VQ-Seg row with the
  alignment's weight lambda_a falling along a half cosine from 5 to 0 over the
  semi-supervised iterations (``vqseg-pfadecay``), paired seed by seed with
  ``acdc-10-val``'s rows and ``acdc-10-val-nopfa``'s VQ-Seg without PFA, and set against
  ``acdc-10-val``'s ceiling.
* ``acdc-10-val-warmup`` (CPU preset only): ``acdc-10-val``'s VQ-Seg row with the
  supervised warm-up at one sixth of the schedule (``vqseg-warmup``: 500 of 3,000
  iterations, where ``vqseg`` keeps the preset's 100), paired seed by seed with
  ``acdc-10-val``'s rows and set against its ceiling.
* ``acdc-10-val-ema`` (CPU preset only): ``acdc-10-val``'s U-Net rows trained again and
  tested, as VQ-Seg is, with the moving average of their weights (``supervised-ema``,
  ``supervised-full-ema``): what the averaging alone gives.
* ``acdc-10-val-long`` (CPU preset only): ``acdc-10-val`` at 5,000 iterations.
* ``acdc-10-val-20train`` (CPU preset only): ``acdc-10-val`` with twice the training
  patients: every other published test patient (``splits/acdc-test-half.list``, 10) is
  the test set, the other 20 patients train (2 of them held out for validation), so
  10% of the training slices is about twice as many labelled slices.
* ``acdc-10-val-20train-5seeds`` (CPU preset only): ``acdc-10-val-20train``'s rows over
  seeds 0 to 4, whatever ``--seeds`` says (that part's folder merged with a run of seeds
  3 and 4): how far its three seeds' figures hold.
* ``acdc-10-vq``, ``acdc-10-ablation``: where VQ-Seg's result at 10% comes from: its
  network trained on the labelled slices alone (``vqseg-labelled``), and VQ-Seg without
  the reconstruction branch, without QPM and without PFA (the rows of VQ-Seg's Table 2).
* ``acdc-10-long-ablation`` (CPU preset only): the same questions at ``acdc-10-long``'s
  1,800 iterations, where VQ-Seg is above the U-Net: its network on the labelled slices
  alone, and VQ-Seg without PFA and without QPM, paired with ``acdc-10-long``'s rows.
* ``chaos-begal``: VQ-BEGAL against random, max-entropy and MC-dropout selection at
  equal budgets up to 40% of the pool; liver on the CHAOS CT case, the 20 CHAOS MR T2
  cases as the auxiliary modality (test slabs of the one CT patient; with three or more
  CT patients, whole patients held out).
* ``chaos-mr-10``: liver on CHAOS MR T2 alone, split by patient, supervised against
  VQ-Seg at 10% labelled slices; ``chaos-mr-10-long`` (CPU preset only): the same rows at
  1,800 iterations; ``chaos-mr-10-val`` (CPU preset only): those rows with three training
  patients held out and each row's weights chosen on them; ``chaos-mr-10-val-long`` (CPU
  preset only): ``chaos-mr-10-val`` at 3,000 iterations, with the fully supervised ceiling.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from VQMedSegLib.active_learning.budget import slice_count  # noqa: E402
from VQMedSegLib.files import atomic_files, atomic_write_json, atomic_write_text, read_json  # noqa: E402
from VQMedSegLib.metrics.segmentation import mean_std_text  # noqa: E402
from VQMedSegLib.provenance import compute_environment, software_versions, versions_differ  # noqa: E402
from VQMedSegLib.training.ssl_report import case_paired, format_p  # noqa: E402

# benchmark preset -> the library presets and the active-learning schedule it uses
PRESETS = {
    # 2 CPU cores: VQ-Seg's `quick` network (600 iterations, K = 1,024, 128 x 128) and
    # VQ-BEGAL's `cpu` network; CHAOS budget 20% initial + 2 rounds of 10% of the pool -> 40%
    # (8 + 4 + 4 of the one CT patient's 40 pool slices)
    "cpu": {"ssl_preset": "quick", "al_preset": "cpu", "initial": "20%", "rounds": 2, "per_round": "10%"},
    # a GPU: the papers' networks (224 x 224, K = 16,384, paper schedules); budget to 50%
    "gpu": {"ssl_preset": "paper", "al_preset": "paper", "initial": "20%", "rounds": 3, "per_round": "10%"},
}

PARTS = {
    "acdc-5": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.05, "methods": ["supervised", "vqseg"]},
    "acdc-10": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "methods": ["supervised", "vqseg", "supervised-full"]},
    # the same rows trained three times as long: a part of the CPU preset only (per preset,
    # the configuration values it overrides)
    "acdc-10-long": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "methods": ["supervised", "vqseg", "supervised-full"],
                     "overrides": {"cpu": {"iterations": 1800}}},
    # a longer schedule whose weights are chosen on held-out training patients, not on the
    # test patients: 8 training patients, 2 validation patients, the same 20 test patients
    "acdc-10-val": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "methods": ["supervised", "vqseg", "supervised-full"],
                    "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val's schedule and validation patients at 5% labelled slices; its ceiling is
    # acdc-10-val's (the ceiling trains on every slice, whatever the fraction)
    "acdc-5-val": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.05, "methods": ["supervised", "vqseg"],
                   "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val's VQ-Seg row with the alignment (eq. 11) on the chosen codewords, which
    # trains the codebook mapping instead of pushing the encoder away from its codes
    "acdc-10-val-pfacodes": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "methods": ["vqseg-pfacodes"],
                             "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val's rows and acdc-10-val-pfacodes' over five seeds, whatever --seeds says: the
    # first three seeds are those parts' rows, merged with seeds 3 and 4 (benchmarks/README.md)
    "acdc-10-val-5seeds": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "seeds": 5,
                           "methods": ["supervised", "vqseg", "vqseg-pfacodes", "supervised-full"],
                           "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val's rows trained again in one install, with VQ-Seg without PFA beside them:
    # whether the 4-point cost of PFA at 1,800 iterations holds at 3,000 with validation
    "acdc-10-val-nopfa": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10,
                          "methods": ["supervised", "vqseg", "vqseg-nopfa", "supervised-full"],
                          "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val's VQ-Seg row with lambda_a fading to 0: without PFA two seeds of
    # acdc-10-val-nopfa gain 2 points and one loses its right ventricle early in training
    "acdc-10-val-pfadecay": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "methods": ["vqseg-pfadecay"],
                             "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val's VQ-Seg row with the warm-up at quick's share of the schedule: five
    # pilot seeds with 500 iterations of it gained 2.3 points, the low seeds most
    "acdc-10-val-warmup": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "methods": ["vqseg-warmup"],
                           "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val's U-Net rows tested as VQ-Seg is, with the moving average of their weights
    # (VQ-Seg's teacher rule): how much of VQ-Seg's margin the averaging alone gives
    "acdc-10-val-ema": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10,
                        "methods": ["supervised-ema", "supervised-full-ema"],
                        "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # the same rows and validation patients at 5,000 iterations: VQ-Seg's validation Dice was still rising at 3,000
    "acdc-10-val-long": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10,
                         "methods": ["supervised", "vqseg", "supervised-full"],
                         "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 5000}}},
    # acdc-10-val with twice the training patients: 18 train, 2 validation, 10 test (benchmarks/splits/)
    "acdc-10-val-20train": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10,
                            "methods": ["supervised", "vqseg", "supervised-full"], "test_list": "acdc-test-half.list",
                            "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val-20train's rows over five seeds, whatever --seeds says: the first three
    # seeds are that part's rows, merged with seeds 3 and 4 (benchmarks/README.md)
    "acdc-10-val-20train-5seeds": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "seeds": 5,
                                   "methods": ["supervised", "vqseg", "supervised-full"], "test_list": "acdc-test-half.list",
                                   "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
    # acdc-10-val's split, validation patients and labelled slices on VQ-Seg's larger `cpu`
    # library preset (U-Net widths 16-256, K = 4,096 codes of width 64, PFA on 96 slices) at
    # its own 2,000 iterations: a wider network than `quick` lifts every row, the ceiling
    # with VQ-Seg, and the ratio moves from 0.901 to 0.911 (benchmarks/README.md)
    "acdc-10-val-wide": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10,
                         "methods": ["supervised", "vqseg", "supervised-full"], "library_preset": "cpu",
                         "validation_patients": 2, "validate_every": 100, "overrides": {"cpu": {"iterations": 2000}}},
    # where VQ-Seg's shortfall comes from: its network on the labelled slices alone, and
    # the paper's Table 2 rows without the dual branch, QPM or PFA
    "acdc-10-vq": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "methods": ["vqseg-labelled", "vqseg-nodb"]},
    "acdc-10-ablation": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10, "methods": ["vqseg-noqpm", "vqseg-nopfa"]},
    # the same questions at acdc-10-long's 1,800 iterations, where VQ-Seg is above the U-Net:
    # its network on the labelled slices alone, and VQ-Seg without PFA or without QPM
    "acdc-10-long-ablation": {"kind": "ssl", "dataset": "acdc", "labeled_fraction": 0.10,
                              "methods": ["vqseg-labelled", "vqseg-nopfa", "vqseg-noqpm"],
                              "overrides": {"cpu": {"iterations": 1800}}},
    "chaos-begal": {"kind": "simulate", "dataset": "chaos", "strategies": ["begal", "random", "entropy", "mcdropout"]},
    "chaos-mr-10": {"kind": "ssl", "dataset": "chaos-mr", "labeled_fraction": 0.10, "methods": ["supervised", "vqseg"]},
    "chaos-mr-10-long": {"kind": "ssl", "dataset": "chaos-mr", "labeled_fraction": 0.10, "methods": ["supervised", "vqseg"],
                         "overrides": {"cpu": {"iterations": 1800}}},
    # the long rows with their weights chosen on 3 held-out training patients (12 train, 3 validation, 5 test)
    "chaos-mr-10-val": {"kind": "ssl", "dataset": "chaos-mr", "labeled_fraction": 0.10, "methods": ["supervised", "vqseg"],
                        "validation_patients": 3, "validate_every": 100, "overrides": {"cpu": {"iterations": 1800}}},
    # the same split and labelled slices at 3,000 iterations, with the ceiling: liver on MR against full supervision
    "chaos-mr-10-val-long": {"kind": "ssl", "dataset": "chaos-mr", "labeled_fraction": 0.10,
                             "methods": ["supervised", "vqseg", "supervised-full"],
                             "validation_patients": 3, "validate_every": 100, "overrides": {"cpu": {"iterations": 3000}}},
}

# the papers' figures for the closest settings (Dice %), see benchmarks/README.md
PAPER = {
    "acdc": {"source": "VQ-Seg Table 7 (ACDC; 70 training patients, labelled fraction of patients)",
             "5%": {"supervised": 46.74, "vqseg": 90.57}, "10%": {"supervised": 79.52, "vqseg": 91.03},
             "full": 91.30},
    "chaos": {"source": "VQ-BEGAL Table 1 (CHAOS, 40% budget)",
              "40%": {"random": 79.45, "entropy": 80.12, "mcdropout": 81.85, "begal": 87.30}},
}

TARGETS = {
    "acdc_vqseg10_vs_full_ratio": (0.97, "VQ-Seg at 10% labelled slices on ACDC / fully supervised Dice"),
    "chaos_begal_minus_random_at_40": (3.0, "BEGAL minus random on CHAOS at a 40% budget (Dice points, mean of seeds)"),
}


# set per run by the experiment (the seed, the number of structures), not by the preset
PER_RUN_KEYS = ("seed", "num_classes")
# what a run.json written before a setting existed ran with
RECORDED_DEFAULTS = {"validation_patients": 0, "validate_every": 0, "test_list": None}
# the test lists that parts name (``test_list``), by file name
SPLITS = Path(__file__).resolve().parent / "splits"


def _config_class(kind: str):
    from VQMedSegLib.config import BEGALConfig, VQSegConfig

    return VQSegConfig if kind == "ssl" else BEGALConfig


def _preset_config(kind: str, preset: str, **overrides) -> dict:
    from VQMedSegLib.config import begal_config_from_preset, vqseg_config_from_preset

    config = (vqseg_config_from_preset if kind == "ssl" else begal_config_from_preset)(preset, **overrides)
    return _comparable(kind, config.to_json())


def parts_of(preset: str) -> list[str]:
    """The parts a benchmark preset runs: a part with per-preset overrides belongs only to
    the presets it names."""
    return [name for name, part in PARTS.items() if "overrides" not in part or preset in part["overrides"]]


def _comparable(kind: str, config: dict | None) -> dict:
    """A configuration as today's code reads it (``JsonConfig.as_read_today``; a key today's
    code no longer knows leaves it unequal, so the part is rerun), without the per-run keys."""
    config = _config_class(kind).as_read_today(config or {})
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in PER_RUN_KEYS}


def part_settings(name: str, preset: str, seeds: int) -> dict:
    """What a part runs: its data, methods, seeds (``seeds`` of them, unless the part names
    its own number) and the full configuration of its preset (so a preset whose values
    change is rerun, not read back)."""
    part, p = PARTS[name], PRESETS[preset]
    seeds = part.get("seeds", seeds)
    if name not in parts_of(preset):
        raise ValueError(f"part {name} belongs to the {', '.join(part['overrides'])} preset(s), not to {preset}")
    overrides = part.get("overrides", {}).get(preset, {})
    if part["kind"] == "ssl":
        library_preset = part.get("library_preset", p["ssl_preset"])
        return {"kind": "ssl", "dataset": part["dataset"], "labeled_fraction": part["labeled_fraction"],
                "methods": part["methods"], "preset": library_preset, "seeds": list(range(seeds)),
                "validation_patients": part.get("validation_patients", 0), "validate_every": part.get("validate_every", 0),
                "test_list": part.get("test_list"), "config": _preset_config("ssl", library_preset, **overrides)}
    return {"kind": "simulate", "dataset": part["dataset"], "strategies": part["strategies"], "preset": p["al_preset"],
            "seeds": list(range(seeds)), "initial": p["initial"], "rounds": p["rounds"], "per_round": p["per_round"],
            "config": _preset_config("simulate", p["al_preset"], **overrides)}


def recorded_settings(run: dict, settings: dict) -> dict:
    """The same fields as ``settings``, read from a part's ``run.json``.

    A simulation from before the budgets were shares of the pool recorded its numbers of
    slices; such a number reads as the share the settings name when it is that share of
    the pool the run recorded (``pool_slices``)."""
    recorded = {k: run.get(k, RECORDED_DEFAULTS.get(k)) for k in settings if k not in ("kind", "config")}
    for key in ("initial", "per_round"):
        share, count = settings.get(key), recorded.get(key)
        if (isinstance(share, str) and isinstance(count, int) and "pool_slices" in run
                and slice_count(share, run["pool_slices"], key) == count):
            recorded[key] = share
    return {"kind": settings["kind"], **recorded, "config": _comparable(settings["kind"], run.get("config"))}


def part_config(settings: dict):
    """The configuration a part trains with: exactly the one its settings record."""
    return _config_class(settings["kind"]).from_json(settings["config"], source=f"preset {settings['preset']!r}")


def run_part(settings: dict, out: Path, device: torch.device) -> None:
    if settings["kind"] == "ssl":
        from VQMedSegLib.training.ssl_experiment import run_ssl

        run_ssl(settings["dataset"], settings["labeled_fraction"], settings["methods"], settings["seeds"],
                part_config(settings), out, device, preset=settings["preset"],
                validation_patients=settings["validation_patients"], validate_every=settings["validate_every"],
                test_list=SPLITS / settings["test_list"] if settings["test_list"] else None)
    else:
        from VQMedSegLib.active_learning.simulation import simulate

        simulate(settings["dataset"], settings["strategies"], settings["rounds"], settings["per_round"], settings["seeds"],
                 part_config(settings), out, device, initial=settings["initial"],
                 preset=settings["preset"])


# seed-paired comparisons (method A minus method B): within a seed both rows trained on
# the same labelled slices, so the per-seed difference removes the labelled set's luck
PAIRED = [
    (("acdc-5", "vqseg"), ("acdc-5", "supervised")),
    (("acdc-10", "vqseg"), ("acdc-10", "supervised")),
    (("chaos-mr-10", "vqseg"), ("chaos-mr-10", "supervised")),
    (("acdc-10-vq", "vqseg-labelled"), ("acdc-10", "supervised")),
    (("acdc-10", "vqseg"), ("acdc-10-vq", "vqseg-labelled")),
    (("acdc-10", "vqseg"), ("acdc-10-vq", "vqseg-nodb")),
    (("acdc-10", "vqseg"), ("acdc-10-ablation", "vqseg-noqpm")),
    (("acdc-10", "vqseg"), ("acdc-10-ablation", "vqseg-nopfa")),
    (("acdc-10-long", "vqseg"), ("acdc-10-long", "supervised")),
    (("acdc-10-long", "vqseg"), ("acdc-10", "vqseg")),
    (("acdc-10-long", "supervised"), ("acdc-10", "supervised")),
    (("acdc-10-long", "vqseg"), ("acdc-10-long-ablation", "vqseg-labelled")),
    (("acdc-10-long", "vqseg"), ("acdc-10-long-ablation", "vqseg-nopfa")),
    (("acdc-10-long", "vqseg"), ("acdc-10-long-ablation", "vqseg-noqpm")),
    (("acdc-10-long-ablation", "vqseg-labelled"), ("acdc-10-long", "supervised")),
    (("acdc-10-val", "vqseg"), ("acdc-10-val", "supervised")),
    (("acdc-5-val", "vqseg"), ("acdc-5-val", "supervised")),
    (("acdc-10-val-pfacodes", "vqseg-pfacodes"), ("acdc-10-val", "vqseg")),
    (("acdc-10-val-pfacodes", "vqseg-pfacodes"), ("acdc-10-val", "supervised")),
    (("acdc-10-val-5seeds", "vqseg"), ("acdc-10-val-5seeds", "supervised")),
    (("acdc-10-val-5seeds", "vqseg-pfacodes"), ("acdc-10-val-5seeds", "vqseg")),
    (("acdc-10-val-nopfa", "vqseg"), ("acdc-10-val-nopfa", "supervised")),
    (("acdc-10-val-nopfa", "vqseg"), ("acdc-10-val-nopfa", "vqseg-nopfa")),
    (("acdc-10-val-nopfa", "vqseg-nopfa"), ("acdc-10-val-nopfa", "supervised")),
    (("acdc-10-val-pfadecay", "vqseg-pfadecay"), ("acdc-10-val", "vqseg")),
    (("acdc-10-val-pfadecay", "vqseg-pfadecay"), ("acdc-10-val-nopfa", "vqseg-nopfa")),
    (("acdc-10-val-pfadecay", "vqseg-pfadecay"), ("acdc-10-val", "supervised")),
    (("acdc-10-val-warmup", "vqseg-warmup"), ("acdc-10-val", "vqseg")),
    (("acdc-10-val-warmup", "vqseg-warmup"), ("acdc-10-val", "supervised")),
    (("acdc-10-val", "vqseg"), ("acdc-10-val-ema", "supervised-ema")),
    (("acdc-10-val-ema", "supervised-ema"), ("acdc-10-val", "supervised")),
    (("acdc-10-val-ema", "supervised-full-ema"), ("acdc-10-val", "supervised-full")),
    (("acdc-10-val-long", "vqseg"), ("acdc-10-val-long", "supervised")),
    (("acdc-10-val-long", "vqseg"), ("acdc-10-val", "vqseg")),
    (("acdc-10-val-long", "supervised"), ("acdc-10-val", "supervised")),
    (("acdc-10-val-long", "supervised-full"), ("acdc-10-val", "supervised-full")),
    (("acdc-10-val-20train", "vqseg"), ("acdc-10-val-20train", "supervised")),
    (("acdc-10-val-20train-5seeds", "vqseg"), ("acdc-10-val-20train-5seeds", "supervised")),
    (("acdc-10-val-wide", "vqseg"), ("acdc-10-val-wide", "supervised")),
    (("acdc-10-val-wide", "vqseg"), ("acdc-10-val", "vqseg")),
    (("acdc-10-val-wide", "supervised-full"), ("acdc-10-val", "supervised-full")),
    (("chaos-mr-10-long", "vqseg"), ("chaos-mr-10-long", "supervised")),
    (("chaos-mr-10-long", "vqseg"), ("chaos-mr-10", "vqseg")),
    (("chaos-mr-10-val", "vqseg"), ("chaos-mr-10-val", "supervised")),
    (("chaos-mr-10-val-long", "vqseg"), ("chaos-mr-10-val-long", "supervised")),
    (("chaos-mr-10-val-long", "vqseg"), ("chaos-mr-10-val", "vqseg")),
    (("chaos-mr-10-val-long", "supervised"), ("chaos-mr-10-val", "supervised")),
]


# the parts with a ceiling row, and the prefix and suffix of their ratio figures in the headline
RATIO_PARTS = (("acdc-10", "acdc", ""), ("acdc-10-long", "acdc", "_long"), ("acdc-10-val", "acdc", "_val"),
               ("acdc-10-val-long", "acdc", "_val_long"), ("acdc-10-val-20train", "acdc", "_val_20train"),
               ("acdc-10-val-wide", "acdc", "_val_wide"), ("acdc-10-val-5seeds", "acdc", "_val_5seeds"),
               ("acdc-10-val-20train-5seeds", "acdc", "_val_20train_5seeds"), ("acdc-10-val-nopfa", "acdc", "_val_nopfa"),
               ("chaos-mr-10-val-long", "chaos_mr", "_val_long"))
# parts without a ceiling row of their own -> the part whose ceiling they are set against,
# and the prefix, labelled percentage and suffix of their ratio figures in the headline
CEILING_OF = {"acdc-5-val": ("acdc-10-val", "acdc", "5", "_val")}
# variants of a VQ-Seg row in a part of their own -> the row, the part whose ceiling they
# are set against and the name of their ratio figure in the headline
ROW_RATIOS = {"acdc-10-val-pfacodes": ("vqseg-pfacodes", "acdc-10-val", "acdc_vqseg_pfacodes10_vs_full_ratio_val"),
              "acdc-10-val-5seeds": ("vqseg-pfacodes", "acdc-10-val-5seeds", "acdc_vqseg_pfacodes10_vs_full_ratio_val_5seeds"),
              "acdc-10-val-nopfa": ("vqseg-nopfa", "acdc-10-val-nopfa", "acdc_vqseg_nopfa10_vs_full_ratio_val_nopfa"),
              "acdc-10-val-pfadecay": ("vqseg-pfadecay", "acdc-10-val", "acdc_vqseg_pfadecay10_vs_full_ratio_val"),
              "acdc-10-val-warmup": ("vqseg-warmup", "acdc-10-val", "acdc_vqseg_warmup10_vs_full_ratio_val")}
# the clean-up chosen on validation, in the report's words
CLEAN_UP_WORDS = "with the largest-piece clean-up chosen per structure on the same patients"
# how many validation patients, in the report's words
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _same_settings(pa: dict, pb: dict, keys: tuple[str, ...]) -> bool:
    return all(pa["settings"].get(k, RECORDED_DEFAULTS.get(k)) == pb["settings"].get(k, RECORDED_DEFAULTS.get(k))
               for k in keys)


def same_training_slices(pa: dict, pb: dict) -> bool:
    """Whether two parts ran on the same data, labelled fraction, seeds and split, so that
    their rows of one seed trained on the same labelled slices."""
    return _same_settings(pa, pb, ("dataset", "labeled_fraction", "seeds", "validation_patients", "test_list"))


def same_ceiling(pa: dict, pb: dict) -> bool:
    """Whether two parts trained their fully supervised rows alike: the same data, seeds,
    split, validation patients and configuration (the labelled fraction may differ: the
    ceiling trains on every slice)."""
    return _same_settings(pa, pb, ("dataset", "seeds", "validation_patients", "test_list", "preset", "config"))


def paired_differences(parts: dict) -> list[dict]:
    """Per-seed Dice differences (points) of the :data:`PAIRED` rows whose parts ran with
    the same data, labelled fraction and seeds."""
    out = []
    for (part_a, a), (part_b, b) in PAIRED:
        pa, pb = parts.get(part_a), parts.get(part_b)
        if not pa or not pb or a not in pa["results"] or b not in pb["results"]:
            continue
        if not same_training_slices(pa, pb):
            continue
        runs_a = {r["seed"]: r["dice_mean"] for r in pa["results"][a].get("per_seed", [])}
        runs_b = {r["seed"]: r["dice_mean"] for r in pb["results"][b].get("per_seed", [])}
        seeds = sorted(set(runs_a) & set(runs_b))
        diff = [100 * (runs_a[k] - runs_b[k]) for k in seeds]
        if not diff:
            continue
        pair = {"a": f"{part_a}/{a}", "b": f"{part_b}/{b}", "seeds": seeds, "per_seed": diff,
                "mean": float(np.mean(diff)), "std": float(np.std(diff)), "a_higher": sum(d > 0 for d in diff),
                # packages both runs recorded at other versions: the pair then holds two installs'
                # arithmetic as well as the rows' difference (a new install moved a seed by points)
                "versions_differ": versions_differ(pa.get("versions"), pb.get("versions"))}
        # None unless both kept per-case scores
        for key, view in (("cases", None), ("cases_largest_component", "largest_component")):
            cases = case_paired(pa["results"][a], pb["results"][b], seeds, view)
            if cases:
                pair[key] = cases
        out.append(pair)
    return out


def _ratios(out: dict, rows: dict, full: dict, name: str) -> None:
    """VQ-Seg's and the supervised U-Net's Dice over the ceiling's, as ``name`` with the
    row in place of ``{row}``; with the last iteration's weights and with the clean-up
    chosen on validation where both rows recorded them."""
    _ratio(out, rows["vqseg"], full, name.format(row="vqseg"))
    out[name.format(row="supervised")] = rows["supervised"]["dice_mean"] / full["dice_mean"]


def _ratio(out: dict, row: dict, full: dict, name: str) -> None:
    """One row's Dice over the ceiling's, as ``name``; with the last iteration's weights
    (``_last``) and with the clean-up chosen on validation (``_postprocessed``) where both
    rows recorded them."""
    out[name] = row["dice_mean"] / full["dice_mean"]
    if "last_iteration" in row and "last_iteration" in full:
        out[name + "_last"] = row["last_iteration"]["dice_mean"] / full["last_iteration"]["dice_mean"]
    if "post_processing" in row and "post_processing" in full:  # clean-up chosen on validation
        out[name + "_postprocessed"] = row["post_processing"]["dice_mean"] / full["post_processing"]["dice_mean"]


def headline(parts: dict) -> dict:
    """The figures the targets are judged on, from whichever parts ran."""
    out: dict = {}
    for part, prefix, suffix in RATIO_PARTS:
        rows = parts.get(part, {}).get("results")
        if rows and "vqseg" in rows and "supervised-full" in rows:
            _ratios(out, rows, rows["supervised-full"], f"{prefix}_{{row}}10_vs_full_ratio{suffix}")
    for part, (ceiling, prefix, percent, suffix) in CEILING_OF.items():
        pa, pc = parts.get(part), parts.get(ceiling)
        if (pa and pc and {"vqseg", "supervised"} <= set(pa["results"]) and "supervised-full" in pc["results"]
                and same_ceiling(pa, pc)):
            _ratios(out, pa["results"], pc["results"]["supervised-full"],
                    f"{prefix}_{{row}}{percent}_vs_full_ratio{suffix}")
    for part, (row, ceiling, name) in ROW_RATIOS.items():
        pa, pc = parts.get(part), parts.get(ceiling)
        if pa and pc and row in pa["results"] and "supervised-full" in pc["results"] and same_ceiling(pa, pc):
            _ratio(out, pa["results"][row], pc["results"]["supervised-full"], name)
    val, ema = parts.get("acdc-10-val"), parts.get("acdc-10-val-ema")
    if (val and ema and "vqseg" in val["results"] and "supervised-full-ema" in ema["results"]
            and same_training_slices(val, ema) and val["settings"].get("config") == ema["settings"].get("config")):
        out["acdc_vqseg10_vs_full_ema_ratio_val"] = (val["results"]["vqseg"]["dice_mean"]
                                                     / ema["results"]["supervised-full-ema"]["dice_mean"])
    chaos = parts.get("chaos-begal", {}).get("results")
    if chaos and "begal" in chaos and "random" in chaos:
        last = len(chaos["begal"]["labeled_fraction"]) - 1
        out["chaos_budget_at_last_round"] = chaos["begal"]["labeled_fraction"][last]
        out["chaos_begal_minus_random_at_40"] = 100 * (chaos["begal"]["dice_mean"][last] - chaos["random"]["dice_mean"][last])
    return out


def _validated_setting(part: str) -> str:
    """How a validation part of the CPU preset trained, in the report's words."""
    held_out = PARTS[part]["validation_patients"]
    return (f"With {PARTS[part]['overrides']['cpu']['iterations']:,} iterations and each row's weights chosen on "
            f"{COUNT_WORDS.get(held_out, held_out)} held-out training patients (`{part}`"
            + (f", test patients those of `{PARTS[part]['test_list']}`" if PARTS[part].get("test_list") else "")
            + (f", the `{PARTS[part]['library_preset']}` network" if PARTS[part].get("library_preset") else "")
            + (f", {COUNT_WORDS.get(PARTS[part]['seeds'], PARTS[part]['seeds'])} seeds" if PARTS[part].get("seeds") else "")
            + ")")


def report(summary: dict) -> str:
    lines = ["# Accuracy on the real scans", "",
             f"Benchmark preset `{summary['preset']}`, seeds {summary['seeds']}; software {summary['versions']}; "
             f"{summary['wall_seconds'] / 3600:.2f} h of compute in the parts on device {summary['device']} "
             "(each part's torch threads in its heading).", ""]
    lines += ["## Targets", "", "| figure | target | measured | met |", "|---|---|---|---|"]
    for key, (target, what) in TARGETS.items():
        value = summary["figures"].get(key)
        shown = "not run" if value is None else f"{value:.3f}"
        met = "n/a" if value is None else ("yes" if value >= target else "**no**")
        lines.append(f"| {what} | ≥ {target:g} | {shown} | {met} |")
    long = summary["figures"].get("acdc_vqseg10_vs_full_ratio_long")
    if long is not None:
        lines += ["", f"With three times the training length (`acdc-10-long`), VQ-Seg at 10% reaches {long:.3f} "
                  f"of the fully supervised Dice (the supervised U-Net "
                  f"{summary['figures']['acdc_supervised10_vs_full_ratio_long']:.3f})."]
    for part, prefix, suffix in RATIO_PARTS:
        val = summary["figures"].get(f"{prefix}_vqseg10_vs_full_ratio{suffix}")
        held_out = PARTS[part].get("validation_patients")
        if val is None or not held_out:
            continue
        last = summary["figures"].get(f"{prefix}_vqseg10_vs_full_ratio{suffix}_last")
        post = summary["figures"].get(f"{prefix}_vqseg10_vs_full_ratio{suffix}_postprocessed")
        lines += ["", _validated_setting(part) + f", VQ-Seg at 10% reaches {val:.3f} of the fully supervised Dice"
                  + (" of the liver on MR" if prefix == "chaos_mr" else "") + " (the supervised "
                  f"U-Net {summary['figures'][f'{prefix}_supervised10_vs_full_ratio{suffix}']:.3f}"
                  + (f"; with the last iteration's weights {last:.3f}" if last is not None else "")
                  + (f"; {CLEAN_UP_WORDS} {post:.3f}"
                     if post is not None else "") + ")."]
    for part, (ceiling, prefix, percent, suffix) in CEILING_OF.items():
        figures = summary["figures"]
        ratio = figures.get(f"{prefix}_vqseg{percent}_vs_full_ratio{suffix}")
        if ratio is None:
            continue
        post = figures.get(f"{prefix}_vqseg{percent}_vs_full_ratio{suffix}_postprocessed")
        lines += ["", _validated_setting(part) + f", VQ-Seg at {percent}% "
                  f"reaches {ratio:.3f} of `{ceiling}`'s fully supervised Dice (the supervised U-Net "
                  f"{figures[f'{prefix}_supervised{percent}_vs_full_ratio{suffix}']:.3f}"
                  + (f"; {CLEAN_UP_WORDS} {post:.3f}"
                     if post is not None else "") + ")."]
    for part, (row, ceiling, name) in ROW_RATIOS.items():
        ratio = summary["figures"].get(name)
        if ratio is None:
            continue
        also = [f"{words} {summary['figures'][name + key]:.3f}" for key, words in
                (("_last", "with the last iteration's weights"),
                 ("_postprocessed", CLEAN_UP_WORDS))
                if name + key in summary["figures"]]
        lines += ["", _validated_setting(part) + f", `{row}` at {PARTS[part]['labeled_fraction']:.0%} reaches "
                  f"{ratio:.3f} of `{ceiling}`'s fully supervised Dice" + (f" ({'; '.join(also)})" if also else "") + "."]
    ema = summary["figures"].get("acdc_vqseg10_vs_full_ema_ratio_val")
    if ema is not None:
        lines += ["", "With `acdc-10-val`'s weights chosen on validation, against a ceiling tested with the moving "
                  f"average of its weights (`acdc-10-val-ema`), VQ-Seg at 10% reaches {ema:.3f} of the fully "
                  "supervised Dice (VQ-Seg is tested with its EMA teacher)."]
    if summary.get("paired"):
        lines += ["", "## Seed-paired differences", "",
                  "Dice points, A minus B, seed by seed (both rows of a seed trained on the same labelled slices).", "",
                  "| A | B | per seed | mean ± std | seeds where A > B |", "|---|---|---|---|---|"]
        for d in summary["paired"]:
            seeds = " / ".join(f"{v:+.2f}" for v in d["per_seed"])
            mark = " †" if d.get("versions_differ") else ""
            lines.append(f"| {d['a']}{mark} | {d['b']} | {seeds} | {mean_std_text(d['mean'], d['std'], len(d['seeds']), scale=1, sign=True)} | {d['a_higher']} of {len(d['seeds'])} |")
        across = sorted({k for d in summary["paired"] for k in d.get("versions_differ", [])})
        if across:
            lines += ["", f"† The two rows ran with other versions of {', '.join(across)} (each part's `run.json`): "
                      "the pair holds two installs' arithmetic as well as the rows' difference, and a new install "
                      "alone can move a seed by points (benchmarks/README.md)."]
        by_case = [d for d in summary["paired"] if "cases" in d]
        if by_case:
            lines += ["", "The same pairs test case by test case, where both rows kept per-case scores: each case's Dice "
                      "(mean of its structures) averaged over the seeds, A minus B, with the two-sided Wilcoxon "
                      "signed-rank test over the patients (the frames of one ACDC patient averaged into one "
                      "difference: they move together); as predicted and, where both rows kept them, with each "
                      "structure's largest piece kept (as `vqmedseg predict` does for the liver).", "",
                      "| A | B | scores | cases | mean | median | cases where A > B | patients where A > B | Wilcoxon p (patients) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for d in by_case:
                for key, scores in (("cases", "as predicted"), ("cases_largest_component", "largest piece")):
                    c = d.get(key)
                    if c:
                        patients = (f"{c['patients_higher']} of {c['n_patients']}" if "n_patients" in c
                                    else "not recorded")
                        lines.append(f"| {d['a']} | {d['b']} | {scores} | {c['n']} | {c['mean']:+.2f} | "
                                     f"{c['median']:+.2f} | {c['a_higher']} of {c['n']} | {patients} | "
                                     f"{format_p(c['wilcoxon_p'])} |")
    for name, part in summary["parts"].items():
        threads = part.get("threads")
        threads = "threads not recorded" if threads is None else f"{threads} thread{'' if threads == 1 else 's'}"
        if part.get("cpu_capability"):
            threads += f", {part['cpu_capability']}"
        body = part["table"].split("\n", 2)[2].strip().replace("\n## ", "\n### ")  # its sections under the part's heading
        lines += ["", f"## {name} ({part['seconds'] / 60:.0f} min, {threads})", "", body]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", help=f"comma-separated parts: {','.join(PARTS)}")
    p.add_argument("--fresh", action="store_true", help="rerun parts even when their results are already in --out")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from VQMedSegLib.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else parts_of(args.preset)
    unknown = [c for c in chosen if c not in PARTS]
    if unknown:
        p.error(f"--only: unknown parts {unknown}; expected some of {', '.join(PARTS)}")
    other = [c for c in chosen if c not in parts_of(args.preset)]
    if other:
        p.error(f"--only: {', '.join(other)} belong(s) to other presets than {args.preset} "
                f"({'; '.join(f'{c}: ' + ', '.join(PARTS[c]['overrides']) for c in other)}); "
                f"expected some of {', '.join(parts_of(args.preset))}")
    out = Path(args.out)
    plan = {}  # part -> (settings, its run.json, whether its finished results in --out are read back)
    for name in chosen:
        settings = part_settings(name, args.preset, args.seeds)
        run_file = out / name / "run.json"
        reuse = False
        if run_file.exists() and not args.fresh:
            recorded = recorded_settings(read_json(run_file), settings)
            reuse = recorded == settings
            if not reuse:
                differ = sorted(k for k in settings if recorded.get(k) != settings[k])
                print(f"{name}: {run_file} holds other settings ({', '.join(differ)} differ); rerunning", flush=True)
        plan[name] = (settings, run_file, reuse)
    to_run = [name for name, (_, _, reuse) in plan.items() if not reuse]
    if args.preset == "gpu" and to_run and device.type != "cuda" and args.device == "auto":
        p.error(f"--preset gpu: no CUDA device found, and on a CPU the papers' networks take seconds a training step, "
                f"days to weeks for each of {', '.join(to_run)} (python benchmarks/run_speed.py --only presets measures "
                f"this machine's pace); run on a GPU, or pass --device cpu to run on the CPU anyway")
    out.mkdir(parents=True, exist_ok=True)
    parts = {}
    for name, (settings, run_file, reuse) in plan.items():
        folder = run_file.parent
        if not reuse:
            print(f"{name}: running {settings}", flush=True)
            run_part(settings, folder, device)
        run = read_json(run_file)
        parts[name] = {"settings": settings, "results": read_json(folder / "results.json"),
                       "table": (folder / "results.md").read_text(encoding="utf-8"), "seconds": run["seconds"],
                       "split": run.get("split") or run.get("description"), "versions": run["versions"],
                       "threads": run.get("threads"), "cpu_capability": run.get("cpu_capability"),
                       "reused": reuse}
        print(f"{name}: {run['seconds'] / 60:.1f} min{' (read back)' if reuse else ''}", flush=True)
    summary = {
        "preset": args.preset, "seeds": list(range(args.seeds)),
        **compute_environment(device), "versions": software_versions(),
        "wall_seconds": sum(p["seconds"] for p in parts.values()), "parts": parts, "figures": headline(parts),
        "paired": paired_differences(parts),
        "papers": PAPER, "measured_at": time.strftime("%Y-%m-%d"),
    }
    summary["targets"] = {k: {"target": t, "what": w, "value": summary["figures"].get(k),
                              "met": None if summary["figures"].get(k) is None else summary["figures"][k] >= t}
                          for k, (t, w) in TARGETS.items()}
    with atomic_files() as stage:  # the figures and their report replace an earlier run's together
        atomic_write_json(stage(out / "accuracy.json"), summary)
        atomic_write_text(stage(out / "accuracy.md"), report(summary))
    print(report(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
