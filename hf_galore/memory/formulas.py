"""Per-weight byte counts read from the components' declarations, and the activation and INT8-weight formulas."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..declare import layout_bytes
from ..errors import UnsupportedSetupError, format_choices
from ..numerics import rows_per_block
from ..optim.members import BASE_OPTIMIZERS
from ..optim.schedules import REFRESH_POLICIES
from ..optim.validation import lowrank_defaults
from ..projectors import PROJECTORS
from ..projectors.geometry import (
    effective_rank,
    matrix_shape,
    projected_shape,
    side_size,
    sides_for,
)
from ..quant.int8 import INT8_BLOCK_ELEMENTS

#: ``state["step"]``: a float32 scalar tensor per trainable tensor (as torch.optim.AdamW).
STEP_BYTES = 4


# ------------------------------------------------------------------- pure formulas
def weight_state_bytes(
    optimizer: type,
    shape: Sequence[int],
    dtype: torch.dtype,
    group: Mapping[str, Any],
    basis_cache: dict | None = None,
) -> int:
    """Optimizer-state bytes of one weight of ``shape`` in ``group``, from the components' declarations.

    ``optimizer`` is a ``GaLoreOptimizer`` subclass. A full-rank weight (no
    ``rank`` in ``group``, or fewer than 2 dimensions) holds ``step`` and the
    base update's state of its own shape. A low-rank weight holds ``step``,
    the base update's state of the projected gradient, one basis per side as
    its codec stores it, and whatever the group's projector and refresh policy
    declare (``state_layout``). The memory estimate and the start-up summary
    both call this, so they agree with each other and with the tensors held.
    """
    shape = tuple(int(s) for s in shape)
    if "rank" not in group or len(shape) < 2:
        return STEP_BYTES + optimizer.state_bytes(shape, dtype, group)
    matrix = matrix_shape(shape)
    sides = sides_for(group["proj_type"], matrix)
    rank = effective_rank(group["rank"], matrix)
    total = STEP_BYTES + optimizer.state_bytes(projected_shape(matrix, rank, sides), dtype, group)
    total += sum(
        basis_bytes(side_size(side, matrix), rank, dtype, group["quant"], basis_cache, group=group) for side in sides
    )
    for registry, key in ((PROJECTORS, "projector"), (REFRESH_POLICIES, "refresh")):
        total += layout_bytes(registry.lookup(group[key]).state_layout(matrix, rank, sides, group))
    return total


def activation_bytes(
    *,
    batch_size: int,
    seq_len: int,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    heads: int,
    kv_hidden: int,
    itemsize: int,
    checkpointing: bool,
) -> int:
    """Activations saved for backward by a LLaMA-layout decoder (fused SDPA attention).

    Counted from the tensors transformers' LlamaForCausalLM saves for
    backward (checked with ``torch.autograd.graph.saved_tensors_hooks`` in
    tests/test_memory.py). Per token and layer, with ``e`` the activation
    bytes:

    * each of the two RMSNorms: float32 input ``4h``, ``rsqrt`` ``4``, the
      normalised ``e·h`` and its output (the next linear's input) ``e·h``;
    * attention: q ``e·h``, k and v ``2·e·h_kv``, output ``e·h`` (also
      o_proj's input), log-sum-exp ``4·heads``;
    * MLP: gate output, SiLU output, up output and their product ``4·e·f``;
    * per layer and sequence position (not per batch row): RoPE cos and
      sin, ``2·e·head_dim``.

    The head keeps the final norm (``4h + 4 + 2·e·h``) and the loss's
    float32 log-softmax (``4·V``). With activation checkpointing each
    layer keeps only its input (``e·h``), and one layer is recomputed at a
    time in the backward pass, so one layer's full activations are added.
    Transient backward buffers, attention workspaces and allocator
    fragmentation are not counted (docs/memory.md).
    """
    tokens = batch_size * seq_len
    e = itemsize
    head_dim = hidden // heads
    per_layer = 2 * (4 * hidden + 4 + 2 * e * hidden) + e * (2 * hidden + 2 * kv_hidden + 4 * intermediate) + 4 * heads
    rope = 2 * e * head_dim * seq_len
    head = tokens * (4 * hidden + 4 + 2 * e * hidden + 4 * vocab)
    if checkpointing:
        return layers * tokens * e * hidden + tokens * per_layer + rope + head
    return layers * (tokens * per_layer + rope) + head


def refresh_transient_bytes(
    projector: str, side: int, other: int, rank: int, *, oversample: int = 8, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Temporaries of one basis refresh of a ``side × other`` gradient of ``dtype``.

    The float32 copy of the gradient every refresh works on (``4·k·n``; none
    for a float32 gradient, which is used as it is) plus what the finder
    declares it allocates (``BasisFinder.refresh_transient_bytes``: exact SVD
    by default, the randomized finder's sketch in ``projectors/randomized.py``).
    """
    finder = PROJECTORS.lookup(projector)
    copy = 0 if dtype == torch.float32 else 4 * side * other
    return copy + finder.refresh_transient_bytes(side, other, rank, {**lowrank_defaults(), "oversample": oversample})


def update_transient_bytes(
    base: str | type,
    shape: Sequence[int],
    low_shape: Sequence[int] | None,
    *,
    int8: bool,
    dtype: torch.dtype = torch.bfloat16,
    decoded: int = 0,
) -> int:
    """Temporaries of one weight's update, for a gradient of ``dtype``.

    Full rank: the base optimizer's kernel (its ``update_transient_bytes``).
    Low rank: the projected gradient ``R`` and ``decoded`` (the float32 bases
    a quantized codec decodes) live through the whole update, on top of the
    larger of two phases: the base optimizer's kernel on ``R``, and, for an
    INT8 weight, the write-back (the step ``U`` and its float32 copy, and one
    row block of the weight in float32 with its requantization temporaries,
    four blocks: ``Int8Linear.update_rows_``). Float weights take the
    back-projection in place (``addmm_``), or in blocks of 2¹⁸ values with
    stochastic rounding (bounded, not counted).
    """
    optimizer = BASE_OPTIMIZERS.lookup(base) if isinstance(base, str) else base
    if low_shape is None:
        return optimizer.update_transient_bytes(tuple(shape), lowrank=False, dtype=dtype)
    e = torch.empty((), dtype=dtype).element_size()
    low = math.prod(low_shape)
    kernel = optimizer.update_transient_bytes(tuple(low_shape), lowrank=True, dtype=dtype)
    write_back = 0
    if int8:
        m, n = shape[0], math.prod(shape[1:])
        rows = min(m, rows_per_block(n, INT8_BLOCK_ELEMENTS))
        write_back = e * low + (4 * low if e != 4 else 0) + 4 * 4 * rows * n
    return e * low + decoded + max(kernel, write_back)


def weight_transient_bytes(
    optimizer: type,
    shape: Sequence[int],
    group: Mapping[str, Any] | None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    int8: bool = False,
) -> int:
    """Temporaries of one weight's optimizer step: the larger of its basis refresh's and its update's.

    ``group`` is the weight's param group (``None``, or one without ``rank``,
    for a weight trained at full rank); ``dtype`` the gradient's. A refresh
    works on a float32 copy of the gradient (none for a float32 gradient)
    and the previous bases in float32, plus what the finder declares; the
    update is :func:`update_transient_bytes`. The refresh's temporaries are
    gone before the update starts, so the step's peak is the larger of the
    two; a layer-wise step adds it to whatever the backward pass holds at
    that moment. ``estimate_memory`` reports the largest over the model as
    ``transient``; ``benchmarks/step_transient.py`` measures it per shape.
    """
    shape = tuple(int(s) for s in shape)
    if group is None or "rank" not in group or len(shape) < 2:
        return update_transient_bytes(optimizer, shape, None, int8=False, dtype=dtype)
    matrix = matrix_shape(shape)
    sides = sides_for(group["proj_type"], matrix)
    rank = effective_rank(group["rank"], matrix)
    finder = PROJECTORS.lookup(group["projector"])
    numel = math.prod(matrix)
    # a quantized codec decodes each basis to a new float32 tensor; the dense one hands the stored one,
    # which the finder reads as float32 (a copy unless it is stored in float32)
    float_bases = sum(4 * side_size(side, matrix) * rank for side in sides)
    decoded = 0 if group.get("quant") is None else float_bases
    previous = float_bases if decoded or dtype != torch.float32 else 0
    copy = 0 if dtype == torch.float32 else 4 * numel
    refresh = copy + previous + max(
        finder.refresh_transient_bytes(side_size(side, matrix), numel // side_size(side, matrix), rank, group)
        for side in sides
    )
    low_shape = projected_shape(matrix, rank, sides)
    update = update_transient_bytes(optimizer, matrix, low_shape, int8=int8, dtype=dtype, decoded=decoded)
    return max(refresh, update)


# ----------------------------------------------------------------- quantized parts
def _stored_bytes(store: Callable[[dict], None]) -> int:
    state: dict = {}
    store(state)
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def basis_bytes(
    k: int, r: int, dtype: torch.dtype, quant: str | None, _cache: dict | None = None, *, group: dict | None = None
) -> int:
    """Bytes of a ``k × r`` basis as stored by the ``quant`` codec.

    Quantized codecs are measured by encoding a random basis of the same
    shape, so the figure follows the codec's real layout (packing, scales);
    ``group`` carries the codec's options (``quant_group_size``), defaults otherwise.
    """
    if quant is None:  # a dense k × r basis in the weight's dtype
        return k * r * torch.empty((), dtype=dtype).element_size()
    options = tuple(sorted((key, value) for key, value in (group or {}).items() if key.startswith("quant_")))
    key = (k, r, dtype, quant, options)
    if _cache is not None and key in _cache:
        return _cache[key]
    from ..projectors.storage import CODECS

    if quant not in CODECS:
        raise UnsupportedSetupError(
            f"basis storage `quant`={quant!r} is not available in this installation "
            f"(registered: {format_choices(CODECS)})"
        )
    basis = torch.randn(k, r, generator=torch.Generator().manual_seed(0))
    value = _stored_bytes(lambda state: CODECS[quant].encode(state, "basis", basis, dtype, group=group))
    if _cache is not None:
        _cache[key] = value
    return value


#: ``hf_galore.quant.Int8Linear``'s default group (Q-GaLore's ``--weight_group_size``).
INT8_WEIGHT_GROUP_SIZE = 256


def int8_weight_bytes(shape: Sequence[int], itemsize: int, group_size: int = INT8_WEIGHT_GROUP_SIZE) -> int:
    """Bytes of an ``Int8Linear`` weight (``hf_galore.quant``, Q-GaLore §3.4) for an ``m × n`` linear.

    int8 codes ``m·n`` + float32 scales ``4·m·⌈n/g⌉`` + the ``sr_seed`` and
    ``sr_step`` int64 buffers (16) + the placeholder parameter, a one-element
    tensor of the training dtype (its gradient is full size; see gradients).
    """
    m, n = shape[0], math.prod(shape[1:])
    return m * n + 4 * m * -(-n // group_size) + 16 + itemsize


