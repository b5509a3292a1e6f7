"""Checkpoints: plain tensors and JSON-like metadata, loaded without running code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, so
``torch.load(..., weights_only=True)`` can read it: a file someone hands you cannot
execute anything. Every checkpoint carries ``format_version``, the ``method`` that made
it and the configuration it was trained with; :func:`load_checkpoint` checks them before
anything uses the weights.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..files import atomic_path

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format_version", "method", "model", "state_dict")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically; adds ``format_version`` when missing."""
    payload = {"format_version": CHECKPOINT_FORMAT, **payload}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    methods: tuple[str, ...] | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load and validate a checkpoint.

    Args:
        methods: accepted ``method`` values (``None`` accepts any).
    Raises:
        InputError naming the file when it is missing, not a checkpoint, unsafe (holds
        objects other than tensors and plain data), from a newer format, or from
        another method.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: not found, expected a .pt file written by VQMedSeg")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False, which this tool never does
        raise InputError(
            f"checkpoint {path}: refused, it is not tensors and plain data (objects of other kinds, or not a checkpoint "
            "at all), and is never loaded in a way that could run code; only checkpoints written by VQMedSeg are accepted"
        ) from None
    except Exception as exc:  # a text or truncated file fails in the unpickler in many ways (KeyError, EOFError ...)
        raise InputError(f"checkpoint {path}: cannot be read ({type(exc).__name__}); expected a VQMedSeg .pt file") from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(payload, dict) or k not in payload]
        raise InputError(f"checkpoint {path}: missing {', '.join(missing)}; expected a VQMedSeg checkpoint")
    version = payload["format_version"]
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise InputError(
            f"checkpoint {path}: format version {version!r} is newer than this VQMedSeg reads (up to {CHECKPOINT_FORMAT})"
        )
    if methods is not None and payload["method"] not in methods:
        raise InputError(
            f"checkpoint {path}: made by method {payload['method']!r}, expected {' or '.join(map(repr, methods))}"
        )
    return payload


def load_resume_checkpoint(path: Path, methods: tuple[str, ...], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`load_checkpoint` for a training's resume point (``checkpoints/<method>/last.pt``),
    whose error says how to go on: it is written atomically, so an unreadable one was
    damaged from outside, and training can only start again without it."""
    try:
        return load_checkpoint(path, methods=methods, map_location=map_location)
    except InputError as exc:
        raise InputError(f"{exc}. It is where an interrupted training resumes from: delete it to train from the start "
                         "(the models already made are kept)") from None
