"""Workspace jobs in real subprocesses: lock, cancel (file and SIGTERM), kill -9 and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from VQMedSegLib.data.volume import Volume
from VQMedSegLib.errors import InputError, WorkspaceError
from VQMedSegLib.jobs.events import read_events
from VQMedSegLib.jobs.locks import HeldLock
from VQMedSegLib.jobs.runner import JobContext, cancel, kill_tree, launch, running_job
from VQMedSegLib.jobs.workspace import Workspace
from conftest import run_cli, run_main

REPO = Path(__file__).resolve().parents[1]


def _disk_case(seed: int) -> tuple[Volume, Volume]:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:6, 0:48, 0:48]
    cy, cx = 24 + rng.integers(-4, 5), 20 + rng.integers(-4, 5)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 12**2) & (zz > 0)
    ct = np.where(mask, 120.0, 20.0) + rng.normal(0, 10, mask.shape)
    vol = Volume(ct.astype(np.float32), spacing=(2.0, 2.0, 5.0), origin=(-48, -48, 0))
    return vol, vol.with_array(mask.astype(np.uint8))


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    ws = Workspace.create(tmp_path / "ws", task="liver")
    for i in range(2):
        ct, label = _disk_case(i)
        ws.add_case(f"case{i}", ct, slice_size=64)
        ws.annotate(f"case{i}", label)
    return ws


def _events(ws: Workspace, job: str | None = None) -> list[dict]:
    ev = read_events(ws.events_path).events
    return [e for e in ev if job is None or e.get("job") == job]


def _wait_for(ws: Workspace, job: str, type_: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in _events(ws, job):
            if e["type"] == type_:
                return e
        if proc.poll() is not None:
            log = (ws.job_dir(job) / "log.txt").read_text()
            raise AssertionError(f"job exited with {proc.returncode} before '{type_}':\n{log}")
        time.sleep(0.1)
    raise AssertionError(f"no '{type_}' event within {timeout} s")


def _train_args(ws: Workspace, iterations: int) -> list[str]:
    return ["train", "--workspace", str(ws.root), "--method", "supervised", "--preset", "tiny",
            "--iterations", str(iterations), "--device", "cpu"]


def test_annotated_empty_slice_is_labelled(workspace):
    ct, _ = _disk_case(5)
    workspace.add_case("extra", ct, slice_size=64)
    empty = ct.with_array(np.zeros(ct.shape, np.uint8))
    assert workspace.annotate("extra", empty, slices=[0, 2]) == [0, 2]
    assert workspace.labelled_slices()["extra"] == [0, 2]
    assert workspace.load_annotation("extra").array.sum() == 0


def test_a_label_map_given_without_slices_never_erases_stored_annotations_unasked(workspace):
    """A label map drawn on a few slices, stored without naming them, once replaced every
    other slice's stored target with background; and value 0 stored the background as the
    target. Both are refused, and the stored annotation is unchanged."""
    from VQMedSegLib.errors import InputError

    before = workspace.load_annotation("case0").array.copy()
    assert before[1:].any(axis=(1, 2)).all()  # the target on slices 1..5
    few = np.zeros_like(before)
    few[4] = before[4]
    label = workspace.load_annotation("case0").with_array(few)
    with pytest.raises(InputError, match=r"no target on 4 slice\(s\) whose stored annotation has it \(\[1, 2, 3, 5\]\).*"
                                         r"--slices.*--replace"):
        workspace.annotate("case0", label)
    with pytest.raises(InputError, match=r"label value 0: 0 is the background.*expected the positive value"):
        workspace.annotate("case0", label, slices=[4], label_value=0)
    np.testing.assert_array_equal(workspace.load_annotation("case0").array, before)
    assert workspace.annotate("case0", label, slices=[4]) == list(range(6))  # named: stored
    np.testing.assert_array_equal(workspace.load_annotation("case0").array, before)
    workspace.annotate("case0", label, replace=True)  # asked for
    np.testing.assert_array_equal(workspace.load_annotation("case0").array, few)


def _read_only(monkeypatch, folder):
    """Writes below ``folder`` fail as on a read-only file system (root ignores permission bits)."""
    import errno

    real_open = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def open_(path, flags, *args, **kwargs):
        if flags & writing and Path(folder).resolve() in Path(os.path.abspath(path)).resolve().parents:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_a_read_only_workspace_can_be_looked_at_and_a_job_on_it_is_refused_without_a_traceback(workspace, monkeypatch):
    """``workspace status`` on a workspace on a read-only disk once ended in an OSError
    traceback from the job lock; so did every job. Status now reads it, and a job is refused
    with the storage error, exit 3."""
    from VQMedSegLib.errors import StorageError
    from VQMedSegLib.jobs.runner import JobContext, running_job

    held = HeldLock(workspace.lock_path)  # a lock file a job left, as in a copied workspace
    assert held.try_acquire()
    held.release()
    _read_only(monkeypatch, workspace.root)
    assert running_job(workspace) is None
    status = run_main("workspace", "status", workspace.root, check=False)
    assert status.returncode == 0 and "case0" in status.stdout, status.stderr
    with pytest.raises(StorageError, match=r"job\.lock: could not write \(the file system is read-only\)"):
        with JobContext(workspace, "train"):
            pass
    train = run_main("train", "--workspace", workspace.root, "--preset", "tiny", "--device", "cpu", check=False)
    assert train.returncode == 3 and "the file system is read-only" in train.stderr and "Traceback" not in train.stderr
    monkeypatch.undo()
    (workspace.root / "job.lock").unlink()  # no lock file at all: nobody holds it, and nothing is written to find out
    _read_only(monkeypatch, workspace.root)
    assert running_job(workspace) is None


def test_an_annotation_is_checked_against_the_cts_grid_without_reading_its_voxels(tmp_path, monkeypatch):
    """Marking a slice in Slicer read the whole stored CT (0.3 s at 512 x 512 x 150, on the
    GUI thread) for its grid alone. The grid now comes from the file's header: an oblique
    CT's grid matches exactly, and one a tenth of a voxel off is still refused."""
    from VQMedSegLib.errors import InputError

    rotation = np.array([[0.0, -1.0, 0.0], [0.6, 0.0, -0.8], [0.8, 0.0, 0.6]])
    ct, label = _disk_case(3)
    ct = Volume(ct.array, spacing=(0.7, 0.8, 2.5), origin=(-101.3, 17.25, 40.125), direction=rotation)
    label = ct.with_array(label.array)
    ws = Workspace.create(tmp_path / "ws", task="liver")
    ws.add_case("oblique", ct, slice_size=64)

    def no_voxels(self, case_id):
        raise AssertionError(f"read every voxel of case {case_id}'s CT")

    monkeypatch.setattr(Workspace, "load_ct", no_voxels)
    entry = ws.case("oblique")
    middle, np_axis = entry["n_slices"] // 2, 2 - entry["slice_axis"]
    assert ws.annotate("oblique", label, slices=[middle]) == [middle]
    stored = ws.load_annotation("oblique")
    assert stored.same_geometry(ct, tol=1e-9) and stored.array.sum() == np.take(label.array, middle, axis=np_axis).sum() > 0
    shifted = Volume(label.array, ct.spacing, np.add(ct.origin, (0.07, 0.0, 0.0)), ct.direction)
    with pytest.raises(InputError, match="its grid differs from the CT: origin"):
        ws.annotate("oblique", shifted, slices=[middle + 1])
    assert ws.labelled_slices() == {"oblique": [middle]}


def test_adding_a_case_again_keeps_its_annotations_and_takes_an_mr_given_now(workspace):
    ct, label = _disk_case(0)
    before, entry = workspace.labelled_slices()["case0"], workspace.case("case0")
    assert workspace.add_case("case0", ct.with_array(ct.array.astype(np.float64))) == entry  # the same CT: unchanged
    assert workspace.labelled_slices()["case0"] == before and workspace.load_mr("case0") is None
    mr = ct.with_array(ct.array[::-1].copy())
    assert workspace.add_case("case0", ct, mr)["mr"] == "inputs/case0/mr.nrrd"
    np.testing.assert_array_equal(workspace.load_mr("case0").array, mr.array)
    workspace.add_case("case0", ct)  # no MR given this time: the stored one stays
    np.testing.assert_array_equal(workspace.load_mr("case0").array, mr.array)
    assert workspace.labelled_slices()["case0"] == before
    np.testing.assert_array_equal(workspace.load_annotation("case0").array, label.array)


@pytest.mark.parametrize("change", ["voxels", "shape", "origin"])
def test_another_ct_under_a_case_id_already_taken_is_refused_not_written_over(workspace, change):
    ct, _ = _disk_case(0)
    other = {"voxels": ct.with_array(ct.array + 1),
             "shape": Volume(ct.array[:4], spacing=ct.spacing, origin=ct.origin),
             "origin": Volume(ct.array, spacing=ct.spacing, origin=(0.0, 0.0, 0.0))}[change]
    with pytest.raises(WorkspaceError, match=r"case 'case0': the workspace already holds another CT .*6 annotated "
                                             r"slices.*another case id"):
        workspace.add_case("case0", other)
    np.testing.assert_array_equal(workspace.load_ct("case0").array, ct.array)
    assert workspace.labelled_slices()["case0"] == [0, 1, 2, 3, 4, 5]


def test_a_prediction_killed_at_any_point_leaves_the_recorded_one_whole(workspace, monkeypatch):
    """A workspace prediction moved the case's previous folder aside, then moved the new one
    in: a kill between the two renames left state.json naming files that were gone (the
    Slicer module loads what it names) and the old prediction hidden for good. Each
    prediction now goes into a folder of its own, which state.json points to in one
    write; a kill at any point leaves the recorded prediction whole, and the next
    prediction removes what the killed one left."""
    from types import SimpleNamespace

    import torch

    import VQMedSegLib.inference.workspace as job

    class Context:
        def __init__(self, job_id):
            self.job_id = job_id

        def progress(self, *args, **kwargs):
            pass

        def check_cancel(self):
            pass

        def emit(self, *args, **kwargs):
            pass

    def fake_prediction(model, ckpt, ct, device, **kwargs):
        label = ct.with_array((ct.array > 60).astype(np.uint8), postprocessing="none", task="liver")
        return SimpleNamespace(label=label, uncertainty={"entropy": ct.with_array(np.zeros(ct.shape, np.float32))})

    monkeypatch.setattr(job, "load_model", lambda path, device: (None, {}))
    monkeypatch.setattr(job, "predict_volume", fake_prediction)
    workspace.record_model("m1", workspace.root / "models" / "m1.pt", "supervised")

    def recorded_files() -> list[Path]:
        records = workspace.load_state()["predictions"]
        return [workspace.resolve(f) for r in records.values() for f in r["files"].values()]

    job.predict_workspace(Context("job-1"), workspace, torch.device("cpu"), ["case0"])
    first = recorded_files()
    assert first and all(f.is_file() for f in first) and all("job-1" in f.as_posix() for f in first)

    class Killed(BaseException):
        pass

    real_update = workspace.update

    def killed(fn):
        raise Killed  # the job dies after its files are in place, before state.json names them

    monkeypatch.setattr(workspace, "update", killed)
    with pytest.raises(Killed):
        job.predict_workspace(Context("job-2"), workspace, torch.device("cpu"), ["case0"])
    assert recorded_files() == first and all(f.is_file() for f in first)  # the recorded prediction, whole
    monkeypatch.setattr(workspace, "update", real_update)
    job.predict_workspace(Context("job-3"), workspace, torch.device("cpu"), ["case0"])
    third = recorded_files()
    assert all(f.is_file() and "job-3" in f.as_posix() for f in third)
    left = sorted(p.relative_to(workspace.root).as_posix() for p in (workspace.root / "predictions").rglob("*"))
    assert left == ["predictions/case0", "predictions/case0/job-3", "predictions/case0/job-3/prediction.seg.nrrd",
                    "predictions/case0/job-3/uncertainty.nrrd"], left


def test_case_ids_windows_keeps_for_devices_are_refused_with_one_that_would_do(workspace):
    """A case named 'CON' or 'nul.1' makes 'inputs/CON/' on Linux, but on Windows that name
    is a device: the workspace could not be copied there, nor used."""
    from VQMedSegLib.files import safe_id, sanitize_id

    ct, _ = _disk_case(6)
    for name in ("CON", "nul", "Com1", "lpt9.scan", "aux"):
        with pytest.raises(InputError, match=rf"case identifier '{re.escape(name)}': .*Windows keeps for a device"):
            workspace.add_case(name, ct)
        safe_id(sanitize_id(name))  # the name suggested, and the one the Slicer module derives, is accepted
    assert sanitize_id("CON") == "CON_1" and sanitize_id("lpt9.scan") == "lpt9_1.scan"
    assert safe_id("console") == "console" and safe_id("COM10") == "COM10"  # not device names
    assert sorted(workspace.cases()) == ["case0", "case1"]


def test_case_ids_that_differ_only_in_letter_case_are_refused(workspace):
    """'Case0' beside 'case0' once became a second case whose files, on Windows and macOS
    (case-insensitive file systems), were the first one's: its CT replaced, its
    annotations overwritten, while state.json still listed them."""
    ct, _ = _disk_case(5)
    with pytest.raises(WorkspaceError, match=r"case 'Case0': the workspace holds case 'case0'.*letter case"):
        workspace.add_case("Case0", ct)
    assert sorted(workspace.cases()) == ["case0", "case1"] and not (workspace.root / "inputs" / "Case0").exists()
    r = run_main("workspace", "add", workspace.root, "--case", "CASE1", "--ct", workspace.root / "inputs" / "case1" / "ct.nrrd",
                 check=False)
    assert r.returncode == WorkspaceError.exit_code and "the workspace holds case 'case1'" in r.stderr


def test_workspace_add_says_a_case_is_kept_and_refuses_another_ct_under_its_id(workspace, tmp_path):
    from VQMedSegLib.data.io import write_volume

    ct, _ = _disk_case(0)
    write_volume(ct, tmp_path / "same.nrrd")
    write_volume(ct.with_array((ct.array[::-1] - ct.array.min()).copy()), tmp_path / "mr.nrrd")  # MR: no air at -1000
    write_volume(_disk_case(1)[0], tmp_path / "other.nrrd")
    kept = run_main("workspace", "add", workspace.root, "--case", "case0", "--ct", tmp_path / "same.nrrd",
                    "--mr", tmp_path / "mr.nrrd")
    assert kept.stdout == ("case case0: already in the workspace with this CT (6 slices + MR); "
                           "kept with its 6 annotated slices; MR stored\n")
    again = run_main("workspace", "add", workspace.root, "--case", "case0", "--ct", tmp_path / "same.nrrd",
                     "--mr", tmp_path / "mr.nrrd")
    assert again.stdout.endswith("kept with its 6 annotated slices\n")  # the same MR: nothing stored
    refused = run_main("workspace", "add", workspace.root, "--case", "case0", "--ct", tmp_path / "other.nrrd",
                       check=False)
    assert refused.returncode == WorkspaceError.exit_code
    assert "case 'case0': the workspace already holds another CT" in refused.stderr
    assert workspace.labelled_slices()["case0"] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("root", ["ws", "sub/../ws"])
def test_a_workspace_named_by_a_relative_path_records_models_where_it_finds_them(tmp_path, monkeypatch, root):
    # `vqmedseg train --workspace ws` and `vqmedseg demo --out demo-out` name the folder
    # relative to where the user stands; the model's recorded path is relative to the workspace
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    ws = Workspace.create(root, task="liver")
    path = ws.root / "models" / "m.pt"
    path.parent.mkdir()
    path.write_bytes(b"weights")
    entry = ws.record_model("m", path, "supervised")
    assert entry["path"] == "models/m.pt"
    assert Workspace.open(tmp_path / "ws").resolve(entry["path"]).read_bytes() == b"weights"
    assert ws.record_model("n", path.absolute(), "supervised")["path"] == "models/m.pt"
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        ws.record_model("o", tmp_path / "elsewhere.pt", "supervised")


def _hold_the_lock(ws: Workspace) -> tuple[subprocess.Popen, str]:
    """Another process runs a job named 'hold' on the workspace; returns it and the job's id
    once the lock is held."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; sys.path.insert(0, sys.argv[2]);"
         "from VQMedSegLib.jobs.runner import JobContext; from VQMedSegLib.jobs.workspace import Workspace;"
         "ctx = JobContext(Workspace(sys.argv[1]), 'hold').__enter__(); print(ctx.job_id, flush=True); time.sleep(60)",
         str(ws.root), str(REPO)],
        stdout=subprocess.PIPE, text=True)
    return holder, holder.stdout.readline().strip()


def test_second_job_is_refused_and_a_crashed_jobs_lock_and_temporary_files_are_cleared(workspace):
    holder, held = _hold_the_lock(workspace)
    assert "-hold-" in held  # the lock is held
    root = workspace.root
    # what a writer killed between writing its temporary file and renaming it leaves behind
    # (files.atomic_path names them .<stem>-<8 hex digits><suffix>), and files that only look alike
    left = [".state-0123abcd.json", ".suggestions-89abcdef.json", "models/.m-0011aabb.pt",
            "checkpoints/supervised/.last-00ff00ff.pt", "predictions/case0/.uncertainty-deadbeef.nrrd",
            "predictions/case0/.prediction-0a0b0c0d.seg.nrrd", "inputs/case1/.ct-01234567.nrrd",
            "annotations/.case1-7654abcd.nrrd"]
    kept = [".notes.txt", ".state.lock", "models/.m-backup.pt", "inputs/case1/.ct-0123456.nrrd",
            "predictions/case0/.DS_Store", "models/m-0123abcd.pt"]
    for name in left + kept:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"partial")
    with pytest.raises(WorkspaceError, match="busy"):
        with JobContext(workspace, "second"):
            pass
    assert running_job(workspace)["kind"] == "hold"
    assert all((root / name).exists() for name in left)  # a refused job touches nothing of the running one's
    holder.kill()  # kill -9: the lock dies with the process
    holder.wait()
    assert running_job(workspace) is None
    with JobContext(workspace, "third") as ctx:
        assert ctx.status == "running"
        assert [name for name in left if (root / name).exists()] == []
        assert [name for name in kept if not (root / name).exists()] == []
        (started,) = [e for e in _events(workspace, ctx.job_id) if e["type"] == "started"]
        assert sorted(started["removed_temporary_files"]) == sorted(left)
    with JobContext(workspace, "fourth") as ctx:
        (started,) = [e for e in _events(workspace, ctx.job_id) if e["type"] == "started"]
        assert "removed_temporary_files" not in started


def test_cancel_file_stops_job_cleanly_and_resume_continues(workspace):
    proc, job = launch(_train_args(workspace, 100000), workspace, "train")
    first_ckpt = _wait_for(workspace, job, "checkpoint", proc)
    cancel(workspace, job_id=job, proc=proc, grace=60)
    assert proc.returncode == 130
    kinds = [e["type"] for e in _events(workspace, job)]
    assert "cancelled" in kinds and "result" not in kinds
    state = workspace.load_state()
    assert state["models"] == []  # partial work is never presented as a finished model
    assert [j["status"] for j in state["jobs"] if j["id"] == job] == ["cancelled"]
    assert (workspace.checkpoint_dir("supervised") / "last.pt").exists()

    proc2, job2 = launch(_train_args(workspace, 100000), workspace, "train")
    resumed = _wait_for(workspace, job2, "resumed", proc2)
    assert resumed["iteration"] >= first_ckpt["iteration"]
    os.kill(proc2.pid, signal.SIGTERM)
    assert proc2.wait(timeout=60) == 130
    assert any(e["type"] == "cancelled" for e in _events(workspace, job2))


def test_ctrl_c_is_recorded_as_a_cancel_and_the_training_resumes(workspace):
    # a terminal's Ctrl-C: SIGINT to the process (not ignored, whatever the test runner's shell did)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen([sys.executable, "-m", "VQMedSegLib", *_train_args(workspace, 100000)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not any(e["type"] == "checkpoint" for e in _events(workspace)) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in proc.stderr.read()
    job = [j for j in workspace.load_state()["jobs"] if j["kind"] == "train"][-1]
    assert job["status"] == "cancelled" and job["reason"] == "interrupted (Ctrl-C)"
    assert [e for e in _events(workspace, job["id"]) if e["type"] == "cancelled"]
    assert not [e for e in _events(workspace, job["id"]) if e["type"] == "error"]

    proc2, job2 = launch(_train_args(workspace, 100000), workspace, "train")
    _wait_for(workspace, job2, "resumed", proc2)
    cancel(workspace, job_id=job2, proc=proc2, grace=60)


def test_kill_9_then_resume_to_completion(workspace):
    args = _train_args(workspace, 40)
    proc, job = launch(args, workspace, "train")
    ckpt = _wait_for(workspace, job, "checkpoint", proc)
    proc.kill()
    proc.wait()
    json.loads(workspace.state_path.read_text())  # state.json still parses
    # the killed job wrote no final status; the job list says it was interrupted, not running
    status = json.loads(run_main("workspace", "status", workspace.root, "--json").stdout)
    assert status["running_job"] is None
    assert [(j["id"], j["status"]) for j in status["last_jobs"]][-1] == (job, "interrupted")
    assert "ended without a final status" in status["last_jobs"][-1]["reason"]
    proc2, job2 = launch(args, workspace, "train")
    assert proc2.wait(timeout=300) == 0, (workspace.job_dir(job2) / "log.txt").read_text()
    # and the next job, holding the lock, wrote it so
    assert {j["id"]: j["status"] for j in workspace.load_state()["jobs"]} == {job: "interrupted", job2: "done"}
    ev = _events(workspace, job2)
    resumed = [e for e in ev if e["type"] == "resumed"]
    assert resumed and resumed[0]["iteration"] >= ckpt["iteration"]
    losses = [e["iteration"] for e in ev if e["type"] == "loss"]
    assert min(losses) > ckpt["iteration"]  # no work before the checkpoint was redone
    models = workspace.load_state()["models"]
    assert len(models) == 1 and models[0]["method"] == "supervised"
    assert workspace.resolve(models[0]["path"]).exists()
    assert not (workspace.checkpoint_dir("supervised") / "last.pt").exists()


def test_bad_input_exits_2_with_message(workspace):
    r = subprocess.run([sys.executable, "-m", "VQMedSegLib", *_train_args(workspace, 5)[:-2], "--device", "cuda"],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode == 0:
        pytest.skip("a GPU is present")
    assert r.returncode == 2 and "--device cuda: CUDA is not available" in r.stderr


def test_begal_round_cancels_and_resumes_mid_round(workspace):
    args = ["train", "--workspace", str(workspace.root), "--method", "begal", "--preset", "tiny", "--device", "cpu",
            "--config", str(_long_begal_config(workspace.root))]
    proc, job = launch(args, workspace, "train")
    ckpt = _wait_for(workspace, job, "checkpoint", proc)
    cancel(workspace, job_id=job, proc=proc, grace=60)
    assert proc.returncode == 130
    assert workspace.load_state().get("rounds", []) == []  # a cancelled round is not a round
    proc2, job2 = launch(args, workspace, "train")
    resumed = _wait_for(workspace, job2, "resumed", proc2)
    assert resumed["iteration"] >= ckpt["iteration"] and resumed["round"] == 0
    cancel(workspace, job_id=job2, proc=proc2, grace=60)


def _long_begal_config(root: Path) -> Path:
    from VQMedSegLib.config import begal_config_from_preset

    cfg = begal_config_from_preset("tiny", initial_iterations=100000, checkpoint_interval=5)
    path = root.parent / "begal.json"
    path.write_text(json.dumps(cfg.to_json()))
    return path


@pytest.mark.skipif(os.name != "posix", reason="process groups and sessions are POSIX")
def test_a_job_leads_its_own_process_group_inside_the_callers_session(workspace):
    """Its own group, so that cancel kills it with its children; the caller's session, because
    Linux's scheduler shares the CPU between sessions ("autogroups"): a job in a session of
    its own got one core's share for its two threads whenever anything else ran, and trained
    ten times slower."""
    proc, _ = launch(["--help"], workspace, "help")
    try:
        assert os.getpgid(proc.pid) == proc.pid
        assert os.getsid(proc.pid) == os.getsid(0)
    finally:
        proc.wait(timeout=120)


def _job_record(ws: Workspace, job: str) -> list[str]:
    return [j["status"] for j in ws.load_state()["jobs"] if j["id"] == job]


def test_a_job_starting_while_its_lock_is_probed_is_not_refused(workspace):
    """`workspace status` and the Slicer module's poll see whether a job runs by taking the
    lock for an instant (running_job); a job starting in that instant was refused as busy
    (reproduced 1 in 8 starts against a tight loop of probes)."""
    import threading

    from VQMedSegLib.errors import WorkspaceError
    from VQMedSegLib.jobs.locks import HeldLock

    probe = HeldLock(workspace.lock_path)
    assert probe.try_acquire()
    threading.Timer(0.2, probe.release).start()
    with JobContext(workspace, "probed") as ctx:
        assert ctx.status == "running"
    # a lock held for good (another job) is still refused, after the short retries
    assert probe.try_acquire()
    try:
        with pytest.raises(WorkspaceError, match="is busy"):
            with JobContext(workspace, "refused"):
                pass
    finally:
        probe.release()


def test_a_cancel_asked_for_while_the_job_starts_up_is_kept(workspace):
    """The Slicer module's Cancel can come before the job's process has taken the workspace
    lock (Python and torch still importing): the job must stop at its first step, not erase
    the request when it starts and train to the end."""
    proc, job = launch(_train_args(workspace, 100000), workspace, "train")
    try:
        assert running_job(workspace) is None  # still starting up
        cancel(workspace, job_id=job)  # asks only, as the module does before its grace period
        assert proc.wait(timeout=120) == 130, (workspace.job_dir(job) / "log.txt").read_text()
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=30)
    assert _job_record(workspace, job) == ["cancelled"]
    assert workspace.load_state()["models"] == []
    assert not (workspace.job_dir(job) / "cancel").exists()  # and the request is cleared once honoured


def test_the_cancel_command_names_the_job_it_stops_and_writes_nothing_when_none_runs(workspace):
    def cancel_files() -> list[str]:
        return sorted(str(p.relative_to(workspace.root)) for p in workspace.root.rglob("cancel"))

    idle = run_main("cancel", "--workspace", workspace.root)
    assert idle.stdout == f"no job is running on workspace {workspace.root}; nothing to cancel\n"
    assert cancel_files() == []
    holder, held = _hold_the_lock(workspace)
    try:
        other = run_main("cancel", "--workspace", workspace.root, "--job", "20260101-000000-train-abcdef")
        assert other.stdout == (f"job 20260101-000000-train-abcdef is not running on workspace {workspace.root} "
                                f"(running: {held}); nothing to cancel\n")
        assert cancel_files() == []
        asked = run_main("cancel", "--workspace", workspace.root)
        assert asked.stdout == f"cancel requested for job {held}; it stops at its next step\n"
        assert cancel_files() == [f"jobs/{held}/cancel"]
    finally:
        holder.kill()
        holder.wait()


def test_a_job_refused_before_it_begins_is_recorded_in_the_workspace(workspace):
    """The command line refuses `--preset paper` on a CPU under `--device auto` before any
    job context exists; the workspace's event log and job list still say so, with the reason."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU on any machine
    args = ["train", "--workspace", str(workspace.root), "--method", "supervised", "--preset", "paper", "--device", "auto"]
    proc, job = launch(args, workspace, "train", env=env)
    assert proc.wait(timeout=120) == 2, (workspace.job_dir(job) / "log.txt").read_text()
    events = _events(workspace, job)
    assert [(e["type"], e["status"], e["kind"]) for e in events] == [("error", "refused", "train")], events
    assert events[0]["message"].startswith("--preset paper: no CUDA device found")
    assert _job_record(workspace, job) == ["refused"]
    assert running_job(workspace) is None


def test_a_job_refused_because_the_workspace_is_busy_is_recorded_beside_the_running_one(workspace):
    holder, holder_job = _hold_the_lock(workspace)
    try:
        proc, job = launch(["query", "--workspace", str(workspace.root), "--strategy", "random", "--n", "2",
                            "--preset", "tiny", "--device", "cpu"], workspace, "query")
        assert proc.wait(timeout=120) == 3, (workspace.job_dir(job) / "log.txt").read_text()
        events = _events(workspace, job)
        assert [(e["type"], e["status"]) for e in events] == [("error", "refused")], events
        assert "is busy" in events[0]["message"] and holder_job in events[0]["message"]
        assert [e["type"] for e in _events(workspace, holder_job)] == ["started"]  # the running job's record is untouched
        assert running_job(workspace)["job"] == holder_job
        status = run_cli("workspace", "status", workspace.root).stdout
        assert f"running: hold job {holder_job} (pid {holder.pid}" in status, status
        assert f"  {job}  query  refused: workspace {workspace.root} is busy" in status, status
    finally:
        holder.kill()
        holder.wait()


def test_a_job_that_fails_inside_its_context_is_recorded_once(workspace):
    """No model yet: `predict` fails inside its job; that job's own `error` event is its only record."""
    r = subprocess.run([sys.executable, "-m", "VQMedSegLib", "predict", "--workspace", str(workspace.root), "--device", "cpu"],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, VQMEDSEG_JOB_ID="predict-no-model"))
    assert r.returncode == 2 and "no trained model yet" in r.stderr, r.stderr
    events = _events(workspace, "predict-no-model")
    assert [e["type"] for e in events] == ["started", "error"] and events[1]["status"] == "failed", events
    assert _job_record(workspace, "predict-no-model") == ["failed"]


def test_workspace_status_says_which_jobs_ran_last_and_why_one_did_not_finish(workspace):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", VQMEDSEG_JOB_ID="train-on-a-cpu")
    r = subprocess.run([sys.executable, "-m", "VQMedSegLib", "train", "--workspace", str(workspace.root), "--preset", "paper"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 2, r.stderr
    run_main("train", "--workspace", workspace.root, "--method", "supervised", "--preset", "tiny", "--iterations", "2",
             "--device", "cpu")
    text = run_cli("workspace", "status", workspace.root).stdout.splitlines()
    assert text[0] == "task liver: 2 cases, 12/12 slices labelled, 1 model, 0 rounds", text
    assert text[1:3] == ["  case0: 6/6 slices labelled, CT", "  case1: 6/6 slices labelled, CT"], text
    assert text[3:5] == ["running: nothing", "last jobs, oldest first:"], text
    assert text[5].startswith("  train-on-a-cpu  train  refused: --preset paper: no CUDA device found"), text
    assert text[6].startswith("  ") and text[6].endswith("  train  done"), text
    jobs = json.loads(run_cli("workspace", "status", workspace.root, "--json").stdout)["last_jobs"]
    assert [(j["status"], j.get("reason", "")[:13]) for j in jobs] == [("refused", "--preset pape"), ("done", "")], jobs


def test_the_terminal_progress_bar_follows_each_stage_of_a_job(workspace, capsys):
    """VQ-Seg reports its foundation features (0 of 1) before its iterations (of 600): the bar
    must then count iterations, under the stage's name, not stay at a total of 1."""
    with JobContext(workspace, "train", progress_bar=True) as ctx:
        ctx.progress(0, 1, "foundation features", force=True)
        ctx.progress(3, 10, "vqseg")
        started = ctx._bar.start_t
        ctx.progress(4, 10, "vqseg")
        assert ctx._bar.start_t == started  # the same stage goes on: its rate is not reset
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "4/10" in last and "vqseg" in last, err
    assert "foundation features" in err
