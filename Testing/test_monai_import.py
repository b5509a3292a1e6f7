"""MONAI is imported without transformers' BERT, which MONAI's Transchex (unused here)
pulls in at import time: about half of MONAI's import, in every process the library
starts (each `vqmedseg` command, each background job)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "VQMedSegLib"


def _imports(tree):
    """(line, top-level module) of every import statement, in the order of the file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module.split(".")[0]
            else:
                yield from ((node.lineno, a.name) for a in node.names if a.name == "_monai")


def test_every_library_module_imports_monai_through_the_guard():
    unguarded = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if path.name == "_monai.py":
            continue
        found = sorted(_imports(ast.parse(path.read_text(encoding="utf-8"))))
        monai = [line for line, name in found if name == "monai"]
        guard = [line for line, name in found if name == "_monai"]
        if monai and (not guard or min(guard) > min(monai)):
            unguarded.append(f"{path.relative_to(LIBRARY.parent)}:{min(monai)}")
    assert not unguarded, f"import VQMedSegLib._monai before monai in: {', '.join(unguarded)}"


def test_the_library_loads_monai_without_bert_and_transformers_still_imports_afterwards():
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[all]'")
    code = ("import sys, VQMedSegLib.training.vqseg, VQMedSegLib.metrics.segmentation\n"
            "print('monai' in sys.modules, 'transformers.models.bert.modeling_bert' in sys.modules)\n"
            "from transformers import Dinov2Config\n"
            "print(Dinov2Config(hidden_size=32).hidden_size)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=LIBRARY.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "32"]


def test_a_monai_that_needs_transformers_to_import_is_imported_the_ordinary_way(tmp_path):
    (tmp_path / "monai").mkdir()
    (tmp_path / "monai" / "__init__.py").write_text("import transformers\nloaded_with = transformers.NAME\n", encoding="utf-8")
    (tmp_path / "monai" / "sub.py").write_text("", encoding="utf-8")
    (tmp_path / "transformers.py").write_text("NAME = 'transformers'\n", encoding="utf-8")
    code = "import sys, VQMedSegLib._monai, monai\nprint(monai.loaded_with, sys.modules['transformers'] is not None)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=LIBRARY.parent, env={**os.environ, "PYTHONPATH": f"{tmp_path}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["transformers", "True"]
