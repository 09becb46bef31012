"""The small interface every member of the GaLore family implements.

A *basis* is a matrix ``B`` of shape ``(k, r)`` with orthonormal columns,
where ``k`` is the size of the side it acts on:

* side ``"left"``  (``k = m``): ``R = Bᵀ G`` (``r × n``), back: ``B N``;
* side ``"right"`` (``k = n``): ``R = G B`` (``m × r``), back: ``N Bᵀ``.

Members differ only in how ``B`` is *found* (a :class:`BasisFinder`); the
geometry below (which side, projecting, projecting back) is shared by all of
them and lives in :mod:`hf_galore.projectors.geometry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from ..declare import Option, StateTensor

Side = Literal["left", "right"]


class BasisFinder(ABC):
    """Strategy that finds (and optionally tracks) the basis of one weight.

    Finders are stateless objects shared by all weights; anything a finder
    needs to remember between steps goes into the per-parameter ``state``
    dict it is handed, as plain tensors or Python scalars, so optimizer
    checkpoints load with ``torch.load(weights_only=True)``.
    """

    #: registry name used in param groups (``projector=...``)
    name: ClassVar[str]
    #: ``True`` when :meth:`track` must run on every step, not only at refreshes
    tracks_every_step: ClassVar[bool] = False
    #: the group keys this finder reads, with defaults and checks (every low-rank group accepts them)
    options: ClassVar[tuple[Option, ...]] = ()

    def state_layout(
        self, shape: tuple[int, int], rank: int, sides: Sequence[Side], group: dict
    ) -> dict[str, StateTensor]:
        """The tensors this finder keeps in a weight's state beyond the basis, once it has stepped.

        ``shape`` is the weight's 2-D shape, ``rank`` the effective rank. The
        memory estimate and the start-up summary count these bytes; under
        FSDP2 the finder runs on rank 0 of the shard group and its state is
        replicated from there. None by default.
        """
        return {}

    @abstractmethod
    def find(
        self,
        matrix: torch.Tensor,
        rank: int,
        side: Side,
        *,
        previous: torch.Tensor | None,
        state: dict,
        group: dict,
    ) -> torch.Tensor:
        """Return a ``(k, rank)`` float32 basis with orthonormal columns.

        ``matrix`` is the 2-D gradient in float32. ``previous`` is the
        current basis (float32) or ``None`` at the first refresh; finders
        may use it as a warm start.
        """

    def refresh_transient_bytes(self, side: int, other: int, rank: int, group: dict) -> int:
        """Temporaries of one refresh of a ``side × other`` gradient (``side``: the projected dimension).

        For the memory estimate's ``transient``: what :meth:`find` allocates
        beyond the float32 gradient it is handed (that copy, made for a bf16 /
        fp16 gradient, is counted by the caller's estimate). This default is the
        exact SVD's: LAPACK's copy of the input and ``Vᵀ`` (``k × n`` each) and
        ``U`` with the divide-and-conquer workspace (about ``5·k²``, float32):
        an approximation of gesdd's documented workspace, not a count of tensors.
        """
        k, n = min(side, other), max(side, other)
        return 2 * 4 * k * n + 5 * 4 * k * k

    def projects_first(self, group: dict) -> bool:
        """Whether a step projects with the basis it had before :meth:`track` moves it (OSD's Alg. 1 order)."""
        return False

    def track(
        self,
        matrix: torch.Tensor,
        basis: torch.Tensor,
        side: Side,
        *,
        state: dict,
        group: dict,
    ) -> torch.Tensor:
        """Move the basis a little on a non-refresh step (online finders only)."""
        return basis
