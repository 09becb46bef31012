"""``estimate_memory``: how many bytes a training step needs, per method, before you allocate any.

The figures are *what hf_galore's optimizers really hold*, not the papers'
rounded formulas: for a model that fits in memory the optimizer-state and
weight bytes equal, to the byte, the tensors our optimizers keep after a step
(``tests/test_memory.py`` checks that). Optimizer state is never computed
from a component's name here: each base optimizer, basis finder and refresh
policy declares its per-weight tensors (``state_layout``) and each codec is
measured by encoding a basis; :func:`weight_state_bytes` adds them up, for
this estimate and for the Trainer's start-up summary alike. The formulas are
documented in ``docs/memory.md``.

Per parameter tensor of ``numel`` elements stored in ``dtype`` (``e`` bytes):

* weights: ``numel·e`` (Q-GaLore's INT8 weights: codes + group scales, see
  :func:`int8_weight_bytes`); frozen parameters cost only their weights;
* gradients: ``numel·e`` for every trainable tensor; layer-wise methods step
  each weight in its gradient hook and free the gradient at once, so only the
  largest single gradient is counted (GaLore §4.3, arXiv:2403.03507);
* optimizer state: a 4-byte float32 ``step`` per trainable tensor, plus

  the declared base update's state, e.g.

  - Adam: ``exp_avg`` and ``exp_avg_sq`` in ``dtype``: ``2·numel·e``;
  - 8-bit Adam: ``2·numel`` uint8 + ``2·⌈numel/256⌉`` float32 block maxima
    (tensors under 4096 elements keep Adam's ``2·numel·e``, as bitsandbytes);
  - Adafactor (β₁ = None): float32 row and column statistics
    (``4·(m + n)`` bytes for an ``m × n`` matrix, ``4·numel`` for vectors);
  - GaLore targets: the same moments, but of the projected gradient
    (``r × n`` or ``m × r``, arXiv:2403.03507 Alg. 1), plus the basis
    (``k × r`` in ``dtype``, or the quantized codec's bytes for Q-GaLore),
    plus the basis finder's and refresh policy's own state (OSD's Adam on
    the basis, Q-GaLore's cosine FIFO). Targets whose smaller side is
    ``<= r`` train at full rank, as ``galore_param_groups`` decides.
* activations: an estimate for decoder-only transformers (LLaMA layout), see
  :func:`activation_bytes`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .declare import layout_bytes
from .errors import GaLoreConfigError, UnsupportedSetupError, format_choices
from .optim.members import BASE_OPTIMIZERS
from .optim.schedules import REFRESH_POLICIES
from .optim.validation import check_lowrank_keys, lowrank_defaults, lowrank_options
from .projectors import PROJECTORS
from .projectors.geometry import (
    PROJ_TYPES,
    as_matrix,
    effective_rank,
    matrix_shape,
    projected_shape,
    side_size,
    sides_for,
)
from .registry import Registry

#: ``state["step"]``: a float32 scalar tensor per trainable tensor (as torch.optim.AdamW).
STEP_BYTES = 4

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

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


def refresh_transient_bytes(projector: str, side: int, other: int, rank: int, *, oversample: int = 8) -> int:
    """Temporaries of one basis refresh of a ``side × other`` gradient, as the finder declares them.

    ``BasisFinder.refresh_transient_bytes`` (exact SVD by default, the
    randomized finder's sketch in ``projectors/randomized.py``).
    """
    finder = PROJECTORS.lookup(projector)
    return finder.refresh_transient_bytes(side, other, rank, {**lowrank_defaults(), "oversample": oversample})


def update_transient_bytes(
    base: str | type, shape: Sequence[int], low_shape: Sequence[int] | None, *, int8: bool
) -> int:
    """Temporaries of one weight's update: the base optimizer's kernel (its ``update_transient_bytes``) and,
    for an INT8 weight, the float32 copy it is updated on (``4·m·n``) and its dequantized values (another
    ``4·m·n``). Float weights are updated in place, or in blocks of 2¹⁸ values with stochastic rounding
    (bounded, ignored here)."""
    optimizer = BASE_OPTIMIZERS.lookup(base) if isinstance(base, str) else base
    like = tuple(low_shape) if low_shape is not None else tuple(shape)
    kernel = optimizer.update_transient_bytes(like, lowrank=low_shape is not None)
    return kernel + (2 * 4 * math.prod(shape) if int8 else 0)


# ----------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """How one training method stores weights and optimizer state."""

    name: str
    base: str  # a registered base optimizer (``hf_galore.optim.members.BASE_OPTIMIZERS``)
    lowrank: bool = False
    projector: str = "svd"
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
    MethodSpec("galore", "adamw", lowrank=True, summary="GaLoreAdamW, exact-SVD basis"),
    MethodSpec("galore_8bit", "adamw8bit", lowrank=True, summary="GaLoreAdamW8bit, exact-SVD basis"),
    MethodSpec("galore_adafactor", "adafactor", lowrank=True, summary="GaLoreAdafactor, exact-SVD basis"),
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


# ------------------------------------------------------------------ model lookup
def _preset_dir():
    return importlib.resources.files("hf_galore").joinpath("presets")


def preset_names() -> list[str]:
    """Shipped LLaMA configs (GaLore's ``configs/llama_*.json``, Table 5 shapes)."""
    names = [p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json")]
    return sorted(names, key=_preset_size)


def _preset_size(name: str) -> float:
    match = re.search(r"(\d+)([mb])$", name)
    if not match:
        return math.inf
    return int(match.group(1)) * (1e3 if match.group(2) == "b" else 1)


def load_preset(name: str):
    """The transformers config of a shipped preset (``llama_60m`` … ``llama_7b``)."""
    from transformers import AutoConfig

    path = _preset_dir().joinpath(f"{name}.json")
    if not path.is_file():
        raise GaLoreConfigError(f"unknown preset {name!r}; shipped presets: {', '.join(preset_names())}")
    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _load_config(spec: str):
    if spec in preset_names():
        return load_preset(spec)
    from transformers import AutoConfig

    if os.path.isfile(spec):
        with open(spec) as fh:
            data = json.load(fh)
        if "model_type" not in data:
            raise GaLoreConfigError(f"config file {spec!r} has no `model_type`; it is not a transformers config")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    presets = ", ".join(preset_names())
    close = difflib.get_close_matches(spec, preset_names(), n=1, cutoff=0.8)
    if close and not os.path.exists(spec):  # a mistyped preset: do not wait for the hub
        raise GaLoreConfigError(f"unknown preset {spec!r} (did you mean {close[0]!r}?); shipped presets: {presets}")
    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GaLoreConfigError(
            f"`model` {spec!r} is neither a shipped preset ({presets}), a config "
            f"file or directory, nor a reachable hub id ({reason})"
        ) from None


def _model_from_config(config) -> nn.Module:
    """Build the model on the meta device: shapes only, no memory, ~1 s for 7B."""
    import transformers

    builders = []
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            builders.append(cls._from_config)
    builders += [transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    last_error: Exception | None = None
    for build in builders:
        try:
            with torch.device("meta"):
                return build(config)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            last_error = exc
    raise UnsupportedSetupError(f"could not build a model from config {type(config).__name__}: {last_error}")


def resolve_model(model_or_config: Any) -> tuple[nn.Module, Any]:
    """``(module, config or None)`` for a model, a transformers config, a preset, a path or a hub id."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config, getattr(model_or_config, "config", None)
    if isinstance(model_or_config, (str, os.PathLike)):
        config = _load_config(os.fspath(model_or_config))
        return _model_from_config(config), config
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        PretrainedConfig = ()  # type: ignore[assignment]
    if isinstance(model_or_config, PretrainedConfig):
        return _model_from_config(model_or_config), model_or_config
    raise GaLoreConfigError(
        "`model_or_config` must be an nn.Module, a transformers config, a preset name "
        f"({', '.join(preset_names())}), a config path or a hub id; got {type(model_or_config).__name__}"
    )


# --------------------------------------------------------------- target selection
def select_target_modules(model: nn.Module, target_modules: str | Sequence[str] | None) -> list[str]:
    """Names of the modules whose weight is projected (GaLore) or adapted (LoRA).

    The same rules as ``galore_param_groups`` and the Trainer
    (:func:`hf_galore.targets.select_target_modules`): a list entry matches
    an exact name, a dot-bounded suffix, a full-match regex or a substring,
    a string is a full-match regex, ``"all-linear"``
    (and ``None``) means every linear but the output head; for LLaMA that is
    exactly the paper's selection, the attention and MLP linears.
    """
    from .targets import select_target_modules as select

    spec = "all-linear" if target_modules is None else target_modules
    if not isinstance(spec, str):
        spec = list(spec)
    return list(select(model, spec).modules)


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
    from .projectors.storage import CODECS

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
) -> MemoryEstimate:
    """Bytes of weights, gradients, optimizer states (bases included) and activations for one step.

    Args:
        model_or_config: an ``nn.Module`` (any device, ``meta`` included), a
            transformers config, a shipped preset (``llama_60m`` … ``llama_7b``,
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
    """
    if method not in METHODS:
        raise GaLoreConfigError(f"`method` must be one of {format_choices(METHODS)}, got {method!r}")
    if dtype not in DTYPES:
        raise GaLoreConfigError(f"`dtype` must be one of {format_choices(DTYPES)}, got {dtype!r}")
    spec = METHODS[method]
    _check_positive_int("rank", rank)
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
    finder = PROJECTORS.lookup(group["projector"])

    model, config = resolve_model(model_or_config)
    uses_targets = spec.lowrank or spec.lora
    targets = set(select_target_modules(model, target_modules)) if uses_targets else set()
    target_weights = {id(m.weight) for n, m in model.named_modules() if n in targets}
    # hf_galore.quant replaces plain nn.Linear targets only (not e.g. GPT-2's Conv1D)
    int8_targets = {id(m.weight) for n, m in model.named_modules() if n in targets and isinstance(m, nn.Linear)}

    weights = gradients = states = bases = 0
    total_params = trainable_params = lowrank_params = 0
    largest_grad = 0
    transient = 0
    small_weights = 0
    float_targets = 0  # projected, but kept in `dtype` by the INT8-weight methods (not an nn.Linear)
    basis_cache: dict = {}
    notes: list[str] = []

    def train_full(shape: Sequence[int]) -> None:
        nonlocal gradients, states, trainable_params, largest_grad, transient
        numel = math.prod(shape)
        trainable_params += numel
        gradients += numel * e
        largest_grad = max(largest_grad, numel * e)
        states += weight_state_bytes(base, shape, torch_dtype, full_group)
        transient = max(transient, update_transient_bytes(base, shape, None, int8=False))

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
        bases += sum(
            basis_bytes(side_size(side, matrix), r, torch_dtype, group["quant"], basis_cache, group=group)
            for side in sides
        )
        states += weight_state_bytes(base, shape, torch_dtype, group, basis_cache)
        refresh = max(
            finder.refresh_transient_bytes(side_size(side, matrix), numel // side_size(side, matrix), r, group)
            for side in sides
        )
        low_shape = projected_shape(matrix, r, sides)
        transient = max(transient, refresh, update_transient_bytes(base, matrix, low_shape, int8=int8))

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
    if spec.layerwise:
        gradients = largest_grad
        notes.append("layer-wise: only the largest single gradient is live at a time")
    acts = _activation_estimate(config, batch_size, seq_len, e, activation_checkpointing)
    if acts is None:
        acts = 0
        notes.append("activations not estimated: the model has no transformers config with sizes")
    elif getattr(config, "model_type", None) != "llama":
        notes.append(
            f"activations use the LLaMA-layout formula; for model_type {getattr(config, 'model_type', None)!r} "
            "treat them as a rough guide"
        )
    if not isinstance(model_or_config, nn.Module) and not getattr(config, "architectures", None):
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


__all__ = [
    "DTYPES",
    "METHODS",
    "MemoryEstimate",
    "MethodSpec",
    "activation_bytes",
    "estimate_memory",
    "preset_names",
    "register_method",
    "select_target_modules",
    "weight_state_bytes",
]
