"""Counters of what the low-rank machinery did, read by ``GaLoreCallback``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import torch


@dataclass
class RefreshStats:
    """Running totals since the optimizer was built (not checkpointed).

    ``overlap_*`` accumulate the subspace overlap between each refreshed basis
    and the one it replaced (1 = same subspace, see ``subspace_overlap``).
    ``skipped_steps`` counts updates skipped for a non-finite gradient (one per
    optimizer step; one per weight in layer-wise mode): it is kept as a device
    tensor and read only when asked for, so counting never syncs the device.
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
    #: running sum of the found-inf flags (a 0-dim float32 tensor on the gradients' device)
    _skip_flags: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def record_skip(self, found_inf: torch.Tensor) -> None:
        """Add a step's found-inf flag (0 or 1) to the count, on its device.

        On the CPU the flag is checked at once (no device to wait for) so the
        warning comes at the skipped step; elsewhere it comes when the count
        is read (``GaLoreCallback`` reads it at every log).
        """
        if self._skip_flags is None:
            self._skip_flags = torch.zeros((), dtype=torch.float32, device=found_inf.device)
        self._skip_flags += found_inf.to(self._skip_flags.device)
        if self._skip_flags.device.type == "cpu" and "skipped_step" not in self.warned:
            self._warn_if_skipped()

    @property
    def skipped_steps(self) -> int:
        """Updates skipped because a gradient held a NaN/Inf (reads the device counter)."""
        self._warn_if_skipped()
        return 0 if self._skip_flags is None else int(self._skip_flags)

    def _warn_if_skipped(self) -> None:
        if self._skip_flags is not None and "skipped_step" not in self.warned and bool(self._skip_flags):
            self.warn_once(
                "skipped_step",
                "GaLore: a gradient held NaN/Inf; that optimizer step was skipped (weights and optimizer state "
                "kept). Counted in `galore_stats.skipped_steps`; set `skip_nonfinite=False` to update anyway",
            )

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
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("warned", "_skip_flags")}
        out["skipped_steps"] = self.skipped_steps
        out["mean_overlap"] = self.mean_overlap
        return out
