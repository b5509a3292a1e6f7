"""Reading and writing volumes: geometry survives, bad input fails with a clear message."""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from VQMedSegLib.data.io import read_geometry, read_label, read_volume, write_segmentation, write_volume
from VQMedSegLib.data.volume import Volume
from VQMedSegLib.errors import InputError

from conftest import keeping_locale, ramp

# An exactly representable oblique rotation (3-4-5 triangles): fine for DICOM DS strings.
_RX = np.array([[1.0, 0.0, 0.0], [0.0, 0.8, -0.6], [0.0, 0.6, 0.8]])
_RZ = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
OBLIQUE = _RZ @ _RX

LIVER_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)


def random_rotation(seed: int = 3) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def oblique_volume(dtype=np.int16, shape=(5, 7, 6)) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=shape).astype(dtype)
    return Volume(array, (0.7, 1.3, 2.9), (-12.5, 33.25, 101.75), random_rotation(), {"modality": "CT"})


def assert_same_geometry(a: Volume, b: Volume, tol: float = 1e-5) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    *,
    spacing=(0.75, 0.5, 2.5),
    origin=(-100.5, 50.25, 20.0),
    direction: np.ndarray = OBLIQUE,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    prefix: str = "s",
    modality: str = "CT",
) -> sitk.Image:
    """Write ``array`` (k, j, i; int16 HU) as one DICOM file per slice, as a scanner would."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = np.asarray(direction, dtype=float)
    with keeping_locale():  # GDCM's writer sets LC_CTYPE to C (see conftest)
        for k in range(image.GetDepth()):
            slice_ = image[:, :, k]
            tags = {
                "0008|0060": modality,
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{series_uid}.{k + 1}",
                "0020|000d": f"{series_uid}.99",
                "0020|000e": series_uid,
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "\\".join(f"{v:.6f}" for v in list(d[:, 0]) + list(d[:, 1])),
                "0018|0050": str(spacing[2]),
            }
            for key, value in tags.items():
                slice_.SetMetaData(key, value)
            writer.SetFileName(str(folder / f"{prefix}{k:04d}.dcm"))
            writer.Execute(slice_)
    return image


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_oblique_geometry_round_trip(tmp_path: Path, ext: str) -> None:
    volume = oblique_volume()
    path = write_volume(volume, tmp_path / f"vol{ext}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    assert_same_geometry(back, volume)
    assert back.metadata["source"] == str(path)
    assert back.metadata["spacing_known"] is True
    # atomic write: nothing but the final file is left in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vol{ext}"]


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha"])
def test_the_grid_read_from_a_header_is_the_grid_read_with_the_voxels(tmp_path: Path, ext: str) -> None:
    path = write_volume(oblique_volume(), tmp_path / f"vol{ext}")
    whole = read_volume(path)
    shape, spacing, origin, direction = read_geometry(path)
    assert shape == whole.shape and spacing == whole.spacing and origin == whole.origin
    np.testing.assert_array_equal(direction, whole.direction)
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(path.read_bytes()[:20])
    with pytest.raises(InputError, match=rf"cut{re.escape(ext)}: could not read the image header"):
        read_geometry(cut)


def test_float_and_bool_round_trip(tmp_path: Path) -> None:
    base = oblique_volume()
    floats = base.with_array(base.array.astype(np.float32) / 7)
    back = read_volume(write_volume(floats, tmp_path / "f.nrrd", compress=False))
    np.testing.assert_array_equal(back.array, floats.array)
    mask = base.with_array(base.array > 0)
    back = read_volume(write_volume(mask, tmp_path / "m.nii.gz"))
    np.testing.assert_array_equal(back.array, mask.array.astype(np.uint8))


def test_write_volume_rejects_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"vol\.png.*expected one of"):
        write_volume(oblique_volume(), tmp_path / "vol.png")
    with pytest.raises(InputError, match="write_segmentation"):
        write_volume(oblique_volume(), tmp_path / "vol.seg.nrrd")


def test_modality_parameter(tmp_path: Path) -> None:
    volume = oblique_volume()
    path = write_volume(volume.with_array(np.abs(volume.array)), tmp_path / "v.nrrd")  # an MR: no air at -1000
    assert read_volume(path, modality="mri").metadata["modality"] == "MR"
    assert "modality" not in read_volume(path).metadata
    with pytest.raises(InputError, match="modality 'PET'.*expected 'CT' or 'MR'"):
        read_volume(path, modality="PET")


# ------------------------------------------------------------------ DICOM
def test_dicom_series_geometry_and_hu(tmp_path: Path) -> None:
    hu = (np.arange(4 * 6 * 5).reshape(4, 6, 5) * 20 - 1000).astype(np.int16)
    written = write_dicom_series(tmp_path / "series", hu)
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, hu)
    np.testing.assert_allclose(volume.spacing, written.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(volume.origin, written.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(volume.direction, OBLIQUE, atol=1e-5)
    assert volume.metadata["modality"] == "CT"
    assert volume.metadata["series_uid"] == "1.2.826.0.1.3680043.2.1125.1"
    assert [s["instance_number"] for s in volume.metadata["dicom_slices"]] == [1, 2, 3, 4]
    assert "warnings" not in volume.metadata
    # one file of the series stands for the whole series
    one = read_volume(tmp_path / "series" / "s0002.dcm")
    np.testing.assert_array_equal(one.array, hu)


def test_reading_dicom_leaves_the_process_locale_alone(tmp_path: Path) -> None:
    """GDCM's writer sets LC_CTYPE to "C" (and Python then reads text as ASCII); reading,
    all the library does with DICOM, must not."""
    import locale

    write_dicom_series(tmp_path / "series", ramp((3, 4, 4), -1000).astype(np.int16), spacing=(1.0, 1.0, 2.0))
    before = locale.setlocale(locale.LC_CTYPE)
    read_volume(tmp_path / "series")
    from VQMedSegLib.data.datasets import discover_cases, load_case

    load_case(discover_cases(tmp_path / "series")[0])
    assert locale.setlocale(locale.LC_CTYPE) == before


def test_dicom_missing_slice_is_flagged(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "s", np.zeros((5, 4, 4), np.int16))
    (tmp_path / "s" / "s0002.dcm").unlink()
    volume = read_volume(tmp_path / "s")
    assert any("not uniform" in w for w in volume.metadata["warnings"])


def test_dicom_multi_series_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_dicom_series(folder, np.zeros((3, 4, 4), np.int16), series_uid="1.2.3.4.1", prefix="a")
    write_dicom_series(folder, np.ones((2, 4, 4), np.int16), series_uid="1.2.3.4.2", prefix="b")
    with pytest.raises(InputError) as info:
        read_volume(folder)
    message = str(info.value)
    assert str(folder) in message and "2 DICOM series" in message
    assert "1.2.3.4.1 (3 files)" in message and "1.2.3.4.2 (2 files)" in message
    assert "series_uid" in message
    # the command line has no series_uid: one file of a series stands for it, and the message names one of each
    assert f"{folder / 'a0000.dcm'} for 1.2.3.4.1" in message and f"{folder / 'b0000.dcm'} for 1.2.3.4.2" in message
    assert read_volume(folder / "b0000.dcm").shape == (2, 4, 4)
    picked = read_volume(folder, series_uid="1.2.3.4.2")
    assert picked.shape == (2, 4, 4) and picked.array.max() == 1
    with pytest.raises(InputError, match="series_uid '9.9'.*not found"):
        read_volume(folder, series_uid="9.9")


def test_dicom_empty_and_non_dicom_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"empty: found no DICOM series \(0 file"):
        read_volume(empty)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"found no DICOM series \(1 file"):
        read_volume(empty)


def test_a_folder_without_dicom_is_said_once_not_in_itks_warning_too(tmp_path: Path, capfd) -> None:
    """Looking for DICOM in a folder that has none (every dataset folder of another
    layout is tried) once printed ITK's own two-line "No Series were found" warning, with
    a build path, to the terminal, beside our message; ITK's warnings stay on afterwards."""
    from VQMedSegLib.data.io import list_dicom_series

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()  # its subfolders are looked into too, for a series to name
    (tmp_path / "sub" / "more.txt").write_text("hello")
    capfd.readouterr()
    assert list_dicom_series(tmp_path) == {}
    with pytest.raises(InputError, match="found no DICOM series"):
        read_volume(tmp_path)
    assert capfd.readouterr().err == ""
    assert sitk.ProcessObject.GetGlobalWarningDisplay()


def test_single_dicom_slice_rejected(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "one", np.zeros((1, 4, 4), np.int16))
    with pytest.raises(InputError, match="single 2-D slice"):
        read_volume(tmp_path / "one")


# ------------------------------------------------------------------ Slicer .seg.nrrd
def test_seg_nrrd_round_trip(tmp_path: Path) -> None:
    import slicerio

    image = oblique_volume()
    labels = np.zeros(image.shape, np.uint8)
    labels[1:3, 2:5, 1:4] = 1
    labels[4, 0:2, 0:2] = 3
    label = image.with_array(labels)
    segments = [
        {"label": 1, "name": "liver", "color": (0.86, 0.35, 0.24), "terminology": LIVER_TERMINOLOGY},
        {"label": 3, "name": "tumour", "color": (1.0, 1.0, 0.0)},
    ]
    path = write_segmentation(label, tmp_path / "case.seg.nrrd", segments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.seg.nrrd"]

    back = read_label(path, reference=image)
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == np.uint8
    assert_same_geometry(back, image)
    by_label = {s["label"]: s for s in back.metadata["segments"]}
    assert by_label[1]["name"] == "liver" and by_label[3]["name"] == "tumour"
    np.testing.assert_allclose(by_label[1]["color"], (0.86, 0.35, 0.24))
    assert by_label[1]["terminology"] == LIVER_TERMINOLOGY
    assert by_label[3]["terminology"] is None

    # what 3D Slicer will see
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["liver", "tumour"]
    assert seg["segments"][0]["terminology"]["type"][2] == "Liver"
    assert seg["segments"][0]["extent"] == [1, 3, 2, 4, 1, 2]


def test_seg_nrrd_overlapping_layers(tmp_path: Path) -> None:
    import slicerio

    image = oblique_volume(shape=(3, 4, 5))
    seg = slicerio.create_segmentation(image.size_ijk, image.ijk_to_lps_matrix())
    a = np.zeros(image.size_ijk, bool)
    a[0:3, :, 0] = True
    b = np.zeros(image.size_ijk, bool)
    b[2:5, :, 0] = True  # overlaps a -> second layer
    slicerio.add_segment(seg, a, {"id": "a", "name": "first", "color": [1, 0, 0]})
    slicerio.add_segment(seg, b, {"id": "b", "name": "second", "color": [0, 1, 0]})
    assert seg["voxels"].ndim == 4
    slicerio.write_segmentation(str(tmp_path / "o.seg.nrrd"), seg)
    back = read_label(tmp_path / "o.seg.nrrd", reference=image)
    assert back.metadata["relabelled"] is True
    assert [(s["label"], s["name"]) for s in back.metadata["segments"]] == [(1, "first"), (2, "second")]
    assert back.array[0, 0, :].tolist() == [1, 1, 2, 2, 2]  # (k, j, i): later segment wins the overlap


def test_a_segment_chosen_by_name_keeps_the_voxels_a_later_overlapping_segment_covers(tmp_path: Path) -> None:
    """A Slicer segmentation with a tumour drawn inside the liver (two layers, as Slicer
    saves overlapping segments): `evaluate` scored the liver from the merged label map,
    where the tumour had overwritten it (a perfect liver got Dice 0.974), and
    `workspace annotate` stored a liver with the tumour's hole in it."""
    import json

    import slicerio

    from conftest import run_main

    from VQMedSegLib.data.io import segment_mask, write_segmentation
    from VQMedSegLib.jobs.workspace import Workspace

    ct = Volume(np.random.default_rng(0).integers(-1000, 400, (10, 40, 40)).astype(np.int16), spacing=(0.8, 0.8, 2.5))
    liver = np.zeros(ct.size_ijk, bool)
    liver[5:30, 5:30, 2:8] = True  # (i, j, k)
    tumour = np.zeros_like(liver)
    tumour[10:18, 10:18, 3:6] = True  # inside the liver
    seg = slicerio.create_segmentation(ct.size_ijk, ct.ijk_to_lps_matrix())
    slicerio.add_segment(seg, liver, {"id": "Liver", "name": "Liver", "color": [0.8, 0.5, 0.4]})
    slicerio.add_segment(seg, tumour, {"id": "Tumor", "name": "Tumor", "color": [0.2, 0.8, 0.2]})
    slicerio.write_segmentation(str(tmp_path / "ref.seg.nrrd"), seg)
    liver_kji = np.ascontiguousarray(liver.transpose(2, 1, 0))

    ref = read_label(tmp_path / "ref.seg.nrrd")
    assert np.array_equal(segment_mask(ref, 1), liver_kji) and np.array_equal(segment_mask(ref, 2), tumour.transpose(2, 1, 0))
    assert np.array_equal(segment_mask(ref.with_array(ref.array), 1), liver_kji)  # the layers go with the volume
    assert np.array_equal(segment_mask(ct.with_array((liver_kji * 3).astype(np.uint8)), 3), liver_kji)  # no layers: the value

    write_segmentation(ct.with_array(liver_kji.astype(np.uint8)), tmp_path / "prediction.seg.nrrd",
                       [{"value": 1, "name": "Liver", "color": (0.8, 0.5, 0.4)}])
    scores = json.loads(run_main("evaluate", "--pred", tmp_path / "prediction.seg.nrrd", "--ref", tmp_path / "ref.seg.nrrd",
                                 "--json").stdout)
    assert scores["dice"] == 1.0 and scores["reference_segment"] == "Liver", scores

    ws = Workspace.create(tmp_path / "ws", task="liver")
    ws.add_case("c1", ct)
    run_main("workspace", "annotate", ws.root, "--case", "c1", "--label", tmp_path / "ref.seg.nrrd", "--slices", "2-7")
    assert np.array_equal(ws.load_annotation("c1").array != 0, liver_kji)


def test_write_segmentation_validates_segments(tmp_path: Path) -> None:
    label = oblique_volume().with_array(np.full((5, 7, 6), 2, np.uint8))
    with pytest.raises(InputError, match=r"label value\(s\) \[2\].*no segment dict"):
        write_segmentation(label, tmp_path / "x.seg.nrrd", [{"label": 1, "name": "a", "color": (1, 0, 0)}])
    with pytest.raises(InputError, match=r"segments\[0\] color"):
        write_segmentation(label, tmp_path / "x.seg.nrrd", [{"label": 2, "name": "a", "color": (255, 0, 0)}])
    with pytest.raises(InputError, match="ending with .seg.nrrd"):
        write_segmentation(label, tmp_path / "x.nrrd", [{"label": 2, "name": "a", "color": (1, 0, 0)}])
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ ACDC HDF5
def test_acdc_h5(tmp_path: Path) -> None:
    path = tmp_path / "patient001_frame01.h5"
    image = np.random.default_rng(1).random((3, 8, 6)).astype(np.float32)
    labels = np.zeros((3, 8, 6), np.uint8)
    labels[1, 2:4, 2:4] = 3
    with h5py.File(path, "w") as f:
        f["image"] = image
        f["label"] = labels
        f["flat"] = np.zeros((8, 6), np.float32)
    volume = read_volume(path, modality="MR")
    np.testing.assert_array_equal(volume.array, image)
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert volume.metadata["spacing_known"] is False
    assert volume.metadata["modality"] == "MR"
    label = read_label(path, reference=volume)
    np.testing.assert_array_equal(label.array, labels)
    assert label.metadata["spacing_known"] is False
    with pytest.raises(InputError, match=r"no dataset 'mask' \(found: 'flat', 'image', 'label'\)"):
        read_volume(path, dataset="mask")
    with pytest.raises(InputError, match=r"dataset 'flat' is 2-D"):
        read_volume(path, dataset="flat")


# ------------------------------------------------------------------ bad input
def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.nii\.gz: not found"):
        read_volume(tmp_path / "nope.nii.gz")


def test_corrupt_truncated_nrrd(tmp_path: Path) -> None:
    path = write_volume(oblique_volume(shape=(10, 20, 20)), tmp_path / "v.nrrd", compress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"v\.nrrd: could not read the image.*expected a complete"):
        read_volume(path)
    garbage = tmp_path / "g.nii.gz"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=r"g\.nii\.gz: could not read"):
        read_volume(garbage)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_a_truncated_nifti_file_is_refused_not_read_with_zeros_for_the_missing_voxels(tmp_path: Path, ext: str) -> None:
    """ITK reads a NIfTI file cut short without an error, the missing slices as zeros."""
    volume = oblique_volume(shape=(40, 32, 32))
    path = write_volume(volume, tmp_path / f"ct{ext}")
    assert read_volume(path).shape == (40, 32, 32)  # the whole file reads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"ct{re.escape(ext)}: .*truncated.*expected a complete"):
        read_volume(path)


def test_hdf5_and_segmentation_files_given_as_images_get_the_image_checks(tmp_path: Path) -> None:
    """NaN voxels, a 0..1 "CT", or a segmentation given as the CT or MR are refused before
    anything is stored, whatever the file's format."""
    image = np.random.default_rng(1).random((4, 8, 6)).astype(np.float32)
    image[0, 0, 0] = np.nan
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["image"] = image
        f["label"] = (image > 0.5).astype(np.uint8)
        f["unit"] = np.nan_to_num(image)
    with pytest.raises(InputError, match=r"nan\.h5: found 1 NaN or infinite voxel"):
        read_volume(tmp_path / "nan.h5", modality="MR")
    with pytest.raises(InputError, match=r"nan\.h5: read as the CT, but its values run from 0 to"):
        read_volume(tmp_path / "nan.h5", modality="CT", dataset="unit")
    assert read_label(tmp_path / "nan.h5").array.sum() > 0  # the labels of the same file read
    labels = Volume(np.zeros((4, 8, 6), np.uint8))
    labels.array[1, 2:4, 2:4] = 1
    seg = write_segmentation(labels, tmp_path / "liver.seg.nrrd", [{"value": 1, "name": "Liver"}])
    for modality in ("CT", "MR"):
        with pytest.raises(InputError, match=rf"liver\.seg\.nrrd: a Slicer segmentation given as the {modality}; "
                                             r"expected an image"):
            read_volume(seg, modality=modality)
    assert read_label(seg).array.sum() == 4


def test_complex_voxels_are_refused(tmp_path: Path) -> None:
    real = sitk.GetImageFromArray(np.full((3, 4, 5), -100.0, np.float32))
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(real, real), str(tmp_path / "c.nrrd"))
    for modality in ("CT", None):
        with pytest.raises(InputError, match=r"c\.nrrd: found complex voxels .*; expected a real scalar volume"):
            read_volume(tmp_path / "c.nrrd", modality=modality)


def test_2d_and_4d_images_rejected(tmp_path: Path) -> None:
    flat = sitk.GetImageFromArray(np.zeros((8, 9), np.int16))
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match=r"flat\.nrrd: found a 2-D image of size \(9, 8\)"):
        read_volume(tmp_path / "flat.nrrd")
    series = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16))] * 2)
    sitk.WriteImage(series, str(tmp_path / "cine.nii.gz"))
    with pytest.raises(InputError, match=r"cine\.nii\.gz: found a 4-D image"):
        read_volume(tmp_path / "cine.nii.gz")
    single = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((2, 3, 4), np.int16))])
    sitk.WriteImage(single, str(tmp_path / "t1.nii.gz"))
    assert read_volume(tmp_path / "t1.nii.gz").shape == (2, 3, 4)


def test_read_label_values_and_geometry(tmp_path: Path) -> None:
    image = oblique_volume()
    as_float = image.with_array((image.array > 0).astype(np.float64) * 2)
    label = read_label(write_volume(as_float, tmp_path / "l.nii.gz"), reference=image)
    assert label.array.dtype == np.uint8 and set(np.unique(label.array)) == {0, 2}
    with pytest.raises(InputError, match="non-integer value 0.5"):
        read_label(write_volume(image.with_array(np.full(image.shape, 0.5)), tmp_path / "h.nrrd"))
    with pytest.raises(InputError, match=r"negative label value -\d+"):
        read_label(write_volume(image, tmp_path / "neg.nrrd"))
    shifted = Volume(label.array, (0.7, 1.3, 3.0), image.origin, image.direction)
    path = write_volume(shifted, tmp_path / "shifted.nrrd")
    with pytest.raises(InputError, match=r"shifted\.nrrd: label geometry does not match.*spacing"):
        read_label(path, reference=image)


def test_no_temp_files_left_after_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(InputError, match="could not write"):
        write_volume(oblique_volume(), tmp_path / "v.nrrd")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["prediction.seg.nrrd", "state.json", "last.pt", "README", "my-case.v2.nrrd"])
def test_a_temporary_file_left_by_a_killed_writer_is_recognised_and_nothing_else(tmp_path: Path, name: str) -> None:
    """What a writer killed between its write and its rename leaves is exactly what
    remove_temporaries deletes (a job does so once it holds the workspace's locks)."""
    import subprocess
    import sys

    from VQMedSegLib.files import remove_temporaries

    others = [name, "." + name, ".DS_Store", ".state.lock", "notes-0123abcd.txt"]
    for other in others:
        (tmp_path / other).write_bytes(b"the user's")
    killed = ("import os, sys; from VQMedSegLib.files import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half'); os._exit(9)")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", killed, str(tmp_path / name)], env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.returncode == 9
    (left,) = set(os.listdir(tmp_path)) - set(others)
    assert left.startswith(".") and (tmp_path / left).read_bytes() == b"half"  # hidden: never taken for the output
    assert remove_temporaries(tmp_path) == [tmp_path / left]
    assert sorted(os.listdir(tmp_path)) == sorted(others)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_outputs_are_readable_as_any_new_file_and_keep_the_mode_of_the_file_they_replace(tmp_path: Path) -> None:
    """Outputs are written to a temporary file and renamed: the file the user gets has the
    permissions of any file they create (0666 less the umask), not a temporary file's 0600
    (which hid every prediction from the user's group), and a rewrite keeps the mode the
    user gave the file."""
    import stat

    from VQMedSegLib.files import atomic_write_json

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    previous = os.umask(0o022)
    try:
        write_volume(oblique_volume(), tmp_path / "ct.nrrd")
        atomic_write_json(tmp_path / "state.json", {"a": 1})
        assert (mode(tmp_path / "ct.nrrd"), mode(tmp_path / "state.json")) == (0o644, 0o644)
        os.umask(0o002)  # a group that shares its folders
        atomic_write_json(tmp_path / "shared.json", {"a": 1})
        assert mode(tmp_path / "shared.json") == 0o664
        (tmp_path / "state.json").chmod(0o640)
        atomic_write_json(tmp_path / "state.json", {"a": 2})
        assert mode(tmp_path / "state.json") == 0o640
    finally:
        os.umask(previous)


def test_a_patient_folder_whose_series_sit_in_subfolders_names_them(tmp_path: Path) -> None:
    """As CHAOS lays a case out (DICOM_anon/ beside Ground/), and many exports nest a study."""
    patient = tmp_path / "patient"
    write_dicom_series(patient / "DICOM_anon", np.zeros((3, 4, 4), np.int16))
    (patient / "Ground").mkdir()
    (patient / "Ground" / "mask.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError) as info:
        read_volume(patient)
    message = str(info.value)
    assert "found no DICOM series (0 file(s) in the folder)" in message
    assert f"a DICOM series is in {patient / 'DICOM_anon'}" in message and "Ground" not in message



@pytest.mark.parametrize("array", [
    np.zeros((4, 5, 6), np.uint8),                                        # background only
    (np.arange(120).reshape(4, 5, 6) % 7 == 0),                           # bool
    (np.arange(120).reshape(4, 5, 6) % 2).astype(np.uint8),               # 0 and 1
    np.array([[[0, 3, 3, 7]]], np.uint8),                                 # gaps between the values
    np.array([[[-2, 0, 5, 5]]], np.int16),                                # negative
    np.array([[[0, 40000, 2]]], np.int32),                                # a wide range
    np.array([[[0.0, 2.0, 2.0]]], np.float32),                            # labels stored as floats
    np.zeros((0, 3, 3), np.uint8),                                        # empty
])
def test_the_values_of_a_label_map_are_those_numpy_finds(array):
    from VQMedSegLib.data.volume import label_values

    found = label_values(array)
    expected = np.unique(array)
    assert found.dtype == expected.dtype and np.array_equal(found, expected), (found, expected)
