"""Shared fixtures: tiny seeded volumes and the real-data location."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_NUM_THREADS", "2")

from VQMedSegLib.data.paths import shared_data_dir  # noqa: E402
from VQMedSegLib.data.volume import Volume  # noqa: E402


@contextlib.contextmanager
def keeping_locale():
    """GDCM's DICOM writer sets the process's LC_CTYPE to "C" and leaves it so: a test
    later in the same process then read text files as ASCII and failed, depending on the
    order the tests ran in. The tests' DICOM writers restore it (the library only reads
    DICOM, which leaves the locale alone: test_io.py holds it so)."""
    import locale

    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


@pytest.fixture(autouse=True)
def no_module_job_outlives_its_test(monkeypatch):
    """Kill every job the Slicer module's workflow launched in a test and left running:
    a test that fails half-way must not leave an endless training beside the others."""
    from VQMedSegLib.jobs.runner import kill_tree
    from VQMedSegLib.workflow import logic as workflow_logic

    launched, launch = [], workflow_logic.launch

    def recorded(*args, **kwargs):
        proc, job_id = launch(*args, **kwargs)
        launched.append(proc)
        return proc, job_id

    monkeypatch.setattr(workflow_logic, "launch", recorded)
    yield
    for proc in launched:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=30)


def ramp(shape: tuple[int, ...], start: float = 0.0) -> np.ndarray:
    """An image of ``shape`` whose voxels count up from ``start``: the least a test image
    needs to be read as a scan (a blank one, every voxel the same, is refused)."""
    return start + np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)


def oblique_direction(angles=(0.3, -0.2, 0.15)) -> np.ndarray:
    """A proper rotation that is far from any axis permutation."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_volume() -> Volume:
    rng = np.random.default_rng(7)
    arr = rng.normal(0, 100, size=(6, 20, 32)).astype(np.float32)
    return Volume(arr, spacing=(0.7, 0.9, 2.5), origin=(-12.5, 30.25, 101.0), direction=oblique_direction())


@pytest.fixture
def real_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real scans not found: set VQMEDSEG_DATA or place them in ../shared/data")
    return path


def run_main(*args, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI's ``main(ARGS)`` in this process, its stdout and stderr captured: what
    :func:`run_cli` checks, without a subprocess's torch and MONAI imports (3 to 4 s each).
    For tests of what the commands do; tests of the command line as a process (exit
    codes, signals, the environment) use :func:`run_cli`."""
    import contextlib
    import io

    from VQMedSegLib.cli.main import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    r = subprocess.CompletedProcess(["vqmedseg", *argv], code, out.getvalue(), err.getvalue())
    if check and r.returncode != 0:
        raise AssertionError(f"vqmedseg {' '.join(argv)} returned {r.returncode}:\n{r.stderr[-3000:]}")
    return r


def run_cli(*args, check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m VQMedSegLib ARGS`` in a real subprocess started in ``cwd``; with ``check``,
    a non-zero exit fails the test with stderr."""
    r = subprocess.run([sys.executable, "-m", "VQMedSegLib", *map(str, args)], capture_output=True, text=True,
                       encoding="utf-8", errors="replace", cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"vqmedseg {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r


def one_case_workspace(folder: Path, dataset: str, task: str, case_id: str, ct_shape: tuple[int, int, int], seed: int,
                       *annotate: str) -> Path:
    """``folder/ws``, a workspace for ``task`` holding one phantom case of ``dataset``
    (its CT written to ``folder/ct.nrrd``, its labels to ``folder/label.nrrd``), annotated
    through the command line with the options ``annotate`` (``--slices 3-6`` ...)."""
    from VQMedSegLib.data.io import write_volume
    from VQMedSegLib.data.phantoms import make_dataset

    case = make_dataset(dataset, 1, seed=seed, ct_shape=ct_shape)[0]
    write_volume(case.ct, folder / "ct.nrrd")
    write_volume(case.ct_label, folder / "label.nrrd")
    ws = folder / "ws"
    run_main("workspace", "init", ws, "--task", task)
    run_main("workspace", "add", ws, "--case", case_id, "--ct", folder / "ct.nrrd")
    run_main("workspace", "annotate", ws, "--case", case_id, "--label", folder / "label.nrrd", *annotate)
    return ws
