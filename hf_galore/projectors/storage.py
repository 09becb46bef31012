"""How a basis is stored between steps, selected by the param-group key ``quant``.

A codec turns a float32 basis into plain tensors kept in the optimizer state
and back. ``None`` keeps the basis as a dense tensor in the parameter's
dtype (galore-torch's behaviour); quantized codecs register themselves here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..declare import Option
from ..registry import Registry


class BasisCodec(ABC):
    """Encode a basis into ``state`` under ``key`` and decode it back."""

    name: ClassVar[str | None]
    #: the group keys this codec reads (every low-rank group accepts them); its bytes are measured
    #: by encoding a basis (``hf_galore.memory.basis_bytes``), so it declares no state layout
    options: ClassVar[tuple[Option, ...]] = ()

    @abstractmethod
    def encode(
        self, state: dict, key: str, basis: torch.Tensor, dtype: torch.dtype, *, group: dict | None = None
    ) -> None:
        """Store ``basis`` (float32, ``(k, r)``) in ``state`` under names derived from ``key``.

        ``group`` is the param group, for codec options such as ``quant_group_size``.
        """

    @abstractmethod
    def decode(self, state: dict, key: str) -> torch.Tensor | None:
        """Return the stored basis (any float dtype), or ``None`` if none is stored yet."""

    def stored_shape(self, state: dict, key: str) -> tuple[int, ...] | None:
        """Shape of the stored basis (a tuple or ``torch.Size``), read without decoding it (checked every step)."""
        basis = self.decode(state, key)
        return None if basis is None else tuple(basis.shape)

    def layout_problem(self, state: dict, key: str) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
        """A stored tensor whose size disagrees with the stored shape: ``(key, expected, found)``, else ``None``.

        Checked when a checkpoint is loaded, so a truncated or edited entry
        is refused by name instead of failing inside a kernel.
        """
        return None

    def drop(self, state: dict, key: str) -> None:
        """Remove the stored basis (the next step computes a new one)."""
        state.pop(key, None)


class DenseCodec(BasisCodec):
    """The basis as one dense tensor in the parameter's dtype."""

    name = None

    def encode(self, state, key, basis, dtype, *, group=None):
        state[key] = basis.to(dtype)

    def decode(self, state, key):
        return state.get(key)

    def stored_shape(self, state, key):
        basis = state.get(key)
        return None if basis is None else basis.shape


CODECS: Registry[BasisCodec] = Registry("quant", "quant codec", declares_options=True)
register_codec = CODECS.register
get_codec = CODECS.lookup


register_codec(DenseCodec())
# Quantized codecs (Int8Codec, Int4Codec) live in ``quantized.py`` and are
# registered by the package ``__init__`` (importing them here would be circular).
