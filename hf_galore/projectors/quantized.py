"""Group-wise INT8 / INT4 storage of the basis (Q-GaLore, arXiv:2407.08296, §3.2).

The flattened ``(k, r)`` basis is cut into groups of ``quant_group_size``
values (group key, default 256 as in Q-GaLore). Each group keeps an
asymmetric min/max code (Q-GaLore's ``_quantize``): ``q = round((x − lo) /
scale)`` in ``[0, 2ᵇ − 1]`` with ``scale = (hi − lo) / (2ᵇ − 1)``, so every
value is recovered within ``scale / 2``. INT4 codes are packed two per byte
(q-galore-torch 1.0 stores one per byte).
``scale`` and ``lo`` are kept in float16 (4 bytes per group); the codes are
computed with the rounded values, so the bound holds for what is stored.

Bytes per value, scales included: INT8 ``1 + 4/g``, INT4 ``0.5 + 4/g``, i.e.
0.254× and 0.129× the float32 basis at ``g = 256``; the last group may be
shorter (no padding), so the ratios hold for every basis with at least
``g`` values (and INT8 for any basis with >= 6 values).

State keys for basis key ``K``: ``K_q`` (uint8 codes), ``K_scale`` and
``K_lo`` (float16 per group), ``K_shape`` (int64 ``[k, r]``), ``K_group``
(int). All plain tensors/ints, so checkpoints load with ``weights_only``;
``GaLoreOptimizer.load_state_dict`` restores the saved dtypes.
"""

from __future__ import annotations

import torch

from ..declare import Option, check_positive_int
from .storage import BasisCodec

DEFAULT_GROUP_SIZE = 256
#: shared by the INT8 and INT4 codecs (one declaration, so they agree)
GROUP_SIZE_OPTION = Option(
    "quant_group_size", DEFAULT_GROUP_SIZE, check_positive_int, "values per quantization group (Q-GaLore: 256)"
)


def quantize_groupwise(
    values: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise codes of a 1-D float tensor: ``(codes uint8, scale f16, lo f16)``.

    ``codes`` has one value per element (not yet packed).
    """
    levels = (1 << bits) - 1
    flat = values.float().reshape(-1)
    n = flat.numel()
    groups = -(-n // group_size)
    pad = groups * group_size - n
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    grid = padded.view(groups, group_size)
    if pad:  # padding must not widen the last group's range
        last = flat[(groups - 1) * group_size :]
        grid = grid.clone()
        grid[-1, group_size - pad :] = last[0]
    lo = _half_toward(grid.amin(dim=1), down=True)
    hi = grid.amax(dim=1)
    scale = _half_toward(((hi - lo) / levels).clamp_(min=1e-7), down=False)
    # lo rounded down and scale rounded up: [lo, lo + levels·scale] still covers the group
    codes = ((grid - lo[:, None]) / scale[:, None]).round_().clamp_(0, levels).to(torch.uint8)
    return codes.reshape(-1)[:n], scale.half(), lo.half()


def _half_toward(values: torch.Tensor, *, down: bool) -> torch.Tensor:
    """``values`` rounded to float16 in the given direction, returned as float32."""
    half = values.half()
    wrong = half.float() > values if down else half.float() < values
    if bool(wrong.any()):
        target = torch.full_like(half, float("-inf") if down else float("inf"))
        half = torch.where(wrong, torch.nextafter(half, target), half)
    return half.float()


def dequantize_groupwise(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groupwise` (float32, 1-D)."""
    n = codes.numel()
    idx = torch.arange(n, device=codes.device) // group_size
    return codes.float() * scale.float()[idx] + lo.float()[idx]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (low nibble first); odd lengths get a zero high nibble."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:n]


class GroupwiseCodec(BasisCodec):
    """Group-wise ``bits``-bit storage; dequantized to float32 on every use."""

    bits: int = 8
    options = (GROUP_SIZE_OPTION,)

    def encode(self, state, key, basis, dtype, *, group=None):
        group_size = int((group or {}).get("quant_group_size", DEFAULT_GROUP_SIZE))
        codes, scale, lo = quantize_groupwise(basis, self.bits, group_size)
        state[f"{key}_q"] = pack_int4(codes) if self.bits == 4 else codes
        state[f"{key}_scale"] = scale
        state[f"{key}_lo"] = lo
        state[f"{key}_shape"] = torch.tensor(list(basis.shape), dtype=torch.int64)
        state[f"{key}_group"] = group_size
        state.pop(key, None)  # a dense basis from an earlier `quant=None` run

    def decode(self, state, key):
        codes = state.get(f"{key}_q")
        if codes is None:
            return None
        rows, cols = (int(v) for v in state[f"{key}_shape"])
        n = rows * cols
        if self.bits == 4:
            codes = unpack_int4(codes, n)
        flat = dequantize_groupwise(codes, state[f"{key}_scale"], state[f"{key}_lo"], int(state[f"{key}_group"]))
        return flat.view(rows, cols)

    def stored_shape(self, state, key):
        if f"{key}_q" not in state:
            return None
        shape = state[f"{key}_shape"]
        if shape.device.type != "cpu":  # moved to the weight's device by load_state_dict: bring it back once,
            shape = state[f"{key}_shape"] = shape.cpu()  # so reading it (every step) never syncs the device
        return tuple(shape.tolist())

    def layout_problem(self, state, key):
        if f"{key}_q" not in state:
            return None
        shape = state.get(f"{key}_shape")
        if not isinstance(shape, torch.Tensor) or shape.numel() != 2:
            return (f"{key}_shape", (2,), None if shape is None else tuple(getattr(shape, "shape", ())))
        n = int(shape[0]) * int(shape[1])
        groups = -(-n // int(state.get(f"{key}_group", DEFAULT_GROUP_SIZE)))
        expected = {
            f"{key}_q": (-(-n // 2),) if self.bits == 4 else (n,),
            f"{key}_scale": (groups,),
            f"{key}_lo": (groups,),
        }
        for name, size in expected.items():
            found = state.get(name)
            found = None if found is None else tuple(found.shape)
            if found != size:
                return (name, size, found)
        return None

    def drop(self, state, key):
        for suffix in ("_q", "_scale", "_lo", "_shape", "_group"):
            state.pop(f"{key}{suffix}", None)


class Int8Codec(GroupwiseCodec):
    name = "int8"
    bits = 8


class Int4Codec(GroupwiseCodec):
    name = "int4"
    bits = 4


def stored_bytes(state: dict, key: str) -> int:
    """Bytes the stored basis occupies (codes + scales), for memory checks and reports."""
    total = 0
    for suffix in ("_q", "_scale", "_lo"):
        tensor = state.get(f"{key}{suffix}")
        if tensor is not None:
            total += tensor.numel() * tensor.element_size()
    if total == 0 and isinstance(state.get(key), torch.Tensor):
        total = state[key].numel() * state[key].element_size()
    return total
