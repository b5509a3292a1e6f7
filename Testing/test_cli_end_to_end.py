"""The command line end to end: the demo (quick preset, the one users run) in a real
subprocess, as users run it; predict, evaluate and dataset check through the CLI's
``main`` in this process (:func:`conftest.run_main`: the same commands without a
subprocess's torch and MONAI imports)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from VQMedSegLib.data.io import read_label, read_volume, write_volume
from VQMedSegLib.data.phantoms import make_abdominal_case
from VQMedSegLib.data.volume import Volume

from conftest import oblique_direction
from conftest import run_cli, run_main as vqmedseg



@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    # as the README runs it: the output folder named relative to where the user stands
    here = tmp_path_factory.mktemp("demo")
    run_cli("demo", "--out", "demo-out", "--device", "cpu", "--json", cwd=here)
    return here / "demo-out"


@pytest.mark.slow
def test_demo_reaches_target_dice_and_writes_every_output(demo_out):
    metrics = json.loads((demo_out / "metrics.json").read_text())
    for key in ("dice", "hd95_mm", "asd_mm"):
        assert key in metrics
    assert metrics["dice"] >= 0.85, metrics
    assert metrics["hd95_mm"] is not None and metrics["hd95_mm"] < 20
    import importlib.util

    scene = importlib.util.find_spec("slicer") is not None  # slicer-core: optional, and without a build for Python 3.9
    for name in ("prediction.seg.nrrd", "uncertainty.nrrd", "overview.png", "report.md") + (("scene.mrb",) if scene else ()):
        assert (demo_out / name).stat().st_size > 0, name
    assert (demo_out / "scene.mrb").exists() == scene
    assert (demo_out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{metrics['dice']:.4f}" in (demo_out / "report.md").read_text()


@pytest.mark.slow
def test_demo_scene_opens_with_segmentation_and_coloured_uncertainty(demo_out):
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e '.[all]')")
    from VQMedSegLib.export.mrml import read_mrb

    scene, _logics = read_mrb(demo_out / "scene.mrb")
    segs = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    assert len(segs) == 1
    segmentation = segs[0].GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "Liver"
    assert segment.GetColor() != (0.5, 0.5, 0.5)
    volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    uncertainty = [v for v in volumes if v.GetAttribute("VQMedSeg.Role") == "uncertainty"]
    assert len(uncertainty) == 1
    colour = uncertainty[0].GetDisplayNode().GetColorNode()
    assert colour is not None and colour.GetNumberOfColors() == 256 and "viridis" in colour.GetName().lower()
    assert {v.GetAttribute("VQMedSeg.Role") for v in volumes} >= {"image", "uncertainty"}
    assert len(volumes) == 3  # CT, MR and the uncertainty map


@pytest.mark.slow
def test_demo_outputs_are_on_the_held_out_grid(demo_out):
    seg = read_label(demo_out / "prediction.seg.nrrd")
    unc = read_volume(demo_out / "uncertainty.nrrd")
    assert seg.same_geometry(unc)
    assert set(np.unique(seg.array)) <= {0, 1} and seg.array.sum() > 0
    assert 0 <= unc.array.min() and unc.array.max() <= np.log(2) + 1e-5


@pytest.mark.slow
def test_predict_keeps_an_oblique_grid_and_evaluate_reports_mm(demo_out, tmp_path):
    model = next((demo_out / "workspace" / "models").glob("*.pt"))
    case = make_abdominal_case(seed=1234, with_mr=False)
    # the same phantom, stored on a rotated grid with a shifted origin
    ct = Volume(case.ct.array, case.ct.spacing, (12.5, -30.0, 47.0), oblique_direction((0.1, -0.05, 0.2)))
    ref = ct.with_array((case.ct_label.array == 1).astype(np.uint8))
    write_volume(ct, tmp_path / "ct.nii.gz")
    write_volume(ref, tmp_path / "ref.nrrd")
    vqmedseg("predict", "--model", model, "--ct", tmp_path / "ct.nii.gz", "--out", tmp_path / "pred", "--device", "cpu")
    pred = read_label(tmp_path / "pred" / "prediction.seg.nrrd")
    assert pred.same_geometry(read_volume(tmp_path / "ct.nii.gz"), tol=1e-4)
    result = json.loads(vqmedseg("evaluate", "--pred", tmp_path / "pred" / "prediction.seg.nrrd", "--ref", tmp_path / "ref.nrrd", "--json").stdout)
    assert result["units"] == "mm" and result["dice"] > 0.8 and result["hd95_mm"] > 0


@pytest.mark.slow
def test_predict_keeps_only_the_largest_liver_piece_unless_asked(demo_out, tmp_path):
    from skimage.measure import label as components

    model = next((demo_out / "workspace" / "models").glob("*.pt"))
    case = make_abdominal_case(seed=1234, with_mr=False)
    liver = case.ct_label.array == 1
    # five slices through the middle of the liver replaced by a slice of the body below it:
    # the model sees the liver in two pieces, each real liver in its place. (This model
    # segments no block of liver tissue pasted elsewhere in the body, and a block pasted
    # beside the liver joins it; with such a block this test once passed on a stray voxel.)
    k = int(np.argwhere(liver).mean(0)[0])
    below = max(z for z in range(liver.shape[0]) if not liver[z].any())
    arr = case.ct.array.copy()
    arr[k - 2 : k + 3] = arr[below]
    write_volume(case.ct.with_array(arr), tmp_path / "ct.nrrd")
    pieces = {}
    for name, extra in (("default", ()), ("all", ("--keep-all-components",))):
        vqmedseg("predict", "--model", model, "--ct", tmp_path / "ct.nrrd", "--out", tmp_path / name, "--device", "cpu", *extra)
        pieces[name] = read_label(tmp_path / name / "prediction.seg.nrrd").array
    found = components(pieces["all"], connectivity=1)  # 6-connected, as the clean-up counts pieces
    sizes = np.bincount(found.ravel())[1:]
    assert np.sort(sizes)[-2] > 2000, sorted(sizes)  # two real pieces of liver, not a stray voxel
    assert components(pieces["default"], connectivity=1, return_num=True)[1] == 1
    # the clean-up only removes: what it keeps is the model's largest piece, unchanged
    largest = found == 1 + int(np.argmax(sizes))
    assert np.all(pieces["default"] <= pieces["all"])
    assert 2 * np.sum(pieces["default"] & largest) / (pieces["default"].sum() + largest.sum()) > 0.99


@pytest.mark.slow
def test_predict_into_a_folder_is_one_at_a_time_and_clears_what_a_killed_one_left(demo_out, tmp_path):
    """`predict --out DIR` outside a workspace: two predictions into one folder at once
    would leave one's segmentation beside the other's uncertainty, so the second is refused
    before it starts; and the hidden temporaries of a prediction killed mid-write are
    deleted by the next, which holds the folder's lock (nothing else of the user's is)."""
    import os

    from VQMedSegLib.jobs.locks import HeldLock

    model = next((demo_out / "workspace" / "models").glob("*.pt"))
    case = make_abdominal_case(seed=1234, with_mr=False)
    write_volume(case.ct, tmp_path / "ct.nrrd")
    out = tmp_path / "pred"
    out.mkdir()
    left = [".prediction-0a1b2c3d.seg.nrrd", ".uncertainty-00ff00ff.nrrd", ".uncertainty_qpm-12345678.nrrd",
            ".-9abcdef0.seg.nrrd", ".-deadbeef.nrrd"]  # a killed write_prediction's (outer and inner) temporaries
    kept = [".DS_Store", ".notes-0a1b2c3d.txt", ".scan-0a1b2c3d.nii.gz", "prediction-0a1b2c3d.seg.nrrd", ".old.nrrd"]
    for name in left + kept:
        (out / name).write_bytes(b"x")

    holder = HeldLock(out / ".vqmedseg-predict.lock")  # another prediction at work in the folder
    assert holder.try_acquire()
    holder.write_info(json.dumps({"pid": os.getpid(), "command": "predict"}))
    try:
        busy = vqmedseg("predict", "--model", model, "--ct", tmp_path / "ct.nrrd", "--out", out, "--device", "cpu", check=False)
    finally:
        holder.release()
    assert busy.returncode == 3, busy.stderr
    assert f"--out {out}: another prediction is being written into this folder" in busy.stderr, busy.stderr
    assert f'"pid": {os.getpid()}' in busy.stderr and "wait for it to finish or give another --out" in busy.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(left + kept + [".vqmedseg-predict.lock"])  # untouched

    vqmedseg("predict", "--model", model, "--ct", tmp_path / "ct.nrrd", "--out", out, "--device", "cpu")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        kept + [".vqmedseg-predict.lock", ".vqmedseg-predict.json", "prediction.seg.nrrd", "uncertainty.nrrd"])

    # its own earlier prediction is replaced; a segmentation corrected and saved over it is not, unless asked
    predict = ("predict", "--model", model, "--ct", tmp_path / "ct.nrrd", "--out", out, "--device", "cpu")
    vqmedseg(*predict)
    corrected = b"a segmentation corrected in Slicer"
    (out / "prediction.seg.nrrd").write_bytes(corrected)
    refused = vqmedseg(*predict, check=False)
    assert refused.returncode == 2 and (f"--out {out}: prediction.seg.nrrd was not written by a prediction into this folder, "
                                        "or changed since") in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "prediction.seg.nrrd").read_bytes() == corrected
    vqmedseg(*predict, "--overwrite")
    assert (out / "prediction.seg.nrrd").read_bytes() != corrected


def test_the_demo_without_slicer_core_writes_everything_but_the_scene_and_says_so(tmp_path):
    """slicer-core is optional (and has no build for Python 3.9, which 3D Slicer 5.8 runs):
    the demo once trained for minutes, then ended in an ImportError traceback."""
    import os
    import subprocess
    import sys

    hidden = tmp_path / "no-slicer"
    (hidden / "slicer").mkdir(parents=True)
    (hidden / "slicer" / "__init__.py").write_text("raise ImportError(\"No module named 'slicer'\")\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(Path(__file__).resolve().parents[1])])}
    r = subprocess.run([sys.executable, "-m", "VQMedSegLib", "demo", "--out", str(tmp_path / "out"), "--preset", "tiny",
                        "--iterations", "3", "--device", "cpu"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "scene.mrb will not be written" in r.stderr and "slicer-core" in r.stderr
    assert "no scene.mrb (it needs slicer-core)" in r.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["demo.json", "metrics.json", "overview.png", "prediction.seg.nrrd", "report.md", "uncertainty.nrrd",
                       "workspace"]
    assert "no `scene.mrb`: writing it needs slicer-core" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_the_demo_writes_over_an_earlier_demo_but_never_over_files_of_the_users(tmp_path):
    """`demo --out ~/Documents` once replaced whatever report.md or metrics.json the user
    kept there. It now refuses before any work; running it again over an earlier demo
    (the README's command, twice) still works, and other files are left alone."""
    from VQMedSegLib.jobs.workspace import Workspace

    tiny = ("--preset", "tiny", "--iterations", "3", "--device", "cpu")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes", encoding="utf-8")
    Workspace.create(mine / "workspace", task="liver")  # a workspace of theirs, even an empty one, is no demo
    r = vqmedseg("demo", "--out", mine, *tiny, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"--out {mine}: holds report.md and workspace, which an earlier demo did not write; expected a new or "
            "empty folder, one without those names, or an earlier demo's folder") in r.stderr, r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["report.md", "workspace"]
    assert (mine / "report.md").read_text(encoding="utf-8") == "my notes"
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    r = vqmedseg("demo", "--out", tmp_path / "a-file", *tiny, check=False)
    assert r.returncode == 3 and "Traceback" not in r.stderr and "cannot make the folder" in r.stderr, r.stderr

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "notes.txt").write_text("kept", encoding="utf-8")
    vqmedseg("demo", "--out", earlier, *tiny)
    report = (earlier / "report.md").read_text(encoding="utf-8")
    other_seed = vqmedseg("demo", "--out", earlier, *tiny, "--seed", "1", check=False)  # other phantoms
    assert other_seed.returncode == 2, other_seed.stderr
    assert (f"--out {earlier}: holds a demo made with --seed 0; run it with --seed 0 to make it again, "
            "or give another --out") in other_seed.stderr, other_seed.stderr
    assert (earlier / "report.md").read_text(encoding="utf-8") == report
    vqmedseg("demo", "--out", earlier, *tiny)  # again, in place
    assert (earlier / "notes.txt").read_text(encoding="utf-8") == "kept"
    assert json.loads((earlier / "metrics.json").read_text(encoding="utf-8"))["seed"] == 0


def _documented_commands(text: str) -> list[str]:
    """The `vqmedseg` command lines of a README: in its shell blocks (continued lines
    joined, comments dropped, `C="vqmedseg ..."` variables expanded; `torchrun ... -m
    VQMedSegLib` counts) and in its backticked table cells."""
    import re

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if m := re.fullmatch(r'([A-Z]\w*)="(.*)"', line):
                variables[m[1]] = m[2]
                continue
            line = re.sub(r"\$([A-Z]\w*)", lambda v: variables.get(v[1], v[0]), line)
            for part in re.split(r"\s*(?:&&|;)\s*", line):
                part = re.sub(r"^torchrun .*?-m VQMedSegLib ", "vqmedseg ", part)
                if part.startswith("vqmedseg "):
                    commands.append(part)
    for row in re.findall(r"^\|.*\|$", text, flags=re.M):
        commands += [c.replace("\\|", "|") for c in re.findall(r"`(vqmedseg [^`]+)`", row)]  # `a\|b`: a|b
    return commands


def _parsable(command: str) -> list[str]:
    """A documented command as arguments: optional parts `[--json]` given, the first of
    alternatives `a|b|PATH`, a placeholder in capitals (`WS`, `B`) a value that parses as a
    path and as a number, and an ellipsis `...` dropped (or a value where an option needs one)."""
    import re
    import shlex

    words = []
    for word in shlex.split(command.replace("[", "").replace("]", ""))[1:]:
        word = word.split("|")[0] if not word.startswith("--") else word
        word = "1" if re.fullmatch(r"[A-Z][A-Z0-9_]*", word) else word
        if word == "...":
            if words and words[-1].startswith("--"):
                words.append("X")
            continue
        words.append(word)
    return words


def test_every_command_line_the_readmes_document_is_accepted_by_the_command_line():
    """The READMEs stay true: each `vqmedseg` command they show parses with the real parser
    (an option renamed or removed in the code fails here, naming the README and the line)."""
    import contextlib
    import io

    from VQMedSegLib.cli.main import build_parser

    root = Path(__file__).resolve().parents[1]
    checked = 0
    for readme in (root / "README.md", root / "benchmarks" / "README.md"):
        commands = _documented_commands(readme.read_text(encoding="utf-8"))
        assert len(commands) >= 10, (readme, commands)
        for command in commands:
            words = _parsable(command)
            mention = len(words) <= 2 and not any(w.startswith("-") for w in words)  # `vqmedseg query`, `... workspace init`
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    build_parser().parse_args(words + ["--help"] if mention else words)
            except SystemExit as exc:
                if not (mention and exc.code == 0):
                    pytest.fail(f"{readme.relative_to(root)}: the command line rejects `{command}` (exit {exc.code})")
            checked += 1
    assert checked >= 60, checked


def test_every_command_line_option_says_what_it_is_for():
    import argparse

    from VQMedSegLib.cli.main import build_parser

    silent = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not (action.help or "").strip():
                silent.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "vqmedseg")
    assert not silent, f"options without help: {silent}"


def test_evaluate_refuses_a_label_value_neither_file_holds_and_prints_per_slice_scores(tmp_path):
    """A typo in --label once scored two empty masks as Dice 1.0; an empty prediction is
    still scored as it is (Dice 0), and --per-slice prints its table without --json too."""
    organs = np.zeros((3, 8, 8), np.uint8)
    organs[1, 2:6, 2:6] = 1
    organs[2, 2:6, 2:6] = 2
    write_volume(Volume(organs, spacing=(1, 1, 2)), tmp_path / "organs.nrrd")
    write_volume(Volume(np.zeros_like(organs), spacing=(1, 1, 2)), tmp_path / "empty.nrrd")
    typo = vqmedseg("evaluate", "--pred", tmp_path / "organs.nrrd", "--ref", tmp_path / "organs.nrrd", "--label", "9", check=False)
    assert typo.returncode == 2, typo.stdout
    assert f"--label 9: occurs nowhere in {tmp_path / 'organs.nrrd'}, whose label values are [1, 2]" in typo.stderr
    ref_typo = vqmedseg("evaluate", "--pred", tmp_path / "organs.nrrd", "--ref", tmp_path / "organs.nrrd", "--ref-label", "3",
                        check=False)
    assert ref_typo.returncode == 2 and "--ref-label 3: occurs nowhere in" in ref_typo.stderr
    # a mask stored as 0/255 once scored as empty, Dice 0, when value 1 was scored by default
    write_volume(Volume((organs == 1).astype(np.uint8) * 255, spacing=(1, 1, 2)), tmp_path / "mask255.nrrd")
    for pred, ref, option in (("organs", "mask255", "--ref-label"), ("mask255", "organs", "--label")):
        default = vqmedseg("evaluate", "--pred", tmp_path / f"{pred}.nrrd", "--ref", tmp_path / f"{ref}.nrrd", check=False)
        assert default.returncode == 2 and (f"{tmp_path / 'mask255.nrrd'}: its label values are [255], and the value scored by "
                                            f"default, 1, is not among them; expected {option} to say which") in default.stderr
    scored = json.loads(vqmedseg("evaluate", "--pred", tmp_path / "organs.nrrd", "--ref", tmp_path / "mask255.nrrd",
                                 "--ref-label", "255", "--json").stdout)
    assert scored["dice"] == 1.0
    empty = json.loads(vqmedseg("evaluate", "--pred", tmp_path / "empty.nrrd", "--ref", tmp_path / "organs.nrrd",
                                "--label", "2", "--json").stdout)
    assert empty["dice"] == 0.0
    text = vqmedseg("evaluate", "--pred", tmp_path / "organs.nrrd", "--ref", tmp_path / "organs.nrrd", "--label", "2",
                    "--per-slice").stdout.splitlines()
    assert text[1] == "slice  Dice    empty" and len(text) == 2 + 3, text
    assert text[4].split()[:2] == ["2", "1.0000"]


def test_evaluate_rejects_mismatched_grids(tmp_path):
    a = Volume(np.ones((3, 8, 8), np.uint8), spacing=(1, 1, 2))
    b = Volume(np.ones((3, 8, 8), np.uint8), spacing=(1, 1, 3))
    write_volume(a, tmp_path / "a.nrrd")
    write_volume(b, tmp_path / "b.nrrd")
    r = vqmedseg("evaluate", "--pred", tmp_path / "a.nrrd", "--ref", tmp_path / "b.nrrd", check=False)
    assert r.returncode == 2 and "spacing" in r.stderr and "a.nrrd" in r.stderr
    # in the words of the command: which file is the prediction, which the reference, and what to do
    message = r.stderr.strip().splitlines()[-1]
    assert f"--pred {tmp_path / 'a.nrrd'}: the prediction's voxel grid differs from the reference's ({tmp_path / 'b.nrrd'})" in message
    assert "spacing (1, 1, 2) != (1, 1, 3) (prediction != reference)" in message, message
    assert "expected both on one grid: predict on the image the reference was drawn on" in message, message
    assert "label value != image value" not in message


def test_evaluate_scores_the_target_segment_whatever_its_value_in_each_file(tmp_path):
    """A reference from another tool holds more organs, at its own values: the liver is
    found by its segment's name in a .seg.nrrd, or by --ref-label in a plain label map."""
    from VQMedSegLib.data.io import write_segmentation

    grid = dict(spacing=(0.8, 0.8, 2.0))
    liver = np.zeros((6, 16, 16), np.uint8)
    liver[1:5, 3:12, 3:12] = 1
    predicted = np.zeros_like(liver)
    predicted[1:5, 4:13, 3:12] = 1  # shifted by one row
    predicted[2, 0:2, 0:2] = 2  # a second structure of the prediction's own
    organs = np.where(liver == 1, 5, 0).astype(np.uint8)
    organs[:, 13:, 13:] = 1  # the spleen, at value 1
    write_segmentation(Volume(predicted, **grid), tmp_path / "pred.seg.nrrd",
                       [{"label": 1, "name": "Liver"}, {"label": 2, "name": "Tumour"}])
    write_segmentation(Volume(organs, **grid), tmp_path / "organs.seg.nrrd",
                       [{"label": 1, "name": "spleen"}, {"label": 5, "name": "liver"}])
    write_volume(Volume(organs, **grid), tmp_path / "organs.nii.gz")
    expected = 2 * (liver & (predicted == 1)).sum() / (liver.sum() + (predicted == 1).sum())

    scores = json.loads(vqmedseg("evaluate", "--pred", tmp_path / "pred.seg.nrrd", "--ref", tmp_path / "organs.seg.nrrd",
                                 "--json").stdout)
    assert scores["dice"] == pytest.approx(expected)
    assert (scores["label"], scores["reference_label"]) == (1, 5)
    assert (scores["segment"], scores["reference_segment"]) == ("Liver", "liver")
    text = vqmedseg("evaluate", "--pred", tmp_path / "pred.seg.nrrd", "--ref", tmp_path / "organs.seg.nrrd").stdout
    assert text.splitlines()[1] == "scored: segment 'Liver' (value 1) of the prediction against segment 'liver' (value 5) of the reference"
    scores = json.loads(vqmedseg("evaluate", "--pred", tmp_path / "pred.seg.nrrd", "--ref", tmp_path / "organs.nii.gz",
                                 "--ref-label", "5", "--json").stdout)
    assert scores["dice"] == pytest.approx(expected) and scores["reference_segment"] is None
    # --label names one value for both files
    scores = json.loads(vqmedseg("evaluate", "--pred", tmp_path / "organs.nii.gz", "--ref", tmp_path / "organs.seg.nrrd",
                                 "--label", "1", "--json").stdout)
    assert scores["dice"] == 1.0 and (scores["label"], scores["reference_label"]) == (1, 1)

    # segments of which none is named for the task are refused, not scored by a guessed value
    write_segmentation(Volume(organs, **grid), tmp_path / "unnamed.seg.nrrd",
                       [{"label": 1, "name": "Segment_1"}, {"label": 5, "name": "Segment_2"}])
    r = vqmedseg("evaluate", "--pred", tmp_path / "pred.seg.nrrd", "--ref", tmp_path / "unnamed.seg.nrrd", check=False)
    assert r.returncode == 2 and "unnamed.seg.nrrd" in r.stderr and "'Segment_1', 'Segment_2'" in r.stderr
    assert "--ref-label" in r.stderr and "--task" in r.stderr
    # a lung-tumour reference is scored with --task lung-tumour, by its segment's name
    write_segmentation(Volume(organs, **grid), tmp_path / "chest.seg.nrrd",
                       [{"label": 1, "name": "Lung"}, {"label": 5, "name": "lung tumour"}])
    write_segmentation(Volume((predicted == 1).astype(np.uint8), **grid), tmp_path / "tumour.seg.nrrd",
                       [{"label": 1, "name": "Lung tumour"}])
    scores = json.loads(vqmedseg("evaluate", "--pred", tmp_path / "tumour.seg.nrrd", "--ref", tmp_path / "chest.seg.nrrd",
                                 "--task", "lung-tumour", "--json").stdout)
    assert scores["dice"] == pytest.approx(expected) and scores["reference_segment"] == "lung tumour"


def test_the_workspace_commands_take_the_folder_as_the_job_commands_do_too(tmp_path):
    """`train --workspace WS` and `workspace add WS` both work, and so does `workspace add --workspace WS`:
    a user who has typed one form will type it again."""
    case = make_abdominal_case(seed=1, ct_shape=(6, 32, 32))
    write_volume(case.ct, tmp_path / "ct.nrrd")
    write_volume(case.ct_label, tmp_path / "label.nrrd")
    vqmedseg("workspace", "init", "--workspace", tmp_path / "ws")
    vqmedseg("workspace", "add", "--workspace", tmp_path / "ws", "--case", "c1", "--ct", tmp_path / "ct.nrrd")
    vqmedseg("workspace", "add", tmp_path / "ws", "--case", "c2", "--ct", tmp_path / "ct.nrrd")
    status = json.loads(vqmedseg("workspace", "status", "--workspace", tmp_path / "ws", "--json").stdout)
    assert status["cases"] == 2
    # each case's share of the labelling
    vqmedseg("workspace", "annotate", "--workspace", tmp_path / "ws", "--case", "c2", "--label", tmp_path / "label.nrrd",
             "--label-value", "1", "--slices", "1,2")
    status = json.loads(vqmedseg("workspace", "status", tmp_path / "ws", "--json").stdout)
    n = status["total_slices"] // 2
    assert status["per_case"] == {"c1": {"labelled_slices": 0, "slices": n, "mr": False},
                                  "c2": {"labelled_slices": 2, "slices": n, "mr": False}}
    text = vqmedseg("workspace", "status", tmp_path / "ws").stdout
    assert f"  c1: 0/{n} slices labelled, CT\n" in text and f"  c2: 2/{n} slices labelled, CT\n" in text
    r = vqmedseg("workspace", "status", check=False)
    assert r.returncode == 2 and "the workspace folder: give it as WS or --workspace WS" in r.stderr
    r = vqmedseg("workspace", "status", tmp_path / "ws", "--workspace", tmp_path / "other", check=False)
    assert r.returncode == 2 and "two workspace folders" in r.stderr and "other" in r.stderr


def test_the_job_commands_take_the_folder_as_the_workspace_commands_do(tmp_path):
    """`train WS`, `query WS` and `cancel WS` work as `workspace status WS` does, so a user who has typed
    `workspace add WS` is not told "the following arguments are required: --workspace" at the next command."""
    case = make_abdominal_case(seed=1, ct_shape=(6, 32, 32))
    write_volume(case.ct, tmp_path / "ct.nrrd")
    write_volume(case.ct_label, tmp_path / "label.nrrd")
    ws = tmp_path / "ws"
    vqmedseg("workspace", "init", ws)
    vqmedseg("workspace", "add", ws, "--case", "c1", "--ct", tmp_path / "ct.nrrd")
    vqmedseg("workspace", "annotate", ws, "--case", "c1", "--label", tmp_path / "label.nrrd", "--label-value", "1",
             "--slices", "1,2,3")
    vqmedseg("train", ws, "--preset", "tiny", "--iterations", "2", "--device", "cpu")
    status = json.loads(vqmedseg("workspace", "status", ws, "--json").stdout)
    assert len(status["models"]) == 1
    suggested = json.loads(vqmedseg("query", ws, "--strategy", "random", "--n", "2", "--preset", "tiny", "--json",
                                    "--device", "cpu").stdout)
    assert len(suggested["suggestions"]) == 2
    assert "no job is running" in vqmedseg("cancel", ws).stdout
    for command in ("train", "query", "cancel"):
        r = vqmedseg(command, check=False)
        assert r.returncode == 2 and f"{command}: the workspace folder: give it as WS or --workspace WS" in r.stderr
        r = vqmedseg(command, ws, "--workspace", tmp_path / "other", check=False)
        assert r.returncode == 2 and f"{command}: two workspace folders" in r.stderr and "other" in r.stderr


def test_predict_refuses_a_missing_model_and_an_out_that_is_a_file(tmp_path):
    r = vqmedseg("predict", "--model", tmp_path / "none.pt", "--ct", tmp_path / "ct.nrrd", "--out", tmp_path, check=False)
    assert r.returncode == 2 and "none.pt: not found" in r.stderr
    (tmp_path / "notes.txt").write_text("mine")  # once: "notes.txt/.vqmedseg-predict.lock: could not write (File exists)"
    r = vqmedseg("predict", "--model", tmp_path / "none.pt", "--ct", tmp_path / "ct.nrrd", "--out", tmp_path / "notes.txt",
                 check=False)
    assert r.returncode == 2 and f"--out {tmp_path / 'notes.txt'}: is a file; expected a folder" in r.stderr


@pytest.mark.realdata
def test_dataset_check_finds_chaos_ct_aligned(real_data):
    r = vqmedseg("dataset", "check", real_data / "chaos" / "Train_Sets" / "CT" / "1", "--json")
    cases = json.loads(r.stdout)["cases"]
    assert len(cases) == 1
    case = cases[0]
    assert case["modality"] == "CT" and case["shape"] == [512, 512, 78]
    assert np.allclose(case["spacing"][2], 2.0, atol=0.01)
    liver = case["labels"]["1"]
    assert liver["voxels"] > 100000
    assert liver["mean_intensity"] > 100, "contrast-enhanced liver must be well above 100 HU when aligned"
    assert case["labels"]["0"]["mean_intensity"] < 0


@pytest.mark.realdata
def test_evaluate_scores_against_chaos_png_masks_given_as_the_reference(real_data, tmp_path):
    from VQMedSegLib.data.datasets import discover_cases, load_case

    case_dir = real_data / "chaos" / "Train_Sets" / "CT" / "1"
    (ref,) = discover_cases(case_dir)
    image, liver = load_case(ref)
    eroded = liver.with_array(liver.array.copy())
    eroded.array[: eroded.shape[0] // 2] = 0  # half of the liver's slices missed
    write_volume(eroded, tmp_path / "pred.nrrd")
    expected = 2 * eroded.array.sum() / (eroded.array.sum() + liver.array.sum())
    for reference in (case_dir / "Ground", case_dir):  # the masks' folder, or the case's
        scores = json.loads(vqmedseg("evaluate", "--pred", tmp_path / "pred.nrrd", "--ref", reference, "--json").stdout)
        assert scores["dice"] == pytest.approx(expected, abs=1e-6), reference
        assert scores["units"] == "mm"


@pytest.mark.realdata
def test_a_chaos_case_is_annotated_from_its_png_masks(real_data, tmp_path):
    """The researcher's loop on a CHAOS CT: the Ground folder serves as the annotation, as it serves `evaluate`."""
    from VQMedSegLib.data.datasets import discover_cases, load_case
    from VQMedSegLib.jobs.workspace import Workspace

    case_dir = real_data / "chaos" / "Train_Sets" / "CT" / "1"
    vqmedseg("workspace", "init", tmp_path / "ws")
    vqmedseg("workspace", "add", tmp_path / "ws", "--case", "p1", "--ct", case_dir / "DICOM_anon")
    out = vqmedseg("workspace", "annotate", tmp_path / "ws", "--case", "p1", "--label", case_dir / "Ground",
                   "--slices", "30,40").stdout
    assert out == "case p1: 2 labelled slices\n"
    ws = Workspace.open(tmp_path / "ws")
    _, liver = load_case(discover_cases(case_dir)[0])
    stored = ws.load_annotation("p1")
    axis = 2 - ws.case("p1")["slice_axis"]  # the slice axis in the array's (z, y, x) order
    for k in (30, 40):
        assert np.array_equal(np.take(stored.array, k, axis=axis), np.take(liver.array, k, axis=axis)), k
        assert np.take(liver.array, k, axis=axis).any(), k

