"""Counters of what the low-rank machinery did, read by ``GaLoreCallback``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields


@dataclass
class RefreshStats:
    """Running totals since the optimizer was built (not checkpointed).

    ``overlap_*`` accumulate the subspace overlap between each refreshed basis
    and the one it replaced (1 = same subspace, see ``subspace_overlap``).
    """

    refreshes: int = 0
    refresh_seconds: float = 0.0
    skipped_nonfinite: int = 0
    refresh_failures: int = 0
    fallbacks: int = 0
    #: randomized refreshes whose estimated energy stayed below ``energy_threshold``: exact SVD used
    energy_fallbacks: int = 0
    #: weights whose state was re-made because `rank` / `proj_type` changed during training
    state_resets: int = 0
    #: non-finite bases found in a loaded state_dict, dropped and recomputed
    dropped_bases: int = 0
    overlap_sum: float = 0.0
    overlap_count: int = 0
    #: causes already warned about, so each is reported once per optimizer
    warned: set = field(default_factory=set, repr=False, compare=False)

    def warn_once(self, cause: str, message: str) -> None:
        """Warn the first time ``cause`` happens in this optimizer, not once per weight."""
        if cause not in self.warned:
            self.warned.add(cause)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def record_overlap(self, value: float) -> None:
        self.overlap_sum += value
        self.overlap_count += 1

    @property
    def mean_overlap(self) -> float | None:
        return self.overlap_sum / self.overlap_count if self.overlap_count else None

    def as_dict(self) -> dict[str, float | int | None]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "warned"}
        out["mean_overlap"] = self.mean_overlap
        return out
