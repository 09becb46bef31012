"""``estimate_memory`` and its methods (what each one stores): the estimator itself."""


from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import GaLoreConfigError, format_choices
from ..optim.accumulation import accumulates_in_subspace
from ..optim.members import BASE_OPTIMIZERS
from ..optim.validation import check_lowrank_keys, lowrank_defaults, lowrank_options
from ..projectors.geometry import (
    PROJ_TYPES,
    as_matrix,
    effective_rank,
    matrix_shape,
    projected_shape,
    side_size,
    sides_for,
)
from ..registry import Registry
from .formulas import activation_bytes, basis_bytes, int8_weight_bytes, weight_state_bytes, weight_transient_bytes
from .models import resolve_model, select_target_modules
from .result import MemoryEstimate

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}



# ----------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """How one training method stores weights and optimizer state."""

    name: str
    base: str  # a registered base optimizer (``hf_galore.optim.members.BASE_OPTIMIZERS``)
    lowrank: bool = False
    projector: str = "auto"
    quant: str | None = None
    int8_weights: bool = False
    refresh: str = "fixed"
    lora: bool = False
    layerwise: bool = False
    summary: str = ""


METHODS: Registry[MethodSpec] = Registry("method", "memory method")
register_method = METHODS.register


_BASE_METHODS = (
    MethodSpec("adamw", "adamw", summary="AdamW on every weight (torch.optim.AdamW / GaLoreAdamW without `rank`)"),
    MethodSpec("adamw8bit", "adamw8bit", summary="8-bit AdamW on every weight (GaLoreAdamW8bit without `rank`)"),
    MethodSpec("adafactor", "adafactor", summary="Adafactor on every weight (GaLoreAdafactor without `rank`)"),
    MethodSpec("galore", "adamw", lowrank=True, summary="GaLoreAdamW, default (auto) basis"),
    MethodSpec("galore_8bit", "adamw8bit", lowrank=True, summary="GaLoreAdamW8bit, default (auto) basis"),
    MethodSpec("galore_adafactor", "adafactor", lowrank=True, summary="GaLoreAdafactor, default (auto) basis"),
    MethodSpec(
        "online_pca", "adamw", lowrank=True, projector="online_pca", summary="GaLoreAdamW, Online Subspace Descent basis"
    ),
    MethodSpec(
        "q_galore",
        "adamw8bit",
        lowrank=True,
        quant="int4",
        int8_weights=True,
        refresh="lazy",
        summary="GaLoreAdamW8bit, INT4 basis, lazy refresh, INT8 target weights (Q-GaLore)",
    ),
)
for _spec in _BASE_METHODS:
    register_method(_spec)
    register_method(
        dataclasses.replace(_spec, name=f"{_spec.name}_layerwise", layerwise=True, summary=_spec.summary + ", layer-wise")
    )
register_method(MethodSpec("lora", "adamw", lora=True, summary="LoRA adapters on the targets, AdamW (peft)"))


# ---------------------------------------------------------------------- estimator
def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GaLoreConfigError(f"`{name}` must be a positive integer (>= 1), got {value!r}")
    return value


def _activation_estimate(config, batch_size, seq_len, itemsize, checkpointing) -> int | None:
    if config is None:
        return None
    get = lambda *names, default=None: next(
        (getattr(config, n) for n in names if getattr(config, n, None) is not None), default
    )
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    vocab = get("vocab_size")
    if not (hidden and layers and vocab):
        return None
    heads = get("num_attention_heads", "n_head", default=1)
    intermediate = get("intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    head_dim = get("head_dim", default=None) or hidden // heads
    kv_heads = get("num_key_value_heads", default=heads)
    return activation_bytes(
        batch_size=batch_size,
        seq_len=seq_len,
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        vocab=vocab,
        heads=heads,
        kv_hidden=kv_heads * head_dim,
        itemsize=itemsize,
        checkpointing=checkpointing,
    )


def estimate_memory(
    model_or_config: Any,
    method: str = "galore",
    *,
    rank: int = 128,
    target_modules: str | Sequence[str] | None = "all-linear",
    dtype: str = "bf16",
    batch_size: int = 1,
    seq_len: int = 256,
    proj_type: str = "std",
    activation_checkpointing: bool = False,
    train_non_targets: bool | None = None,
    projector: str | None = None,
    optimizer: str | None = None,
    options: Mapping[str, Any] | None = None,
    grad_accum: int = 1,
) -> MemoryEstimate:
    """Bytes of weights, gradients, optimizer states (bases included) and activations for one step.

    Args:
        model_or_config: an ``nn.Module`` (any device, ``meta`` included), a
            transformers config, a shipped preset (``llama_60m`` … ``llama_13b``,
            GaLore arXiv:2403.03507 Table 5), a config file/directory or a hub id.
        method: one of :data:`METHODS` (``hf-galore estimate --help`` lists them).
        rank: projection rank (GaLore) or adapter rank (LoRA). Targeted
            weights whose smaller side is <= rank train at full rank, as
            ``galore_param_groups`` does.
        target_modules: projected / adapted modules, PEFT's rules
            (:func:`select_target_modules`). Default: every linear but the head.
        dtype: storage dtype of weights, gradients, Adam moments and bases.
        batch_size, seq_len: micro-batch for the activation estimate.
        proj_type: GaLore's side convention (decides basis and moment shapes).
        activation_checkpointing: keep only each layer's input in the forward.
        train_non_targets: LoRA only: also train the non-target weights
            (embeddings, head, norms) at full rank, as the GaLore paper's LoRA
            baseline does (Table 6). Default ``False`` (peft's default).
        projector: the basis finder, for methods with a basis (default: the
            method's own); it decides per-weight finder state and the
            refresh's transient working set. Shorthand for
            ``options={"projector": ...}``.
        optimizer: a registered base optimizer (``"adamw"``, ``"adamw8bit"``,
            ``"adafactor"`` or one registered with ``register_base_optimizer``)
            instead of the method's.
        options: low-rank group keys instead of the method's (``projector``,
            ``quant``, ``refresh``, or any registered component's option such as
            ``lazy_queue``), checked as the optimizers check them; GaLore
            methods only (``rank`` and ``proj_type`` have their own arguments).
            ``options={"accumulate": ...}`` chooses where gradients accumulate
            (``"auto"``: in the subspace for layer-wise methods).
        grad_accum: micro-batches per optimizer step. Gradients that
            accumulate in the subspace (``hf_galore.optim.accumulation``) count
            as their ``R``-sized accumulators plus the largest gradient live
            at once; full-rank weights, and the projected weights of any
            method that accumulates in full, hold their full gradients across
            the window. The estimate is of a step without a scheduled refresh
            (with ``refresh="staggered"``, the ``⌈N/T⌉`` weights due at every
            step are included); a note gives what a refresh step adds. It is
            the peak from three micro-batches on and an upper bound for two
            (the final micro-batch frees full-rank gradients as it updates them).
    """
    if method not in METHODS:
        raise GaLoreConfigError(f"`method` must be one of {format_choices(METHODS)}, got {method!r}")
    if dtype not in DTYPES:
        raise GaLoreConfigError(f"`dtype` must be one of {format_choices(DTYPES)}, got {dtype!r}")
    spec = METHODS[method]
    _check_positive_int("rank", rank)
    _check_positive_int("grad_accum", grad_accum)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    if proj_type not in PROJ_TYPES:
        raise GaLoreConfigError(f"`proj_type` must be one of {format_choices(PROJ_TYPES)}, got {proj_type!r}")
    if train_non_targets is not None and not spec.lora:
        raise GaLoreConfigError("`train_non_targets` applies to `method='lora'` only")
    torch_dtype = DTYPES[dtype]
    e = torch.empty((), dtype=torch_dtype).element_size()
    if projector is not None:
        if not spec.lowrank:
            raise GaLoreConfigError(f"`projector` applies to methods with a basis; {method!r} has none")
        if (options or {}).get("projector", projector) != projector:
            raise GaLoreConfigError(
                f"`projector`={projector!r} and `options['projector']`={options['projector']!r} disagree; keep one"
            )
        options = {**(options or {}), "projector": projector}
    base = BASE_OPTIMIZERS.lookup(spec.base if optimizer is None else optimizer)
    full_group = base.default_hyperparams()
    group = _lowrank_group(spec, base, rank, proj_type, options)

    model, config = resolve_model(model_or_config)
    uses_targets = spec.lowrank or spec.lora
    targets = set(select_target_modules(model, target_modules)) if uses_targets else set()
    target_weights = {id(m.weight) for n, m in model.named_modules() if n in targets}
    # hf_galore.quant replaces plain nn.Linear targets only (not e.g. GPT-2's Conv1D)
    int8_targets = {id(m.weight) for n, m in model.named_modules() if n in targets and isinstance(m, nn.Linear)}

    weights = gradients = states = bases = 0
    total_params = trainable_params = lowrank_params = 0
    largest_grad = 0
    full_rank_grads = accumulators = 0  # bytes: gradients of weights trained at full rank; subspace accumulators
    projected_grads: list[int] = []  # bytes of each projected weight's full gradient
    accumulator_itemsize = 4 if group.get("accumulate_dtype") == "float32" else e
    transient = 0
    small_weights = 0
    float_targets = 0  # projected, but kept in `dtype` by the INT8-weight methods (not an nn.Linear)
    basis_cache: dict = {}
    notes: list[str] = []

    def train_full(shape: Sequence[int]) -> None:
        nonlocal gradients, states, trainable_params, largest_grad, transient, full_rank_grads
        numel = math.prod(shape)
        trainable_params += numel
        gradients += numel * e
        full_rank_grads += numel * e
        largest_grad = max(largest_grad, numel * e)
        states += weight_state_bytes(base, shape, torch_dtype, full_group)
        transient = max(transient, weight_transient_bytes(base, shape, None, dtype=torch_dtype))

    for _, param in model.named_parameters():
        shape = tuple(param.shape)
        numel = math.prod(shape)
        total_params += numel
        is_target = id(param) in target_weights
        if spec.lora:
            weights += numel * e
            if is_target:
                m, n = as_matrix(torch.empty(shape, device="meta")).shape
                for factor in ((rank, n), (m, rank)):  # lora_A (r × in), lora_B (out × r)
                    weights += math.prod(factor) * e
                    lowrank_params += math.prod(factor)
                    train_full(factor)
            elif train_non_targets:
                train_full(shape)
            continue
        if not param.requires_grad:  # frozen by the user: stored, never updated
            weights += numel * e
            continue
        matrix = matrix_shape(shape) if param.dim() >= 2 else shape
        if is_target and rank >= min(matrix):
            # galore_param_groups trains these at full rank (projecting saves nothing); INT8
            # weights need a projected group, so Q-GaLore leaves them in float too.
            small_weights += 1
            is_target = False
        if not is_target:
            weights += numel * e
            train_full(shape)
            continue
        int8 = spec.int8_weights and id(param) in int8_targets
        if int8:
            weights += int8_weight_bytes(shape, e)
        else:
            weights += numel * e
            float_targets += spec.int8_weights
        sides = sides_for(proj_type, matrix)
        r = effective_rank(rank, matrix)
        lowrank_params += numel
        trainable_params += numel
        gradients += numel * e
        largest_grad = max(largest_grad, numel * e)
        projected_grads.append(numel * e)
        accumulators += math.prod(projected_shape(matrix, r, sides)) * accumulator_itemsize
        bases += sum(
            basis_bytes(side_size(side, matrix), r, torch_dtype, group["quant"], basis_cache, group=group)
            for side in sides
        )
        states += weight_state_bytes(base, shape, torch_dtype, group, basis_cache)
        transient = max(transient, weight_transient_bytes(base, shape, group, dtype=torch_dtype, int8=int8))

    if small_weights:
        notes.append(
            f"{small_weights} targeted weights have a smaller dimension <= rank {rank} and train at full rank "
            "(as galore_param_groups does)"
        )
    if float_targets:
        notes.append(
            f"{float_targets} targeted weights are not nn.Linear (e.g. GPT-2's Conv1D): "
            f"prepare_model_for_int8_weights leaves them in {dtype}, and so does this estimate"
        )
    gradients = _gradient_bytes(
        spec, group, grad_accum, gradients, largest_grad, full_rank_grads, accumulators, projected_grads, notes
    )
    acts = _activation_estimate(config, batch_size, seq_len, e, activation_checkpointing)
    if acts is None:
        acts = 0
        notes.append("activations not estimated: the model has no transformers config with sizes")
    elif getattr(config, "model_type", None) != "llama":
        notes.append(
            f"activations use the LLaMA-layout formula; for model_type {getattr(config, 'model_type', None)!r} "
            "treat them as a rough guide"
        )
    if getattr(model, "_hf_galore_built_from_config", False) and not getattr(config, "architectures", None):
        notes.append(f"the config names no architecture; estimated as {type(model).__name__}")
    return MemoryEstimate(
        method=method,
        dtype=dtype,
        rank=rank if uses_targets else None,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        activations=acts,
        projection_bases=bases,
        total_params=total_params,
        trainable_params=trainable_params,
        lowrank_params=lowrank_params,
        transient=transient,
        notes=tuple(notes),
    )


def _gradient_bytes(
    spec: MethodSpec,
    group: Mapping[str, Any],
    grad_accum: int,
    every: int,
    largest: int,
    full_rank: int,
    accumulators: int,
    projected: list[int],
    notes: list[str],
) -> int:
    """Peak live gradient bytes of a step without a scheduled refresh (see ``estimate_memory``'s ``grad_accum``)."""
    gib = 2**30
    in_subspace = spec.lowrank and accumulates_in_subspace(group, spec.layerwise)
    if in_subspace and projected and (grad_accum > 1 or not spec.layerwise):
        due = 0
        if group["refresh"] == "staggered":  # about ceil(N/T) weights refresh at every step, in full
            count = min(len(projected), math.ceil(len(projected) / int(group["update_proj_gap"])))
            due = sum(sorted(projected, reverse=True)[:count])
        held = full_rank + accumulators + due  # full-rank gradients wait for the step (or the final micro-batch)
        notes.append(
            f"gradients accumulate in the subspace: {accumulators / gib:.3f} GiB of accumulators for the projected "
            f"weights (their full gradients: {sum(projected) / gib:.3f} GiB), {full_rank / gib:.3f} GiB of full-rank "
            f"gradients, plus the largest projected gradient live at a time"
            + (f" and {due / gib:.3f} GiB for the weights refreshed at each step (staggered)" if due else "")
        )
        if group["refresh"] != "staggered" and grad_accum > 1:
            notes.append(
                f"a refresh step (the first, then every update_proj_gap steps with refresh={group['refresh']!r}) "
                f"holds the full gradients of the weights due: up to {sum(projected) / gib:.3f} GiB more; "
                "refresh='staggered' spreads them over the gap"
            )
        return held + max(projected)  # full-rank gradients are already held: one projected gradient is live
    if spec.layerwise and grad_accum > 1:
        notes.append(
            f"layer-wise with {grad_accum} micro-batches accumulating in full: every gradient is held across the window"
        )
        return every
    if spec.layerwise:
        notes.append("layer-wise: only the largest single gradient is live at a time")
        return largest
    return every


def _lowrank_group(
    spec: MethodSpec, base: type, rank: int, proj_type: str, options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The low-rank param group the method's optimizer would get (defaults, the method's components, ``options``)."""
    options = dict(options or {})
    if options and not spec.lowrank:
        raise GaLoreConfigError(f"`options` apply to GaLore methods only, not to `method`={spec.name!r}")
    valid = lowrank_options()
    for key in options:
        if key in ("rank", "proj_type"):
            raise GaLoreConfigError(f"`options` sets {key!r}: pass `{key}=` to estimate_memory directly")
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise GaLoreConfigError(f"unknown key {key!r} in `options`.{hint} Valid keys: {', '.join(sorted(valid))}")
    group = {
        **base.default_hyperparams(),
        **lowrank_defaults(),
        "projector": spec.projector,
        "quant": spec.quant,
        "refresh": spec.refresh,
        **options,
        "rank": rank,
        "proj_type": proj_type,
    }
    check_lowrank_keys(group)
    return group


__all__ = ["DTYPES", "METHODS", "MethodSpec", "estimate_memory", "register_method"]
