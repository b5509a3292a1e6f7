"""The ``vqmedseg`` command line (also ``python -m VQMedSegLib``).

Every sub-command turns a :class:`~VQMedSegLib.errors.VQMedSegError` into one line on
stderr and its exit code (2 bad input, 3 workspace, 130 cancelled); anything else is a
bug and shows its traceback with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .. import __version__
from ..errors import InputError, VQMedSegError
from ..tasks import TASKS

log = logging.getLogger("vqmedseg")


def _parse_indices(text: str, option: str = "--slices") -> list[int]:
    """``"3,5,10-12"`` -> ``[3, 5, 10, 11, 12]``; a backwards range, an index beyond any image
    or a list naming no index is an error."""
    from ..data.io import MAX_AXIS

    expected = "expected comma-separated indices or ranges such as 3,5,10-12"
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise InputError(f"{option} {text!r}: the range {part} runs backwards; {expected}")
                if b >= MAX_AXIS:  # checked before the range is spelled out: 0-1000000000 would fill the memory
                    raise InputError(f"{option} {text!r}: index {b} is beyond any image this tool reads (at most "
                                     f"{MAX_AXIS} slices); {expected}")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise InputError(f"{option} {text!r}: {expected}") from None
    if not out:
        raise InputError(f"{option} {text!r}: names no index; {expected}")
    return out


def _names(text: str, option: str, example: str = "begal,random") -> list[str]:
    """A comma-separated list of names; one naming nothing (``,``) is an error, not an
    experiment with no rows or a prediction of every case."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError(f"{option} {text!r}: names nothing; expected comma-separated names such as {example}")
    return names


def _slices(text: str) -> int | str:
    """An ``argparse`` type: a number of slices, or a share of the pool such as ``10%``
    (resolved once the pool is built; :func:`~VQMedSegLib.active_learning.budget.slice_count`)."""
    from ..active_learning.budget import slice_amount

    try:
        return slice_amount(text, "")
    except InputError:
        raise argparse.ArgumentTypeError(
            f"found {text!r}, expected a number of slices (1 or more) or a share of the pool such as 10%") from None


def _seed(text: str) -> int:
    """An ``argparse`` type: a seed is a whole number from 0 to ``MAX_SEED`` (NumPy refuses
    negative ones, torch and MONAI larger ones)."""
    from ..config import MAX_SEED

    expected = f"expected a whole number from 0 to {MAX_SEED}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"found {text!r}, {expected}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"found {value}, {expected}")
    return value


def _given(args, *flags: str) -> list[str]:
    """Those of ``flags`` (options whose default is ``None``) given on the command line."""
    return [flag for flag in flags if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _seed_list(args) -> list[int]:
    """``--seed-ids 1,4-5`` as given, else ``--seeds N`` as 0 .. N-1."""
    if args.seed_ids is not None:
        try:
            ids = _parse_indices(args.seed_ids, "--seed-ids")
        except InputError:
            ids = None
        from ..config import MAX_SEED

        if not ids or min(ids) < 0 or max(ids) > MAX_SEED or len(set(ids)) != len(ids):
            raise InputError(f"--seed-ids {args.seed_ids!r}: expected distinct seeds from 0 to {MAX_SEED}, such as 2 or 0,3-4")
        return ids
    n = args.default_seeds if args.seeds is None else args.seeds
    if n < 1:
        raise InputError(f"--seeds {n}: expected at least 1")
    return list(range(n))


def _seed_args(parser, default: int, note: str = "") -> None:
    group = parser.add_mutually_exclusive_group()
    # default None, not the number: argparse lets both options through when the value given is the default object
    group.add_argument("--seeds", type=int, help=f"number of seeds, 0 .. N-1 (default {default})")
    parser.set_defaults(default_seeds=default)
    group.add_argument("--seed-ids", help="exactly these seeds, such as 2 or 0,3-4" + note)


def _report_experiment(args, results: dict) -> int:
    """Print an experiment's results: JSON with --json, else its results.md table."""
    if args.json:
        _print_json(results)
    else:
        sys.stdout.write((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    return 0


# ------------------------------------------------------------------ commands
def cmd_demo(args) -> int:
    from ..files import output_folder
    from .demo import run_demo

    with output_folder(args.out) as out:
        result = run_demo(out, preset=args.preset, device_name=args.device, seed=args.seed, iterations=args.iterations)
    if args.json:
        _print_json(result)
    else:
        m = result["metrics"]
        sys.stdout.write(
            f"demo finished in {result['seconds']:.0f} s: Dice {m['dice']:.3f}, HD95 {m['hd95_mm']:.1f} mm, "
            f"ASD {m['asd_mm']:.2f} mm on held-out case {result['test_case']}\n"
            + (f"open {Path(args.out) / 'scene.mrb'} in 3D Slicer; " if "scene" in result["outputs"] else
               f"no scene.mrb (it needs slicer-core); open {Path(args.out) / 'prediction.seg.nrrd'} in 3D Slicer; ")
            + f"summary in {Path(args.out) / 'report.md'}\n"
        )
    return 0


def cmd_predict(args) -> int:
    from ..device import resolve_device

    if args.workspace:
        if unused := _given(args, "--model", "--ct", "--mr", "--out") + (["--overwrite"] if args.overwrite else []):
            raise InputError(f"predict: {', '.join(unused)} not used with --workspace, which predicts the workspace's "
                             "cases with its models into predictions/<case>/; choose a model with --model-id")
        return _predict_workspace(args, resolve_device(args.device))
    if unused := _given(args, "--case", "--model-id"):
        raise InputError(f"predict: {', '.join(unused)} only with --workspace")
    missing = [flag for flag, value in (("--model", args.model), ("--ct", args.ct), ("--out", args.out)) if not value]
    if missing:
        raise InputError(f"predict: {', '.join(missing)} missing; give --model, --ct and --out, or --workspace")
    from ..data.io import read_volume
    from ..export.prediction import prediction_folder, refuse_files_of_others, write_prediction
    from ..inference.predict import load_model, predict_volume

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out}: is a file; expected a folder for the prediction's files (made if missing)")
    device = resolve_device(args.device)
    model, ckpt = load_model(args.model, device)
    ct = read_volume(args.ct, modality="CT")
    mr = read_volume(args.mr, modality="MR") if args.mr else None
    # the folder is held from before the prediction: a second one into it is refused at once, not after minutes
    with prediction_folder(args.out) as out:
        if not args.overwrite:
            refuse_files_of_others(out)
        pred = predict_volume(model, ckpt, ct, device, mr=mr, largest_component=_largest_component(args))
        files = write_prediction(out, pred, record=True)
    if args.json:
        _print_json({"outputs": {k: str(v) for k, v in files.items()}, "voxels": int(pred.label.array.sum())})
    else:
        for name, path in files.items():
            sys.stdout.write(f"{name}: {path}\n")
    return 0


def _largest_component(args) -> bool | None:
    """``--keep-all-components`` turns the task's largest-component clean-up off."""
    return False if args.keep_all_components else None


def _predict_workspace(args, device) -> int:
    from ..inference.workspace import predict_workspace
    from ..jobs.runner import JobContext
    from ..jobs.workspace import Workspace

    ws = Workspace.open(args.workspace)
    cases = _names(args.case, "--case", "case1,case2") if args.case is not None else None
    params = {"cases": cases, "model": args.model_id, "keep_all_components": args.keep_all_components}
    with JobContext(ws, "predict", params=params) as ctx:
        result = predict_workspace(ctx, ws, device, cases, args.model_id, largest_component=_largest_component(args))
    if args.json:
        _print_json(result)
    else:
        for case_id, record in result["predictions"].items():  # files recorded relative to the workspace
            sys.stdout.write(f"{case_id}: {', '.join(str(ws.root / f) for f in record['files'].values())}\n")
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np

    from ..data.datasets import read_reference_label
    from ..data.io import read_label, segment_mask
    from ..metrics.segmentation import per_slice_scores, score_volumes

    ref = read_reference_label(args.ref)
    pred = read_label(args.pred)
    problems = ref.geometry_mismatch(pred)
    if problems:
        raise InputError(f"--pred {args.pred}: the prediction's voxel grid differs from the reference's ({args.ref}): "
                         f"{'; '.join(problems)} (prediction != reference); expected both on one grid: predict on the "
                         "image the reference was drawn on")
    value, segment = _scored_value(pred, args.pred, args.label, args.task, "--label")
    ref_value, ref_segment = _scored_value(ref, args.ref, args.ref_label if args.ref_label is not None else args.label,
                                           args.task, "--ref-label")
    _require_value(pred, value, args.pred, "--label", args.label is not None)
    _require_value(ref, ref_value, args.ref, "--ref-label" if args.ref_label is not None or args.label is None else "--label",
                   args.ref_label is not None or args.label is not None)
    pred = pred.with_array(segment_mask(pred, value).astype(np.uint8))
    ref = ref.with_array(segment_mask(ref, ref_value).astype(np.uint8))
    scores = score_volumes(pred, ref).to_json()
    result = {"prediction": str(args.pred), "reference": str(args.ref), "label": value, "reference_label": ref_value,
              "segment": segment, "reference_segment": ref_segment, **scores}
    if args.per_slice:
        result["per_slice"] = per_slice_scores(pred, ref)
    if args.json:
        _print_json(result)
    else:
        unit = "mm" if scores["units"] == "mm" else "vox"
        hd = scores.get(f"hd95_{unit}")
        asd = scores.get(f"asd_{unit}")
        sys.stdout.write(
            f"Dice {scores['dice']:.4f}  Jaccard {scores['jaccard']:.4f}  "
            f"HD95 {'undefined' if hd is None else f'{hd:.2f} {unit}'}  ASD {'undefined' if asd is None else f'{asd:.2f} {unit}'}"
            + (f"  (empty: {scores['empty']})" if scores["empty"] else "")
            + "\n"
        )
        if args.per_slice:
            sys.stdout.write("slice  Dice    empty\n" + "".join(
                f"{row['slice']:5d}  {'   -  ' if row['dice'] is None else format(row['dice'], '.4f')}  {row['empty'] or ''}\n"
                for row in result["per_slice"]))
        if segment or ref_segment or value != ref_value:  # say what was scored where it is not simply label 1
            def what(name, v):
                return f"segment {name!r} (value {v})" if name else f"value {v}"

            sys.stdout.write(f"scored: {what(segment, value)} of the prediction against {what(ref_segment, ref_value)} "
                             "of the reference\n")
    return 0


def _require_value(label, value: int, path, option: str, given: bool) -> None:
    """The label value scored must occur in a file that holds labels: a typo (--label 9)
    would otherwise score two empty masks, Dice 1, and a mask stored as 255 would score as
    empty when value 1 is scored by default. A file with no label at all (an empty
    prediction) is scored as it is."""
    from ..data.volume import label_values

    present = [int(v) for v in label_values(label.array) if v != 0]
    if present and value not in present:
        if given:
            raise InputError(f"{option} {value}: occurs nowhere in {path}, whose label values are {present[:10]}; "
                             "expected one of them")
        raise InputError(f"{path}: its label values are {present[:10]}, and the value scored by default, {value}, is not "
                         f"among them; expected {option} to say which one to score")


def _task_segment(label, task: str, path, hint: str) -> dict | None:
    """The segment of a Slicer segmentation read as ``label`` that is named for ``task``
    (:func:`~VQMedSegLib.tasks.target_segment`); None when the file has no segments, or one
    not so named. Several segments and none so named is an error ending with ``hint``."""
    from ..tasks import target_segment

    segments = [s for s in label.metadata.get("segments") or [] if s.get("label")]
    try:
        index = target_segment([s.get("name", "") for s in segments], task, str(path))
    except InputError as exc:
        raise InputError(f"{exc}, {hint}") from None
    return None if index is None else segments[index]


def _scored_value(label, path, given: int | None, task: str, option: str) -> tuple[int, str | None]:
    """The label value of ``task``'s structure in one file, and its segment's name when
    it was found by name: ``given`` if set; in a Slicer segmentation, the segment named
    for the task, or its only segment; else 1."""
    if given is not None:
        return given, None
    segment = _task_segment(label, task, path, f"or give its value with {option}, or score another structure with --task")
    if segment is None:
        segments = [s for s in label.metadata.get("segments") or [] if s.get("label")]
        segment = segments[0] if segments else {"label": 1}
    return segment["label"], segment.get("name")


def cmd_dataset_check(args) -> int:
    from ..data.check import check_dataset, format_report

    result = check_dataset(args.path, modality=args.modality, progress=None)
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(format_report(result) + "\n")
    if result["n_with_problems"]:
        sys.stderr.write(f"vqmedseg dataset check: {result['n_with_problems']} of {result['n_checked']} case(s) "
                         f"has a problem (listed above)\n")
        return 1
    return 0


def cmd_workspace_init(args) -> int:
    from ..jobs.workspace import Workspace

    ws = Workspace.create(args.workspace, task=args.task)
    sys.stdout.write(f"workspace {ws.root} ready for task {args.task}\n")
    return 0


def cmd_workspace_add(args) -> int:
    from ..data.io import read_volume
    from ..files import safe_id
    from ..jobs.workspace import Workspace

    ws = Workspace.open(args.workspace)
    ct = read_volume(args.ct, modality="CT")
    mr = read_volume(args.mr, modality="MR") if args.mr else None
    known = ws.cases().get(safe_id(args.case))
    entry = ws.add_case(args.case, ct, mr)
    size = f"{entry['n_slices']} slices{' + MR' if entry.get('mr') else ''}"
    if known is None:
        sys.stdout.write(f"case {args.case}: {size}\n")
    else:
        labelled = len(ws.labelled_slices().get(args.case, []))
        mr_note = "; MR stored" if entry.get("mr_added") != known.get("mr_added") else ""
        sys.stdout.write(f"case {args.case}: already in the workspace with this CT ({size}); "
                         f"kept with its {labelled} annotated slices{mr_note}\n")
    return 0


def cmd_workspace_annotate(args) -> int:
    from ..data.datasets import read_reference_label
    from ..jobs.workspace import Workspace

    ws = Workspace.open(args.workspace)
    label = read_reference_label(args.label)  # a label file, or a CHAOS case's Ground folder of PNG masks
    slices = _parse_indices(args.slices) if args.slices is not None else None
    segment = None
    if args.label_value is None:  # a Slicer .seg.nrrd: the segment named for the task
        segment = _task_segment(label, ws.task, args.label, "or give its value with --label-value")
    value = segment["label"] if segment else args.label_value
    if value is not None and label.metadata.get("segment_layers") is not None:  # overlapping segments: this one whole
        import numpy as np

        from ..data.io import segment_mask

        label = label.with_array(np.where(segment_mask(label, value), value, 0).astype(label.array.dtype))
    labelled = ws.annotate(args.case, label, slices=slices, label_value=value, replace=args.replace)
    source = f", from segment {segment['name']!r} (value {value})" if segment else ""
    sys.stdout.write(f"case {args.case}: {len(labelled)} labelled slices{source}\n")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def cmd_workspace_status(args) -> int:
    from ..jobs.runner import interrupted, running_job
    from ..jobs.workspace import Workspace

    ws = Workspace.open(args.workspace)
    state = ws.load_state()
    labelled = ws.labelled_slices()
    status = {
        "workspace": str(ws.root),
        "task": state["task"],
        "cases": len(state["cases"]),
        "labelled_slices": sum(len(v) for v in labelled.values()),
        "total_slices": sum(c["n_slices"] for c in state["cases"].values()),
        "rounds": len(state["rounds"]),
        "models": [m["id"] for m in state["models"]],
        "running_job": (running := running_job(ws)),
        "last_jobs": interrupted(state["jobs"], (running or {}).get("job"))[-5:],
        "per_case": {case_id: {"labelled_slices": len(labelled.get(case_id, [])), "slices": entry["n_slices"],
                               "mr": bool(entry.get("mr"))} for case_id, entry in state["cases"].items()},
    }
    if args.json:
        _print_json(status)
        return 0
    running = status["running_job"]
    lines = [f"task {status['task']}: {_count(status['cases'], 'case')}, {status['labelled_slices']}/{status['total_slices']} "
             f"slices labelled, {_count(len(status['models']), 'model')}, {_count(status['rounds'], 'round')}"]
    shown = 20
    lines += [f"  {case_id}: {c['labelled_slices']}/{c['slices']} slices labelled, {'CT + MR' if c['mr'] else 'CT'}"
              for case_id, c in list(status["per_case"].items())[:shown]]
    if len(status["per_case"]) > shown:
        lines.append(f"  ... and {len(status['per_case']) - shown} more cases (--json lists every case)")
    if running:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(running.get("started", 0)))
        lines.append(f"running: {running.get('kind', 'unknown')} job {running.get('job', '?')} "
                     f"(pid {running.get('pid', '?')} on {running.get('host', '?')}, since {since})")
    else:
        lines.append("running: nothing")
    if status["last_jobs"]:
        lines.append("last jobs, oldest first:")
        lines += [f"  {j['id']}  {j['kind']}  {j['status']}" + (f": {j['reason']}" if j.get("reason") else "")
                  for j in status["last_jobs"]]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _device_for_preset(args):
    """The device ``--device`` names; with ``auto``, the ``paper`` preset is refused when
    no CUDA device is found, for its networks would train for days on a CPU."""
    from ..device import resolve_device

    device = resolve_device(args.device)
    if args.preset == "paper" and device.type != "cuda" and args.device == "auto":
        raise InputError(
            "--preset paper: no CUDA device found, and on a CPU the papers' networks take seconds a training step, "
            "days for a run; run on a GPU, or choose the device cpu (--device cpu) to train on the CPU anyway")
    return device


def _begal_config(args):
    from ..config import begal_config_from_preset

    return begal_config_from_preset(args.preset, args.config, seed=getattr(args, "seed", None))


def cmd_train(args) -> int:
    from ..jobs.runner import JobContext
    from ..jobs.workspace import Workspace

    _refuse_options_the_method_ignores(args)
    ws = Workspace.open(args.workspace)
    device = _device_for_preset(args)
    if args.method == "supervised":
        from ..config import train_config_from_preset
        from ..training.supervised import train_supervised

        config = train_config_from_preset(args.preset, args.config, iterations=args.iterations, seed=args.seed)
        run = train_supervised
    elif args.method == "begal":
        from ..active_learning.rounds import train_round

        config = _begal_config(args)
        run = train_round
    elif args.method == "vqseg":
        from ..config import vqseg_config_from_preset
        from ..training.vqseg_workspace import train_vqseg

        config = vqseg_config_from_preset(
            args.preset, args.config, iterations=args.iterations, seed=args.seed, perturbation=args.perturbation,
            dropout_rate=args.dropout_rate, foundation=args.foundation)
        run = train_vqseg
        _refuse_settings_no_row_reads(args, config, ["vqseg"], lambda key: {
            "dropout_rate": "read only with the dropout perturbation, and --method vqseg perturbs with "
                            + (config.perturbation if config.use_qpm else "nothing (use_qpm false)"),
            "perturbation": "use_qpm false switches the perturbation off",
            "foundation": "use_pfa false switches PFA off, and no foundation model is read"}[key])
    else:
        raise InputError(f"--method {args.method!r}: expected 'supervised', 'begal' or 'vqseg'")
    if args.validation_cases:
        config = config.replace(validation_cases=[c.strip() for c in args.validation_cases.split(",") if c.strip()])
    from ..training.distributed import FollowerContext, process_group

    with process_group(device) as (info, device):  # under torchrun: join the process group
        params = {"method": args.method, "config": config.to_json(), "device": str(device), "processes": info.world}
        context = JobContext(ws, "train", params=params) if info.is_main else FollowerContext(ws, "train", info)
        with context as ctx:
            entry = run(ctx, ws, config, device)
    if info.is_main:
        sys.stdout.write(f"model {entry['id']} written to {ws.root / entry['path']}\n")
    return 0


def _refuse_options_the_method_ignores(args) -> None:
    """An option that would change nothing is an error: whoever gave it believes it took effect."""
    if args.method == "begal" and args.iterations is not None:
        raise InputError(f"--iterations {args.iterations}: not used by --method begal, whose rounds train in phases; "
                         "set initial_iterations, encoder_iterations and decoder_iterations in --config")
    if args.method == "vqseg" and args.validation_cases:
        raise InputError(f"--validation-cases {args.validation_cases}: not used by --method vqseg, which trains on every "
                         "annotated slice and keeps its teacher's last weights; leave those cases unannotated to hold them out")
    if args.method != "vqseg":
        if given := _given(args, "--perturbation", "--dropout-rate", "--foundation"):
            them = "it" if len(given) == 1 else "them"
            raise InputError(f"{', '.join(given)}: only --method vqseg uses {them}; --method {args.method} would ignore {them}")


# the settings a VQ-Seg command line gives every row of an experiment (each the option
# --key-name), and which rows read them (the rows themselves are listed from rows_reading,
# so a new row is named)
_READ_ONLY_BY = {
    "perturbation": "read only by rows that train semi-supervised and set no perturbation of their own",
    "dropout_rate": "read only where the perturbation is dropout",
    "strong_augment": "read only by rows that train semi-supervised",
    "foundation": "read only by rows with PFA",
}


def _readers_named(key: str) -> str:
    """``_READ_ONLY_BY[key]``'s reason with the rows that read the setting under the
    defaults, as the experiment finds them."""
    from ..config import VQSegConfig
    from ..training.ssl_experiment import METHODS, rows_reading

    rows = rows_reading(list(METHODS), VQSegConfig())[key]
    reason = _READ_ONLY_BY[key]
    if key == "dropout_rate":  # the command line's choice, or the rows that choose dropout themselves
        return f"{reason} (--perturbation dropout, or the row{'s' if len(rows) > 1 else ''} {', '.join(rows)})"
    return f"{reason} ({', '.join(rows)})"


def _rows_have_none(config, methods: list[str]):
    """How an experiment's refusal ends: no row of ``methods`` reads the setting (and why)."""
    def why(key: str) -> str:
        off = (" (use_qpm false switches every perturbation off)" if key in ("perturbation", "dropout_rate") and not config.use_qpm
               else " (use_pfa false switches PFA off)" if key == "foundation" and not config.use_pfa else "")
        return f"{_readers_named(key)}; --methods {','.join(methods)} has none{off}"
    return why


def _refuse_settings_no_row_reads(args, config, methods: list[str], why_unread) -> None:
    """A VQ-Seg setting given on the command line, or changed from the preset in
    ``--config``, that none of ``methods`` reads is an error, as for
    :func:`_refuse_options_the_method_ignores`; ``why_unread(key)`` says why. A config
    file's key that keeps the preset's value changes nothing either way (a whole recorded
    configuration can be given again), and ``--foundation none`` is how one says not to
    load a foundation model: neither is refused."""
    from ..config import as_option, vqseg_config_from_preset
    from ..errors import ConfigError
    from ..files import read_json
    from ..training.ssl_experiment import rows_reading

    given = {}
    if args.config:  # already read and checked; here, which keys it changes
        preset = vqseg_config_from_preset(args.preset).to_json()
        for key, value in read_json(Path(args.config), ConfigError).items():
            if key in _READ_ONLY_BY and value != preset[key]:
                given[key] = f"config key {key!r} ({json.dumps(value)}) of {args.config}"
    for key in _READ_ONLY_BY:
        value = getattr(args, key, None)
        if value is not None and value is not False:  # options win over the file
            given[key] = as_option(key, value)
    readers = rows_reading(methods, config)
    for key, label in given.items():
        if not readers[key] and not (key == "foundation" and config.foundation == "none"):
            raise InputError(f"{label}: {why_unread(key)}")


def cmd_query(args) -> int:
    from ..active_learning.rounds import query
    from ..device import resolve_device
    from ..jobs.runner import JobContext
    from ..jobs.workspace import Workspace

    ws = Workspace.open(args.workspace)
    device = resolve_device(args.device)
    config = _begal_config(args)
    with JobContext(ws, "query", params={"strategy": args.strategy, "n": args.n}) as ctx:
        result = query(ctx, ws, args.strategy, args.n, device, config, budget_total=args.budget, force=args.force)
    if args.json:
        _print_json(result)
    else:
        if result["message"]:
            sys.stdout.write(result["message"] + "\n")
        for s in result["suggestions"]:
            sys.stdout.write(f"{s['rank']:4d}  {s['case']}  slice {s['slice']:4d}  score {s['score']:.4f}  {s['purpose']}\n")
        b = result["budget"]
        if b["spent"] > b["total"]:  # annotated beyond the suggestions, or the budget lowered later
            sys.stdout.write(f"budget: {b['spent']} labelled, {b['spent'] - b['total']} over the budget of {b['total']} slices\n")
        else:
            sys.stdout.write(f"budget: {b['spent']} of {b['total']} slices labelled, {b['remaining']} remaining\n")
    return 0


def _preset_label(args) -> str:
    """The preset as an experiment records it: ``quick``, or ``quick + FILE`` with a config file laid over it."""
    return f"{args.preset} + {Path(args.config).name}" if args.config else args.preset


def _refuse_to_replace_results(args) -> None:
    """An experiment's --out that holds an earlier run's results is refused before any work
    (those results may have taken hours), unless --overwrite says to replace them."""
    earlier = Path(args.out) / "results.json"
    if earlier.exists() and not args.overwrite:
        raise InputError(f"--out {args.out}: holds the results of an earlier run ({earlier}); expected a folder without "
                         "results; give another --out, or --overwrite to replace them")


def cmd_simulate(args) -> int:
    from ..active_learning.simulation import simulate
    from ..config import begal_config_from_preset
    from ..files import output_folder

    _refuse_to_replace_results(args)
    device = _device_for_preset(args)
    config = begal_config_from_preset(args.preset, args.config)
    strategies = _names(args.strategies, "--strategies")
    with output_folder(args.out) as out:
        results = simulate(args.dataset, strategies, args.rounds, args.per_round, _seed_list(args), config, out,
                           device, initial=args.initial, preset=_preset_label(args))
    return _report_experiment(args, results)


def cmd_ssl(args) -> int:
    from ..config import vqseg_config_from_preset
    from ..files import output_folder
    from ..training.ssl_experiment import run_ssl

    _refuse_to_replace_results(args)
    device = _device_for_preset(args)
    config = vqseg_config_from_preset(
        args.preset, args.config, foundation=args.foundation, iterations=args.iterations, perturbation=args.perturbation,
        dropout_rate=args.dropout_rate, strong_augment=args.strong_augment or None)
    methods = _names(args.methods, "--methods")
    _refuse_settings_no_row_reads(args, config, methods, _rows_have_none(config, methods))
    with output_folder(args.out) as out:
        results = run_ssl(args.dataset, args.labeled_fraction, methods, _seed_list(args), config, out, device,
                          preset=_preset_label(args), validation_patients=args.validation_patients,
                          validate_every=args.validate_every, test_list=Path(args.test_list) if args.test_list else None,
                          validation_list=Path(args.validation_list) if args.validation_list else None)
    return _report_experiment(args, results)


def cmd_ssl_merge(args) -> int:
    from ..training.ssl_experiment import merge_ssl

    _refuse_to_replace_results(args)
    methods = _names(args.methods, "--methods") if args.methods else None
    results = merge_ssl([Path(f) for f in args.folders], Path(args.out), methods)
    return _report_experiment(args, results)


def cmd_cancel(args) -> int:
    from ..jobs.runner import cancel, running_job
    from ..jobs.workspace import Workspace

    ws = Workspace.open(args.workspace)
    running = (running_job(ws) or {}).get("job")
    # a job clears cancel requests as it starts, so one left for a job not running would do nothing
    if running is None or (args.job is not None and args.job != running and running != "unknown"):
        named = f"job {args.job} is not running" if args.job else "no job is running"
        sys.stdout.write(f"{named} on workspace {ws.root}{f' (running: {running})' if running else ''}; nothing to cancel\n")
        return 0
    cancel(ws, job_id=args.job)
    sys.stdout.write(f"cancel requested for job {args.job or running}; it stops at its next step\n")
    return 0


def cmd_phantom(args) -> int:
    from ..data.phantoms import LIVER_LABELS, LUNG_LABELS, write_datasets

    if args.n < 1:
        raise InputError(f"--n {args.n}: expected at least 1 case")
    labels = LIVER_LABELS if args.kind == "phantom-liver" else LUNG_LABELS
    named = ", ".join(f"{name} {value}" for name, value in labels.items())
    for modality, folder in write_datasets(Path(args.out), args.kind, args.n, seed=args.seed).items():
        sys.stdout.write(f"{folder}: {args.n} {modality} cases with labels ({named})\n")
    return 0


# -------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqmedseg", description="Label-efficient CT/MR segmentation (VQ-BEGAL, VQ-Seg).")
    p.add_argument("--version", action="version", version=f"vqmedseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def device_arg(sp):
        sp.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")

    def json_arg(sp, what: str = "the result"):
        sp.add_argument("--json", action="store_true", help=f"print {what} as JSON")

    def overwrite_arg(sp):
        sp.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out (refused otherwise)")

    def preset_arg(sp, method: str):
        sp.add_argument("--preset", default="quick", choices=["tiny", "quick", "cpu", "paper"],
                        help=f"{method} settings: tiny: seconds, for tests; quick (default): minutes on a CPU; "
                             "cpu: real scans on a CPU; paper: the papers' settings, for a GPU")

    def workspace_arg(sp):  # WS or --workspace WS, one of them (see _workspace_folder)
        sp.add_argument("workspace", nargs="?", help="the workspace folder ('vqmedseg workspace init'), or --workspace WS")
        sp.add_argument("--workspace", dest="workspace_option", metavar="WS", help="the workspace folder, as WS")

    d = sub.add_parser("demo", help="build a phantom example, train a small baseline, predict, write a Slicer scene")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--preset", default="quick", choices=["tiny", "quick", "cpu"],
                   help="tiny: seconds, for smoke tests; quick: minutes; cpu: a larger network, about nine times as long")
    d.add_argument("--iterations", type=int, default=None, help="override the preset's training iterations")
    d.add_argument("--seed", type=_seed, default=0, help="seed of the phantoms and of training (default 0)")
    json_arg(d)
    device_arg(d)
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("predict", help="segment a CT with a trained model; writes label and uncertainty")
    pr.add_argument("--model", help="checkpoint (.pt) written by vqmedseg train")
    pr.add_argument("--ct", help="CT volume: NRRD, NIfTI, MHA or a DICOM folder")
    pr.add_argument("--mr", help="optional MR volume")
    pr.add_argument("--out", help="output folder")
    pr.add_argument("--overwrite", action="store_true", help="with --out: replace prediction files this command did not "
                    "write there, or that were changed since (refused otherwise)")
    pr.add_argument("--workspace", help="instead: predict the workspace's cases as a job (into predictions/<case>/)")
    pr.add_argument("--case", help="with --workspace: comma-separated cases (default: all)")
    pr.add_argument("--model-id", help="with --workspace: a model id from 'workspace status' (default: the newest)")
    pr.add_argument("--keep-all-components", action="store_true",
                    help="keep every predicted piece; by default a liver label keeps only its largest connected component")
    json_arg(pr, "the written files")
    device_arg(pr)
    pr.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="Dice, Jaccard, HD95 and ASD (mm) of a prediction against a reference")
    ev.add_argument("--pred", required=True, help="the predicted label volume (.seg.nrrd, .nrrd, .nii.gz)")
    ev.add_argument("--ref", required=True, help="the reference label volume on the same grid, or a CHAOS case's Ground folder of PNG masks")
    ev.add_argument("--label", type=int, default=None,
                    help="label value to score in both files (default: in a Slicer .seg.nrrd, the segment named for "
                    "--task, or its only segment; in other files 1)")
    ev.add_argument("--ref-label", type=int, default=None,
                    help="the reference's value of the same structure, where it differs from the prediction's "
                    "(default: as --label)")
    ev.add_argument("--task", default="liver", choices=sorted(TASKS),
                    help="the structure scored: its segment's name in .seg.nrrd files (default liver: 'Liver')")
    ev.add_argument("--per-slice", action="store_true", help="also score every axial slice, numbered as the workspace "
                    "numbers them")
    json_arg(ev, "the scores")
    ev.set_defaults(func=cmd_evaluate)

    ds = sub.add_parser("dataset", help="dataset tools")
    ds_sub = ds.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    dc = ds_sub.add_parser("check", help="list cases, label statistics and geometry problems; exit code 1 when "
                           "a case has a problem")
    dc.add_argument("path", help="a dataset folder (layout recognised: CHAOS, ACDC, ...), a case folder, or an image file")
    dc.add_argument("--modality", type=str.upper, choices=["CT", "MR"], default=None,
                    help="the images' modality where the layout, dataset.json or DICOM tags do not give it "
                    "(default: guessed from the intensities)")
    json_arg(dc, "the report")
    dc.set_defaults(func=cmd_dataset_check)

    wsp = sub.add_parser("workspace", help="create and fill a workspace")
    ws_sub = wsp.add_subparsers(dest="workspace_command", required=True, metavar="ACTION")
    wi = ws_sub.add_parser("init", help="create a workspace folder")
    workspace_arg(wi)
    wi.add_argument("--task", default="liver", choices=["liver", "lung-tumour"],
                    help="the structure to segment on CT (default liver)")
    wi.set_defaults(func=cmd_workspace_init)
    wa = ws_sub.add_parser("add", help="register a case (CT and optional MR)")
    workspace_arg(wa)
    wa.add_argument("--case", required=True, help="the case's id: letters, digits, '.', '_' or '-'")
    wa.add_argument("--ct", required=True, help="CT volume: NRRD, NIfTI, MHA or a DICOM folder")
    wa.add_argument("--mr", help="optional MR volume of the same patient (the auxiliary modality)")
    wa.set_defaults(func=cmd_workspace_add)
    wn = ws_sub.add_parser("annotate", help="store annotated slices of a case from a label volume")
    workspace_arg(wn)
    wn.add_argument("--case", required=True, help="the case's id, as given to 'workspace add'")
    wn.add_argument("--label", required=True, help="label volume on the case's CT grid (.nrrd, .nii.gz, .seg.nrrd), "
                    "or a CHAOS case's Ground folder of PNG masks")
    wn.add_argument("--slices", help="indices along the slice axis that were annotated, e.g. 3,5,10-12 (default: all)")
    wn.add_argument("--label-value", type=int, default=None, help="foreground value (default: any non-zero; in a .seg.nrrd with several segments, the one named for the task, such as Liver)")
    wn.add_argument("--replace", action="store_true", help="without --slices: store the label map over every slice, even "
                    "slices whose stored annotation has the target where this map has none (refused otherwise)")
    wn.set_defaults(func=cmd_workspace_annotate)
    wst = ws_sub.add_parser(
        "status", help="cases, labelled slices, models, the running job, and the last five jobs with why any did not finish")
    workspace_arg(wst)
    json_arg(wst, "the status")
    wst.set_defaults(func=cmd_workspace_status)

    tr = sub.add_parser("train", help="train on the workspace's labelled slices (a resumable, cancellable job)")
    workspace_arg(tr)
    tr.add_argument("--method", default="supervised", choices=["supervised", "begal", "vqseg"],
                    help="supervised: the U-Net baseline; begal: one VQ-BEGAL round; vqseg: VQ-Seg semi-supervised")
    preset_arg(tr, "the method's")
    tr.add_argument("--config", help="JSON settings laid over the preset; the options given here win over both")
    tr.add_argument("--iterations", type=int, help="supervised and vqseg: training iterations")
    tr.add_argument("--seed", type=_seed, help="seed of initialisation and sampling (default: the preset's, 0)")
    tr.add_argument("--validation-cases", help="comma-separated annotated cases used only for validation")
    tr.add_argument("--perturbation", choices=["qpm", "dropout", "none"], default=None, help="vqseg: QPM (default) or the dropout baseline")
    tr.add_argument("--dropout-rate", type=float, default=None, help="vqseg with --perturbation dropout")
    tr.add_argument("--foundation", default=None, help="vqseg: litemedsam (default), dinov2:PATH or none")
    device_arg(tr)
    tr.set_defaults(func=cmd_train)

    qu = sub.add_parser("query", help="suggest slices to annotate next (a job; writes suggestions.json)")
    workspace_arg(qu)
    qu.add_argument("--strategy", default="begal", choices=["begal", "egal", "random", "entropy", "mcdropout", "coreset"],
                    help="begal (default): VQ-BEGAL's modality uncertainty, high and low; egal: the same score, high only; "
                         "random; entropy: of the segmentation; mcdropout: of T dropout passes (10; tiny 3); coreset: k-centre greedy")
    qu.add_argument("--n", type=int, default=50, help="slices to suggest (default 50; BEGAL: half high-, half low-uncertainty)")
    qu.add_argument("--budget", type=int, help="total slices that may be annotated, at least 1 (stored in the workspace; slices annotated beyond it are kept)")
    preset_arg(qu, "VQ-BEGAL")
    qu.add_argument("--config", help="JSON VQ-BEGAL settings laid over the preset; the options given here win over both")
    qu.add_argument("--seed", type=_seed, help="seed of the random first set and of random selection (default: the preset's, 0)")
    qu.add_argument("--force", action="store_true", help="suggest even when validation Dice has plateaued")
    json_arg(qu, "the suggestions")
    device_arg(qu)
    qu.set_defaults(func=cmd_query)

    si = sub.add_parser("simulate", help="compare active-learning strategies with the ground truth as oracle")
    si.add_argument("--dataset", required=True,
                    help="phantom-liver, chaos, or a dataset folder of CT cases with liver labels (value 1) and any MR cases, "
                         "or with CT/ and MR/ dataset folders in it (as `vqmedseg phantom` writes), each CT paired with its own case's MR")
    si.add_argument("--strategies", default="begal,random,entropy,mcdropout,coreset,egal",
                    help="comma-separated, from: begal, egal, random, entropy, mcdropout, coreset (default: all six)")
    si.add_argument("--rounds", type=int, default=4, help="query rounds after the initial set (default 4)")
    si.add_argument("--per-round", type=_slices, default=10,
                    help="slices selected per round (B), or a share of the pool such as 10%% (default 10 slices)")
    si.add_argument("--initial", type=_slices,
                    help="random initial slices, or a share of the pool such as 20%% (default: --per-round)")
    _seed_args(si, 2)
    preset_arg(si, "VQ-BEGAL")
    si.add_argument("--config", help="JSON VQ-BEGAL settings laid over the preset; the options given here win over both")
    si.add_argument("--out", required=True, help="output folder: results.json, results.md, run.json, a plot")
    overwrite_arg(si)
    json_arg(si, "the results")
    device_arg(si)
    si.set_defaults(func=cmd_simulate)

    ss = sub.add_parser("ssl", help="semi-supervised experiment: supervised against VQ-Seg (and ablations)")
    ss.add_argument("--dataset", required=True, help="phantom-liver, phantom-lung, acdc, chaos-mr, or a dataset folder")
    ss.add_argument("--labeled-fraction", type=float, default=0.1,
                    help="share of the training slices that are labelled, in (0, 1] (default 0.1)")
    ss.add_argument("--methods", default="supervised,vqseg",
                    help="comma-separated: supervised, supervised-full (every training slice labelled), supervised-ema, "
                         "supervised-full-ema (the same, tested with the moving average of their weights, as VQ-Seg's "
                         "teacher is), vqseg, vqseg-noqpm, vqseg-nodb, "
                         "vqseg-nopfa, vqseg-dropout, vqseg-pfacodes (the alignment on the chosen codewords, "
                         "which trains the codebook mapping, not the encoder), vqseg-pfadecay (lambda_a falling along a half "
                         "cosine to 0 at the last iteration), vqseg-warmup (the supervised warm-up at one sixth of the "
                         "iterations, the quick preset's share), vqseg-labelled (VQ-Seg's network on "
                         "the labelled slices alone)")
    _seed_args(ss, 2, " (to spread one experiment over processes or machines; gather the folders with ssl-merge)")
    preset_arg(ss, "VQ-Seg and U-Net")
    ss.add_argument("--config", help="JSON VQ-Seg settings laid over the preset; the options given here win over both")
    ss.add_argument("--iterations", type=int, help="training iterations of every row (default: the preset's)")
    ss.add_argument("--foundation", default=None, help="litemedsam (default), dinov2:PATH, or none")
    ss.add_argument("--perturbation", choices=["qpm", "dropout", "none"], default=None,
                    help="VQ-Seg's perturbation of the unlabelled slices: QPM (default), the dropout baseline, or none")
    ss.add_argument("--dropout-rate", type=float, default=None, help="with --perturbation dropout")
    ss.add_argument("--strong-augment", action="store_true",
                    help="the paper's augmentation of unlabelled slices: rotation before the teacher, colour jitter and blur "
                         "on the student's CutMix view (on in the paper preset)")
    held = ss.add_mutually_exclusive_group()
    held.add_argument("--validation-patients", type=int, default=0,
                      help="hold out the last N training patients (sorted); each row is tested with its weights of best "
                           "validation Dice")
    held.add_argument("--validation-list", metavar="FILE",
                      help="case or patient ids, one per line: hold out their patients (training patients only) as "
                           "--validation-patients does")
    ss.add_argument("--validate-every", type=int, default=0,
                    help="iterations between validation scores (default: a twentieth of the iterations)")
    ss.add_argument("--test-list", metavar="FILE",
                    help="case or patient ids, one per line: their patients are the test set "
                         "(default: the dataset's test.list, else the last quarter of the patients, sorted)")
    ss.add_argument("--out", required=True, help="output folder: results.json, results.md, run.json, figures")
    overwrite_arg(ss)
    json_arg(ss, "the results")
    device_arg(ss)
    ss.set_defaults(func=cmd_ssl)

    sm = sub.add_parser("ssl-merge", help="merge `ssl` runs of one experiment (seeds or methods run apart) into one result")
    sm.add_argument("folders", nargs="+", help="the runs' --out folders")
    sm.add_argument("--out", required=True, help="output folder of the merged result")
    overwrite_arg(sm)
    sm.add_argument("--methods", help="the rows' order, such as supervised,vqseg,supervised-full (default: as found)")
    json_arg(sm, "the merged results")
    sm.set_defaults(func=cmd_ssl_merge)

    ca = sub.add_parser("cancel", help="ask the job running on a workspace to stop")
    workspace_arg(ca)
    ca.add_argument("--job", help="job id (default: whichever job holds the workspace)")
    ca.set_defaults(func=cmd_cancel)

    ph = sub.add_parser("phantom", help="write synthetic phantom cases (CT, MR, labels) as datasets the other commands read")
    ph.add_argument("--out", required=True,
                    help="output folder: a dataset folder per modality, CT/ (and MR/ for the liver), each holding "
                         "image_CASE.nrrd, label_CASE.nrrd (liver 1, right kidney 2, left kidney 3, spleen 4; lung: "
                         "tumour 1) and dataset.json")
    ph.add_argument("--kind", default="phantom-liver", choices=["phantom-liver", "phantom-lung"],
                    help="paired CT and MR of the abdomen (default), or a chest CT with one lung tumour")
    ph.add_argument("--n", type=int, default=2, help="number of cases (default 2)")
    ph.add_argument("--seed", type=_seed, default=0, help="dataset seed; case N depends only on it and N (default 0)")
    ph.set_defaults(func=cmd_phantom)
    return p


JOB_COMMANDS = ("train", "query", "predict")  # the commands that run as a job in a workspace


def _record_refusal(args, exc: VQMedSegError) -> None:
    """A job command refused before its job began (bad input, a busy workspace) leaves its
    reason in the workspace's event log, as a job that fails inside its context does. Only
    rank 0 records under torchrun; nothing is recorded without a workspace to record in."""
    if (args.command not in JOB_COMMANDS or not getattr(args, "workspace", None) or exc.job_id is not None
            or os.environ.get("RANK", "0") != "0"):
        return
    from ..jobs.runner import record_refusal
    from ..jobs.workspace import Workspace

    try:
        record_refusal(Workspace.open(args.workspace), args.command, str(exc))
    except (VQMedSegError, OSError) as problem:  # a missing or broken workspace: the message above is the record
        log.debug("refusal not recorded in %s: %s", args.workspace, problem)


def _workspace_folder(parser: argparse.ArgumentParser, args) -> None:
    """``workspace ACTION``, ``train``, ``query`` and ``cancel`` take their folder as ``WS`` or as ``--workspace WS``:
    one of them. (``predict``'s ``--workspace`` is a mode of its own and stays an option.)"""
    if not hasattr(args, "workspace_option"):
        return
    command = f"workspace {args.workspace_command}" if args.command == "workspace" else args.command
    given = [f for f in (args.workspace, args.workspace_option) if f is not None]
    if not given:
        parser.error(f"{command}: the workspace folder: give it as WS or --workspace WS")
    if len(given) == 2 and Path(given[0]).resolve() != Path(given[1]).resolve():
        parser.error(f"{command}: two workspace folders, {given[0]} and --workspace {given[1]}; expected one")
    args.workspace = given[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _workspace_folder(parser, args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if "OMP_NUM_THREADS" not in os.environ:
        logging.getLogger("vqmedseg").debug("OMP_NUM_THREADS not set; torch picks its own thread count")
    try:
        return int(args.func(args) or 0)
    except VQMedSegError as exc:
        sys.stderr.write(f"vqmedseg {args.command}: error: {exc}\n")
        _record_refusal(args, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"vqmedseg {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
