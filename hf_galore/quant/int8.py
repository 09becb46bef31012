"""INT8 weights updated with stochastic rounding (Q-GaLore, arXiv:2407.08296, §3.4).

A targeted ``nn.Linear`` becomes an :class:`Int8Linear`: its weight lives as
``int8`` codes plus one float32 scale per group of ``group_size`` input
features (symmetric absmax, ``w ≈ q · scale``, ``q ∈ [−127, 127]``), i.e.
``1 + 4/g`` bytes per weight instead of 2 (bf16) or 4 (fp32).

Why not torchao: its INT8 training tensors (``torchao.prototype
.quantized_training``) are a prototype tensor subclass with row-wise scales
whose optimizer integration goes through ``copy_``/``add_`` on the subclass,
while GaLore applies its update with a fused ``addmm_`` of the low-rank
factors (``lowrank.apply_update``); supporting that would mean implementing
the subclass' dispatch for every op we touch, and adding a dependency that is
not installed by default. A 150-line module with group-wise scales (Q-GaLore's
layout, group 256) and one hook in ``apply_update`` is smaller and honest
about memory.

How the optimizer sees it: ``Int8Linear.weight`` is an ``nn.Parameter`` of
the right shape and float dtype whose storage is a *single element* (a
zero-stride expand), so it costs nothing; autograd still gives it a full
float gradient (as for any weight, and freed by ``zero_grad``/layer-wise
mode). The parameter carries a reference to its module, and
``lowrank.apply_update`` then dequantizes the weight to a float32 master
one block of rows at a time (:func:`row_blocks`; a whole LLaMA-7B MLP weight
in float32 would be 180 MB), adds the low-rank update's rows and requantizes
**with stochastic rounding**: ``q = ⌊x/scale + u⌋``, ``u ~
U[0, 1)``, so ``E[q·scale] = x`` and updates far smaller than one
quantization step still move the weight on average (the paper reports
+7.86 ppl at 60M without it). Decoupled weight decay multiplies the scales
(exact, no requantization).

The rounding noise comes from a generator seeded by the module's ``sr_seed``
and ``sr_step`` buffers, so a run is reproducible, a checkpoint of the model
resumes the same stream, and DDP ranks (same step, same seed) round
identically and stay in sync.

``.weight`` holds no values: read the weight with :meth:`Int8Linear.dequantize`.
Int8 weights must sit in a low-rank (``rank``) param group.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import numerics
from ..errors import GaLoreConfigError
from ..projectors.randomized import derive_seed

DEFAULT_WEIGHT_GROUP_SIZE = 256
_OWNER_ATTR = "_hf_galore_int8_owner"


def quantize_rows(
    weight: torch.Tensor, group_size: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax INT8 codes per group of ``group_size`` columns: ``(q int8 (m, n), scale f32 (m, G))``.

    With a ``generator`` the codes are rounded stochastically (unbiased),
    otherwise to nearest.
    """
    w = weight.float()
    m, n = w.shape
    groups = -(-n // group_size)
    pad = groups * group_size - n
    grid = F.pad(w, (0, pad)).view(m, groups, group_size)
    scale = grid.abs().amax(dim=2).div_(127.0).clamp_(min=1e-12)
    x = grid / scale[:, :, None]
    if generator is None:
        x.round_()
    else:
        x.add_(torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)).floor_()
    q = x.clamp_(-127, 127).to(torch.int8).view(m, groups * group_size)[:, :n]
    return q.contiguous(), scale


#: Values per row block of an INT8 weight's dequantization and update (on every device): four
#: float32 temporaries of one block, 16 MiB, against 0.7 GiB for a whole LLaMA-7B MLP weight.
INT8_BLOCK_ELEMENTS = 1 << 20


def row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """``(first, last)`` row ranges of about ``INT8_BLOCK_ELEMENTS`` values each (at least one row).

    Why: dequantizing or updating a whole ``m × n`` INT8 weight at once makes
    several float32 ``m × n`` temporaries (12·m·n bytes; 0.5 GiB for one
    LLaMA-7B MLP weight), which is what sets Q-GaLore's peak memory; a block
    of rows at a time keeps them to one block, with the same result.
    """
    return numerics.row_blocks(rows, cols, INT8_BLOCK_ELEMENTS)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``q · scale`` as a dense ``(m, n)`` tensor of ``dtype``.

    Computed in float32 a block of rows at a time (:func:`row_blocks`) into
    the result, so the only full-size tensor is the result itself; the values
    are those of the whole-tensor product, bit for bit.
    """
    m, n = q.shape
    out = torch.empty(m, n, dtype=dtype, device=q.device)
    for first, last in row_blocks(m, n):
        expanded = scale[first:last].repeat_interleave(group_size, dim=1)[:, :n]
        out[first:last] = q[first:last].to(torch.float32) * expanded
    return out


class _Int8LinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` dequantized on the fly; the weight's gradient goes to the placeholder."""

    @staticmethod
    def forward(ctx, x, placeholder, q, scale, bias, group_size):
        weight = dequantize_rows(q, scale, group_size, x.dtype)
        ctx.save_for_backward(x, q, scale)
        ctx.group_size = group_size
        ctx.placeholder_dtype = placeholder.dtype
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, q, scale = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_rows(q, scale, ctx.group_size, grad_out.dtype)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (flat_out.t() @ x.reshape(-1, x.shape[-1])).to(ctx.placeholder_dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_b = flat_out.sum(dim=0)
        return grad_x, grad_w, None, None, grad_b, None


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored in INT8 with group-wise scales.

    It stays an ``nn.Linear`` subclass so target selection ("all-linear",
    suffix lists) finds it; ``forward`` never reads ``.weight``'s values.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int = DEFAULT_WEIGHT_GROUP_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        nn.Module.__init__(self)
        if group_size < 1:
            raise GaLoreConfigError(f"`group_size` must be a positive integer, got {group_size!r}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, int(group_size)
        groups = -(-in_features // self.group_size)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("sr_seed", torch.tensor(int(seed), dtype=torch.int64, device="cpu"))
        self.register_buffer("sr_step", torch.tensor(0, dtype=torch.int64, device="cpu"))
        placeholder = torch.zeros((), dtype=dtype, device=device).expand(out_features, in_features)
        self.weight = nn.Parameter(placeholder)
        setattr(self.weight, _OWNER_ATTR, weakref.ref(self))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = DEFAULT_WEIGHT_GROUP_SIZE, seed: int = 0) -> Int8Linear:
        """Quantize ``linear``'s weight (round to nearest) into a new module; the bias is copied."""
        w = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            dtype=w.dtype,
            device=w.device,
            seed=seed,
        )
        module.store_(w)
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.copy_(linear.bias)
            module.bias.requires_grad_(linear.bias.requires_grad)
        module.weight.requires_grad_(linear.weight.requires_grad)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense ``(out, in)`` tensor (a new tensor)."""
        return dequantize_rows(self.weight_int8, self.weight_scale, self.group_size, dtype)

    @torch.no_grad()
    def store_(self, weight: torch.Tensor, *, stochastic: bool = False) -> None:
        """Quantize ``weight`` into the module; stochastic rounding draws from the module's own stream."""
        generator = self._rounding_stream() if stochastic else None
        for first, last in row_blocks(*self.weight_int8.shape):
            self._store_rows(weight[first:last], first, generator)

    @torch.no_grad()
    def update_rows_(
        self, fill: Callable[[torch.Tensor, int, int], None], keep: torch.Tensor | None = None
    ) -> None:
        """Change the weight a block of rows at a time, stored back with stochastic rounding.

        ``fill(master, first, last)`` updates ``master``, a float32 copy of rows
        ``[first, last)``, in place. Only one block is ever in float32, and the
        result equals :meth:`dequantize`, change, ``store_(stochastic=True)`` on
        the whole weight (on the CPU bit for bit: the noise is drawn block after
        block from the same stream). Where the one-element ``keep`` is set (a
        skipped step, read on the device without a host sync) each block's
        codes and scales are put back as they were: requantizing, even by a
        zero step, would move them.
        """
        generator = self._rounding_stream()
        for first, last in row_blocks(*self.weight_int8.shape):
            codes, scales = self.weight_int8[first:last], self.weight_scale[first:last]
            master = dequantize_rows(codes, scales, self.group_size, torch.float32)
            old = None if keep is None else (codes.clone(), scales.clone())
            fill(master, first, last)
            self._store_rows(master, first, generator)
            if old is not None:
                flag = keep.bool().to(codes.device)
                codes.copy_(torch.where(flag, old[0], codes))
                scales.copy_(torch.where(flag, old[1], scales))

    def _rounding_stream(self) -> torch.Generator:
        """The next stochastic-rounding stream: seeded by ``sr_seed`` and ``sr_step``, which advances."""
        generator = torch.Generator(device=self.weight_int8.device)
        generator.manual_seed(derive_seed(int(self.sr_seed), int(self.sr_step), *self.weight_int8.shape))
        self.sr_step += 1
        return generator

    def _store_rows(self, rows: torch.Tensor, first: int, generator: torch.Generator | None) -> None:
        q, scale = quantize_rows(rows, self.group_size, generator=generator)
        self.weight_int8[first : first + rows.shape[0]].copy_(q)
        self.weight_scale[first : first + rows.shape[0]].copy_(scale)

    # The placeholder holds no values: checkpoints carry the codes and scales
    # instead. A dense float ``weight`` in a loaded state dict (a checkpoint of
    # the float model) is quantized on load, so both kinds of checkpoint work.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self._parameters["weight"]
        self._parameters["weight"] = None
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["weight"] = weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        dense = state_dict.pop(prefix + "weight", None)
        if dense is not None and 0 not in dense.stride() and self.weight_int8.is_meta:
            self._materialize_(dense.device)
        weight = self._parameters["weight"]
        self._parameters["weight"] = None
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            self._parameters["weight"] = weight
        if dense is not None and 0 not in dense.stride():
            self.store_(dense)

    def _materialize_(self, device: torch.device) -> None:
        """Give a layer built on the meta device real (empty) codes and scales on ``device``.

        Why: a float checkpoint can then be loaded straight into INT8 layers
        (``hf_galore.load_checkpoint_into_int8``) without the float model ever
        existing; ``store_`` fills them as each dense weight arrives.
        """
        placeholder = self._parameters["weight"]
        self.weight_int8 = torch.empty_like(self.weight_int8, device=device)
        self.weight_scale = torch.empty_like(self.weight_scale, device=device)
        fresh = nn.Parameter(
            torch.zeros((), dtype=placeholder.dtype, device=device).expand(self.out_features, self.in_features),
            requires_grad=placeholder.requires_grad,
        )
        setattr(fresh, _OWNER_ATTR, weakref.ref(self))
        self.weight = fresh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.weight_int8, self.weight_scale, self.bias, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 group_size={self.group_size}"


def int8_owner(param: torch.Tensor) -> Int8Linear | None:
    """The :class:`Int8Linear` whose placeholder ``param`` is, or ``None`` for an ordinary parameter."""
    ref = getattr(param, _OWNER_ATTR, None)
    return None if ref is None else ref()


def weight_values(param: torch.Tensor) -> torch.Tensor:
    """The values ``param`` holds: dequantized (float32) for an INT8 placeholder, ``param`` itself otherwise.

    Optimizers that read the weight (Adafactor's ``scale_parameter`` RMS) must
    use this: an INT8 weight's placeholder parameter is all zeros.
    """
    owner = int8_owner(param)
    return param if owner is None else owner.dequantize(torch.float32)


@torch.no_grad()
def int8_add_(
    param: torch.Tensor, fill: Callable[[torch.Tensor, int, int], None], keep: torch.Tensor | None = None
) -> bool:
    """If ``param`` is an INT8 weight: ``fill(master, first, last)`` on float32 copies of its row blocks,
    stored back with SR (:meth:`Int8Linear.update_rows_`; ``keep``: a skipped step's flag).

    ``master`` holds rows ``[first, last)`` of the weight. Returns ``False``
    (doing nothing) for an ordinary parameter.
    """
    owner = int8_owner(param)
    if owner is None:
        return False
    owner.update_rows_(fill, keep)
    return True


@torch.no_grad()
def int8_scale_(param: torch.Tensor, factor: float) -> bool:
    """If ``param`` is an INT8 weight, multiply it by ``factor`` through its scales (weight decay)."""
    owner = int8_owner(param)
    if owner is None:
        return False
    owner.weight_scale.mul_(factor)
    return True


@torch.no_grad()
def dequantize_int8_weights(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn every :class:`Int8Linear` of ``model`` back into a plain ``nn.Linear``, in place; return ``model``.

    The export step of a Q-GaLore run (as PEFT's ``merge_and_unload``): the
    INT8 layers save ``weight_int8`` / ``weight_scale`` instead of ``weight``,
    so a plain ``AutoModelForCausalLM.from_pretrained`` of a quantized
    checkpoint would report those weights missing and initialise them at
    random. After this call ``save_pretrained`` writes an ordinary float
    checkpoint with the same outputs (the weight is ``q · scale``, exactly
    what ``Int8Linear.forward`` computes with). ``dtype`` defaults to each
    layer's own (the dtype of the layer it replaced); the bias is kept (cast
    to ``dtype`` when one is given), and so are ``requires_grad`` and the
    training mode. The rounding stream (``sr_seed``, ``sr_step``) is dropped.
    The new weights are new parameters: build a new optimizer to train on.
    (A bare ``Int8Linear`` passed as ``model`` cannot be replaced in place;
    its ``nn.Linear`` is returned.)
    """
    replacements = [
        (name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, Int8Linear)
    ]
    done: dict[int, nn.Linear] = {}  # a layer reachable under two names stays one (shared) layer
    for name, module in replacements:
        linear = done.get(id(module))
        if linear is None:
            target = module.weight.dtype if dtype is None else dtype
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            linear.weight = nn.Parameter(module.dequantize(target), requires_grad=module.weight.requires_grad)
            bias = module.bias
            if bias is not None and bias.dtype != target:
                bias = nn.Parameter(bias.detach().to(target), requires_grad=bias.requires_grad)
            linear.bias = bias
            linear.train(module.training)
            done[id(module)] = linear
        parent_name, _, child = name.rpartition(".")
        if not parent_name and not child:  # the model itself is an Int8Linear
            return linear
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return model


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of all INT8 weights of ``model`` at rest (codes + scales)."""
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += module.weight_int8.numel() + module.weight_scale.numel() * module.weight_scale.element_size()
    return total
