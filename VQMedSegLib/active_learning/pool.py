"""The pool of candidate CT slices, each paired with an MR slice.

CT and MR need no spatial or patient correspondence (in CHAOS they come from different
people). A CT slice is paired with the MR slice at the same **relative position within
the body**: 0 at the lowest slice that shows the body, 1 at the highest, measured along
the patient's inferior-superior axis. The MR comes from the same patient when that
patient has one, otherwise from an MR case drawn deterministically from the seed and
the CT case's identifier. A pool with no MR at all pairs nothing (``pair == -1``) and the
models run CT-only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.preprocessing import extract_ct_slices, extract_label_slices, extract_slices, mr_normalize, plan_slices
from ..data.volume import Volume
from ..errors import InputError

BODY_CT = 0.05  # windowed CT above this is body (air and zero padding are 0)
BODY_MR = 0.08  # normalised MR intensity above this is body
BODY_FRACTION = 0.02  # a slice shows the body when this share of its pixels is body


@dataclass
class CaseInput:
    """One case for the pool: a CT with optional label (oracle) and optional MR."""

    case_id: str
    ct: Volume
    label: Volume | None = None  # binary target mask on the CT grid (simulation oracle)
    mr: Volume | None = None


def target_case(case_id: str, ct: Volume, label: Volume, mr: Volume | None = None, value: int = 1) -> CaseInput:
    """A pool case whose oracle is the voxels of ``label`` equal to ``value``.

    The default is the liver: label 1 in CHAOS and in the phantoms (``LIVER_LABELS``).
    """
    return CaseInput(case_id, ct, label.with_array((label.array == value).astype(np.uint8)), mr)


@dataclass
class SlicePool:
    """Arrays over all candidate CT slices (``N``) and all MR slices (``M``).

    ``ct (N, 1, S, S)``, ``labels (N, S, S)`` or ``None``, ``case_ids (N,)``,
    ``slice_index (N,)`` index along the case's slice axis in the CT's own voxel space,
    ``position (N,)`` relative position in the body, ``mr (M, 1, S, S)``,
    ``mr_case_ids (M,)``, ``mr_position (M,)``, ``pair (N,)`` index into ``mr`` or -1.
    """

    ct: np.ndarray
    labels: np.ndarray | None
    case_ids: np.ndarray
    slice_index: np.ndarray
    position: np.ndarray
    mr: np.ndarray
    mr_case_ids: np.ndarray
    mr_position: np.ndarray
    pair: np.ndarray
    size: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ct)

    @property
    def has_mr(self) -> bool:
        return len(self.mr) > 0

    def key(self, i: int) -> tuple[str, int]:
        return str(self.case_ids[i]), int(self.slice_index[i])

    def index_of(self) -> dict[tuple[str, int], int]:
        return {self.key(i): i for i in range(len(self))}

    def cases(self) -> list[str]:
        return list(dict.fromkeys(self.case_ids.tolist()))

    def subset(self, idx: np.ndarray, group: str | None = None) -> "SlicePool":
        """The slices ``idx`` (sharing the MR arrays); ``group`` renames them all as one case."""
        return SlicePool(
            ct=self.ct[idx],
            labels=self.labels[idx] if self.labels is not None else None,
            case_ids=np.array([group] * len(idx)) if group is not None else self.case_ids[idx],
            slice_index=self.slice_index[idx],
            position=self.position[idx],
            mr=self.mr,
            mr_case_ids=self.mr_case_ids,
            mr_position=self.mr_position,
            pair=self.pair[idx],
            size=self.size,
        )

    def tensors(self, idx: np.ndarray, device):
        """:meth:`batch` as tensors on ``device``: the arguments of a VQ-BEGAL forward pass."""
        import torch

        ct, mr, present = self.batch(idx)
        return (
            torch.as_tensor(ct, device=device),
            torch.as_tensor(mr, device=device) if mr is not None else None,
            torch.as_tensor(present, device=device),
        )

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """CT slices, paired MR slices (None if the pool has no MR) and the MR-present mask."""
        ct = self.ct[idx]
        if not self.has_mr:
            return ct, None, np.zeros(len(idx), bool)
        p = self.pair[idx]
        present = p >= 0
        mr = self.mr[np.where(present, p, 0)].copy()
        mr[~present] = 0
        return ct, mr, present


def body_positions(normalised_slices: np.ndarray, threshold: float) -> np.ndarray:
    """Relative position (0..1) of each slice between the first and last that show the body."""
    frac = (normalised_slices.reshape(len(normalised_slices), -1) > threshold).mean(axis=1)
    body = np.flatnonzero(frac > BODY_FRACTION)
    n = len(normalised_slices)
    if len(body) < 2:
        return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)
    first, last = body[0], body[-1]
    return np.clip((np.arange(n) - first) / (last - first), 0.0, 1.0)


def _stable_rng(seed: int, text: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _allocate(storage: Path | None, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An array in memory, or a memory-mapped ``.npy`` file under ``storage``."""
    if storage is None:
        return np.empty(shape, dtype)
    storage.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(storage / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def build_pool(
    cases: list[CaseInput],
    size: int,
    ct_window: tuple[float, float],
    seed: int = 0,
    extra_mr: list[tuple[str, Volume]] | None = None,
    storage: Path | None = None,
) -> SlicePool:
    """Slice, normalise and pair every case; ``extra_mr`` adds MR-only cases (other patients).

    With ``storage``, the slice arrays are memory-mapped ``.npy`` files in that folder,
    filled case by case: the pool's slices then live in the page cache, not in the
    process's memory, whatever the number of slices.
    """
    if not cases:
        raise InputError("slice pool: found no CT case, expected at least one")
    ids, index, pos = [], [], []
    mr_ids, mr_pos = [], []
    mr_sources = [(c.case_id, c.mr) for c in cases if c.mr is not None] + list(extra_mr or [])
    mr_plans = [(mr_id, mr, plan_slices(mr, size)) for mr_id, mr in mr_sources]
    ct_plans = [(case, plan_slices(case.ct, size)) for case in cases]
    mr_arr = _allocate(storage, "mr", (sum(p.n_slices for _, _, p in mr_plans), 1, size, size), np.float32)
    mr_range: dict[str, tuple[int, int]] = {}
    start = 0
    for mr_id, mr, plan in mr_plans:
        slices = extract_slices(mr, plan, values=mr_normalize(mr.array))
        mr_arr[start : start + len(slices), 0] = slices
        mr_ids += [mr_id] * len(slices)
        mr_pos.append(body_positions(slices, BODY_MR))
        mr_range[mr_id] = (start, start + len(slices))
        start += len(slices)
    have_labels = all(c.label is not None for c in cases)
    n_ct = sum(p.n_slices for _, p in ct_plans)
    ct_arr = _allocate(storage, "ct", (n_ct, 1, size, size), np.float32)
    labels = _allocate(storage, "labels", (n_ct, size, size), np.int64) if have_labels else None
    start = 0
    for case, plan in ct_plans:
        slices = extract_ct_slices(case.ct, plan, ct_window)
        ct_arr[start : start + len(slices), 0] = slices
        if labels is not None:
            labels[start : start + len(slices)] = extract_label_slices(case.label.array > 0, plan)
        start += len(slices)
        ids += [case.case_id] * plan.n_slices
        index.append(np.array([plan.canonical_to_index_slice(s) for s in range(plan.n_slices)]))
        pos.append(body_positions(slices, BODY_CT))
    position = np.concatenate(pos)
    mr_position = np.concatenate(mr_pos) if mr_pos else np.zeros(0)
    case_ids = np.array(ids)
    pair = np.full(len(case_ids), -1, dtype=np.int64)
    if mr_range:
        mr_names = sorted(mr_range)
        for case in cases:
            rows = np.flatnonzero(case_ids == case.case_id)
            partner = case.case_id if case.case_id in mr_range else mr_names[_stable_rng(seed, case.case_id).integers(len(mr_names))]
            lo, hi = mr_range[partner]
            cand = mr_position[lo:hi]
            pair[rows] = lo + np.abs(position[rows, None] - cand[None, :]).argmin(axis=1)
    for array in (ct_arr, mr_arr, labels):
        if isinstance(array, np.memmap):
            array.flush()
    return SlicePool(
        ct=ct_arr,
        labels=labels,
        case_ids=case_ids,
        slice_index=np.concatenate(index),
        position=position,
        mr=mr_arr,
        mr_case_ids=np.array(mr_ids),
        mr_position=mr_position,
        pair=pair,
        size=size,
    )
