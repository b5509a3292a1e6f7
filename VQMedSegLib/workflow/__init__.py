"""The Slicer module's workflow on an MRML scene, free of Qt (see :mod:`.logic`)."""

from .logic import WorkflowLogic, case_id_for

__all__ = ["WorkflowLogic", "case_id_for"]
