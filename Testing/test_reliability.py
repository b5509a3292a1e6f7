"""Fault injection: bad input, killed jobs, hostile files, no network.

Every case runs the real command line in a subprocess and checks what a user sees: a
non-zero exit code, one message naming the file or parameter with what was found and
what was expected, no traceback, and nothing half-written. ``Testing/RELIABILITY.md``
lists each case with the test that proves it.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from VQMedSegLib.data.io import write_volume
from VQMedSegLib.data.phantoms import make_dataset
from VQMedSegLib.data.volume import Volume
from VQMedSegLib.jobs.runner import own_process_group
from VQMedSegLib.jobs.workspace import Workspace

from conftest import REPO, keeping_locale, run_cli, run_main


# ------------------------------------------------------------------------- helpers
def refused(result: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> str:
    """The command failed cleanly: non-zero exit, no traceback, the message says all of ``needles``."""
    message = result.stderr
    assert result.returncode != 0, f"expected a failure, got exit 0:\n{result.stdout[-1000:]}"
    if code is not None:
        assert result.returncode == code, (result.returncode, message)
    assert "Traceback" not in message, message
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in: {message}"
    return message


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def no_temporaries(root: Path) -> None:
    leftovers = [p for p in files_under(root) if Path(p).name.startswith(".") and not Path(p).name.endswith(".lock")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def ct_volume(shape=(8, 24, 24), spacing=(1.0, 1.0, 2.5), dtype=np.int16, low=-1000, high=400, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(low, high, shape).astype(dtype), spacing=spacing)


@pytest.fixture
def ws(tmp_path) -> Path:
    return Workspace.create(tmp_path / "ws", task="liver").root


def add_ct(ws: Path, path: Path, case: str = "c1") -> subprocess.CompletedProcess:
    return run_cli("workspace", "add", ws, "--case", case, "--ct", path, check=False)


def unchanged_workspace(ws: Path, before: set[str]) -> None:
    assert files_under(ws) - {"events.jsonl", "events.jsonl.lock"} <= before | {"events.jsonl", "events.jsonl.lock"}
    json.loads((ws / "state.json").read_text())
    no_temporaries(ws)


# ------------------------------------------------------------------------- files
def test_missing_path(ws, tmp_path):
    refused(add_ct(ws, tmp_path / "nope.nrrd"), "nope.nrrd", "not found", code=2)


def test_unreadable_file(ws, tmp_path, monkeypatch):
    path = tmp_path / "ct.nrrd"
    write_volume(ct_volume(), path)
    os.chmod(path, 0)
    if os.geteuid() != 0:
        refused(add_ct(ws, path), "ct.nrrd", "permission denied", code=2)
        return
    # root reads any file: the kernel's refusal is simulated where the library opens it
    from VQMedSegLib.data.io import read_volume
    from VQMedSegLib.errors import InputError

    real_open = os.open

    def denied(p, flags, *args, **kwargs):
        if Path(p) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(InputError, match="ct.nrrd: permission denied; expected a file you can read"):
        read_volume(path, modality="CT")


def test_truncated_nrrd(ws, tmp_path):
    path = tmp_path / "ct.nrrd"
    write_volume(ct_volume(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = files_under(ws)
    refused(add_ct(ws, path), "ct.nrrd", code=2)
    unchanged_workspace(ws, before)


def test_corrupt_nifti(ws, tmp_path):
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(os.urandom(4000)))
    refused(add_ct(ws, path), "ct.nii.gz", code=2)


def test_corrupt_dicom_file_in_a_series(ws, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 400, (4, 16, 16)).astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with keeping_locale():  # GDCM's writer sets LC_CTYPE to C (see conftest)
        for k in range(4):
            s = image[:, :, k]
            for tag, value in (("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0020|0013", str(k + 1)),
                               ("0020|0032", f"0\\0\\{2.5 * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "1\\1")):
                s.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"{k:03d}.dcm"))
            writer.Execute(s)
    victim = folder / "002.dcm"
    victim.write_bytes(victim.read_bytes()[:300])
    refused(add_ct(ws, folder), "dicom", code=2)


def test_empty_dicom_folder(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(add_ct(ws, tmp_path / "empty"), "empty", code=2)


# ---------------------------------------------------------------- wrong images
@pytest.mark.parametrize(
    "name, volume, needles",
    [
        ("2d", None, ("2-D", "expected a 3-D volume")),
        ("4d", None, ("4-D", "expected a 3-D volume")),
        ("nan", Volume(np.where(np.arange(8 * 24 * 24).reshape(8, 24, 24) % 97 == 0, np.nan, -500.0).astype(np.float32)),
         ("NaN", "expected finite")),
        ("unsigned", ct_volume(dtype=np.uint16, low=0, high=4096), ("without the rescale", "Hounsfield")),
        ("mr-as-ct", Volume(np.random.default_rng(1).random((8, 24, 24)).astype(np.float32) * 900), ("MR", "Hounsfield")),
        ("zero-spacing", None, ("spacing", "positive")),
        ("huge", Volume(np.full((2, 2, 2049), -1000, np.int16)), ("2049", "at most 2048")),
        # a blank volume (a series of the scanner's padding, a mask picked as the image) once
        # trained and predicted: nothing in it can be segmented
        ("blank", Volume(np.full((8, 24, 24), -1000, np.int16), spacing=(1.0, 1.0, 2.5)),
         ("read as the CT", "every voxel is -1000", "blank image", "expected a scan")),
        # a spacing stored in metres (or micrometres) once went through: HD95 and every
        # millimetre figure off by 1,000, and VQ-BEGAL's pool built from it
        ("metres", ct_volume(spacing=(0.0007, 0.0007, 0.0025)), ("spacing (0.0007, 0.0007, 0.0025)", "0.01 to 100 mm",
                                                               "metres")),
        ("micrometres", ct_volume(spacing=(700.0, 700.0, 2500.0)), ("spacing (700, 700, 2500)", "0.01 to 100 mm")),
        # a sheared grid: its axes are not at right angles, and slices taken along k are not planes of the body
        ("sheared", Volume(ct_volume().array, spacing=(1.0, 1.0, 2.5), direction=[[1, 0, 0.5], [0, 1, 0], [0, 0, 1]]),
         ("direction", "not at right angles", "expected orthonormal")),
    ],
)
def test_images_of_the_wrong_kind_are_refused(ws, tmp_path, name, volume, needles):
    path = tmp_path / f"{name}.nrrd"
    if name == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((24, 24), np.int16)), str(path))
    elif name == "4d":
        frame = sitk.GetImageFromArray(np.zeros((4, 24, 24), np.int16))
        sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))
    elif name == "zero-spacing":
        write_volume(ct_volume(), path)
        text = path.read_bytes()
        header, _, body = text.partition(b"\n\n")
        lines = [b"space directions: (1,0,0) (0,1,0) (0,0,0)" if l.startswith(b"space directions") else l for l in header.split(b"\n")]
        path.write_bytes(b"\n".join(lines) + b"\n\n" + body)
    else:
        write_volume(volume, path)
    before = files_under(ws)
    message = refused(add_ct(ws, path), path.name, *needles, code=2)
    assert "expected" in message
    unchanged_workspace(ws, before)
    assert Workspace.open(ws).cases() == {}


def test_a_ct_given_as_the_mr_is_refused(ws, tmp_path):
    """The MR selector pointed at the CT (or the two files swapped) once went through: the
    MR branch trained on Hounsfield units. Magnitude MR has no values near -1000, air on a
    CT does; a z-scored MR (a few units below 0) is still accepted."""
    write_volume(ct_volume(), tmp_path / "ct.nrrd")
    write_volume(ct_volume(seed=1), tmp_path / "ct-again.nrrd")
    r = run_cli("workspace", "add", ws, "--case", "c1", "--ct", tmp_path / "ct.nrrd", "--mr", tmp_path / "ct-again.nrrd",
                check=False)
    message = refused(r, "ct-again.nrrd", "read as the MR", "Hounsfield", "expected an MR", code=2)
    assert "% of its voxels" in message
    assert Workspace.open(ws).cases() == {}
    zscored = np.random.default_rng(2).normal(0.0, 1.0, (8, 24, 24)).astype(np.float32) * 1.5
    write_volume(Volume(zscored, spacing=(1.0, 1.0, 2.5)), tmp_path / "mr.nrrd")
    run_cli("workspace", "add", ws, "--case", "c1", "--ct", tmp_path / "ct.nrrd", "--mr", tmp_path / "mr.nrrd")
    assert Workspace.open(ws).cases()["c1"].get("mr")


def test_a_blank_mr_is_refused(ws, tmp_path):
    """An MR of zeros (a series of padding, or an empty export) is no help to the CT."""
    write_volume(ct_volume(), tmp_path / "ct.nrrd")
    write_volume(Volume(np.zeros((8, 24, 24), np.float32), spacing=(1.0, 1.0, 2.5)), tmp_path / "mr.nrrd")
    r = run_cli("workspace", "add", ws, "--case", "c1", "--ct", tmp_path / "ct.nrrd", "--mr", tmp_path / "mr.nrrd",
                check=False)
    refused(r, "mr.nrrd", "read as the MR", "every voxel is 0", "blank image", code=2)
    assert Workspace.open(ws).cases() == {}


# ------------------------------------------------------------------------ labels
@pytest.fixture
def ws_with_case(ws, tmp_path):
    Workspace.open(ws).add_case("c1", ct_volume())
    return ws


def annotate(ws: Path, tmp_path: Path, label: np.ndarray, *extra, check: bool = False) -> subprocess.CompletedProcess:
    """``vqmedseg workspace annotate`` of case c1 with ``label`` (spacing of :func:`ct_volume`)."""
    write_volume(Volume(label, spacing=(1.0, 1.0, 2.5)), tmp_path / "label.nrrd")
    return run_cli("workspace", "annotate", ws, "--case", "c1", "--label", tmp_path / "label.nrrd", *extra, check=check)


def test_label_on_another_grid(ws_with_case, tmp_path):
    refused(annotate(ws_with_case, tmp_path, np.ones((8, 20, 24), np.uint8)), "c1", "grid", code=2)
    assert Workspace.open(ws_with_case).labelled_slices() == {}


def test_label_values_outside_the_task(ws_with_case, tmp_path):
    label = np.zeros((8, 24, 24), np.uint8)
    label[2, 5:9, 5:9], label[4, 10:12, 10:12] = 1, 3
    refused(annotate(ws_with_case, tmp_path, label), "c1", "[3]", "expected 0 (background) and 1", "--label-value", code=2)
    assert Workspace.open(ws_with_case).labelled_slices() == {}
    # naming the target's value is accepted
    annotate(ws_with_case, tmp_path, label, "--label-value", "1", check=True)
    assert Workspace.open(ws_with_case).labelled_slices() == {"c1": list(range(8))}


def test_a_slicer_segmentation_gives_the_segment_named_for_the_task(ws_with_case, tmp_path):
    from VQMedSegLib.data.io import write_segmentation

    label = np.zeros((8, 24, 24), np.uint8)
    label[2:5, 5:9, 5:9], label[3, 12:15, 12:15] = 1, 2
    volume = Volume(label, spacing=(1.0, 1.0, 2.5))
    liver_second = [{"label": 1, "name": "Tumor"}, {"label": 2, "name": "liver"}]  # the target is value 2 here
    write_segmentation(volume, tmp_path / "edited.seg.nrrd", liver_second)
    r = run_main("workspace", "annotate", ws_with_case, "--case", "c1", "--label", tmp_path / "edited.seg.nrrd",
                 "--slices", "2-4")
    assert r.stdout == "case c1: 3 labelled slices, from segment 'liver' (value 2)\n"
    stored = Workspace.open(ws_with_case).load_annotation("c1").array
    np.testing.assert_array_equal(stored, (label == 2).astype(np.uint8))
    # one segment, named for the task, with a value other than 1
    single = (label == 2).astype(np.uint8) * 7
    write_segmentation(volume.with_array(single), tmp_path / "one.seg.nrrd", [{"label": 7, "name": "Liver"}])
    r = run_main("workspace", "annotate", ws_with_case, "--case", "c1", "--label", tmp_path / "one.seg.nrrd",
                 "--slices", "3")
    assert r.stdout == "case c1: 3 labelled slices, from segment 'Liver' (value 7)\n"
    # several segments, none named for the task: they are listed
    write_segmentation(volume, tmp_path / "other.seg.nrrd", [{"label": 1, "name": "Segment_1"}, {"label": 2, "name": "Segment_2"}])
    r = run_main("workspace", "annotate", ws_with_case, "--case", "c1", "--label", tmp_path / "other.seg.nrrd", check=False)
    refused(r, "segments 'Segment_1', 'Segment_2'", "none is named 'Liver'", "--label-value", code=2)


def test_label_with_no_labelled_voxel(ws_with_case, tmp_path):
    refused(annotate(ws_with_case, tmp_path, np.zeros((8, 24, 24), np.uint8)), "no labelled voxel", "--slices", code=2)
    assert Workspace.open(ws_with_case).labelled_slices() == {}


@pytest.mark.parametrize("slices", ["3-1", "", " , "])
def test_slices_that_name_no_slice_are_refused_not_taken_as_none_or_all(ws_with_case, tmp_path, slices):
    label = np.zeros((8, 24, 24), np.uint8)
    label[:, 5:9, 5:9] = 1
    write_volume(Volume(label, spacing=(1.0, 1.0, 2.5)), tmp_path / "label.nrrd")
    r = run_main("workspace", "annotate", ws_with_case, "--case", "c1", "--label", tmp_path / "label.nrrd",
                 "--slices", slices, check=False)
    refused(r, f"--slices {slices!r}", "expected", code=2)
    assert Workspace.open(ws_with_case).labelled_slices() == {}


def test_a_label_value_the_label_map_does_not_hold_is_refused_not_stored_as_empty_slices(ws_with_case, tmp_path):
    """`--label-value 9` (a typo) once stored the named slices as annotated without the
    target; a map of zeros still records slices where the target is absent."""
    label = np.zeros((8, 24, 24), np.uint8)
    label[:, 5:9, 5:9] = 1
    write_volume(Volume(label, spacing=(1.0, 1.0, 2.5)), tmp_path / "label.nrrd")
    r = run_main("workspace", "annotate", ws_with_case, "--case", "c1", "--label", tmp_path / "label.nrrd",
                 "--label-value", "9", "--slices", "1,2", check=False)
    refused(r, "label value 9 occurs nowhere in the label map, whose values are [1]; expected one of them", code=2)
    assert Workspace.open(ws_with_case).labelled_slices() == {}
    write_volume(Volume(np.zeros_like(label), spacing=(1.0, 1.0, 2.5)), tmp_path / "zeros.nrrd")
    run_main("workspace", "annotate", ws_with_case, "--case", "c1", "--label", tmp_path / "zeros.nrrd",
             "--label-value", "1", "--slices", "1,2")
    assert Workspace.open(ws_with_case).labelled_slices() == {"c1": [1, 2]}


def test_slices_far_out_of_range_are_refused_at_once_in_a_short_message(ws_with_case, tmp_path):
    """`--slices 0-1000000000` once spelled out a billion indices (the process was killed
    for memory), and `0-100000` printed each bad one: a 688 kB error line."""
    label = np.zeros((8, 24, 24), np.uint8)
    label[:, 5:9, 5:9] = 1
    write_volume(Volume(label, spacing=(1.0, 1.0, 2.5)), tmp_path / "label.nrrd")
    annotate = ("workspace", "annotate", ws_with_case, "--case", "c1", "--label", tmp_path / "label.nrrd", "--slices")
    huge = run_main(*annotate, "0-1000000000", check=False)
    refused(huge, "--slices '0-1000000000': index 1000000000 is beyond any image this tool reads (at most 2048 slices)", code=2)
    many = run_main(*annotate, "0-2000", check=False)
    refused(many, "annotated slices [8, 9, 10, 11, 12, ... 2000] (1993 indices) of case 'c1': expected indices in 0..7", code=2)
    assert len(many.stderr) < 300
    assert Workspace.open(ws_with_case).labelled_slices() == {}


# ----------------------------------------------------------------- configuration
@pytest.mark.parametrize("argv, needles", [
    (("train", "WS", "--preset", "tiny", "--method", "begal", "--iterations", "5"), ("--iterations", "not used by --method begal", "--config")),
    (("train", "WS", "--preset", "tiny", "--method", "supervised", "--perturbation", "dropout"), ("--perturbation", "only --method vqseg")),
    (("train", "WS", "--preset", "tiny", "--method", "begal", "--foundation", "none"), ("--foundation", "only --method vqseg")),
    (("train", "WS", "--preset", "tiny", "--method", "vqseg", "--dropout-rate", "0.3"),
     ("--dropout-rate 0.3: read only with the dropout perturbation, and --method vqseg perturbs with qpm",)),
    (("predict", "WS", "--out", "elsewhere"), ("--out", "not used with --workspace", "predictions/<case>/")),
    (("predict", "--model", "m.pt", "--ct", "ct.nrrd", "--out", "o", "--case", "c1"), ("--case only with --workspace",)),
])
def test_options_a_command_would_ignore_are_refused(ws_with_case, argv, needles):
    # an option that changes nothing must not pass silently: the user believes it took effect
    label = np.zeros((8, 24, 24), np.uint8)
    label[:, 5:9, 5:9] = 1
    ws = Workspace.open(ws_with_case)
    ws.annotate("c1", Volume(label, spacing=(1.0, 1.0, 2.5)))
    argv = [a for arg in argv for a in (("--workspace", ws_with_case) if arg == "WS" else (arg,))]
    refused(run_main(*argv, check=False), *needles, code=2)
    assert ws.load_state()["models"] == []


@pytest.mark.parametrize("options, needles", [
    (("--methods", "supervised", "--strong-augment"),
     ("--strong-augment: read only by rows that train semi-supervised", "--methods supervised has none")),
    (("--methods", "supervised,vqseg-nopfa", "--foundation", "litemedsam"),
     ("--foundation litemedsam: read only by rows with PFA", "--methods supervised,vqseg-nopfa has none")),
    (("--methods", "vqseg", "--dropout-rate", "0.3"),
     ("--dropout-rate 0.3: read only where the perturbation is dropout", "--methods vqseg has none")),
    (("--methods", "vqseg-dropout,vqseg-noqpm,vqseg-labelled", "--perturbation", "none"),
     ("--perturbation none: read only by rows that train semi-supervised and set no perturbation of their own",
      "--methods vqseg-dropout,vqseg-noqpm,vqseg-labelled has none")),
    (("--methods", "supervised,vqseg", "--config", "CONFIG"),
     ("config key 'dropout_rate' (0.2) of", "read only where the perturbation is dropout", "has none")),
    (("--methods", "vqseg-dropout", "--dropout-rate", "0.2", "--config", "NOQPM"),
     ("--dropout-rate 0.2: ", "--methods vqseg-dropout has none (use_qpm false switches every perturbation off)")),
])
def test_ssl_refuses_a_setting_no_row_of_the_experiment_reads(tmp_path, options, needles):
    """`ssl --methods supervised --strong-augment` once trained without it and recorded it in
    run.json as if it had taken effect; so did a dropout rate beside QPM."""
    (tmp_path / "rate.json").write_text(json.dumps({"dropout_rate": 0.2}))
    (tmp_path / "noqpm.json").write_text(json.dumps({"use_qpm": False}))
    options = [{"CONFIG": tmp_path / "rate.json", "NOQPM": tmp_path / "noqpm.json"}.get(o, o) for o in options]
    r = run_main("ssl", "--dataset", "phantom-lung", "--preset", "tiny", *options, "--out", tmp_path / "out", check=False)
    refused(r, *needles, code=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("methods", ["vqseg-typo", "supervised,vqseg-warmpu"])
def test_ssl_with_an_unknown_row_named_like_a_vqseg_row_is_refused_not_a_traceback(tmp_path, methods):
    """`ssl --methods vqseg-typo` once ended in a KeyError: the check of which rows read
    the command line's settings looked the row up before the names were checked."""
    r = run_main("ssl", "--dataset", "phantom-lung", "--preset", "tiny", "--methods", methods, "--strong-augment",
                 "--out", tmp_path / "out", check=False)
    unknown = [m for m in methods.split(",") if m != "supervised"]
    refused(r, f"--methods: unknown {unknown}; expected some of supervised, supervised-full", "vqseg-warmup", code=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, options", [("perturbation", ("--methods", "vqseg-dropout", "--perturbation", "none")),
                                          ("dropout_rate", ("--methods", "vqseg", "--dropout-rate", "0.3")),
                                          ("strong_augment", ("--methods", "supervised", "--strong-augment")),
                                          ("foundation", ("--methods", "vqseg-nopfa", "--foundation", "litemedsam"))])
def test_a_refusal_names_the_rows_that_read_the_setting_as_the_experiment_finds_them(tmp_path, monkeypatch, key, options):
    """The refusal's list of the rows that would read a setting is the experiment's own
    (``rows_reading`` under the defaults), so a row added to ``METHODS`` is named without
    a second, hand-kept list to forget."""
    from VQMedSegLib.config import VQSegConfig
    from VQMedSegLib.training import ssl_experiment

    monkeypatch.setitem(ssl_experiment.METHODS, "vqseg-added", {"perturbation": "dropout"} if key == "dropout_rate" else {})
    readers = ssl_experiment.rows_reading(list(ssl_experiment.METHODS), VQSegConfig())[key]
    assert "vqseg-added" in readers
    r = run_main("ssl", "--dataset", "phantom-lung", "--preset", "tiny", *options, "--out", tmp_path / "out", check=False)
    refused(r, f"({', '.join(readers)})" if key != "dropout_rate" else f"or the rows {', '.join(readers)})", code=2)


def test_predict_with_a_case_list_naming_nothing_is_refused_not_run_on_every_case(ws_with_case):
    refused(run_main("predict", "--workspace", ws_with_case, "--case", ",", check=False),
            "--case ',': names nothing; expected comma-separated names such as case1,case2", code=2)


@pytest.mark.parametrize("argv", [("simulate", "--dataset", "phantom-liver", "--strategies", ","),
                                  ("ssl", "--dataset", "phantom-lung", "--methods", " , "),
                                  ("ssl-merge", "a", "b", "--methods", ",")])
def test_a_list_of_methods_or_strategies_naming_nothing_is_refused(tmp_path, argv):
    """`--methods ,` once wrote an empty results.json (which then blocked the folder), and
    `--strategies ,` ended in a traceback."""
    r = run_main(*argv, "--preset", "tiny", "--out", tmp_path / "out", check=False) if argv[0] != "ssl-merge" else \
        run_main(*argv, "--out", tmp_path / "out", check=False)
    refused(r, "names nothing; expected comma-separated names", code=2)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("value", ["ten", "0", "0%", "120%"])
def test_a_number_of_slices_that_is_neither_a_count_nor_a_share_is_refused_before_any_work(tmp_path, value):
    r = run_main("simulate", "--dataset", "phantom-liver", "--preset", "tiny", "--per-round", value,
                 "--out", tmp_path / "out", check=False)
    refused(r, f"argument --per-round: found '{value}', expected a number of slices (1 or more) or a share of the "
               "pool such as 10%", code=2)
    assert not (tmp_path / "out").exists()


def test_config_with_unknown_keys_or_wrong_types(ws_with_case, tmp_path):
    (tmp_path / "typo.json").write_text(json.dumps({"iteratoins": 10}))
    refused(run_main("train", "--workspace", ws_with_case, "--config", tmp_path / "typo.json", check=False), "iteratoins", code=2)
    (tmp_path / "type.json").write_text(json.dumps({"iterations": "ten"}))
    refused(run_main("train", "--workspace", ws_with_case, "--config", tmp_path / "type.json", check=False),
            "iterations", "expected an integer", code=2)
    # the method is the command line's choice; a config file's "method" was once ignored without a word
    (tmp_path / "method.json").write_text(json.dumps({"method": "vqseg"}))
    refused(run_main("train", "--workspace", ws_with_case, "--config", tmp_path / "method.json", check=False),
            "config key 'method': found 'vqseg', expected 'supervised' (choose the method with train --method)", code=2)
    # a negative seed, which NumPy refuses with a traceback half way into a job
    (tmp_path / "seed.json").write_text(json.dumps({"seed": -3}))
    for method in ("supervised", "begal", "vqseg"):
        refused(run_main("train", "--workspace", ws_with_case, "--method", method, "--config", tmp_path / "seed.json",
                         check=False), "seed", "-3", "expected a whole number from 0", code=2)
    # and one too large for torch and MONAI, which once failed the job with an OverflowError
    (tmp_path / "seed.json").write_text(json.dumps({"seed": 2**32}))
    for method in ("supervised", "begal", "vqseg"):
        refused(run_main("train", "--workspace", ws_with_case, "--method", method, "--config", tmp_path / "seed.json",
                         check=False), "seed", str(2**32), "expected a whole number from 0 to 4294967295", code=2)
    for argv in (("train", "--workspace", ws_with_case), ("query", "--workspace", ws_with_case),
                 ("phantom", "--out", tmp_path / "p"), ("demo", "--out", tmp_path / "d")):
        for seed in ("-1", "99999999999999999999"):
            refused(run_main(*argv, "--seed", seed, check=False),
                    f"argument --seed: found {seed}, expected a whole number from 0 to 4294967295", code=2)
    assert Workspace.open(ws_with_case).load_state()["models"] == [] and not (tmp_path / "p").exists()
    # a demo refused for its settings leaves no demo.json asking for them again
    refused(run_main("demo", "--out", tmp_path / "d", "--device", "cuda", check=False), "cuda", code=2)
    assert not (tmp_path / "d" / "demo.json").exists()


@pytest.mark.parametrize("argv, needle", [
    (("ssl", "--dataset", "phantom-lung", "--iterations", "0"),
     "preset 'tiny' with --iterations 0: config key 'iterations': found 0, expected at least 1"),
    (("ssl", "--dataset", "phantom-lung", "--methods", "vqseg-dropout", "--dropout-rate", "1.5"),
     "preset 'tiny' with --dropout-rate 1.5: config key 'dropout_rate': found 1.5, expected in [0, 1)"),
    (("train", "--workspace", "WS", "--iterations", "-5"),
     "preset 'tiny' with --iterations -5: config key 'iterations': found -5, expected at least 1"),
    (("train", "--workspace", "WS", "--method", "vqseg", "--config", "RATE", "--dropout-rate", "2", "--perturbation", "dropout"),
     "with config file RATE and --perturbation dropout, --dropout-rate 2.0: config key 'dropout_rate': found 2.0"),
])
def test_an_option_the_configuration_refuses_is_named_as_the_option_given(ws_with_case, tmp_path, argv, needle):
    """`ssl --iterations 0` was refused as "preset 'tiny': config key 'iterations'", as if
    the preset held the bad value: the message names the option the user typed."""
    (tmp_path / "rate.json").write_text(json.dumps({"dropout_rate": 0.2}))
    swap = {"WS": str(ws_with_case), "RATE": str(tmp_path / "rate.json")}
    argv = [swap.get(a, a) for a in argv]
    out = ("--out", tmp_path / "out") if argv[0] == "ssl" else ()
    refused(run_main(*argv, "--preset", "tiny", *out, check=False), swap["RATE"].join(needle.split("RATE")), code=2)
    assert not (tmp_path / "out").exists()


def test_train_lays_its_config_file_over_the_preset_and_its_options_over_both(ws_with_case, tmp_path):
    from VQMedSegLib.config import train_config_from_preset

    label = np.zeros((8, 24, 24), np.uint8)
    label[2:6, 8:16, 8:16] = 1
    annotate(ws_with_case, tmp_path, label, check=True)
    (tmp_path / "partial.json").write_text(json.dumps({"learning_rate": 0.01, "iterations": 50}), encoding="utf-8")
    run_main("train", "--workspace", ws_with_case, "--preset", "tiny", "--config", tmp_path / "partial.json",
             "--iterations", "2", "--seed", "5", "--device", "cpu")
    ws = Workspace.open(ws_with_case)
    ckpt = torch.load(ws.root / ws.latest_model()["path"], map_location="cpu", weights_only=True)
    assert ckpt["config"] == train_config_from_preset("tiny", learning_rate=0.01, iterations=2, seed=5).to_json()


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_the_supervised_unet_trains_with_each_preset_the_slicer_module_offers(ws_with_case, tmp_path, preset):
    """The Slicer module passes one preset to every job: `train --method supervised` must
    train with that preset, not fall back to another (the step at `paper` size is cut to
    one slice a batch to keep CI short)."""
    from VQMedSegLib.config import train_config_from_preset
    from VQMedSegLib.jobs.events import read_events

    label = np.zeros((8, 24, 24), np.uint8)
    label[2:6, 8:16, 8:16] = 1
    annotate(ws_with_case, tmp_path, label, check=True)
    (tmp_path / "small.json").write_text(json.dumps({"batch_size": 1}), encoding="utf-8")
    run_main("train", "--workspace", ws_with_case, "--method", "supervised", "--preset", preset, "--iterations", "1",
             "--config", tmp_path / "small.json", "--device", "cpu")
    ws = Workspace.open(ws_with_case)
    assert [e for e in read_events(ws.events_path).events if e["type"] == "warning"] == []
    ckpt = torch.load(ws.root / ws.latest_model()["path"], map_location="cpu", weights_only=True)
    assert ckpt["config"] == train_config_from_preset(preset, batch_size=1, iterations=1).to_json()


def test_every_method_trains_with_the_same_preset_names(ws_with_case):
    """`train --preset` offers the names every method has, so one choice (the Slicer
    module's) means a preset of that name for each; `standard`, the U-Net's old name for
    `cpu`, is refused with the choices."""
    from VQMedSegLib.cli.main import build_parser
    from VQMedSegLib.config import begal_config_from_preset, train_config_from_preset, vqseg_config_from_preset

    parser = build_parser()
    for preset in ("tiny", "quick", "cpu", "paper"):
        for method, config_from in (("supervised", train_config_from_preset), ("begal", begal_config_from_preset),
                                    ("vqseg", vqseg_config_from_preset)):
            args = parser.parse_args(["train", "--workspace", "WS", "--method", method, "--preset", preset])
            config_from(args.preset)
    before = files_under(ws_with_case)
    refused(run_main("train", "--workspace", ws_with_case, "--preset", "standard", check=False),
            "--preset", "'standard'", "tiny", "quick", "cpu", "paper", code=2)
    unchanged_workspace(ws_with_case, before)


@pytest.mark.parametrize("command", [
    ["train", "--method", "supervised"], ["train", "--method", "begal"], ["train", "--method", "vqseg"],
    ["simulate", "--dataset", "phantom-liver", "--strategies", "random"],
    ["ssl", "--dataset", "phantom-lung", "--labeled-fraction", "0.1"],
])
def test_the_paper_presets_are_refused_on_a_cpu_unless_asked_for_by_name(ws_with_case, tmp_path, monkeypatch, command):
    """`--preset paper` with `--device auto` and no GPU would train for days (the Slicer
    module's device choice is `auto` by default): refused at once, saying how to run it
    anyway; nothing is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    where = ["--workspace", ws_with_case] if command[0] == "train" else ["--out", tmp_path / "out"]
    before = files_under(ws_with_case)
    refused(run_main(*command, *where, "--preset", "paper", check=False),
            "--preset paper", "no CUDA device", "days", "--device cpu", code=2)
    unchanged_workspace(ws_with_case, before)
    assert not (tmp_path / "out").exists()


def test_workspace_from_a_newer_format(ws_with_case):
    state = json.loads((ws_with_case / "state.json").read_text())
    state["format_version"] = 99
    (ws_with_case / "state.json").write_text(json.dumps(state))
    refused(run_cli("workspace", "status", ws_with_case, check=False), "99", code=3)


@pytest.mark.parametrize("content, found", [
    ('[1, 2]', "holds a JSON list"),
    ('{"name": "my app", "version": 3}', "no format_version"),
    ('{"format_version": "1"}', "format_version '1'"),
    ('{"format_version": 0}', "format_version 0"),
    ('{"format_version": 1}', "task, cases, annotations, rounds, models, jobs missing or of another type"),
])
def test_a_state_file_that_is_not_a_workspaces_is_named_as_such(tmp_path, content, found):
    """Another program's state.json once read as 'format version None is newer than this
    VQMedSeg understands; update VQMedSeg', and a list or a bare version gave tracebacks."""
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "state.json").write_text(content, encoding="utf-8")
    for argv in (("workspace", "status", folder), ("workspace", "init", folder)):
        r = run_main(*argv, check=False)
        refused(r, f"workspace {folder / 'state.json'}: {found}; expected the state of a VQMedSeg workspace",
                "is this folder another program's?", code=3)
        assert "newer" not in r.stderr
    assert (folder / "state.json").read_text(encoding="utf-8") == content


# ------------------------------------------------------------ run-time conditions
def test_checkpoints_from_another_model_or_method(tmp_path):
    from VQMedSegLib.errors import InputError
    from VQMedSegLib.inference.predict import load_model
    from VQMedSegLib.jobs.checkpoints import load_checkpoint, save_checkpoint
    from VQMedSegLib.models.unet import build_unet, model_spec

    net = build_unet(features=(4, 8, 8, 16, 16, 4))
    path = tmp_path / "model.pt"
    # weights of one U-Net recorded as another
    save_checkpoint(path, {"method": "supervised", "model": model_spec(1, 2, (8, 16, 32, 64, 128, 8), 0.0),
                           "state_dict": net.state_dict(), "config": {}, "task": "liver"})
    with pytest.raises(InputError, match="weights do not fit"):
        load_model(path, torch.device("cpu"))
    write_volume(ct_volume(), tmp_path / "ct.nrrd")
    refused(run_cli("predict", "--model", path, "--ct", tmp_path / "ct.nrrd", "--out", tmp_path / "out", check=False),
            "model.pt", "do not fit", code=2)
    assert not (tmp_path / "out" / "prediction.seg.nrrd").exists()
    # a checkpoint of another method
    with pytest.raises(InputError, match="made by method 'supervised', expected 'vqseg'"):
        load_checkpoint(path, methods=("vqseg",))


def test_cuda_where_there_is_none(ws_with_case):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(run_cli("train", "--workspace", ws_with_case, "--device", "cuda", check=False), "--device cuda", "CUDA is not available", code=2)


def test_read_only_workspace(ws_with_case, tmp_path):
    write_volume(ct_volume(seed=3), tmp_path / "ct2.nrrd")
    before = {p: p.read_bytes() for p in ws_with_case.rglob("*") if p.is_file()}
    if os.geteuid() == 0:
        # root writes through permission bits: make the file system itself read-only
        r = subprocess.run(["mount", "--bind", str(ws_with_case), str(ws_with_case)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot make a read-only mount here ({r.stderr.strip() or 'not permitted'})")
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(ws_with_case)], check=True, capture_output=True)
            result = add_ct(ws_with_case, tmp_path / "ct2.nrrd", case="c2")
        finally:
            subprocess.run(["umount", str(ws_with_case)], check=False)
        refused(result, str(ws_with_case), "read-only", "nothing was half-written", code=3)
    else:
        for p in [ws_with_case, *ws_with_case.rglob("*")]:
            os.chmod(p, 0o555 if p.is_dir() else 0o444)
        try:
            refused(add_ct(ws_with_case, tmp_path / "ct2.nrrd", case="c2"), str(ws_with_case), "permission denied", code=3)
        finally:
            for p in [ws_with_case, *ws_with_case.rglob("*")]:
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert {p: p.read_bytes() for p in ws_with_case.rglob("*") if p.is_file()} == before


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to simulate a full disk here ({r.stderr.strip() or 'not permitted'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk(small_disk, tmp_path):
    ws = small_disk / "ws"
    run_cli("workspace", "init", ws)
    state = (ws / "state.json").read_bytes()
    write_volume(ct_volume(shape=(40, 96, 96)), tmp_path / "big.nrrd", compress=False)  # 720 kB of noise
    r = add_ct(ws, tmp_path / "big.nrrd")
    refused(r, "ct.nrrd", "disk is full", "nothing was half-written", code=3)
    assert (ws / "state.json").read_bytes() == state and Workspace.open(ws).cases() == {}
    no_temporaries(ws)


# ------------------------------------------------------------------------- faults
def _training_workspace(tmp_path) -> Path:
    case = make_dataset("phantom-liver", 1, seed=3, ct_shape=(12, 48, 48))[0]
    write_volume(case.ct, tmp_path / "ct.nrrd")
    write_volume(case.ct_label, tmp_path / "label.nrrd")
    ws = tmp_path / "ws"
    run_cli("workspace", "init", ws)
    run_cli("workspace", "add", ws, "--case", "c1", "--ct", tmp_path / "ct.nrrd")
    run_cli("workspace", "annotate", ws, "--case", "c1", "--label", tmp_path / "label.nrrd", "--label-value", "1", "--slices", "2-9")
    return ws


def _events(ws: Path) -> list[dict]:
    from VQMedSegLib.jobs.events import read_events

    return read_events(ws / "events.jsonl").events


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "VQMedSegLib", *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            **own_process_group())


def test_kill_9_during_training_20_times_loses_at_most_one_checkpoint_interval(tmp_path):
    ws = _training_workspace(tmp_path)
    annotation = (ws / "annotations" / "c1.nrrd").read_bytes()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"iterations": 100000, "batch_size": 2, "slice_size": 32, "features": [4, 8, 8, 16, 16, 4],
                                  "val_interval": 100000, "checkpoint_interval": 5, "augment": False}))
    from VQMedSegLib.jobs.runner import running_job

    rng = random.Random(7)

    def wait_for(types, since):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(e["type"] in types for e in _events(ws)[since:]):
            time.sleep(0.05)

    for attempt in range(20):
        n = len(_events(ws))
        proc = _spawn("train", "--workspace", ws, "--config", config, "--device", "cpu")
        if attempt % 5 == 4:
            time.sleep(rng.uniform(0.3, 1.5))  # during start-up
        elif attempt % 5 == 3:
            wait_for(("started",), n)
            time.sleep(rng.uniform(0.0, 0.3))  # while the job loads its data, model and checkpoint
        else:
            wait_for(("resumed", "progress", "checkpoint"), n)  # training under way
            time.sleep(rng.uniform(0.0, 2.0))  # anywhere in training, checkpoint writes included
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # state.json parses, the annotations and earlier records are intact, the lock is free again
        state = json.loads((ws / "state.json").read_text())
        assert state["annotations"]["c1"]["slices"] == list(range(2, 10))
        assert (ws / "annotations" / "c1.nrrd").read_bytes() == annotation
        assert running_job(Workspace.open(ws)) is None
    proc = _spawn("train", "--workspace", ws, "--config", config, "--device", "cpu")  # one more restart, to check it
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(e["type"] in ("resumed", "checkpoint") for e in _events(ws)[-3:]):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    events = _events(ws)
    starts = [e for e in events if e["type"] == "started"]
    assert len(starts) >= 15, f"only {len(starts)} of 21 runs got far enough to start"
    resumed_runs = 0
    for start in starts[1:]:
        before = [e["iteration"] for e in events if e["type"] == "checkpoint" and e["seq"] < start["seq"]]
        resumed = [e["iteration"] for e in events if e["type"] == "resumed" and e.get("job") == start["job"]]
        trained = [e for e in events if e["type"] in ("progress", "checkpoint") and e.get("job") == start["job"]]
        if before and not resumed and not trained:
            continue  # killed before it got as far as resuming: it neither trained nor lost anything
        if before:
            # each restart resumes from the newest checkpoint: the work lost is what followed it, less than one
            # interval. A kill between a checkpoint's rename and its event leaves a newer file than the events
            # say; resuming from that one is right too.
            assert resumed in ([max(before)], [max(before) + 5]), (start["job"], resumed, max(before))
            resumed_runs += 1
    assert resumed_runs >= 10, f"only {resumed_runs} of 20 restarts had a checkpoint to resume from"
    checkpoints = sorted({e["iteration"] for e in events if e["type"] == "checkpoint"})
    assert all(c % 5 == 0 for c in checkpoints)


def test_kill_9_during_query_or_prediction_leaves_nothing_that_looks_final(tmp_path):
    ws = _training_workspace(tmp_path)
    # the model and a first suggestion list, in this process; the runs that are killed are processes of their own
    run_main("train", "--workspace", ws, "--method", "begal", "--preset", "tiny", "--device", "cpu")
    run_main("query", "--workspace", ws, "--strategy", "begal", "--n", "4", "--preset", "tiny", "--device", "cpu")
    before = (ws / "suggestions.json").read_bytes()
    for delay in (0.5, 1.5, 2.5):
        proc = _spawn("query", "--workspace", ws, "--strategy", "mcdropout", "--n", "4", "--preset", "tiny", "--device", "cpu")
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        now = (ws / "suggestions.json").read_bytes()
        data = json.loads(now)  # never half-written
        assert now == before or data["strategy"] == "mcdropout"
        before = now
        # a kill between a temporary file's write and its rename may leave it (hidden; the next job removes it)
    for delay in (0.5, 1.5, 2.5):
        proc = _spawn("predict", "--workspace", ws, "--device", "cpu")
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        state = json.loads((ws / "state.json").read_text())
        for case, record in state.get("predictions", {}).items():
            for rel in record["files"].values():
                assert (ws / rel).is_file()
        folder = ws / "predictions" / "c1"
        if "c1" not in state.get("predictions", {}):
            assert not (folder / "prediction.seg.nrrd").exists(), "an unrecorded prediction looks final"
    run_main("query", "--workspace", ws, "--strategy", "random", "--n", "4", "--preset", "tiny", "--device", "cpu")
    no_temporaries(ws)  # what the kills left, the next job cleared


# ----------------------------------------------------------------------- security
class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_executed(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "method": "supervised", "payload": _Exploit()}, path, pickle_module=pickle)
    write_volume(ct_volume(), tmp_path / "ct.nrrd")
    r = subprocess.run([sys.executable, "-m", "VQMedSegLib", "predict", "--model", str(path), "--ct", str(tmp_path / "ct.nrrd"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    refused(r, "evil.pt", "refused", code=2)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


@pytest.mark.parametrize("content", [b"hello world\n", bytes(range(256)) * 4, b""])
def test_a_file_that_is_no_checkpoint_is_a_clear_error_as_a_model_and_as_a_resume_point(ws_with_case, tmp_path, content):
    """A text file, random bytes or an empty file given as --model once gave a traceback
    (KeyError: 101), or passed on PyTorch's advice to load it with weights_only=False; a
    damaged resume point (last.pt) blocked training without saying what to do."""
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    write_volume(ct_volume(), tmp_path / "ct.nrrd")
    r = run_main("predict", "--model", bad, "--ct", tmp_path / "ct.nrrd", "--out", tmp_path / "out", check=False)
    refused(r, f"checkpoint {bad}:", "VQMedSeg", code=2)
    assert "weights_only" not in r.stderr and not (tmp_path / "out").exists()
    label = np.zeros((8, 24, 24), np.uint8)
    label[2:6, 8:16, 8:16] = 1
    annotate(ws_with_case, tmp_path, label, check=True)
    last = ws_with_case / "checkpoints" / "supervised" / "last.pt"
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_bytes(content)
    r = run_main("train", "--workspace", ws_with_case, "--preset", "tiny", "--iterations", "2", "--device", "cpu", check=False)
    refused(r, f"checkpoint {last}:", "delete it to train from the start (the models already made are kept)", code=2)


@pytest.mark.parametrize("case_id", ["../evil", "a/b", "..", ".hidden", "x" * 200])
def test_case_identifiers_cannot_escape_the_workspace(ws, tmp_path, case_id):
    write_volume(ct_volume(), tmp_path / "ct.nrrd")
    refused(run_cli("workspace", "add", ws, "--case", case_id, "--ct", tmp_path / "ct.nrrd", check=False), "cannot name a path outside")
    assert not (tmp_path / "evil").exists() and not (ws.parent / "evil").exists()
    assert Workspace.open(ws).cases() == {}


def test_a_case_name_with_spaces_or_accents_is_refused_with_a_name_that_would_do(ws, tmp_path):
    write_volume(ct_volume(), tmp_path / "ct.nrrd")
    r = run_main("workspace", "add", ws, "--case", "Pätient 1", "--ct", tmp_path / "ct.nrrd", check=False)
    refused(r, "'Pätient 1'", "for example 'P_tient_1'", code=2)
    run_main("workspace", "add", ws, "--case", "P_tient_1", "--ct", tmp_path / "ct.nrrd")  # the suggestion is accepted
    assert list(Workspace.open(ws).cases()) == ["P_tient_1"]


def test_main_commands_run_with_networking_disabled(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*a, **k):\n"
        "    raise OSError('network access attempted while networking is disabled')\n"
        "socket.socket.connect = _refuse\n"
        "socket.socket.connect_ex = _refuse\n"
        "socket.create_connection = _refuse\n"
        "socket.getaddrinfo = _refuse\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "HF_HUB_OFFLINE": "0"}

    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           capture_output=True, text=True, env=env)
    assert "networking is disabled" in probe.stderr  # the guard is active in the subprocesses
    ws = tmp_path / "ws"
    case = make_dataset("phantom-liver", 1, seed=2, ct_shape=(12, 48, 48))[0]
    write_volume(case.ct, tmp_path / "ct.nrrd")
    write_volume(case.ct_label, tmp_path / "label.nrrd")
    commands = [
        ["demo", "--out", tmp_path / "demo", "--preset", "tiny", "--device", "cpu"],
        ["workspace", "init", ws],
        ["workspace", "add", ws, "--case", "c1", "--ct", tmp_path / "ct.nrrd"],
        ["query", "--workspace", ws, "--n", "4", "--preset", "tiny", "--device", "cpu"],
        ["workspace", "annotate", ws, "--case", "c1", "--label", tmp_path / "label.nrrd", "--label-value", "1", "--slices", "3-8"],
        ["train", "--workspace", ws, "--method", "vqseg", "--preset", "tiny", "--device", "cpu"],
        ["predict", "--workspace", ws, "--device", "cpu"],
    ]
    # one guarded process runs the commands in turn (a process each would mostly time the imports)
    script = ("import json, sys\nfrom VQMedSegLib.cli.main import main\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    code = main(argv)\n"
              "    print('DONE', argv[0], code, flush=True)\n"
              "    if code:\n"
              "        sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", script, json.dumps([[str(a) for a in c] for c in commands])],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("DONE")] == [[c[0], "0"] for c in commands]
    # LiteMedSAM's features for PFA (seconds a slice on a CPU) report their progress batch by batch
    events = [json.loads(line) for line in (ws / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    features = [(e["done"], e["total"]) for e in events if e["type"] == "progress" and e.get("message") == "foundation features"]
    assert features[-1] == (6, 6) and len(features) >= 2, features
    assert (ws / "predictions").is_dir() and any((ws / "predictions").rglob("*.seg.nrrd"))


def test_subprocesses_get_argument_lists_never_a_shell_string():
    import ast

    offenders = []
    for path in [*(REPO / "VQMedSegLib").rglob("*.py"), REPO / "VQMedSeg" / "VQMedSeg.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                    offenders.append(f"{path.name}:{node.lineno} {name}")
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        offenders.append(f"{path.name}:{node.lineno} shell=")
                if name.startswith("subprocess.") and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
                    offenders.append(f"{path.name}:{node.lineno} string command")
    assert not offenders, offenders
