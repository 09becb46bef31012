"""The result of ``estimate_memory``: bytes by component, as a table or a JSON-ready dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FIELDS = ("weights", "gradients", "optimizer_states", "activations", "total")


# --------------------------------------------------------------------------- result
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step, by component; ``total`` is their sum.

    ``optimizer_states`` includes ``projection_bases`` (the GaLore bases,
    reported separately because the papers count them differently).
    ``transient`` is the largest working set of one refresh or one weight's
    update (float32 copies, sketches, kernel temporaries), which lives on
    top of ``total`` for a moment: ``peak = total + transient``.
    """

    method: str
    dtype: str
    rank: int | None
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    projection_bases: int = 0
    total_params: int = 0
    trainable_params: int = 0
    lowrank_params: int = 0
    transient: int = 0
    notes: tuple[str, ...] = ()
    total: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.weights + self.gradients + self.optimizer_states + self.activations)

    @property
    def peak(self) -> int:
        """The predicted high-water mark of a step: ``total`` plus the largest transient working set."""
        return self.total + self.transient

    @property
    def weights_and_states(self) -> int:
        """What GaLore's Tables 2 and 6 call "memory": weights + optimizer states."""
        return self.weights + self.optimizer_states

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; byte fields keep the names of the dataclass."""
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        out["peak"] = self.peak
        return out

    def to_table(self) -> str:
        """A short human-readable table (bytes, GiB and GB)."""
        head = f"method={self.method}  dtype={self.dtype}" + (f"  rank={self.rank}" if self.rank else "")
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer_states", self.optimizer_states),
            ("  of which projection_bases", self.projection_bases),
            ("activations", self.activations),
            ("total", self.total),
            ("transient (refresh / update)", self.transient),
            ("peak", self.peak),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [head, f"{'component':<{width}}  {'bytes':>17}  {'GiB':>9}  {'GB':>9}"]
        for name, value in rows:
            lines.append(f"{name:<{width}}  {value:>17,}  {value / 2**30:>9.3f}  {value / 1e9:>9.3f}")
        lines.append(
            f"parameters: {self.total_params:,} total, {self.trainable_params:,} trainable, "
            f"{self.lowrank_params:,} in projected/adapted weights"
        )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


