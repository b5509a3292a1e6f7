"""Data-set discovery, case loading, the CHAOS mask alignment and the data check."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from VQMedSegLib.data.check import check_dataset, format_report
from VQMedSegLib.data.datasets import CaseRef, discover_cases, load_case
from VQMedSegLib.data.io import write_volume
from VQMedSegLib.data.paths import shared_data_dir
from VQMedSegLib.data.volume import Volume
from VQMedSegLib.errors import InputError

from conftest import keeping_locale, ramp

SKIP_REASON = "real scans not found: set VQMEDSEG_DATA or place them in ../shared/data"


def real_data(sub: str) -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip(SKIP_REASON)
    path = root / sub
    if not path.exists():
        pytest.skip(f"real scans incomplete: {sub} not found in the shared data folder")
    return path


def make_volume(array: np.ndarray, spacing=(0.8, 0.8, 3.0), origin=(10.0, -20.0, 5.0)) -> Volume:
    return Volume(array, spacing, origin, np.diag([1.0, -1.0, 1.0]))


def write_pair(folder: Path, name: str, image: np.ndarray, label: np.ndarray | None, **geometry) -> None:
    write_volume(make_volume(image, **geometry), folder / f"image_{name}.nii.gz")
    if label is not None:
        write_volume(make_volume(label.astype(np.uint8), **geometry), folder / f"label_{name}.nii.gz")


def write_dicom_slices(folder: Path, slices: list[np.ndarray], positions_z: list[float], numbers: list[int]) -> None:
    """One axial CT file per slice, named by InstanceNumber like CHAOS (i0000,0000b.dcm = number 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    with keeping_locale():
        _write_slices(writer, folder, uid, slices, positions_z, numbers)


def _write_slices(writer, folder: Path, uid: str, slices, positions_z, numbers) -> None:
    for pixels, z, number in zip(slices, positions_z, numbers):
        image = sitk.GetImageFromArray(pixels.astype(np.int16)[np.newaxis])
        image.SetSpacing((0.7, 0.7, 2.0))
        image = image[:, :, 0]
        for key, value in {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{number}",
            "0020|000d": f"{uid}.1",
            "0020|000e": uid,
            "0020|0013": str(number),
            "0020|0032": f"-100\\-50\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": "2.0",
        }.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"i{number - 1:04d},0000b.dcm"))
        writer.Execute(image)


# ------------------------------------------------------------------ layouts
def test_image_label_pairs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((4, 6, 5)) * 500
    label = np.zeros((4, 6, 5), np.uint8)
    label[1:3, 2:4, 2:4] = 2
    write_pair(tmp_path, "10", image, label)
    write_pair(tmp_path, "2", image, None)
    refs = discover_cases(tmp_path)
    assert [r.case_id for r in refs] == ["2", "10"]  # natural order
    assert all(r.layout == "pairs" and r.modality == "MR" for r in refs)
    assert refs[0].options["modality_source"] == "guessed"
    assert refs[0].label is None and refs[1].label == tmp_path / "label_10.nii.gz"
    img, lab = load_case(refs[1])
    np.testing.assert_allclose(img.array, image)
    np.testing.assert_array_equal(lab.array, label)
    assert img.metadata["case_id"] == "10" and img.metadata["modality"] == "MR"
    assert load_case(refs[0])[1] is None
    given = discover_cases(tmp_path, modality="CT")
    assert given[0].modality == "CT" and given[0].options["modality_source"] == "given"


def test_modality_guess_ct(tmp_path: Path) -> None:
    write_pair(tmp_path, "1", np.full((3, 4, 4), -1000.0), np.zeros((3, 4, 4)))
    assert discover_cases(tmp_path)[0].modality == "CT"


def test_a_pairs_folder_takes_its_modality_from_dataset_json(tmp_path: Path, caplog) -> None:
    """The command line has no modality option: a guess says how to settle it there."""
    write_pair(tmp_path, "1", np.full((3, 4, 4), 200.0), np.zeros((3, 4, 4)))  # no air: would be guessed MR
    with caplog.at_level("WARNING"):
        assert discover_cases(tmp_path)[0].modality == "MR"
    assert "guessed MR" in caplog.text and 'dataset.json beside the images ({"modality": {"0": "CT"}})' in caplog.text
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        ref = discover_cases(tmp_path)[0]
    assert ref.modality == "CT" and ref.options["modality_source"] == "dataset.json" and "guessed" not in caplog.text


@pytest.mark.parametrize("labels", [{"background": 0, "liver": 1, "spleen": 4},  # nnU-Net v2: name -> value
                                    {"0": "background", "1": "liver", "4": "spleen"}])  # MSD: value -> name
def test_a_dataset_json_names_its_label_values_in_either_convention(tmp_path: Path, labels) -> None:
    from VQMedSegLib.data.datasets import dataset_json_labels

    assert dataset_json_labels(tmp_path) is None
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert dataset_json_labels(tmp_path) == {1: "liver", 4: "spleen"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": ["liver"]}))  # no convention of either
    assert dataset_json_labels(tmp_path) is None


def test_a_folder_of_dataset_folders_is_refused_naming_them(tmp_path: Path) -> None:
    """`vqmedseg phantom --out DIR` writes DIR/CT and DIR/MR; DIR itself is no dataset."""
    (tmp_path / "CT").mkdir()
    (tmp_path / "CT" / "dataset.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    with pytest.raises(InputError, match=rf"no cases found in a supported layout; its folder CT holds a dataset: give "
                                         rf"{re.escape(str(tmp_path / 'CT'))}\. Supported layouts"):
        discover_cases(tmp_path)


def test_label_geometry_mismatch(tmp_path: Path) -> None:
    write_pair(tmp_path, "1", ramp((3, 4, 4)), None)
    write_volume(make_volume(np.ones((3, 4, 4), np.uint8), origin=(0.0, 0.0, 0.0)), tmp_path / "label_1.nii.gz")
    ref = discover_cases(tmp_path, "MR")[0]
    with pytest.raises(InputError, match=r"label_1\.nii\.gz: label geometry does not match.*origin"):
        load_case(ref)
    result = check_dataset(tmp_path, modality="MR")
    (case,) = result["cases"]
    assert any("label geometry differs" in p and "origin" in p for p in case["problems"])


def test_msd_images_tr(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}}))
    image = np.full((3, 4, 5), 40.0)
    image[0, 0, :] = -1000.0  # air: a CT in Hounsfield units
    write_volume(make_volume(image), tmp_path / "imagesTr" / "liver_0.nii.gz")
    write_volume(make_volume(np.ones((3, 4, 5), np.uint8)), tmp_path / "labelsTr" / "liver_0.nii.gz")
    write_volume(make_volume(image), tmp_path / "imagesTs" / "liver_7.nii.gz")
    (tmp_path / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05macOS resource fork")
    refs = discover_cases(tmp_path)
    assert [(r.case_id, r.modality, r.label is not None, r.options["split"]) for r in refs] == [
        ("liver_0", "CT", True, "imagesTr"),
        ("liver_7", "CT", False, "imagesTs"),
    ]
    assert refs[0].options["modality_source"] == "dataset.json"
    img, lab = load_case(refs[0])
    assert lab.array.sum() == 60
    # the imagesTr folder itself works too
    assert [r.case_id for r in discover_cases(tmp_path / "imagesTr")] == ["liver_0", "liver_7"]


def test_nnunet_images_tr(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "file_ending": ".nii.gz"}))
    for name in ("prostate_001", "prostate_002"):
        write_volume(make_volume(ramp((3, 4, 5), 7.0)), tmp_path / "imagesTr" / f"{name}_0000.nii.gz")
        write_volume(make_volume(np.ones((3, 4, 5), np.uint8)), tmp_path / "labelsTr" / f"{name}.nii.gz")
    refs = discover_cases(tmp_path)
    assert [r.case_id for r in refs] == ["prostate_001", "prostate_002"]
    assert all(r.modality == "MR" and r.label is not None for r in refs)
    assert refs[1].label == tmp_path / "labelsTr" / "prostate_002.nii.gz"
    assert load_case(refs[1])[1].array.sum() == 60


def test_acdc_h5_folder(tmp_path: Path) -> None:
    for name in ("patient001_frame01", "patient001_frame02"):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["image"] = np.random.default_rng(0).random((3, 8, 6)).astype(np.float32)
            label = np.zeros((3, 8, 6), np.uint8)
            label[1, 2:5, 2:4] = 1
            f["label"] = label
    (tmp_path / "test.list").write_text("patient001_frame01\n")
    refs = discover_cases(tmp_path)
    assert [(r.case_id, r.modality, r.layout) for r in refs] == [
        ("patient001_frame01", "MR", "acdc-h5"),
        ("patient001_frame02", "MR", "acdc-h5"),
    ]
    image, label = load_case(refs[0])
    assert image.metadata["spacing_known"] is False and label.array.sum() == 6
    (case, _) = check_dataset(tmp_path)["cases"]
    assert any("spacing unknown" in p for p in case["notes"]) and case["problems"] == []
    assert case["labels"]["1"]["voxels"] == 6


def test_single_file_with_label(tmp_path: Path) -> None:
    write_pair(tmp_path, "x", ramp((3, 4, 4), -900.0), np.ones((3, 4, 4)))
    (ref,) = discover_cases(tmp_path / "image_x.nii.gz", label=tmp_path / "label_x.nii.gz")
    assert (ref.case_id, ref.modality, ref.layout) == ("image_x", "CT", "single")
    image, label = load_case(ref)
    assert label.array.sum() == 48
    with pytest.raises(InputError, match="label .*missing.nii.gz: not found"):
        discover_cases(tmp_path / "image_x.nii.gz", "CT", label=tmp_path / "missing.nii.gz")


def test_dicom_folder_layout(tmp_path: Path) -> None:
    write_dicom_slices(tmp_path / "scan", [np.full((4, 4), v) for v in (-1000, 2, 3)], [0.0, 2.0, 4.0], [1, 2, 3])
    (ref,) = discover_cases(tmp_path / "scan")
    assert (ref.case_id, ref.modality, ref.layout, ref.label) == ("scan", "CT", "dicom", None)
    assert ref.options["modality_source"] == "dicom"
    image, label = load_case(ref)
    assert image.array[:, 0, 0].tolist() == [-1000, 2, 3] and label is None


def test_chaos_layout_mask_order(tmp_path: Path) -> None:
    """PNG n belongs to the slice with the n-th InstanceNumber, whatever order GDCM reads."""
    from PIL import Image

    case = tmp_path / "CHAOS" / "Train_Sets" / "CT" / "7"
    n, rows, cols = 4, 6, 5
    slices, pngs = [], []
    for number in range(1, n + 1):  # InstanceNumber 1 is the top slice, as in CHAOS CT
        pixels = np.full((rows, cols), -1000, np.int16)  # air
        pixels[number, number % cols] = 1000 + number  # asymmetric spot: catches flips
        slices.append(pixels)
        pngs.append(pixels > 0)
    z = [100.0 - 2.0 * k for k in range(n)]
    write_dicom_slices(case / "DICOM_anon", slices, z, list(range(1, n + 1)))
    (case / "Ground").mkdir()
    for k, mask in enumerate(pngs):
        Image.fromarray(mask).save(case / "Ground" / f"liver_GT_{k:03d}.png")

    (ref,) = discover_cases(tmp_path / "CHAOS")
    assert (ref.case_id, ref.modality, ref.layout) == ("CT_7", "CT", "chaos")
    image, label = load_case(ref)
    assert image.origin[2] == pytest.approx(94.0)  # GDCM sorted by position: bottom first
    assert label.array.sum() == n
    np.testing.assert_array_equal(image.array[label.array == 1], image.array[image.array > 0])
    assert label.same_geometry(image)

    (case / "Ground" / "liver_GT_003.png").unlink()
    with pytest.raises(InputError, match=r"Ground: found 3 PNG masks; expected one per slice .*4 slices"):
        load_case(ref)


def test_unknown_layout_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(InputError, match="no cases found in a supported layout. Supported layouts: chaos"):
        discover_cases(tmp_path)
    with pytest.raises(InputError, match="gone: not found"):
        discover_cases(tmp_path / "gone")


def test_case_ref_safety_and_json(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="case identifier '../x'"):
        CaseRef("../x", "CT", tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="expected 'CT' or 'MR'"):
        CaseRef("a", "US", tmp_path / "a.nii.gz")
    ref = CaseRef("a", "MR", tmp_path / "a.h5", tmp_path / "a.h5", "acdc-h5", {"label_dataset": "label"})
    assert CaseRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


# ------------------------------------------------------------------ check_dataset
def test_check_dataset_synthetic(tmp_path: Path) -> None:
    image = np.zeros((4, 6, 5))
    image[1] = 100.0
    label = np.zeros((4, 6, 5), np.uint8)
    label[1, :2] = 1
    write_pair(tmp_path, "1", image, label)
    write_pair(tmp_path, "2", image, np.zeros((4, 6, 5)))
    result = check_dataset(tmp_path, modality="MR")
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    one, two = result["cases"]
    assert one["shape"] == [5, 6, 4]  # (i, j, k) = columns, rows, slices
    assert one["spacing"] == pytest.approx([0.8, 0.8, 3.0])
    assert one["labels"] == {
        "0": {"voxels": 110, "mean_intensity": pytest.approx(20 * 100 / 110, abs=1e-3)},
        "1": {"voxels": 10, "mean_intensity": 100.0},
    }
    assert one["problems"] == []
    assert any("no labelled voxel" in p for p in two["problems"])
    assert check_dataset(tmp_path, modality="MR", limit=1)["n_checked"] == 1
    report = format_report(result)
    assert "5x6x4" in report and "1:10(100)" in report and "2: no labelled voxel" in report
    with pytest.raises(InputError, match="limit 0"):
        check_dataset(tmp_path, limit=0)


def test_check_dataset_shows_one_progress_bar_instead_of_a_log_line_per_case(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    label = np.zeros((4, 6, 5), np.uint8)
    label[1] = 1
    for case in "123":
        write_pair(tmp_path, case, np.ones((4, 6, 5)), label)
    with caplog.at_level(logging.INFO, logger="VQMedSegLib"):
        assert check_dataset(tmp_path, modality="MR", progress=True)["n_checked"] == 3
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) == 1 and "3 case(s)" in info[0], info  # what was found, then the bar
    err = capsys.readouterr().err
    assert "check" in err and "3/3" in err, err
    check_dataset(tmp_path, modality="MR", progress=False)
    assert capsys.readouterr().err == ""


def test_the_check_report_says_a_problem_shared_by_many_cases_once() -> None:
    spacing = "voxel spacing unknown (the file stores none; (1, 1, 1) used)"
    empty = "no labelled voxel (the label map is all background)"
    cases = [{"id": f"p{i:02d}", "modality": "MR", "problems": [empty], "notes": [spacing]} for i in range(60)]
    cases[7]["problems"].append("label geometry differs from the image: origin (label != image)")
    report = format_report({"path": "acdc", "layout": "acdc-h5", "n_cases": 60, "n_checked": 60, "cases": cases})
    problems, notes = report.split("Problems:\n")[1].split("Notes:\n")
    assert problems.splitlines() == [
        f"  60 cases (p00, p01, p02 and 57 more): {empty}",
        "  p07: label geometry differs from the image: origin (label != image)",
        "",
    ]
    assert notes.splitlines() == [f"  60 cases (p00, p01, p02 and 57 more): {spacing}"]
    two = format_report({"cases": cases[:2]}).split("Problems:\n")[1].split("\n\n")[0].splitlines()
    assert two == [f"  2 cases (p00, p01): {empty}"]


def test_dataset_check_exits_1_on_a_problem_and_0_when_there_are_only_notes(tmp_path: Path) -> None:
    """A script or CI job gating on ``vqmedseg dataset check`` once passed a data set whose
    label map was all background, or lay elsewhere than its image: the command exited 0
    whatever it found. Notes (spacing the file does not store, an unlabelled case) are
    not problems: such data trains."""
    from conftest import run_main

    label = np.zeros((4, 6, 5), np.uint8)
    label[1, :2] = 1
    write_pair(tmp_path / "fine", "1", ramp((4, 6, 5), 100.0), label)
    r = run_main("dataset", "check", tmp_path / "fine", "--modality", "MR")
    assert r.returncode == 0 and "No problems found." in r.stdout

    unlabelled = tmp_path / "unlabelled.nii.gz"
    write_volume(Volume(ramp((4, 6, 5), 100.0).astype(np.float32)), unlabelled)
    r = run_main("dataset", "check", unlabelled, "--modality", "MR")
    assert r.returncode == 0 and "No problems found." in r.stdout and "no label map (unlabelled case)" in r.stdout

    write_pair(tmp_path / "empty", "1", ramp((4, 6, 5), 100.0), np.zeros((4, 6, 5)))
    r = run_main("dataset", "check", tmp_path / "empty", "--modality", "MR", check=False)
    assert r.returncode == 1 and "1: no labelled voxel" in r.stdout
    assert "1 of 1 case(s) has a problem" in r.stderr
    r = run_main("dataset", "check", tmp_path / "empty", "--modality", "MR", "--json", check=False)
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["n_with_problems"] == 1 and report["cases"][0]["notes"] == []


# ------------------------------------------------------------------ real scans
@pytest.fixture(scope="module")
def chaos_ct_case():
    (ref,) = discover_cases(real_data("chaos/Train_Sets/CT/1"))
    return ref, *load_case(ref)


@pytest.mark.realdata
def test_chaos_ct_alignment_real(chaos_ct_case) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    ref, image, label = chaos_ct_case
    assert image.shape == (78, 512, 512) and image.metadata["modality"] == "CT"
    assert label.shape == image.shape
    hu = image.array.astype(np.float64)
    liver = label.array == 1
    inside = hu[liver].mean()
    band = np.zeros_like(liver)
    for k in range(liver.shape[0]):
        band[k] = ndimage.binary_dilation(liver[k], iterations=8) & ~liver[k]
    outside = hu[band].mean()
    assert inside > 100, f"mean HU inside the liver mask {inside:.1f}: masks are misaligned"
    assert inside - outside > 100, f"inside {inside:.1f} HU vs band outside {outside:.1f} HU"
    # the other slice order (masks in GDCM list order) is clearly wrong
    assert hu[label.array[::-1] == 1].mean() < inside - 50


@pytest.mark.realdata
def test_check_dataset_chaos_ct_real() -> None:
    result = check_dataset(real_data("chaos/Train_Sets/CT/1"))
    (case,) = result["cases"]
    assert case["id"] == "CT_1" and case["modality"] == "CT"
    assert case["shape"] == [512, 512, 78]
    assert case["spacing"] == pytest.approx([0.7265625, 0.7265625, 2.0])
    assert set(case["labels"]) == {"0", "1"}
    assert case["labels"]["1"]["mean_intensity"] > 100
    assert case["problems"] == []


@pytest.mark.realdata
def test_check_dataset_chaos_mr_t2_real() -> None:
    result = check_dataset(real_data("chaos_mr_t2"), limit=2)
    assert result["layout"] == "pairs" and result["n_cases"] == 20 and result["n_checked"] == 2
    for case in result["cases"]:
        assert case["modality"] == "MR"
        assert case["shape"][:2] == [256, 256]
        assert case["spacing"][:2] == pytest.approx([1.25, 1.25])
        assert set(case["labels"]) == {"0", "1", "2", "3", "4"}
        assert case["problems"] == []
