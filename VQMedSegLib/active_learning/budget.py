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


def slice_amount(value: int | str, option: str, pool_size: int | None = None) -> int | str:
    """A number of slices as given: a count (``8``, ``"8"``) as an int, or a share of the
    pool (``"10%"``) as its text; anything else is refused, naming ``option``."""
    text = str(value).strip()
    pool = f"the pool's {pool_size} slices" if pool_size is not None else "the pool"
    try:
        if text.endswith("%"):
            if not 0 < float(text[:-1]) <= 100:
                raise ValueError(text)
            return text
        if int(text) < 1:
            raise ValueError(text)
        return int(text)
    except ValueError:
        raise InputError(f"{option}: found {value!r}; expected a number of slices (1 or more) "
                         f"or a share of {pool} such as 10%") from None


def slice_count(value: int | str, pool_size: int, option: str) -> int:
    """:func:`slice_amount` in slices of a pool of ``pool_size``: a share rounds half up,
    to at least one slice.

    A simulation's budgets are shares of the pool where the pool's size depends on the
    data (the CHAOS CT set here has one patient, the challenge's has 20)."""
    amount = slice_amount(value, option, pool_size)
    if isinstance(amount, int):
        return amount
    return max(1, int(pool_size * float(amount[:-1]) / 100 + 0.5))
