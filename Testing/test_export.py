"""Scene (.mrb) and overview (.png) exports, checked against real MRML through slicer-core."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from VQMedSegLib.data.volume import Volume
from VQMedSegLib.errors import InputError
from VQMedSegLib.export.overview import choose_slices, write_overview_png
from VQMedSegLib.tasks import get_task

SHAPE = (8, 32, 32)  # k, j, i


def _oblique_direction() -> np.ndarray:
    """A rotation about an oblique axis: every direction cosine is non-zero."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    angle = 0.4
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


@pytest.fixture
def case() -> dict:
    rng = np.random.default_rng(7)
    k, j, i = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]]
    organ = ((j - 16) ** 2 + (i - 14) ** 2 < 70) & (k >= 2) & (k <= 6)
    ct = Volume(
        (rng.normal(40, 15, SHAPE) - 900 * ~organ * (i > 26)).astype(np.int16),
        spacing=(0.78, 0.91, 2.5),
        origin=(-123.4, 56.7, -310.25),
        direction=_oblique_direction(),
    )
    uncertainty = np.exp(-np.abs(np.sqrt((j - 16.0) ** 2 + (i - 14.0) ** 2) - 8.4)).astype(np.float32)
    return {
        "ct": ct,
        "label": ct.with_array(organ.astype(np.uint8)),
        "reference": ct.with_array((((j - 16) ** 2 + (i - 15) ** 2 < 80) & (k >= 2) & (k <= 5)).astype(np.uint8)),
        "uncertainty": ct.with_array(uncertainty),
        "mr": Volume(rng.random((6, 16, 16)).astype(np.float32), (1.6, 1.6, 3.0), (10.0, -20.0, 30.0)),
    }


@pytest.fixture(scope="module")
def mrml():
    pytest.importorskip(
        "slicer", reason="slicer-core (MRML without the Slicer app) is not installed: pip install 'vqmedseg[scene]'"
    )
    from VQMedSegLib.export import mrml

    return mrml


def _liver_segments() -> list[dict]:
    task = get_task("liver")
    return [{"value": 1, "name": task.segment_name, "color": task.color, "terminology": task.terminology}]


# --------------------------------------------------------------------------- import
def test_export_package_does_not_load_slicer():
    code = (
        "import sys, VQMedSegLib, VQMedSegLib.export, VQMedSegLib.export.overview\n"
        "assert 'slicer' not in sys.modules and 'vtkmodules' not in sys.modules, 'slicer loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------- geometry
def test_volume_round_trip_keeps_oblique_geometry_and_voxels(mrml, case):
    ct = case["ct"]
    scene, _logics = mrml.new_scene()
    node = mrml.add_volume(scene, ct, "CT")

    back = mrml.volume_from_node(node)

    assert np.array_equal(back.array, ct.array) and back.array.dtype == ct.array.dtype
    np.testing.assert_allclose(back.spacing, ct.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, ct.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-5)


def test_volume_node_places_voxels_at_their_ras_position(mrml, case):
    ct = case["ct"]
    scene, _logics = mrml.new_scene()
    node = mrml.add_volume(scene, ct, "CT")
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    for ijk in ([0, 0, 0], [31, 0, 0], [5, 17, 7]):
        lps = ct.index_to_physical(np.array(ijk, dtype=float))
        ras = ijk_to_ras @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)


# ------------------------------------------------------------------------ scenes
def test_write_scene_round_trips_through_mrb(mrml, case, tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    out = tmp_path / "out" / "case_001.mrb"
    task = get_task("liver")

    mrml.write_scene(
        out,
        ct=case["ct"],
        mr=case["mr"],
        label=case["label"],
        segments=_liver_segments(),
        uncertainty={"Entropy": case["uncertainty"]},
        ct_window=task.ct_window,
    )

    assert sorted(p.name for p in out.parent.iterdir()) == ["case_001.mrb"]  # no work folders left
    assert list(workdir.iterdir()) == []
    scene, _logics = mrml.read_mrb(out)

    ct_node = scene.GetFirstNode("CT", "vtkMRMLScalarVolumeNode")
    ct_back = mrml.volume_from_node(ct_node)
    assert ct_back.geometry_mismatch(case["ct"], tol=1e-5) == []
    assert np.array_equal(ct_back.array, case["ct"].array)
    assert ct_node.GetDisplayNode().GetWindowLevelMin() == pytest.approx(task.ct_window[0])

    segmentation_node = scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert segmentation_node is not None and segmentation_node.GetName() == "Prediction"
    assert segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole()) is ct_node
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetSegment(segmentation.GetNthSegmentID(0))
    assert segment.GetName() == "Liver"
    np.testing.assert_allclose(segment.GetColor(), task.color, atol=1e-5)
    assert "10200004" in segment.GetTerminology()
    label_back = mrml.labelmap_from_segmentation(segmentation_node, ct_node)
    assert np.array_equal(label_back.array, case["label"].array)

    uncertainty_node = scene.GetFirstNode("Entropy", "vtkMRMLScalarVolumeNode")
    assert uncertainty_node.GetAttribute(mrml.ROLE_ATTRIBUTE) == "uncertainty"
    table = uncertainty_node.GetDisplayNode().GetColorNode()
    assert table is not None and table.IsA("vtkMRMLColorTableNode")
    assert table.GetName() == mrml.colour_table_name("viridis")
    assert table.GetNumberOfColors() == 256
    import matplotlib

    rgba = [0.0] * 4
    table.GetColor(0, rgba)
    np.testing.assert_allclose(rgba[:3], matplotlib.colormaps["viridis"](0.0)[:3], atol=1 / 255)
    display = uncertainty_node.GetDisplayNode()
    assert display.GetWindowLevelMin() == pytest.approx(float(case["uncertainty"].array.min()), abs=1e-6)
    assert display.GetWindowLevelMax() == pytest.approx(float(case["uncertainty"].array.max()), abs=1e-6)

    assert scene.GetFirstNode("MR", "vtkMRMLScalarVolumeNode") is not None
    red = scene.GetSingletonNode("Red", "vtkMRMLSliceCompositeNode")
    assert red.GetBackgroundVolumeID() == ct_node.GetID()
    assert red.GetForegroundVolumeID() == uncertainty_node.GetID()


@pytest.mark.parametrize("fill, window", [
    ("nan-and-inf", None),        # the window spans the finite values only
    ("all-nan", (0.0, 1.0)),      # nothing finite: any window
    ("constant", (0.25, 1.25)),   # one value: a window one wide from it
])
def test_an_uncertainty_overlays_window_spans_its_finite_values(mrml, case, fill, window):
    scene, _logics = mrml.new_scene()
    values = case["uncertainty"].array.copy()
    if fill == "nan-and-inf":
        values[0, 0, :3] = (np.nan, np.inf, -np.inf)
        finite = values[np.isfinite(values)]
        window = (float(finite.min()), float(finite.max()))
    elif fill == "all-nan":
        values[:] = np.nan
    else:
        values[:] = 0.25
    node = mrml.add_uncertainty_overlay(scene, case["uncertainty"].with_array(values), "map")
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(window, abs=1e-6)
    np.testing.assert_array_equal(mrml.volume_from_node(node).array, values)  # the voxels, untouched


def test_a_label_map_of_several_values_becomes_one_segment_a_value_in_its_place(mrml, case, tmp_path):
    """Three structures, one absent, the label on an oblique grid finer than the CT's: each
    segment holds exactly its value's voxels in the label's own place, and the scene
    saved and read back says the same. Nothing temporary is left in the scene."""
    scene, _logics = mrml.new_scene()
    ct_node = mrml.add_volume(scene, case["ct"], "CT")
    rng = np.random.default_rng(3)
    fine = Volume(rng.choice(np.array([0, 1, 3], np.uint8), size=(6, 20, 22), p=[0.6, 0.3, 0.1]),
                  spacing=(0.5, 0.7, 1.25), origin=(-120.0, 50.0, -305.0), direction=_oblique_direction())
    segments = [{"value": 1, "name": "RV", "color": (0.9, 0.1, 0.1)}, {"value": 2, "name": "Myo", "color": (0.1, 0.9, 0.1)},
                {"value": 3, "name": "LV", "color": (0.1, 0.1, 0.9)}]
    nodes_before = scene.GetNumberOfNodes()

    node = mrml.add_segmentation(scene, fine, segments, reference_node=ct_node, name="heart")

    assert scene.GetNumberOfNodes() == nodes_before + 2  # the segmentation and its display node
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(3)] == ["RV", "Myo", "LV"]
    empty = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Myo"))
    assert empty.GetName() == "Myo" and np.allclose(empty.GetColor(), (0.1, 0.9, 0.1))
    ras = mrml.add_volume(scene, fine.with_array(np.zeros(fine.shape, np.int16)), "grid of the label")
    back = mrml.labelmap_from_segmentation(node, ras)
    np.testing.assert_array_equal(back.array, fine.array)
    for index, (name, value) in enumerate((("RV", 1), ("Myo", 2), ("LV", 3))):
        alone = mrml.labelmap_from_segmentation(node, ras, only=name).array
        np.testing.assert_array_equal(alone != 0, fine.array == value, err_msg=name)

    path = tmp_path / "heart.mrb"
    mrml.write_scene(path, ct=case["ct"], label=fine, segments=segments, uncertainty=case["uncertainty"])
    read, _read_logics = mrml.read_mrb(path)
    saved = read.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    grid = mrml.add_volume(read, fine.with_array(np.zeros(fine.shape, np.int16)), "grid")
    np.testing.assert_array_equal(mrml.labelmap_from_segmentation(saved, grid).array, fine.array)


def test_segments_missing_from_the_label_are_kept_empty(mrml, case):
    scene, _logics = mrml.new_scene()
    ct_node = mrml.add_volume(scene, case["ct"], "CT")
    segments = _liver_segments() + [{"value": 2, "name": "Tumour", "color": (0.2, 0.9, 0.2)}]

    node = mrml.add_segmentation(scene, case["label"], segments, reference_node=ct_node)

    segmentation = node.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(n)).GetName() for n in range(2)]
    assert names == ["Liver", "Tumour"]
    assert np.array_equal(mrml.labelmap_from_segmentation(node, ct_node).array, case["label"].array)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # temporaries removed


def test_a_segmentation_is_exported_on_the_cts_grid_without_copying_the_cts_voxels(mrml, case, monkeypatch):
    """The Slicer module exports a segmentation on its GUI thread (marking slices, scoring
    against a reference); the CT's voxels, 150 MB for 512 x 512 x 300, were once copied
    only to learn its grid."""
    scene, _logics = mrml.new_scene()
    ct_node = mrml.add_volume(scene, case["ct"], "CT")
    node = mrml.add_segmentation(scene, case["label"], _liver_segments(), reference_node=ct_node)
    read, original = [], mrml.volume_from_node
    monkeypatch.setattr(mrml, "volume_from_node", lambda n: read.append(n.GetName()) or original(n))
    label = mrml.labelmap_from_segmentation(node, ct_node)
    assert "CT" not in read and read  # the exported labelmap itself is read
    assert np.array_equal(label.array, case["label"].array)
    assert label.geometry_mismatch(case["ct"], tol=1e-5) == []


def test_label_values_without_a_segment_are_refused(mrml, case):
    scene, _logics = mrml.new_scene()
    label = case["label"].with_array(case["label"].array * 3)
    with pytest.raises(InputError, match=r"found values \[3\]"):
        mrml.add_segmentation(scene, label, _liver_segments())


def test_a_scene_named_relative_to_the_working_folder_is_written_and_read_back(mrml, case, tmp_path, monkeypatch):
    # MRML's bundle writer refuses a relative folder; `vqmedseg demo --out demo-out` names one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    scene, _logics = mrml.new_scene()
    mrml.add_volume(scene, case["ct"], "CT")
    assert mrml.write_mrb(scene, Path("out") / "scene.mrb") == Path("out") / "scene.mrb"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scene.mrb"]
    back, _back_logics = mrml.read_mrb(Path("out") / "scene.mrb")
    assert np.array_equal(mrml.volume_from_node(back.GetFirstNode("CT", "vtkMRMLScalarVolumeNode")).array,
                          case["ct"].array)


def test_write_mrb_requires_the_mrb_suffix(mrml, tmp_path):
    scene, _logics = mrml.new_scene()
    with pytest.raises(InputError, match="expected '.mrb'"):
        mrml.write_mrb(scene, tmp_path / "scene.zip")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- overview
def test_overview_png_is_written(case, tmp_path):
    out = tmp_path / "overview.png"

    write_overview_png(
        out, case["ct"], case["label"], case["uncertainty"], reference=case["reference"], n_slices=3, title="liver"
    )

    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 400 <= width <= 2000 and 300 <= height <= 1200
    assert [p.name for p in tmp_path.iterdir()] == ["overview.png"]


def test_overview_refuses_a_label_on_another_grid(case, tmp_path):
    with pytest.raises(InputError, match="overview label: found shape"):
        write_overview_png(tmp_path / "o.png", case["ct"], case["mr"], case["uncertainty"])


def test_slices_cover_the_structure_and_take_the_largest_sections():
    foreground = np.zeros((10, 8, 8), bool)
    foreground[2:8, 2:4, 2:4] = True
    foreground[3, :, :] = True  # the largest section in the first half
    assert choose_slices(foreground, 2) == [3, 5]
    assert choose_slices(foreground, 50) == [2, 3, 4, 5, 6, 7]
    assert choose_slices(np.zeros((9, 4, 4), bool), 2) == [3, 5]


def test_result_figures_never_switch_matplotlibs_backend(case, tmp_path, monkeypatch):
    # a library call inside Slicer or a notebook must leave the host's matplotlib as it was
    import matplotlib

    from VQMedSegLib.active_learning.simulation import plot_dice_vs_budget
    from VQMedSegLib.training.ssl_report import write_figures

    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail(f"matplotlib.use{a} called"))
    plot_dice_vs_budget({"begal": {"labeled_fraction": [0.2, 0.3], "dice_mean": [0.8, 0.85], "dice_std": [0.01, 0.02]}},
                        tmp_path / "budget.png", "phantom")
    row = {"per_seed": [{"seed": 0, "cases": {"a": {"liver": 0.9}},
                         "validation": {"iterations": [1, 2], "dice": [0.5, 0.6], "best_iteration": 2, "best_dice": 0.6}}]}
    assert [p.name for p in write_figures({"vqseg": row}, tmp_path, "phantom")] == ["dice_by_case.png", "validation.png"]
    write_overview_png(tmp_path / "overview.png", case["ct"], case["label"], case["uncertainty"], n_slices=2)
    for name in ("budget.png", "dice_by_case.png", "validation.png", "overview.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_prediction_that_fails_part_way_leaves_the_previous_one_whole(tmp_path: Path, monkeypatch) -> None:
    """The segmentation and its uncertainty maps replace the previous ones together, or not
    at all: a failure after the segmentation (here the disk fills while the uncertainty map
    is written) must not leave a new segmentation beside the old case's uncertainty."""
    from types import SimpleNamespace

    import SimpleITK as sitk

    from VQMedSegLib.errors import VQMedSegError
    from VQMedSegLib.export.prediction import write_prediction

    def prediction(seed: int, shape: tuple[int, int, int]) -> SimpleNamespace:
        rng = np.random.default_rng(seed)
        label = Volume((rng.random(shape) > 0.5).astype(np.uint8), spacing=(1.0, 1.0, 2.0), metadata={"task": "liver"})
        return SimpleNamespace(label=label, uncertainty={"entropy": label.with_array(rng.random(shape).astype(np.float32)),
                                                         "qpm": label.with_array(rng.random(shape).astype(np.float32))})

    out = tmp_path / "out"
    files = write_prediction(out, prediction(0, (4, 8, 8)))
    assert sorted(p.name for p in files.values()) == ["prediction.seg.nrrd", "uncertainty.nrrd", "uncertainty_qpm.nrrd"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    with pytest.raises(VQMedSegError) as failed:
        write_prediction(out, prediction(1, (5, 8, 8)))
    assert str(failed.value).startswith(f"{out / 'uncertainty.nrrd'}: could not write"), failed.value
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier case's, whole; no temporaries


def test_a_prediction_with_fewer_maps_leaves_none_of_the_earlier_ones_and_records_itself(tmp_path: Path) -> None:
    """A VQ-Seg prediction (entropy and QPM maps) and then a supervised one (entropy only)
    into one folder once left the first case's ``uncertainty_qpm.nrrd`` beside the second
    case's segmentation, and the folder's record, which no longer listed it, made the next
    prediction refuse it as a file of someone else's."""
    from types import SimpleNamespace

    from VQMedSegLib.export.prediction import WRITTEN, refuse_files_of_others, write_prediction
    from VQMedSegLib.files import read_json

    def prediction(seed: int, maps: tuple[str, ...]) -> SimpleNamespace:
        rng = np.random.default_rng(seed)
        label = Volume((rng.random((4, 8, 8)) > 0.5).astype(np.uint8), origin=(seed, 0, 0), metadata={"task": "liver"})
        return SimpleNamespace(label=label, uncertainty={m: label.with_array(rng.random((4, 8, 8)).astype(np.float32))
                                                         for m in maps})

    out = tmp_path / "out"
    out.mkdir()
    write_prediction(out, prediction(0, ("entropy", "qpm")), record=True)
    assert sorted(read_json(out / WRITTEN)) == ["prediction.seg.nrrd", "uncertainty.nrrd", "uncertainty_qpm.nrrd"]
    files = write_prediction(out, prediction(1, ("entropy",)), record=True)
    assert sorted(p.name for p in out.iterdir()) == [WRITTEN, "prediction.seg.nrrd", "uncertainty.nrrd"]
    assert sorted(read_json(out / WRITTEN)) == ["prediction.seg.nrrd", "uncertainty.nrrd"] == sorted(p.name for p in files.values())
    refuse_files_of_others(out)  # the record vouches for what is there: the next prediction may replace it
