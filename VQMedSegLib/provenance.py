"""What a result file records about the software that produced it."""

from __future__ import annotations

import os
import platform


def software_versions() -> dict:
    import numpy as np
    import torch

    from . import __version__, _monai  # noqa: F401  (before MONAI; see _monai.py)

    import monai

    return {"vqmedseg": __version__, "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def compute_environment(device) -> dict:
    """Where a run's seconds were spent: the device, torch's threads and the machine's CPUs."""
    import torch

    return {"device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
