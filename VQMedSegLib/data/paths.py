"""Where the real sample scans live: ``$VQMEDSEG_DATA``, else ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """The folder of real scans, or ``None`` when neither location exists."""
    env = os.environ.get("VQMEDSEG_DATA")
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    for candidate in (_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None
