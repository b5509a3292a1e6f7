"""Import MONAI without transformers' BERT. Every library module imports this before MONAI.

``import monai`` loads all of MONAI's subpackages, and ``monai.networks.nets.transchex``
imports BERT from ``transformers`` when that package is installed (it is, for the DINOv2
foundation model): about half of MONAI's import time, paid by every process the library
starts (each ``vqmedseg`` command, each background job of the Slicer module). Nothing
here uses Transchex. While MONAI loads, ``transformers`` is marked as absent, so MONAI's
``optional_import`` records it as missing for Transchex alone; afterwards the mark is
removed and ``import transformers`` works as usual (DINOv2 loads it when asked).

Should a MONAI version ever need transformers to import at all, MONAI is imported again
the ordinary way.
"""

from __future__ import annotations

import sys


def _import_monai_without_transformers() -> None:
    if "monai" in sys.modules or "transformers" in sys.modules:
        return  # already paid for, or nothing to save
    sys.modules["transformers"] = None  # type: ignore[assignment]  # 'import transformers' raises ImportError
    try:
        import monai  # noqa: F401
    except ImportError:
        for name in [n for n in sys.modules if n == "monai" or n.startswith("monai.")]:
            del sys.modules[name]
    finally:
        del sys.modules["transformers"]
    import monai  # noqa: F401,F811  (a no-op after the guarded import; the ordinary import after a failed one)


_import_monai_without_transformers()
