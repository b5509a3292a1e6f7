"""The built-in example: ``vqmedseg demo --out DIR``.

Builds paired CT/MR phantoms, annotates the training cases fully in a workspace, trains
the supervised U-Net baseline as a workspace job, predicts the held-out case and writes
what a user opens: ``metrics.json``, ``prediction.seg.nrrd``, ``uncertainty.nrrd``,
``scene.mrb``, ``overview.png`` and ``report.md``.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from .. import __version__
from ..config import train_config_from_preset
from ..data.phantoms import make_dataset
from ..device import resolve_device
from ..errors import InputError, VQMedSegError, listed
from ..export.prediction import segments_for, write_prediction
from ..files import atomic_write_json, atomic_write_text, read_json
from ..inference.predict import load_model, predict_volume
from ..jobs.runner import JobContext
from ..jobs.workspace import Workspace
from ..metrics.segmentation import per_slice_scores, score_volumes
from ..tasks import get_task
from ..training.supervised import train_supervised

log = logging.getLogger("vqmedseg")

N_TRAIN, N_VAL = 3, 1
LIVER = 1
# what the demo writes into its --out folder; MARKER first, so a demo killed early is known as one
MARKER = "demo.json"
OUTPUTS = (MARKER, "metrics.json", "overview.png", "prediction.seg.nrrd", "report.md", "scene.mrb", "uncertainty.nrrd",
           "workspace")


def run_demo(out: Path, preset: str = "quick", device_name: str = "auto", seed: int = 0, iterations: int | None = None) -> dict:
    t0 = time.monotonic()
    out = Path(out)
    _refuse_to_write_over_other_files(out, seed)
    scene_writer = _scene_writer()  # known before training: minutes are not spent to fail at the end
    # the settings are checked before anything is written: a refused run leaves no demo.json
    # that would ask for the same refused settings again
    device = resolve_device(device_name)
    config = train_config_from_preset(preset, iterations=iterations, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, {"vqmedseg_demo": __version__, "seed": seed})
    task = get_task("liver")
    cases = make_dataset("phantom-liver", N_TRAIN + N_VAL + 1, seed=seed)
    train_cases, val_cases, test_case = cases[:N_TRAIN], cases[N_TRAIN : N_TRAIN + N_VAL], cases[-1]

    ws = Workspace.create(out / "workspace", task="liver")
    config = config.replace(validation_cases=[c.case_id for c in val_cases])
    for case in train_cases + val_cases:
        if case.case_id not in ws.cases():
            ws.add_case(case.case_id, case.ct, case.mr, slice_size=config.slice_size)
        liver = case.ct_label.with_array((case.ct_label.array == LIVER).astype("uint8"))
        ws.annotate(case.case_id, liver)  # the baseline is fully supervised on these cases

    with JobContext(ws, "train", params={"method": "supervised", "config": config.to_json(), "device": str(device)}) as ctx:
        entry = train_supervised(ctx, ws, config, device)
    train_seconds = time.monotonic() - t0

    model, ckpt = load_model(ws.resolve(entry["path"]), device)
    t_pred = time.monotonic()
    pred = predict_volume(model, ckpt, test_case.ct, device, mr=test_case.mr)
    predict_seconds = time.monotonic() - t_pred
    files = write_prediction(out, pred, "liver")

    reference = test_case.ct_label.with_array((test_case.ct_label.array == LIVER).astype("uint8"))
    scores = score_volumes(pred.label, reference).to_json()
    slices = per_slice_scores(pred.label, reference)
    metrics = {
        "case": test_case.case_id,
        "task": "liver",
        "method": "supervised",
        **{k: scores[k] for k in ("dice", "jaccard", "hd95_mm", "asd_mm", "empty", "units")},
        "per_slice_dice_mean": _mean([s["dice"] for s in slices if s["empty"] != "both"]),
        "hd95_convention": "MONAI: 95th percentile of each directed surface distance, then the maximum; millimetres, 3-D",
        "preset": preset,
        "iterations": config.iterations,
        "seed": seed,
    }
    atomic_write_json(out / "metrics.json", metrics)

    from ..export.overview import write_overview_png

    if scene_writer is not None:
        scene_writer(
            out / "scene.mrb",
            ct=test_case.ct,
            mr=test_case.mr,
            label=pred.label,
            segments=segments_for("liver"),
            uncertainty={"entropy": pred.uncertainty["entropy"]},
        )
    write_overview_png(
        out / "overview.png",
        test_case.ct,
        pred.label,
        pred.uncertainty["entropy"],
        reference=reference,
        window=task.ct_window,
        title=f"VQMedSeg demo: {test_case.case_id}, Dice {scores['dice']:.3f}",
    )
    seconds = time.monotonic() - t0
    result = {
        "metrics": metrics,
        "test_case": test_case.case_id,
        "model": entry["path"],
        "val_dice": entry.get("val_dice"),
        "seconds": seconds,
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "device": str(device),
        "outputs": {k: str(v.relative_to(out)) for k, v in files.items()}
        | ({"scene": "scene.mrb"} if scene_writer is not None else {})
        | {"overview": "overview.png", "report": "report.md", "metrics": "metrics.json"},
    }
    atomic_write_text(out / "report.md", _report(result, config, train_cases, val_cases))
    return result


def _refuse_to_write_over_other_files(out: Path, seed: int) -> None:
    """The demo replaces its own outputs (running the README's command again works), but
    not files of the same names that no demo wrote (a report.md kept in the folder given
    as --out), nor a demo of other phantoms (another --seed), whose workspace holds them."""
    taken = [name for name in OUTPUTS if (out / name).exists()] if out.is_dir() else []
    if not taken:
        return
    earlier = _earlier_demo_seed(out)
    if earlier is None:
        raise InputError(f"--out {out}: holds {listed(taken, most=len(OUTPUTS))}, which an earlier demo did not write; "
                         "expected a new or empty folder, one without those names, or an earlier demo's folder")
    if earlier != seed:
        raise InputError(f"--out {out}: holds a demo made with --seed {earlier}; run it with --seed {earlier} to make it "
                         "again, or give another --out")


def _earlier_demo_seed(out: Path) -> int | None:
    """The seed of the demo in ``out`` (its demo.json; before that file existed, the seed
    in its metrics.json beside a demo report), or None when ``out`` holds no demo."""
    for name, is_demo in ((MARKER, lambda d: "vqmedseg_demo" in d),
                          ("metrics.json", lambda d: _read_start(out / "report.md").startswith("# VQMedSeg demo report"))):
        try:
            data = read_json(out / name)
        except VQMedSegError:
            continue
        if isinstance(data, dict) and is_demo(data) and isinstance(data.get("seed"), int):
            return data["seed"]
    return None


def _read_start(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(64)
    except (OSError, UnicodeDecodeError):
        return ""


def _scene_writer():
    """:func:`~VQMedSegLib.export.mrml.write_scene`, or None when slicer-core (an optional
    package, and one with no build for Python 3.9) is missing: the demo then writes
    everything but the scene, and says so."""
    try:
        from ..export.mrml import write_scene
    except ImportError as exc:
        log.warning("scene.mrb will not be written: %s", exc)
        return None
    return write_scene


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _report(result: dict, config, train_cases, val_cases) -> str:
    m = result["metrics"]
    hd = "undefined" if m["hd95_mm"] is None else f"{m['hd95_mm']:.2f} mm"
    asd = "undefined" if m["asd_mm"] is None else f"{m['asd_mm']:.2f} mm"
    return f"""# VQMedSeg demo report

A supervised 2-D U-Net (MONAI BasicUNet; the papers' "Baseline (U-Net)" / "CT-only" row)
was trained on synthetic paired CT/MR abdominal phantoms and evaluated on a held-out
phantom case. The MR volumes are in the workspace and the scene; this baseline uses CT only.

## Result on the held-out case `{m['case']}`

| metric | value |
|---|---|
| Dice | {m['dice']:.4f} |
| Jaccard | {m['jaccard']:.4f} |
| HD95 (3-D, mm) | {hd} |
| ASD (symmetric, 3-D, mm) | {asd} |
| mean per-slice Dice (slices with liver in either mask) | {m['per_slice_dice_mean']:.4f} |

HD95 convention: {m['hd95_convention']}. Empty masks: both empty scores Dice 1 and
distance 0; exactly one empty scores Dice 0 with undefined (null) distances.

## Training

- training cases: {', '.join(c.case_id for c in train_cases)} (every slice annotated)
- validation case: {', '.join(c.case_id for c in val_cases)} (best validation Dice {result['val_dice'] if result['val_dice'] is None else f"{result['val_dice']:.4f}"})
- preset `{m['preset']}`: {config.iterations} iterations, batch {config.batch_size}, slices {config.slice_size}x{config.slice_size}, features {list(config.features)}
- device {result['device']}; training {result['train_seconds']:.0f} s, prediction {result['predict_seconds']:.1f} s, total {result['seconds']:.0f} s

## Files

- `prediction.seg.nrrd`: the liver segmentation (open in Slicer, or read with slicerio)
- `uncertainty.nrrd`: predictive entropy of the softmax, in nats (0 = certain, 0.693 = coin toss)
{"- `scene.mrb`: CT, MR, segmentation and uncertainty overlay; double-click to open in 3D Slicer" if "scene" in result["outputs"]
   else "- no `scene.mrb`: writing it needs slicer-core (`pip install 'vqmedseg[scene]'`); load the files above into 3D Slicer instead"}
- `overview.png`: slices with the prediction (and reference) contours and the uncertainty overlay
- `metrics.json`: the numbers above
- `workspace/`: the workspace with inputs, annotations, model and event log

Software: vqmedseg {__version__}, torch {torch.__version__}, Python {platform.python_version()}.
"""

