"""Stochastic rounding of float32 results into bf16 / fp16 weights.

Why: a bf16 weight has 8 significant bits, so an update smaller than half
the spacing around the weight (``|w|·2⁻⁹``) is rounded away when it is
written back to nearest. At fine-tuning learning rates that is most of
them: a pure-bf16 GaLore run then barely trains (docs/benchmarks.md,
"bf16 weights"). Rounding up with probability ``(x − lo)/(hi − lo)``
instead makes the stored weight an unbiased estimate of the float32 result,
so small updates move the weight on average, as INT8 weights already do
(``int8.py``).

How, cheaply and without a host sync: the new weight is computed in float32
one block of values at a time (``block_elements``: bounded extra memory),
a random integer below ``2¹⁶`` is added to each float32 bit pattern and the
low 16 bits are dropped (for bf16: its pattern is the top half of the
float32 one). Consecutive bf16 values are ``2¹⁶`` patterns apart and the
value is linear in the pattern between them, so this rounds up with exactly
the right probability. fp16 drops 13 bits the same way; its subnormal range
(``|x| < 2⁻¹⁴``) rounds on the fixed ``2⁻²⁴`` grid instead.

The random integers are a window of a fixed table (``noise_table``: every
16-bit value equally often, shuffled once per device) starting at an
offset hashed from ``(key, block)``; ``key`` mixes the group's ``sr_seed``,
the parameter's position in the optimizer and its ``step`` counter
(``GaLoreOptimizer._rounding_key``). Each element's random value is thus
exactly uniform for a uniform offset, a fresh one every step, and nothing
but the existing ``step`` tensor is state: a resumed run rounds bit for bit
as the uninterrupted one. Reading a window costs no extra pass over the
weight, unlike hashing every element index.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ..projectors.randomized import derive_seed

#: Weight dtypes whose updates are rounded stochastically (group key ``stochastic_rounding``).
SR_DTYPES = (torch.bfloat16, torch.float16)
#: Values rounded per block on the CPU: a 1 MiB float32 temporary, about cache-sized.
BLOCK_ELEMENTS = 1 << 18
#: ... and on accelerators (16 MiB): there every block costs a few kernel launches, which dominate.
DEVICE_BLOCK_ELEMENTS = 1 << 22
#: Entries of the CPU's noise table (4 MiB of int32); each 16-bit value appears 16 times.
TABLE_SIZE = 1 << 20
_TABLE_SEED = 0x5EED_B16
_TABLES: dict[tuple[torch.device, int], torch.Tensor] = {}
_SCRATCH: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
_LITTLE_ENDIAN = sys.byteorder == "little"


def block_elements(device: torch.device) -> int:
    """Values rounded per block on ``device`` (``BLOCK_ELEMENTS`` on the CPU, else ``DEVICE_BLOCK_ELEMENTS``)."""
    return BLOCK_ELEMENTS if torch.device(device).type == "cpu" else DEVICE_BLOCK_ELEMENTS


def table_size(device: torch.device) -> int:
    """Entries of ``device``'s noise table: ``TABLE_SIZE``, or one accelerator block (16 MiB)."""
    return max(TABLE_SIZE, block_elements(device))


def noise_table(device: torch.device, bits: int = 16) -> torch.Tensor:
    """``table_size`` int32 values in ``[0, 2**bits)``, each equally often, in a fixed shuffled order (cached)."""
    device = torch.device(device)
    key = (device, bits)
    table = _TABLES.get(key)
    if table is None:
        size = table_size(device)
        generator = torch.Generator().manual_seed(_TABLE_SEED)
        values = torch.arange(size, dtype=torch.int32) & 0xFFFF
        values = values[torch.randperm(size, generator=generator)] >> (16 - bits)
        table = _TABLES[key] = values.to(device)
    return table


def scratch(device: torch.device, dtype: torch.dtype, numel: int, slot: int = 0) -> torch.Tensor:
    """A reused 1-D work buffer of at least ``numel`` elements (its first ``numel`` returned).

    Re-allocating the per-block temporaries costs more than the rounding on
    CPU; one buffer per (device, dtype, slot) grows to the largest block and
    is kept (at most one block unless a single row is longer).
    Work on one device is serialised (one stream, or autograd's one thread
    per device for layer-wise hooks), so reuse is safe.
    """
    key = (torch.device(device), dtype, slot)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return buffer[:numel]


def _windows(numel: int, key: int, block: int, size: int):
    """``(start, stop, table_start)`` pieces covering ``numel`` values from a hashed offset in a table of ``size``."""
    offset = derive_seed(key, block) % size
    start = 0
    while start < numel:
        length = min(numel - start, size - offset)
        yield start, start + length, offset
        start += length
        offset = 0


def _noise(numel: int, key: int, block: int, device: torch.device, bits: int) -> torch.Tensor:
    table = noise_table(device, bits)
    pieces = [table[o : o + stop - start] for start, stop, o in _windows(numel, key, block, table.numel())]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def round_into_(out: torch.Tensor, master: torch.Tensor, key: int, block: int = 0) -> None:
    """``out ← stochastic_round(master)`` for a contiguous bf16 / fp16 ``out`` and float32 ``master``.

    ``master`` (same number of elements, contiguous) is overwritten. The
    random values depend only on ``(key, block)``: calling again with the
    same arguments rounds identically.
    """
    if out.dtype not in SR_DTYPES:
        raise TypeError(f"stochastic rounding writes bf16 or fp16 tensors, got {out.dtype}")
    flat = master.view(-1)
    ints = flat.view(torch.int32)
    if out.dtype == torch.bfloat16:
        table = noise_table(master.device, 16)
        for start, stop, offset in _windows(ints.numel(), key, block, table.numel()):
            ints[start:stop].add_(table[offset : offset + stop - start])
        if _LITTLE_ENDIAN:  # bf16 is the high half of the float32 pattern: copy it, no mask pass
            out.view(-1).view(torch.int16).copy_(ints.view(torch.int16)[1::2])
        else:  # pragma: no cover - big-endian hosts
            ints.bitwise_and_(-(1 << 16))
            out.view(-1).copy_(flat)
        return
    noise = _noise(ints.numel(), key, block, master.device, 16)
    tiny = flat.abs() < 2.0**-14  # fp16 subnormals: a fixed grid of 2⁻²⁴
    sub = flat.mul(2.0**24).add_(noise.float().mul_(2.0**-16)).floor_().mul_(2.0**-24)
    ints.add_(noise >> 3).bitwise_and_(-(1 << 13))
    out.view(-1).copy_(torch.where(tiny, sub, flat))


def write_rounded_(
    param: torch.Tensor,
    fill: Callable[[torch.Tensor, int, int], None],
    key: int,
    *,
    block_size: int | None = None,
) -> None:
    """``param ← SR(new)``, where ``fill(master, start, stop)`` turns ``master`` into the new values.

    ``master`` is a float32 copy of the flattened elements ``[start, stop)``
    of ``param`` (one block of ``block_size`` elements, by default
    :func:`block_elements` of its device; the last one shorter),
    updated in place by ``fill``. A strided parameter goes through one
    full-size temporary, with the same blocks and the same result.
    """
    block_size = block_elements(param.device) if block_size is None else block_size
    contiguous = param.is_contiguous()
    out = param.view(-1) if contiguous else torch.empty(param.numel(), dtype=param.dtype, device=param.device)
    source = out if contiguous else param.reshape(-1)
    for block, start in enumerate(range(0, out.numel(), block_size)):
        stop = min(start + block_size, out.numel())
        master = scratch(param.device, torch.float32, stop - start)
        master.copy_(source[start:stop])
        fill(master, start, stop)
        round_into_(out[start:stop], master, key, block)
    if not contiguous:
        param.copy_(out.view(param.shape))


def add_rounded_(
    param: torch.Tensor, delta: torch.Tensor, *, alpha: float, decay: float | torch.Tensor | None, key: int
) -> None:
    """``param ← SR(param·decay + alpha·delta)`` (``decay=None``: no decay), computed in float32 block by block."""
    flat = delta.reshape(-1)

    def fill(master: torch.Tensor, start: int, stop: int) -> None:
        if decay is not None:
            master.mul_(decay)
        master.add_(flat[start:stop], alpha=alpha)

    write_rounded_(param, fill, key)


__all__ = [
    "BLOCK_ELEMENTS",
    "DEVICE_BLOCK_ELEMENTS",
    "SR_DTYPES",
    "TABLE_SIZE",
    "add_rounded_",
    "block_elements",
    "noise_table",
    "round_into_",
    "scratch",
    "table_size",
    "write_rounded_",
]
