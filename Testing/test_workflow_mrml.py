"""The Slicer module's workflow on a real MRML scene (slicer-core), jobs in real subprocesses.

These are the module Logic's behaviours: :class:`VQMedSeg.VQMedSegLogic` delegates to
:class:`VQMedSegLib.workflow.WorkflowLogic`, which needs only MRML.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from VQMedSegLib.data.phantoms import make_dataset
from VQMedSegLib.data.volume import Volume
from VQMedSegLib.errors import InputError

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without the Slicer app) is not installed: pip install slicer-core")

from VQMedSegLib.export import mrml  # noqa: E402
from VQMedSegLib.files import sanitize_id  # noqa: E402
from VQMedSegLib.workflow import WorkflowLogic  # noqa: E402
from conftest import ramp  # noqa: E402


def _oblique() -> np.ndarray:
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(0.3) * cross + (1 - np.cos(0.3)) * cross @ cross


@pytest.fixture
def scene():
    scene, logics = mrml.new_scene()
    yield scene
    del logics


@pytest.fixture
def phantom():
    return make_dataset("phantom-liver", 1, seed=11, ct_shape=(16, 64, 64))[0]


def test_case_ids_from_node_names_are_safe():
    assert sanitize_id("CT chest #2") == "CT_chest_2"
    assert sanitize_id("../../etc") == "etc"
    assert sanitize_id("...") == "case"


def test_ct_and_mr_nodes_become_a_workspace_case_with_their_geometry(scene, tmp_path):
    rng = np.random.default_rng(0)
    ct = Volume(rng.integers(-1000, 400, (10, 24, 20)).astype(np.int16), (0.7, 0.9, 2.5), (-12.5, 30.25, -200.0), _oblique())
    mr = Volume(rng.random((8, 16, 16)).astype(np.float32), (1.5, 1.5, 3.0), (5.0, 6.0, -190.0))
    ct_node = mrml.add_volume(scene, ct, "CT abdomen")
    mr_node = mrml.add_volume(scene, mr, "MR T2")
    logic = WorkflowLogic(scene)
    case_id = logic.prepare(ct_node, mr_node, task="liver", folder=tmp_path / "ws")
    assert case_id == "CT_abdomen"
    stored_ct, stored_mr = logic.workspace.load_ct(case_id), logic.workspace.load_mr(case_id)
    np.testing.assert_array_equal(stored_ct.array, ct.array)
    np.testing.assert_allclose(stored_ct.direction, ct.direction, atol=1e-9)
    np.testing.assert_allclose(stored_ct.origin, ct.origin, atol=1e-9)
    np.testing.assert_allclose(stored_ct.spacing, ct.spacing, atol=1e-9)
    np.testing.assert_array_equal(stored_mr.array, mr.array)
    np.testing.assert_allclose(stored_mr.origin, mr.origin, atol=1e-9)
    # preparing again keeps the case; a different grid or different voxels under the same name are refused
    assert logic.prepare(ct_node, mr_node) == case_id
    other = mrml.add_volume(scene, Volume(ramp((4, 8, 8), -1000).astype(np.int16)), "CT abdomen")
    with pytest.raises(Exception, match="shape"):
        logic.prepare(other, None, case_id=case_id)
    edited = mrml.add_volume(scene, ct.with_array(ct.array + 1), "CT abdomen")
    with pytest.raises(Exception, match="voxel values differ.*rename the CT volume 'CT abdomen'"):
        logic.prepare(edited, None, case_id=case_id)
    with pytest.raises(Exception, match="is the CT"):
        logic.prepare(ct_node, ct_node)
    status = logic.status()
    assert status["cases"] == [case_id] and status["labelled_slices"] == 0 and status["total_slices"] == 10


def test_an_mr_picked_after_the_case_was_prepared_with_ct_alone_is_stored(scene, tmp_path):
    rng = np.random.default_rng(1)
    ct = Volume(rng.integers(-1000, 400, (6, 16, 16)).astype(np.int16), (0.8, 0.8, 3.0))
    mr = Volume(rng.random((5, 12, 12)).astype(np.float32), (1.5, 1.5, 4.0))
    ct_node = mrml.add_volume(scene, ct, "CT")
    logic = WorkflowLogic(scene)
    case_id = logic.prepare(ct_node, None, folder=tmp_path / "ws")
    assert logic.workspace.load_mr(case_id) is None
    assert logic.prepare(ct_node, mrml.add_volume(scene, mr, "MR")) == case_id
    np.testing.assert_array_equal(logic.workspace.load_mr(case_id).array, mr.array)


def test_volumes_picked_in_the_panel_get_the_checks_of_a_file(scene, tmp_path):
    """The panel's volumes once skipped the checks every file gets: an MR picked as the
    CT, a CT picked as the MR, NaN voxels or a sheared grid went into the workspace and
    trained, and so did a blank volume. Each is refused before any folder is made, naming
    the node."""
    rng = np.random.default_rng(3)
    ct = Volume(rng.integers(-1000, 400, (6, 16, 16)).astype(np.int16), (0.8, 0.8, 3.0))
    mr = Volume(rng.random((6, 16, 16)).astype(np.float32) * 800, (0.8, 0.8, 3.0))
    nan = mr.with_array(np.where(rng.random(mr.shape) < 0.01, np.nan, mr.array).astype(np.float32))
    sheared = Volume(ct.array, (0.8, 0.8, 3.0), direction=[[1, 0, 0.4], [0, 1, 0], [0, 0, 1]])
    blank = ct.with_array(np.full(ct.shape, -1024, np.int16))
    logic = WorkflowLogic(scene)
    for ct_volume, mr_volume, needles in [
        (mr, None, ("CT volume 'MR T2'", "nothing below 0", "Hounsfield")),
        (ct, ct.with_array(ct.array[::-1].copy()), ("MR volume 'CT again'", "read as the MR", "looks like a CT")),
        (ct, nan, ("MR volume 'NaN MR'", "NaN", "expected finite")),
        (sheared, None, ("CT volume 'sheared'", "sheared grid")),
        (blank, None, ("CT volume 'blank'", "every voxel is -1024", "blank image")),
    ]:
        names = {id(mr): "MR T2", id(nan): "NaN MR", id(sheared): "sheared", id(blank): "blank"}
        ct_node = mrml.add_volume(scene, ct_volume, names.get(id(ct_volume), "CT"))
        mr_node = None if mr_volume is None else mrml.add_volume(scene, mr_volume, names.get(id(mr_volume), "CT again"))
        with pytest.raises(InputError) as refused:
            logic.prepare(ct_node, mr_node, folder=tmp_path / "ws")
        for needle in needles:
            assert needle in str(refused.value), (needle, str(refused.value))
        assert not (tmp_path / "ws").exists()
    assert logic.prepare(mrml.add_volume(scene, ct, "CT"), mrml.add_volume(scene, mr, "MR"), folder=tmp_path / "ws") == "CT"


def test_the_keep_every_piece_choice_reaches_the_predict_job(scene, tmp_path):
    """The panel's "keep every piece" box becomes ``predict --keep-all-components``,
    whether the prediction follows training or runs on its own."""
    from VQMedSegLib.cli.main import build_parser

    ct = Volume(ramp((4, 16, 16), -1000).astype(np.int16))
    logic = WorkflowLogic(scene, device="cpu")
    case_id = logic.prepare(mrml.add_volume(scene, ct, "CT"), None, folder=tmp_path / "ws")
    parser = build_parser()
    for keep in (False, True):
        for args in (logic.prediction_args(keep_all_components=keep), logic.prediction_args(case_id, keep_all_components=keep)):
            parsed = parser.parse_args(args)
            assert parsed.command == "predict" and parsed.keep_all_components is keep, args
    assert parser.parse_args(logic.prediction_args(case_id)).case == case_id


def test_a_corrupt_suggestions_file_is_a_clear_error_not_a_traceback(scene, tmp_path):
    from VQMedSegLib.errors import InputError

    logic = WorkflowLogic(scene, device="cpu")
    logic.prepare(mrml.add_volume(scene, Volume(ramp((4, 16, 16), -1000).astype(np.int16)), "CT"), None, folder=tmp_path / "ws")
    assert logic.suggestions() == []  # no query yet
    (tmp_path / "ws" / "suggestions.json").write_text('{"suggestions": [', encoding="utf-8")
    with pytest.raises(InputError, match=r"suggestions.json: not valid JSON .*run the query again"):
        logic.suggestions()


def test_a_segmentation_edited_on_two_slices_gives_exactly_two_labelled_slices(scene, tmp_path, phantom):
    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    logic = WorkflowLogic(scene)
    case_id = logic.prepare(ct_node, None, folder=tmp_path / "ws")
    # the annotator paints the liver on slices 6 and 9 only (as the Segment Editor would)
    painted = np.zeros(phantom.ct.shape, np.uint8)
    truth = (phantom.ct_label.array == 1).astype(np.uint8)
    painted[6], painted[9] = truth[6], truth[9]
    assert truth[6].any() and truth[9].any()
    node = logic.annotation_node(case_id)
    edited = mrml.add_segmentation(scene, phantom.ct.with_array(painted), [{"value": 1, "name": "Liver", "color": (1, 0, 0)}],
                                   reference_node=ct_node, name="edited")
    assert logic.annotated_slices(edited, case_id) == [6, 9]
    assert logic.mark_annotated(case_id, logic.annotated_slices(edited, case_id), edited) == [6, 9]
    assert logic.workspace.labelled_slices() == {case_id: [6, 9]}
    stored = logic.workspace.load_annotation(case_id).array
    np.testing.assert_array_equal(stored[6], truth[6])
    np.testing.assert_array_equal(stored[9], truth[9])
    assert stored[7].sum() == 0
    # an annotated empty slice counts: slice 0 holds no liver
    assert logic.mark_annotated(case_id, [0], node) == [0, 6, 9]
    assert logic.status()["labelled_slices"] == 3
    # the slice centre lies on that slice's plane
    r, a, s = logic.slice_center(case_id, 9)
    ct = phantom.ct
    lps = np.array([-r, -a, s])
    ijk = np.linalg.solve(np.asarray(ct.direction) * np.asarray(ct.spacing), lps - np.asarray(ct.origin))
    assert ijk[2] == pytest.approx(9.0)


def test_only_the_segment_named_for_the_task_is_stored_as_the_annotation(scene, tmp_path, phantom):
    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    logic = WorkflowLogic(scene)
    case_id = logic.prepare(ct_node, None, folder=tmp_path / "ws")
    truth = (phantom.ct_label.array == 1).astype(np.uint8)
    painted = np.zeros(phantom.ct.shape, np.uint8)
    painted[6] = truth[6]
    painted[10] = (phantom.ct_label.array[10] == 4) * 2  # the annotator's own extra segment: the spleen, on slice 10
    assert painted[10].any()
    segments = [{"value": 1, "name": "liver", "color": (1, 0, 0)}, {"value": 2, "name": "Spleen", "color": (0, 0, 1)}]
    edited = mrml.add_segmentation(scene, phantom.ct.with_array(painted), segments, reference_node=ct_node, name="edited")
    assert logic.annotated_slices(edited, case_id) == [6]
    assert logic.mark_annotated(case_id, [6, 10], edited) == [6, 10]
    stored = logic.workspace.load_annotation(case_id).array
    np.testing.assert_array_equal(stored[6], truth[6])
    assert stored[10].sum() == 0  # the spleen is not liver
    # two segments, neither named for the task: refused, listing them
    segments[0]["name"] = "Segment_1"
    unnamed = mrml.add_segmentation(scene, phantom.ct.with_array(painted), segments, reference_node=ct_node, name="unnamed")
    with pytest.raises(Exception, match=r"segments 'Segment_1', 'Spleen'.*none is named 'Liver'"):
        logic.mark_annotated(case_id, [6], unnamed)


def _truth_node(scene, phantom, ct_node):
    return mrml.add_segmentation(scene, phantom.ct_label.with_array((phantom.ct_label.array == 1).astype(np.uint8)),
                                 [{"value": 1, "name": "Liver", "color": (1, 0, 0)}], reference_node=ct_node, name="truth")


def test_query_train_predict_loop_through_the_logic_ends_with_the_segmentation_in_the_scene(scene, tmp_path, phantom):
    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    mr_node = mrml.add_volume(scene, phantom.mr, "MR")
    truth = _truth_node(scene, phantom, ct_node)
    logic = WorkflowLogic(scene, device="cpu", preset="tiny")
    case_id = logic.prepare(ct_node, mr_node, folder=tmp_path / "ws")

    job = logic.start_query("begal", n=8)
    assert logic.wait(timeout=300).status == "done", job.reason
    rows = logic.suggestions()
    assert len(rows) == 8 and {"case", "slice", "score", "purpose"} <= set(rows[0])
    logic.mark_annotated(case_id, [r["slice"] for r in rows], truth)
    assert logic.status()["labelled_slices"] == 8
    assert logic.suggestions() == []  # annotated rows leave the table

    logic.start_training("supervised", iterations=120)
    assert logic.wait(timeout=600).status == "done"  # training, then the queued prediction
    assert logic.job.kind == "predict" and logic.job.status == "done", logic.job.reason
    loaded = logic.loaded[case_id]
    seg = loaded["segmentation"]
    segment = seg.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "Liver"
    assert tuple(round(c, 3) for c in segment.GetColor()) == tuple(round(c, 3) for c in (221 / 255, 130 / 255, 101 / 255))
    assert seg.GetScene() is scene
    # the overlay is the foreground of every slice view, through a colour table
    overlay = loaded["overlays"][loaded["shown"]]
    composite = scene.GetSingletonNode("Red", "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == overlay.GetID() and composite.GetForegroundOpacity() > 0
    assert overlay.GetDisplayNode().GetColorNode().IsA("vtkMRMLColorTableNode")
    # results sit in one folder of the subject hierarchy
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(seg))
    assert folder and sh.GetItemParent(sh.GetItemByDataNode(overlay)) == folder
    # loading the results again (as after another training) replaces them, folder and all
    logic.load_results(case_id)
    from vtkmodules.vtkCommonCore import vtkIdList

    children = vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), children, True)
    names = [sh.GetItemName(children.GetId(i)) for i in range(children.GetNumberOfIds())]
    assert names.count(f"{case_id} results") == 1 and names.count(f"{case_id} Liver (supervised)") == 1, names
    assert seg.GetScene() is None and logic.loaded[case_id]["segmentation"].GetScene() is scene
    scores = logic.score_against(case_id, truth)
    assert scores["dice"] > 0.6, scores
    assert scores["hd95_mm"] is not None
    # a reference holding more organs (as a whole-body segmentation does) is scored on its liver alone
    organs = mrml.add_segmentation(scene, phantom.ct_label, [
        {"value": 2, "name": "kidney right", "color": (0, 1, 0)}, {"value": 1, "name": "liver", "color": (1, 0, 0)},
        {"value": 3, "name": "kidney left", "color": (0, 0, 1)}, {"value": 4, "name": "spleen", "color": (1, 1, 0)}],
        reference_node=ct_node, name="organs")
    assert logic.score_against(case_id, organs) == scores
    # and one whose segments name no liver is refused, naming them
    organs.GetSegmentation().RemoveSegment(organs.GetSegmentation().GetSegmentIdBySegmentName("liver"))
    with pytest.raises(InputError, match="'kidney right', 'kidney left', 'spleen'; none is named 'Liver'"):
        logic.score_against(case_id, organs)
    # an overlay the user deleted is forgotten, and nothing else: the segmentation (perhaps
    # edited since) stays in the scene and loaded
    segmentation = logic.loaded[case_id]["segmentation"]
    scene.RemoveNode(logic.loaded[case_id]["overlays"]["entropy"])
    assert logic.forget_removed_results() == [] and "entropy" not in logic.loaded[case_id]["overlays"]
    assert logic.loaded[case_id]["shown"] in (None, *logic.loaded[case_id]["overlays"])
    assert segmentation.GetScene() is scene and logic.loaded[case_id]["segmentation"] is segmentation
    with pytest.raises(InputError, match="not loaded"):
        logic.show_uncertainty(case_id, "entropy")
    # a deleted segmentation forgets the case's results, and takes its overlays with it
    logic.load_results(case_id)
    overlays = list(logic.loaded[case_id]["overlays"].values())
    scene.RemoveNode(logic.loaded[case_id]["segmentation"])
    assert logic.forget_removed_results() == [case_id] and case_id not in logic.loaded
    assert all(node.GetScene() is None for node in overlays)
    # the module's Segment button: the last model predicts this case alone, and it is loaded
    first = logic.available_predictions()[case_id]["job"]
    logic.start_prediction(case_id)
    assert logic.wait(timeout=300).status == "done", logic.job.reason
    assert logic.job.kind == "predict" and logic.available_predictions()[case_id]["job"] == logic.job.job_id != first
    assert logic.loaded[case_id]["segmentation"].GetScene() is scene
    scene.Clear(0)
    assert logic.forget_removed_results() == [case_id] and logic.loaded == {}


def _poll_until(logic, condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition(logic.job) and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.2)
    assert condition(logic.job), f"{logic.job.kind} job: condition not met within {timeout} s ({logic.job.status} {logic.job.reason})"


def _endless_training(scene, tmp_path, phantom) -> WorkflowLogic:
    """A workspace with 3 annotated slices and a training job that would run for hours."""
    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    truth = _truth_node(scene, phantom, ct_node)
    logic = WorkflowLogic(scene, device="cpu", preset="tiny")
    case_id = logic.prepare(ct_node, None, folder=tmp_path / "ws")
    logic.mark_annotated(case_id, [4, 8, 12], truth)
    logic.start_training("supervised", iterations=100000)
    return logic


def test_a_cancelled_training_is_reported_loads_nothing_and_resumes(scene, tmp_path, phantom):
    logic = _endless_training(scene, tmp_path, phantom)
    _poll_until(logic, lambda job: job.checkpoints > 0)
    assert logic.cancel(grace=30, block=False)  # the GUI's way: returns at once, poll reports the end
    job = logic.wait(timeout=60)
    assert job.kind == "train" and job.status == "cancelled"
    assert logic.loaded == {} and logic.available_predictions() == {}
    assert logic.status()["running_job"] is None and logic.status()["last_model"] is None
    # reopening the workspace (a new session) shows its state and resumes the training
    again = WorkflowLogic(scene, device="cpu", preset="tiny")
    again.open_workspace(tmp_path / "ws")
    assert again.status()["labelled_slices"] == 3
    again.start_training("supervised", iterations=100000)
    _poll_until(again, lambda job: job.resumed_from is not None)
    assert again.job.resumed_from >= 10
    again.cancel(grace=30)
    assert again.wait(timeout=60).status == "cancelled"


def test_a_cancel_confirmed_after_its_job_ended_does_not_stop_the_next_one(scene, tmp_path):
    """The module asks "Stop the running job?" in a modal dialog, during which its timer
    still polls: a training that ends there starts its queued prediction, and the "Yes"
    once cancelled that prediction instead. A cancel names the job it was asked about."""
    import subprocess
    import sys

    from VQMedSegLib.jobs.workspace import Workspace
    from VQMedSegLib.workflow.logic import JobState

    ws = Workspace.create(tmp_path / "ws", task="liver")
    logic = WorkflowLogic(scene)
    logic.open_workspace(ws.root)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        logic.job = JobState("predict", "predict-next", proc)
        logic._queue = [("predict", ["--case", "later"])]
        assert not logic.cancel(block=False, job_id="train-asked-about")  # ended while the dialog was open
        assert logic.job.kill_at is None and logic._queue and not ws.job_dir("predict-next").exists()
        assert logic.cancel(block=False, job_id="predict-next")
        assert logic.job.kill_at is not None and logic._queue == []
        assert (ws.job_dir("predict-next") / "cancel").exists()
    finally:
        proc.kill()
        proc.wait()


def test_no_workspace_is_opened_or_prepared_under_a_running_job(scene, tmp_path, phantom):
    """Preparing while a job runs would swap the workspace whose events the job is read
    from (a finished training then reads as crashed, its queued prediction is dropped) or,
    on the same folder, replace the followed job by one without its process handle."""
    from VQMedSegLib.errors import WorkspaceError

    logic = _endless_training(scene, tmp_path, phantom)
    job = logic.job
    other = mrml.add_volume(scene, phantom.ct, "CT other")
    for folder in (tmp_path / "other", tmp_path / "ws"):
        with pytest.raises(WorkspaceError, match=r"a train job \(.+\) is running on workspace .*; wait for it or cancel it"):
            logic.prepare(other, None, folder=folder)
    assert logic.workspace.root == tmp_path / "ws" and not (tmp_path / "other").exists()
    assert logic.attach() is job and job.proc is not None  # following it already: the same job, its process kept
    logic.cancel(grace=30)
    assert logic.wait(timeout=60).status == "cancelled"
    assert logic.prepare(other, None, folder=tmp_path / "other") == "CT_other"  # once it has ended


def test_a_suggested_slice_is_marked_only_once_shown_in_the_segment_editor(scene, tmp_path, phantom):
    """A click on a suggestion shows its slice and sets the Segment Editor (created if the
    user has not opened it yet) on the case's annotation and CT, so what is drawn is what is
    stored; Mark annotated stores that slice, and only once it was shown."""
    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    liver = phantom.ct_label.with_array((phantom.ct_label.array == 1).astype(np.uint8))
    prediction = mrml.add_segmentation(scene, liver, [{"value": 1, "name": "Liver", "color": (1, 0, 0)}],
                                       reference_node=ct_node, name="an earlier prediction")
    logic = WorkflowLogic(scene)
    case_id = logic.prepare(ct_node, None, folder=tmp_path / "ws")
    assert scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode") is None  # never opened
    with pytest.raises(InputError, match="no suggested slice is shown; click one in the table"):
        logic.mark_shown_annotated()
    logic.show_for_annotation(case_id, 9)
    editor = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    annotation = logic.annotation_node(case_id)
    assert editor is not None and editor.GetSegmentationNode() is annotation and annotation is not prediction
    assert editor.GetSourceVolumeNode() is ct_node
    assert logic.shown == (case_id, 9)
    # the annotator draws the liver on slice 9 in the node the editor shows
    truth = (phantom.ct_label.array == 1).astype(np.uint8)
    drawn = np.zeros_like(truth)
    drawn[9] = truth[9]
    annotation.GetSegmentation().RemoveAllSegments()
    mrml._add_label_segments(phantom.ct.with_array(drawn), [{"value": 1, "name": "Liver", "color": (1, 0, 0)}],
                             annotation.GetSegmentation())
    assert logic.mark_shown_annotated() == (case_id, [9])
    np.testing.assert_array_equal(logic.workspace.load_annotation(case_id).array[9], truth[9])
    assert logic.shown is None  # marked once; the next needs another click
    with pytest.raises(InputError, match="no suggested slice is shown"):
        logic.mark_shown_annotated()
    # the editor node the user made themselves is used, not a second one
    logic.show_for_annotation(case_id, 3)
    assert len([scene.GetNthNodeByClass(i, "vtkMRMLSegmentEditorNode")
                for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode"))]) == 1


def test_jobs_start_in_the_environment_the_module_gives_them(scene, tmp_path, phantom, monkeypatch):
    """An outside Python (a conda or CUDA environment) gets Slicer's startup environment,
    not the PYTHONHOME and library paths of Slicer's own Python, which would break it."""
    import subprocess

    from VQMedSegLib.workflow import logic as workflow_logic

    seen = {}

    def fake_launch(args, ws, kind, python=None, env=None):
        seen.update(python=python, env=env)
        return subprocess.Popen(["true"]), "job-env"

    monkeypatch.setattr(workflow_logic, "launch", fake_launch)
    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    logic = WorkflowLogic(scene, python="/opt/gpu/bin/python")
    logic.prepare(ct_node, None, folder=tmp_path / "ws")
    logic.env = {"PATH": "/usr/bin", "HOME": "/home/user"}
    logic.start_query("random", n=2)
    assert seen == {"python": "/opt/gpu/bin/python", "env": {"PATH": "/usr/bin", "HOME": "/home/user"}}
    logic.job.proc.wait()


def test_following_a_job_never_waits_for_its_process_to_exit(scene, tmp_path):
    """The module polls on the GUI thread: a job that has written its final event but takes
    seconds to exit (the interpreter and torch shutting down, a stuck worker) must not
    freeze Slicer while it does; the job ends at the first poll after its process has."""
    import subprocess
    import sys

    from VQMedSegLib.jobs.workspace import Workspace
    from VQMedSegLib.workflow.logic import JobState

    ws = Workspace.create(tmp_path / "ws", task="liver")
    logic = WorkflowLogic(scene)
    logic.open_workspace(ws.root)
    script = ("import sys, time\nfrom VQMedSegLib.jobs.runner import JobContext\nfrom VQMedSegLib.jobs.workspace import Workspace\n"
              "with JobContext(Workspace.open(sys.argv[1]), 'slow', job_id='slow-exit'):\n    pass\ntime.sleep(3)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(ws.root)])
    logic.job = JobState("slow", "slow-exit", proc)
    longest, finishing_seen = 0.0, False
    try:
        deadline = time.monotonic() + 60
        while not logic.job.finished and time.monotonic() < deadline:
            t = time.monotonic()
            logic.poll()
            longest = max(longest, time.monotonic() - t)
            finishing_seen |= not logic.job.finished and proc.poll() is None and logic.job.message == "finishing"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert logic.job.status == "done" and proc.returncode == 0
    assert finishing_seen  # its final event read while its process still ran
    assert longest < 1.0, f"a poll took {longest:.2f} s"


def test_a_killed_job_is_reported_as_crashed_with_its_reason(scene, tmp_path, phantom):
    logic = _endless_training(scene, tmp_path, phantom)
    _poll_until(logic, lambda job: job.fraction > 0)
    os.killpg(logic.job.proc.pid, signal.SIGKILL)
    job = logic.wait(timeout=60)
    assert job.status == "crashed" and "exit code" in job.reason
    assert logic.loaded == {} and logic.available_predictions() == {}
    # the workspace is free again and its state still parses
    assert logic.status()["running_job"] is None
    json.loads((logic.workspace.root / "state.json").read_text())


@pytest.mark.parametrize("preset, reason", [
    ("paper", "--preset paper: no CUDA device found"),  # the command refuses it and records why in the workspace
    ("standard", "argument --preset: invalid choice: 'standard'"),  # the parser refuses it: only its log says why
], ids=["refused-by-the-command", "refused-by-the-parser"])
def test_a_job_the_command_line_refuses_fails_with_its_reason_not_as_a_crash(scene, tmp_path, phantom, monkeypatch,
                                                                              preset, reason):
    """The `paper` preset with the device left at `auto` on a machine without a GPU, or a
    preset no method has: the job process refuses it before it begins, and the panel shows
    why, as a failure; the prediction queued behind the training never starts."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the job process sees no GPU on any machine
    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    truth = _truth_node(scene, phantom, ct_node)
    logic = WorkflowLogic(scene, device="auto", preset=preset)
    case_id = logic.prepare(ct_node, None, folder=tmp_path / "ws")
    logic.mark_annotated(case_id, [4, 8, 12], truth)
    logic.start_training("supervised")
    job = logic.wait(timeout=120)
    assert job.kind == "train" and job.status == "failed", (job.status, job.reason)
    assert job.reason.startswith(reason), job.reason
    if preset == "paper":
        assert "--device cpu" in job.reason, job.reason
    assert logic.status()["running_job"] is None and logic.status()["last_model"] is None
    assert logic.available_predictions() == {}


def test_partial_prediction_files_are_never_loaded(scene, tmp_path, phantom):
    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    logic = WorkflowLogic(scene)
    case_id = logic.prepare(ct_node, None, folder=tmp_path / "ws")
    # files on disk without the state's record (a job killed after writing them)
    folder = logic.workspace.prediction_dir(case_id)
    folder.mkdir(parents=True)
    (folder / "prediction.seg.nrrd").write_bytes(b"NRRD0004\n")
    with pytest.raises(Exception, match="no finished prediction"):
        logic.load_results(case_id)


def _recorded_prediction(scene, tmp_path, phantom):
    """A workspace whose state records a finished prediction of its one case (the phantom's
    liver, and an uncertainty map), as a predict job leaves it, without running one."""
    from VQMedSegLib.data.io import write_volume

    ct_node = mrml.add_volume(scene, phantom.ct, "CT")
    logic = WorkflowLogic(scene)
    case_id = logic.prepare(ct_node, None, folder=tmp_path / "ws")
    ws = logic.workspace
    liver = phantom.ct_label.with_array((phantom.ct_label.array == 1).astype(np.uint8))
    write_volume(liver, ws.prediction_dir(case_id) / "prediction.nrrd")
    write_volume(liver.with_array(liver.array * 0.5), ws.prediction_dir(case_id) / "uncertainty.nrrd")
    ws.update(lambda st: st.setdefault("predictions", {}).update({case_id: {
        "method": "supervised", "files": {"segmentation": f"predictions/{case_id}/prediction.nrrd",
                                          "uncertainty": f"predictions/{case_id}/uncertainty.nrrd"}}}))
    return logic, case_id, ct_node


def test_after_a_prediction_job_a_result_that_cannot_be_loaded_is_reported_and_the_others_load(scene, tmp_path, phantom):
    """The end of a prediction job loads each case's result; one that cannot be read is
    reported as an error of the poll, and the job still ends with the others loaded."""
    import shutil

    from VQMedSegLib.workflow.logic import JobState

    logic, case_a, _ct_a = _recorded_prediction(scene, tmp_path, phantom)
    ws = logic.workspace
    case_b = logic.prepare(mrml.add_volume(scene, phantom.ct, "CT b"), None)
    shutil.copytree(ws.prediction_dir(case_a), ws.prediction_dir(case_b), dirs_exist_ok=True)
    ws.update(lambda st: st["predictions"].update({case_b: {"method": "supervised", "files": {
        "segmentation": f"predictions/{case_b}/prediction.nrrd", "uncertainty": f"predictions/{case_b}/uncertainty.nrrd"}}}))
    (ws.prediction_dir(case_a) / "uncertainty.nrrd").write_bytes(b"NRRD0004\ntruncated")
    logic.job = JobState(kind="predict", job_id="ended", status="done", message="loading the result",
                         loading={case: logic.start_loading(case) for case in (case_a, case_b)})
    deadline = time.monotonic() + 60
    update = logic.poll()
    while not update.ended and time.monotonic() < deadline:
        time.sleep(0.02)
        update = logic.poll()
    assert update.ended and logic.job.finished and logic.job.message == ""
    assert len(update.errors) == 1 and update.errors[0].startswith(f"the prediction of {case_a} could not be loaded: ")
    assert f"loaded the prediction of {case_b}" in update.lines and list(logic.loaded) == [case_b]


def test_unloading_results_keeps_the_tree_entry_of_a_users_node_moved_into_their_folder(scene, tmp_path, phantom):
    """Results are unloaded when loaded again (a new prediction) or their segmentation is
    deleted. Their subject-hierarchy folder went with every item in it, so a node of the
    user's that they had filed there vanished from the Data module's tree."""
    logic, case_id, _ct_node = _recorded_prediction(scene, tmp_path, phantom)
    loaded = logic.load_results(case_id)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder, parent = loaded["folder"], sh.GetItemParent(loaded["folder"])
    mine = mrml.add_volume(scene, phantom.ct, "my notes")
    sh.SetItemParent(sh.GetItemByDataNode(mine) or sh.CreateItem(sh.GetSceneItemID(), mine), folder)
    again = logic.load_results(case_id)  # unloads the first
    assert loaded["segmentation"].GetScene() is None and not sh.GetItemName(folder)
    item = sh.GetItemByDataNode(mine)
    assert mine.GetScene() is scene and item and sh.GetItemParent(item) == parent
    logic.unload_results(case_id)
    assert again["segmentation"].GetScene() is None and not sh.GetItemName(again["folder"])


def test_after_a_prediction_only_the_cases_on_show_are_loaded_into_the_scene(scene, tmp_path, phantom, monkeypatch):
    """The prediction after a training segments every case of the workspace. Loading each
    into the scene, on the GUI thread, brought back the CT of every case prepared in an
    earlier session with its segmentation and overlays: seconds of frozen GUI per case,
    and a scene full of what nobody asked to see. Cases whose CT is not in the scene stay
    on disk, recorded, for *Load last prediction*. The files of those loaded are read on
    the worker thread (0.58 s at 512 x 512 x 150); the job ends once their nodes are made."""
    import threading

    from VQMedSegLib.data import io

    ct_a = mrml.add_volume(scene, phantom.ct, "CT a")
    truth = _truth_node(scene, phantom, ct_a)
    logic = WorkflowLogic(scene, device="cpu", preset="tiny")
    case_a = logic.prepare(ct_a, None, folder=tmp_path / "ws")
    ct_b = mrml.add_volume(scene, phantom.ct, "CT b")
    case_b = logic.prepare(ct_b, None, folder=tmp_path / "ws")
    scene.RemoveNode(ct_b)  # closed since, or from an earlier session
    logic.mark_annotated(case_a, [4, 8, 12], truth)
    logic.start_training("supervised", iterations=20)
    release, readers, real = threading.Event(), [], io.read_volume

    def held(*args, **kwargs):  # the prediction's files, read when the test lets them be
        readers.append(threading.current_thread())
        if threading.current_thread() is not threading.main_thread():
            release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "read_volume", held)
    said, deadline = [], time.monotonic() + 600
    while not (logic.job.kind == "predict" and logic.job.status != "running") and time.monotonic() < deadline:
        said += logic.poll().lines
        time.sleep(0.2)
    job = logic.job
    assert job.kind == "predict" and job.status == "done", job.reason
    for _ in range(3):  # the files are being read: the job is not over, and says why
        said += logic.poll().lines
        assert not job.finished and job.message == "loading the result" and not logic.loaded
        time.sleep(0.05)
    assert readers and threading.main_thread() not in readers, readers
    release.set()
    while not job.finished and time.monotonic() < deadline:
        said += logic.poll().lines
        time.sleep(0.05)
    assert f"loaded the prediction of {case_a}" in said

    # the scene closed while the next prediction's files are read: nothing is brought back into it
    release.clear()
    job = logic.start_prediction(case_a)
    while job.loading is None and not job.finished and time.monotonic() < deadline:
        said += logic.poll().lines
        time.sleep(0.2)
    assert job.loading is not None, job.reason
    scene.Clear(0)
    release.set()
    while not job.finished and time.monotonic() < deadline:
        said += logic.poll().lines
        time.sleep(0.05)
    assert said[-1] == f"the CT of {case_a} left the scene while its prediction was read; load it from the Results panel"
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert job.kind == "predict" and job.status == "done", job.reason
    assert f"predicted {case_b} too, whose CT is not in the scene; load it from the Results panel" in said
    assert sorted(logic.available_predictions()) == sorted([case_a, case_b])
    assert list(logic.loaded) == [case_a] and logic.case_nodes(case_b) == []
    assert logic.load_results(case_b)["segmentation"].GetScene() is scene  # on request


def test_scoring_runs_off_the_calling_thread_on_the_segmentations_as_they_were_when_asked(scene, tmp_path, phantom,
                                                                                        monkeypatch):
    """Scoring a prediction against a reference took about 0.8 s of Slicer's GUI thread at
    512 x 512 x 150. The segmentations are exported to labelmaps on the calling thread
    (MRML is not thread-safe) and the metrics run on a worker: ``start_scoring`` returns
    before they end, and what it scores is the reference as it was when asked."""
    import threading

    from VQMedSegLib.metrics import segmentation

    logic, case_id, ct_node = _recorded_prediction(scene, tmp_path, phantom)
    logic.load_results(case_id)
    truth = _truth_node(scene, phantom, ct_node)
    expected = logic.score_against(case_id, truth)
    assert expected["dice"] == 1.0

    release, entered, threads, real = threading.Event(), threading.Event(), [], segmentation.score_volumes

    def held(pred, ref, label=1):
        threads.append(threading.get_ident())
        entered.set()
        assert release.wait(60), "the test never released the scoring"
        return real(pred, ref, label)

    monkeypatch.setattr(segmentation, "score_volumes", held)
    first = logic.start_scoring(case_id, truth)
    assert not first.done()  # returned while the metrics wait on the worker
    # the worker has started it (on a loaded machine it may still be waiting in line, and be replaced)
    assert entered.wait(60)
    scene.RemoveNode(truth)  # exported already: what the user does next does not change the answer
    # a request made while another waits in line replaces it: only the newest is wanted
    other = _truth_node(scene, phantom, ct_node)
    queued = logic.start_scoring(case_id, other)
    newest = logic.start_scoring(case_id, other)
    assert queued.cancelled() and not newest.done()
    release.set()
    assert first.result(timeout=60) == expected and newest.result(timeout=60) == expected
    # the waiting kind (the Python console, the self-test) never cancels a request of the panel's
    release.clear()
    logic._worker().submit(release.wait, 60)  # the worker busy: the panel's request waits in line
    panel = logic.start_scoring(case_id, other)
    waiting = threading.Thread(target=lambda: logic.score_against(case_id, other))
    waiting.start()
    time.sleep(0.2)
    release.set()
    waiting.join(60)
    assert panel.result(timeout=60) == expected and not panel.cancelled()
    assert threads and threading.get_ident() not in threads
    # a reference that cannot be scored is refused on the call, not later in the worker
    other.GetSegmentation().GetNthSegment(0).SetName("kidney")
    other.GetSegmentation().AddEmptySegment("", "spleen")
    with pytest.raises(InputError, match="none is named 'Liver'"):
        logic.start_scoring(case_id, other)


_GUI_THREAD_STEPS = r'''
import sys, tempfile, threading, pathlib
import numpy as np

importers = {}


class Watch:  # records which thread first imports torch or MONAI
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "monai") and name not in importers:
            importers[name] = threading.current_thread().name
        return None


sys.meta_path.insert(0, Watch())
from VQMedSegLib.data.io import write_volume
from VQMedSegLib.data.phantoms import make_dataset
from VQMedSegLib.export import mrml
from VQMedSegLib.workflow import WorkflowLogic

scene, logics = mrml.new_scene()
phantom = make_dataset("phantom-liver", 1, seed=11, ct_shape=(16, 64, 64))[0]
ct_node, mr_node = mrml.add_volume(scene, phantom.ct, "CT"), mrml.add_volume(scene, phantom.mr, "MR")
liver = phantom.ct_label.with_array((phantom.ct_label.array == 1).astype(np.uint8))
truth = mrml.add_segmentation(scene, liver, [{"value": 1, "name": "Liver", "color": (1, 0, 0)}], reference_node=ct_node)
logic = WorkflowLogic(scene)
case = logic.prepare(ct_node, mr_node, folder=pathlib.Path(tempfile.mkdtemp()) / "ws")
print("prepare", sorted(importers), flush=True)
logic.status(), logic.suggestions(), logic.show_for_annotation(case, 4)
print("show", sorted(importers), flush=True)
logic.mark_annotated(case, [3, 5], truth)
print("mark", sorted(importers), flush=True)
ws = logic.workspace
write_volume(liver, ws.prediction_dir(case) / "prediction.nrrd")
write_volume(liver.with_array(liver.array * 0.5), ws.prediction_dir(case) / "uncertainty.nrrd")
ws.update(lambda st: st.setdefault("predictions", {}).update({case: {"method": "supervised", "files": {
    "segmentation": f"predictions/{case}/prediction.nrrd", "uncertainty": f"predictions/{case}/uncertainty.nrrd"}}}))
logic.load_results(case)
print("load", sorted(importers), flush=True)
scores = logic.start_scoring(case, truth).result(timeout=300)
print("score", scores["dice"], importers, flush=True)
'''


def test_the_steps_on_the_gui_thread_import_neither_torch_nor_monai(tmp_path):
    """Importing torch and MONAI takes seconds (more inside Slicer, from a cold disk cache).
    Preparing the workspace imported both, through the slice planner, freezing Slicer's
    GUI on the first click. The module's own steps (prepare, show a slice, mark it, load
    results) must not import them; scoring, which needs MONAI, imports it on its worker."""
    import subprocess
    import sys

    script = tmp_path / "steps.py"
    script.write_text(_GUI_THREAD_STEPS, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout.splitlines()
    assert said[:4] == ["prepare []", "show []", "mark []", "load []"], said
    assert said[4].startswith("score 1.0 ") and "MainThread" not in said[4], said


def test_a_case_is_copied_into_the_workspace_off_the_calling_thread(scene, tmp_path, phantom, monkeypatch):
    """Copying a CT and an MR into the workspace (compressed NRRD) took about 2 s of
    Slicer's GUI thread at 512 x 512 x 150. The volumes leave the scene on the calling
    thread; the files are written on a worker. Until the copy is finished, no job starts,
    no other case is prepared, and the nodes are not marked as the case's; a failed copy
    leaves the Logic on the workspace it had."""
    import threading

    from VQMedSegLib.errors import WorkspaceError
    from VQMedSegLib.jobs.workspace import Workspace
    from VQMedSegLib.workflow.logic import CASE_ATTRIBUTE

    ct_node, mr_node = mrml.add_volume(scene, phantom.ct, "CT"), mrml.add_volume(scene, phantom.mr, "MR")
    logic = WorkflowLogic(scene, device="cpu", preset="tiny")
    release, threads, real = threading.Event(), [], Workspace.add_case

    def held(self, *args, **kwargs):
        threads.append(threading.get_ident())
        assert release.wait(60), "the test never released the copy"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Workspace, "add_case", held)
    preparing = logic.start_prepare(ct_node, mr_node, folder=tmp_path / "ws")
    assert not preparing.done() and preparing.case_id == "CT" and logic.preparing is preparing
    assert ct_node.GetAttribute(CASE_ATTRIBUTE) is None  # not the case's until it is in the workspace
    assert logic.workspace is None  # nor is the workspace the Logic's
    with pytest.raises(WorkspaceError, match="case 'CT' is still being copied into workspace .*; wait for it"):
        logic.start_query("random", n=2)
    with pytest.raises(WorkspaceError, match="case 'CT' is still being copied"):
        logic.start_prepare(mrml.add_volume(scene, phantom.ct, "CT 2"), None, folder=tmp_path / "ws")
    release.set()
    assert logic.finish_prepare() == "CT" and logic.preparing is None
    assert threads and threading.get_ident() not in threads
    assert ct_node.GetAttribute(CASE_ATTRIBUTE) == mr_node.GetAttribute(CASE_ATTRIBUTE) == "CT"
    np.testing.assert_array_equal(logic.workspace.load_mr("CT").array, phantom.mr.array)

    # another CT under a taken id, in another workspace: refused when the copy ends, and the Logic stays where it was
    monkeypatch.setattr(Workspace, "add_case", real)
    (tmp_path / "other").mkdir()
    first = WorkflowLogic(scene).prepare(mrml.add_volume(scene, phantom.ct.with_array(phantom.ct.array + 1), "CT"), None,
                                         folder=tmp_path / "other")
    assert first == "CT"
    preparing = logic.start_prepare(ct_node, None, folder=tmp_path / "other")
    assert logic.workspace.root == tmp_path / "ws"  # the Logic's own until the copy has ended well
    with pytest.raises(WorkspaceError, match="voxel values differ"):
        logic.finish_prepare()
    assert logic.workspace.root == tmp_path / "ws" and logic.preparing is None
    # a node that cannot be read is refused before any folder is made
    with pytest.raises(InputError, match="found no image data"):
        logic.start_prepare(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), None, folder=tmp_path / "third")
    assert not (tmp_path / "third").exists() and logic.workspace.root == tmp_path / "ws" and logic.preparing is None
    assert logic.start_query("random", n=2) is logic.job  # jobs start again
    assert logic.wait(timeout=300).status == "done"
