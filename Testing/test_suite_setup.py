"""How the suite itself runs: its test files in parallel under pytest-xdist, one worker
per usable core up to a cap, and a file's tests on one worker (the demo is built once)."""

from __future__ import annotations

from importlib.metadata import requires

import pytest

import conftest


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 2), (3, 3), (64, conftest.MAX_WORKERS)])
def test_auto_gives_one_worker_per_usable_core_up_to_the_cap(monkeypatch, cores, workers):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(conftest, "usable_cores", lambda: cores)
    assert conftest.pytest_xdist_auto_num_workers(None) == workers


def test_pytest_xdists_own_variable_decides_when_set(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "7")
    assert conftest.pytest_xdist_auto_num_workers(None) is None  # pytest-xdist's own hook then reads it


def test_the_suite_runs_files_in_parallel_and_installs_what_that_needs(pytestconfig):
    addopts = pytestconfig.getini("addopts")  # pyproject's [tool.pytest.ini_options]
    assert addopts[addopts.index("-n") + 1] == "auto"
    # by file: a file's module-scoped fixtures (the demo's run, minutes) are built once, not once per worker
    assert addopts[addopts.index("--dist") + 1] == "loadfile"
    installed = requires("vqmedseg")  # the installed package's metadata, extras included
    for extra in ("test", "all"):  # the README installs `all`
        assert any(r.startswith("pytest-xdist") and f'extra == "{extra}"' in r for r in installed), (extra, installed)
