"""How the suite itself runs: its test files in parallel under pytest-xdist, one worker
per usable core up to a cap, and a file's tests on one worker (the demo is built once)."""

from __future__ import annotations

from collections import Counter
from importlib.metadata import requires
from pathlib import Path

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
    assert "--no-loadscope-reorder" in addopts  # the files go out in conftest's order, below
    installed = requires("vqmedseg")  # the installed package's metadata, extras included
    for extra in ("test", "all"):  # the README installs `all`
        assert any(r.startswith("pytest-xdist") and f'extra == "{extra}"' in r for r in installed), (extra, installed)


class _Item:
    def __init__(self, path: str, name: str, slow: bool = False):
        self.path, self.name, self.slow = Path(path), name, slow

    def get_closest_marker(self, name: str):
        return object() if name == "slow" and self.slow else None


def test_files_with_slow_tests_go_first_most_first_each_file_whole_and_in_order():
    items = [_Item("a.py", "a1"), _Item("a.py", "a2"),
             _Item("b.py", "b1"), _Item("b.py", "b2", slow=True), _Item("b.py", "b3"),
             _Item("c.py", "c1"),
             _Item("d.py", "d1", slow=True), _Item("d.py", "d2", slow=True)]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["d1", "d2", "b1", "b2", "b3", "a1", "a2", "c1"]


def test_this_sessions_files_run_slowest_first(request):
    items = request.session.items  # under pytest-xdist, every worker holds the whole collection
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    files = list(dict.fromkeys(item.path for item in items))
    assert [slow[f] for f in files] == sorted((slow[f] for f in files), reverse=True), [f.name for f in files[:5]]
