"""``GaLoreAdamW8bit``: bitsandbytes' block-wise 8-bit Adam states, low-rank and full-rank.

bitsandbytes is called through its functional API with keyword arguments
only (positional calls broke silently when its signature changed), and
nothing here touches ``torch.cuda``, so it runs wherever bitsandbytes'
8-bit kernels do, CPU included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from .._optional import require
from ..declare import StateKey
from ..errors import GaLoreConfigError, UnsupportedSetupError
from ..quant.rounding import block_elements, scratch, write_rounded_
from .adamw import GALORE_GROUP_DOC, TORCH_FLAGS_DOC, GaLoreAdamW, betas_of
from .functional import restored_where
from .members import register_base_optimizer
from .validation import BASE_TORCH_FLAGS, check_choice, check_positive_int

#: bitsandbytes keeps tensors smaller than this in 32-bit states (its ``min_8bit_size``).
MIN_8BIT_SIZE = 4096
#: bitsandbytes' block size for block-wise quantized states.
BLOCK_SIZE = 256
#: Values per bitsandbytes call. Its CPU kernel dequantizes both moments, the gradient and
#: the weight to float32 for the whole tensor (about 28 bytes of temporaries per value: 3.4 GiB
#: for a 131M-value embedding); calling it on slices of whole 256-value blocks gives the same
#: result with bounded temporaries.
CALL_ELEMENTS = 1 << 22
#: Bytes of temporaries its CPU kernel makes per value, measured as resident memory on 4M-value
#: calls (bitsandbytes 0.50, ``benchmarks/step_transient.py``'s note in docs/memory.md): float32
#: moments and denominator for float32 inputs, and float32 copies of the gradient and the
#: weight as well for bf16 / fp16 inputs.
CPU_KERNEL_BYTES_PER_VALUE = 20
CPU_KERNEL_BYTES_PER_VALUE_16BIT = 24


def padded_length(length: int) -> int:
    """``length`` rounded up to whole 256-value quantization blocks."""
    return -(-length // BLOCK_SIZE) * BLOCK_SIZE


def lowrank_state_shape(like: tuple[int, ...]) -> tuple[int, int]:
    """Shape of the uint8 moments of a low-rank gradient ``R`` of shape ``like``: one row per direction.

    ``R`` is ``(r, n)`` (left basis: a row per direction) or ``(m, r)`` (right
    basis: a column per direction; kept transposed), so the rows of the state
    are the shorter side. Each row is padded to whole 256-value blocks: a
    quantization block then holds values of one direction only, and a direction
    with a small singular value keeps its own scale instead of sharing the
    absmax of a large neighbour (which flushes its small values to zero).
    """
    rows, length = (like[1], like[0]) if like[0] > like[1] else like
    return (rows, padded_length(length))


def _state_slice(state: dict, start: int, stop: int) -> dict:
    """The 8-bit state of the flat values ``[start, stop)`` (``start`` on a block boundary): views, no copies."""
    first, last = start // BLOCK_SIZE, -(-stop // BLOCK_SIZE)
    return {
        "step": state["step"],
        "state1": state["state1"].view(-1)[start:stop],
        "state2": state["state2"].view(-1)[start:stop],
        "absmax1": state["absmax1"][first:last],
        "absmax2": state["absmax2"][first:last],
    }


#: The state entries one kernel call writes (with ``step``, which the caller takes back).
_KERNEL_STATE = ("state1", "state2", "absmax1", "absmax2")


def _min_8bit_size(group: Any) -> int:
    """Tensors with fewer values keep 32-bit moments (bitsandbytes' ``min_8bit_size``, a group key here)."""
    return int(group.get("min_8bit_size", MIN_8BIT_SIZE))


def _check_bnb_keywords(optim_bits: Any, percentile_clipping: Any, block_wise: Any, is_paged: Any, args: Any) -> None:
    """bitsandbytes' ``AdamW8bit`` keywords: accepted where they mean what hf_galore does, else refused by name."""
    check_choice("optim_bits", optim_bits, (8, 32))  # both are 8-bit moments in bitsandbytes' AdamW8bit
    refused = (
        (
            "percentile_clipping",
            percentile_clipping,
            percentile_clipping != 100,
            (
                "bitsandbytes' percentile gradient clipping is not implemented; clip with "
                "torch.nn.utils.clip_grad_norm_ (the Trainer's `max_grad_norm`) and leave it at 100"
            ),
        ),
        ("block_wise", block_wise, block_wise is not True, "the 8-bit states are always block-wise (256 values)"),
        (
            "is_paged",
            is_paged,
            is_paged is not False,
            (
                "paged optimizer state (CUDA unified memory) is not implemented; the low-rank states are small "
                "enough to stay resident. Use `is_paged=False` (optim='adamw_bnb_8bit' rather than 'paged_adamw_8bit')"
            ),
        ),
        ("args", args, args is not None, "bitsandbytes' per-parameter config object is not read; pass keywords"),
    )
    for name, value, bad, reason in refused:
        if bad:
            raise GaLoreConfigError(f"`{name}`={value!r} is not supported by GaLoreAdamW8bit: {reason}")


def _bnb_functional():
    return require("bitsandbytes.functional", "GaLoreAdamW8bit")


@register_base_optimizer
class GaLoreAdamW8bit(GaLoreAdamW):
    __doc__ = (
        """GaLoreAdamW with both moments stored in 8 bits (block-wise, 256 values per block).

    Tensors (low-rank gradients or full-rank parameters) with fewer than
    ``min_8bit_size`` (4096) elements keep 32-bit moments, as bitsandbytes does.
    Full-rank groups are updated by the same kernel as
    ``bitsandbytes.optim.AdamW8bit``. Needs bitsandbytes
    (``pip install 'hf_galore[8bit]'``).

    bitsandbytes' (and galore-torch's ``GaLoreAdamW8bit``'s) keywords are
    accepted with their meaning: ``optim_bits`` 8 or 32 (both give 8-bit
    moments, as in ``bitsandbytes.optim.AdamW8bit``, where 32 is the
    compatibility default), ``min_8bit_size`` (honoured, also a group key);
    what hf_galore does not implement is refused by name:
    ``percentile_clipping`` other than 100, ``block_wise=False``,
    ``is_paged=True`` (paged state), ``args`` (bitsandbytes' config object).
"""
        + TORCH_FLAGS_DOC
        + GALORE_GROUP_DOC
    )

    # bitsandbytes' 8-bit kernel is a fused one (``fused=True`` names it), run one tensor at a time
    torch_flags: ClassVar[dict] = {
        **BASE_TORCH_FLAGS,
        "fused": ((None, True), "bitsandbytes' 8-bit kernel is a fused kernel; there is no unfused one"),
    }
    supports_complex = False
    _constructor_only = (
        "no_deprecation_warning",
        "optim_bits",
        "percentile_clipping",
        "block_wise",
        "is_paged",
        "args",
    )

    # bitsandbytes' kernel has no found_inf: a guarded step snapshots what each kernel call writes
    # (the slice of the weight or step buffer and of the 8-bit states, at most CALL_ELEMENTS values)
    # and puts it back with torch.where when the step is skipped, so the copy is one slice, never a
    # whole embedding and its states
    _native_found_inf = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        stochastic_rounding: bool = True,
        *,
        optim_bits: int = 32,
        min_8bit_size: int = MIN_8BIT_SIZE,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        args: Any = None,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        **torch_flags: Any,
    ) -> None:
        _check_bnb_keywords(optim_bits, percentile_clipping, block_wise, is_paged, args)
        functional = _bnb_functional()
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._create_dynamic_map = functional.create_dynamic_map
        self._update_8bit = functional.optimizer_update_8bit_blockwise
        self._min_8bit_size = min_8bit_size
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            stochastic_rounding=stochastic_rounding,
            correct_bias=correct_bias,
            no_deprecation_warning=no_deprecation_warning,
            **torch_flags,
        )

    def _extra_defaults(self) -> dict[str, Any]:
        return {"min_8bit_size": self._min_8bit_size}

    def _validate_group(self, group):
        super()._validate_group(group)
        check_positive_int("min_8bit_size", group.get("min_8bit_size", MIN_8BIT_SIZE))
        if not group.get("correct_bias", True):
            raise GaLoreConfigError(
                "`correct_bias`=False is not supported by GaLoreAdamW8bit: bitsandbytes' 8-bit kernel always "
                "corrects the bias. Use GaLoreAdamW for `correct_bias=False`"
            )

    def _qmaps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The signed / unsigned dynamic quantization maps, shared by all states (not checkpointed)."""
        if device not in self._qmaps:
            self._qmaps[device] = (
                self._create_dynamic_map(signed=True).to(device),
                self._create_dynamic_map(signed=False).to(device),
            )
        return self._qmaps[device]

    name = "adamw8bit"
    # uint8 codes and float32 block maxima: local on every FSDP2 rank, kept as they are by rotate_moments
    state_keys: ClassVar[dict[str, StateKey]] = {
        **GaLoreAdamW.state_keys,
        "state1": StateKey(torch.uint8),
        "state2": StateKey(torch.uint8),
        "absmax1": StateKey(torch.float32),
        "absmax2": StateKey(torch.float32),
    }

    @classmethod
    def update_transient_bytes(cls, like, *, lowrank, dtype=torch.float32):
        """bitsandbytes' CPU kernel on at most ``CALL_ELEMENTS`` values per call (its float32 working
        copies), with the skipped-step snapshot of that call's slice (the written values and both
        8-bit states); for a low-rank gradient also the step buffer and, for a transposed or padded
        one, its contiguous padded copy (:meth:`_lowrank_updates`), both in the gradient's dtype.
        Tensors under ``MIN_8BIT_SIZE`` values take 32-bit Adam."""
        numel = math.prod(like)
        if numel < MIN_8BIT_SIZE:
            return super().update_transient_bytes(like, lowrank=lowrank, dtype=dtype)
        e = torch.empty((), dtype=dtype).element_size()
        kernel = CPU_KERNEL_BYTES_PER_VALUE if dtype == torch.float32 else CPU_KERNEL_BYTES_PER_VALUE_16BIT
        per_value = kernel + e + 2  # the kernel's copies, the snapshot of the call's values and states
        if not lowrank:
            return min(numel, CALL_ELEMENTS) * per_value
        shape = tuple(like)
        padded = math.prod(lowrank_state_shape(shape))
        copy = e * padded if padded != numel or shape[0] > shape[1] else 0
        return copy + e * padded + min(padded, CALL_ELEMENTS) * per_value

    @classmethod
    def state_layout(cls, like, group, state, *, dtype):
        # the layout in use (32-bit moments also load from a GaLoreAdamW checkpoint), else the one made
        if "exp_avg" in state or ("state1" not in state and math.prod(like) < _min_8bit_size(group)):
            return super().state_layout(like, group, state, dtype=dtype)
        # a low-rank gradient: one row per projected direction, padded to whole blocks
        shape = lowrank_state_shape(tuple(like)) if "rank" in group else tuple(like)
        blocks = (-(-math.prod(shape) // BLOCK_SIZE),)
        shapes = {"state1": shape, "state2": shape, "absmax1": blocks, "absmax2": blocks}
        return {key: cls._entry(key, shape, dtype) for key, shape in shapes.items()}

    def _mismatch_hint(self, key: str, expected: Any, found: Any) -> str:
        """Name the layout of GaLoreAdamW8bit before per-direction blocks, when a loaded state has it."""
        if key not in ("state1", "state2") or expected is None or found is None or len(found) != 2:
            return ""
        rows, length = found
        if (rows, padded_length(length)) != tuple(expected) or length == expected[1]:
            return ""
        return (
            f"; {tuple(found)} is the earlier GaLoreAdamW8bit layout, whose 256-value quantization blocks ran "
            f"across projected directions: each direction now has its own blocks (rows padded to {expected[1]} "
            "values), and the old block scales cannot be split per direction, so this state is refused, not misread"
        )

    def _init_moments(self, state, like, group):
        if "exp_avg" in state or "state1" in state:
            return
        if like.numel() < _min_8bit_size(group):
            super()._init_moments(state, like, group)
            return
        # the declared layout (state_layout): a low-rank gradient's rows padded to whole blocks
        for key, entry in self.state_layout(tuple(like.shape), group, {}, dtype=like.dtype).items():
            state[key] = torch.zeros(entry.shape, dtype=entry.dtype, device=like.device)

    def _bnb_step_(
        self,
        target: torch.Tensor,
        grad: torch.Tensor,
        state: dict,
        group: dict,
        lr: float,
        wd: float,
        found_inf: torch.Tensor | None = None,
    ):
        """Run bitsandbytes' fused 8-bit AdamW kernel on ``target`` in place, ``CALL_ELEMENTS`` values per call.

        Slices start on 256-value block boundaries and the kernel is
        element-wise apart from each block's scale, so the result is the one
        of a single call on the whole tensor. Where ``found_inf`` is set, each
        call's slice of ``target`` and of the states is put back as it was.
        """
        numel = target.numel()
        if numel <= CALL_ELEMENTS:
            with restored_where(found_inf, [target, *(state[key] for key in _KERNEL_STATE)]):
                self._bnb_call_(target, grad.contiguous(), state, group, lr, wd)
            return
        flat_target, flat_grad = target.view(-1), grad.contiguous().view(-1)
        for start in range(0, numel, CALL_ELEMENTS):
            stop = min(start + CALL_ELEMENTS, numel)
            part = _state_slice(state, start, stop)
            with restored_where(found_inf, [flat_target[start:stop], *(part[key] for key in _KERNEL_STATE)]):
                self._bnb_call_(flat_target[start:stop], flat_grad[start:stop], part, group, lr, wd)

    def _bnb_call_(self, target: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, lr: float, wd: float):
        """One call of bitsandbytes' fused 8-bit AdamW kernel (keyword arguments only)."""
        qmap1, qmap2 = self._qmaps_on(grad.device)
        beta1, beta2 = betas_of(group)
        self._update_8bit(
            optimizer_name="adam",
            g=grad,
            p=target,
            state1=state["state1"],
            state2=state["state2"],
            beta1=beta1,
            beta2=beta2,
            beta3=0.0,
            alpha=0.0,
            eps=group["eps"],
            step=int(state["step"]),
            lr=lr,
            qmap1=qmap1,
            qmap2=qmap2,
            absmax1=state["absmax1"],
            absmax2=state["absmax2"],
            weight_decay=wd,
            gnorm_scale=1.0,
            skip_zeros=False,
        )

    def _lowrank_updates(self, group, params, grads, states, found_inf=None):
        lr = float(group["lr"])
        updates: list[torch.Tensor | None] = [None] * len(grads)
        small = [i for i, s in enumerate(states) if "exp_avg" in s]
        if small:
            small_updates, _ = super()._lowrank_updates(
                group,
                [params[i] for i in small],
                [grads[i] for i in small],
                [states[i] for i in small],
                found_inf=found_inf,
            )
            for i, u in zip(small, small_updates):
                updates[i] = u
        for i, (grad, state) in enumerate(zip(grads, states)):
            if updates[i] is None:
                # one row per projected direction (see lowrank_state_shape), each
                # padded to whole 256-value blocks with zero gradients: their
                # moments stay at the quantization map's smallest magnitude
                # (~2e-5 of the block's absmax, as for any zero gradient), below
                # the row's real values, so they do not set a block's scale and
                # their updates are dropped
                transposed = grad.shape[0] > grad.shape[1]
                low = grad.t() if transposed else grad
                rows, length = low.shape
                padded = padded_length(length)
                if padded == length:
                    low = low.contiguous()
                else:
                    padded_grad = torch.zeros(rows, padded, dtype=grad.dtype, device=grad.device)
                    padded_grad[:, :length] = low
                    low = padded_grad
                # The kernel updates a "parameter" in place: start from zero and
                # read the step off it (−lr·Adam direction; zero on a skipped step).
                buffer = torch.zeros(rows, padded, dtype=grad.dtype, device=grad.device)
                self._bnb_step_(buffer, low, state, group, lr=lr, wd=0.0, found_inf=found_inf)
                step = buffer.narrow(1, 0, length).neg_()
                updates[i] = step.t() if transposed else step
        return updates, [lr] * len(updates)

    def _step_full_rank(self, group, params, grads, states, found_inf=None):
        lr = float(group["lr"])
        small = [i for i, s in enumerate(states) if "exp_avg" in s]
        if small:
            super()._step_full_rank(
                group,
                [params[i] for i in small],
                [grads[i] for i in small],
                [states[i] for i in small],
                found_inf=found_inf,
            )
        for p, grad, state in zip(params, grads, states):
            if "state1" in state:
                if not p.is_contiguous():
                    raise UnsupportedSetupError(
                        f"GaLoreAdamW8bit needs contiguous parameters; got a strided one of shape {tuple(p.shape)}"
                    )
                key = self._rounding_key(p, group, state)
                if key is None:
                    self._bnb_step_(p, grad, state, group, lr=lr, wd=group["weight_decay"], found_inf=found_inf)
                    continue
                self._step_8bit_rounded(p, grad, state, group, lr, key, found_inf)

    def _step_8bit_rounded(self, param, grad, state, group, lr, key, found_inf=None):
        """bf16 / fp16 with stochastic rounding: bitsandbytes' kernel block by block on a small buffer.

        Per block of ``block_elements`` (a multiple of the 256-value
        quantization blocks, so the result equals one call on the whole
        tensor) the kernel writes ``−step`` into a zeroed buffer and the block
        is rounded from ``W·(1 − lr·wd) + buffer`` computed in float32.
        """
        size = block_elements(param.device)  # a power of two >= BLOCK_SIZE
        flat_grad = grad.contiguous().view(-1)
        buffer = scratch(param.device, param.dtype, min(size, param.numel()), slot=1)
        wd = group["weight_decay"]
        decay = 1.0 - lr * wd if wd else None
        if decay is not None and found_inf is not None:  # a skipped step decays by exactly 1.0
            decay = torch.where(found_inf.bool(), 1.0, torch.tensor(decay, dtype=torch.float32)).to(param.device)

        def fill(master: torch.Tensor, start: int, stop: int) -> None:
            # a skipped step leaves a zero step: the float32 master is the weight itself, which
            # stochastic rounding writes back unchanged (it is exactly representable)
            step = buffer[: stop - start].zero_()
            part = _state_slice(state, start, stop)
            self._bnb_step_(step, flat_grad[start:stop], part, group, lr=lr, wd=0.0, found_inf=found_inf)
            if decay is not None:
                master.mul_(decay)
            master.add_(step)

        write_rounded_(param, fill, key, block_size=size)
