"""Annotation budget bookkeeping (VQ-BEGAL eq. 8-9).

Each round adds the selected slices to the labelled set, ``L = L u (S_high u S_low)``,
and spends ``b = b + 2n`` of the total budget ``B``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass
class Budget:
    total: int  # B: slices that may be annotated in all
    spent: int = 0  # b

    def __post_init__(self) -> None:
        if self.total < 0 or self.spent < 0:
            raise InputError(f"budget: found total {self.total}, spent {self.spent}; expected non-negative numbers")

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.spent)

    @property
    def exhausted(self) -> bool:
        return self.remaining == 0

    def allowance(self, requested: int) -> int:
        """How many of ``requested`` slices this round may select."""
        if requested < 0:
            raise InputError(f"slices per round: found {requested}, expected a non-negative number")
        return min(requested, self.remaining)

    def spend(self, n_high: int, n_low: int) -> None:
        """Eq. 9 (``b = b + 2n`` when both halves have n slices)."""
        n = n_high + n_low
        if n > self.remaining:
            raise InputError(f"budget: {n} slices selected but only {self.remaining} of {self.total} remain")
        self.spent += n
