"""The default projector: exact SVD on small weights, the guarded randomized finder on large ones.

An exact SVD costs about ``m·n·min(m, n)``; the warm-started randomized
finder (``randomized.py``) about ``m·n·(r + oversample)`` times a few rounds,
plus fixed costs (QR factorizations, a small eigen-decomposition, the energy
guard's check) that dominate on small matrices. So the randomized finder wins
on large weights at a rank well below their smaller side, and loses on small
or nearly full-rank ones. ``auto`` picks, per weight, by

    randomized  iff  m·n ≥ auto_min_numel  and  r ≤ auto_max_rank_ratio · min(m, n)

with the defaults ``auto_min_numel = 65536`` (256×256) and
``auto_max_rank_ratio = 0.5``, set from the measured crossover on a shared
2-core CPU (fp32, 2 threads, synthetic power-law gradients, median of 7
interleaved calls; ``python benchmarks/refresh.py --crossover --reps 7``,
docs/benchmarks.md): at 128×128 the guarded randomized finder is at best 1.4×
faster (r/min = 1/4) and slower from r/min = 1/2; at 128×352 and 192×192 it
wins up to r/min = 1/2 by 1.1–12×; from 256×688 up it wins at every
r/min ≤ 1/2 (1.7–20×); at r/min = 3/4 it loses or barely wins up to 512×512.
Below 256×256 a refresh costs milliseconds either way, and a weight whose
spectrum makes the energy guard fall back would pay both finders there.

Below the switch the basis is exactly ``projector="svd"``'s (the same call),
so parity with galore-torch holds there bit for bit. Above it the basis is
``projector="randomized"``'s, with its energy guard: a basis whose estimated
captured energy is below ``energy_threshold`` of the exact SVD's gets more
rounds, then the exact SVD (counted in ``energy_fallbacks``). The choice
depends only on the weight's shape, its rank and the group keys, so it is
deterministic, identical on all ranks, and needs no state of its own (resume
is bit-exact; the state bytes are those of ``svd`` / ``randomized``: none
beyond the basis).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..declare import Option, check_non_negative_int, check_positive
from ..errors import GaLoreConfigError
from .base import BasisFinder
from .randomized import RandomizedFinder
from .svd import top_singular_basis


def _check_ratio(name: str, value: object) -> float:
    ratio = check_positive(name, value)
    if ratio > 1:
        raise GaLoreConfigError(f"`{name}` must be in (0, 1] (a fraction of the smaller side), got {value!r}")
    return ratio


#: Group keys read here (declared once; every low-rank group accepts them).
OPTIONS = (
    Option("auto_min_numel", 65536, check_non_negative_int, "auto: smallest m*n that takes the randomized finder"),
    Option("auto_max_rank_ratio", 0.5, _check_ratio, "auto: largest rank/min(m, n) that takes the randomized finder"),
)
AUTO_DEFAULTS = {option.name: option.default for option in OPTIONS}


def auto_uses_randomized(shape: Sequence[int], rank: int, group: dict) -> bool:
    """Whether ``projector="auto"`` finds the basis of an ``m×n`` weight at ``rank`` with the randomized finder."""
    m, n = int(shape[0]), int(shape[1])
    min_numel = int(group.get("auto_min_numel", AUTO_DEFAULTS["auto_min_numel"]))
    ratio = float(group.get("auto_max_rank_ratio", AUTO_DEFAULTS["auto_max_rank_ratio"]))
    return m * n >= min_numel and rank <= ratio * min(m, n)


class AutoFinder(BasisFinder):
    """Exact SVD below the size switch, warm-started randomized finder with the energy guard above it.

    Group keys: ``auto_min_numel`` (65536) and ``auto_max_rank_ratio`` (0.5)
    for the switch, and the randomized finder's keys above it.
    """

    name = "auto"
    options = OPTIONS

    def __init__(self) -> None:
        self._randomized = RandomizedFinder()

    def refresh_transient_bytes(self, side, other, rank, group):
        """The randomized finder's temporaries above the switch, the exact SVD's below it."""
        if auto_uses_randomized((side, other), rank, group):
            return self._randomized.refresh_transient_bytes(side, other, rank, group)
        return super().refresh_transient_bytes(side, other, rank, group)

    def find(self, matrix, rank, side, *, previous, state, group):
        if auto_uses_randomized(matrix.shape, rank, group):
            return self._randomized.find(matrix, rank, side, previous=previous, state=state, group=group)
        return top_singular_basis(matrix, rank, side)
