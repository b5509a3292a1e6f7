"""The Slicer module's workflow on an MRML scene, free of Qt (see :mod:`.logic`)."""

from .logic import WorkflowLogic

__all__ = ["WorkflowLogic"]
