"""The training methods of the pretraining example: one registry entry each, selected by ``--method``.

Every entry turns a freshly initialised model into ``(model, optimizer)``.
Defaults follow the papers (see ``docs/pretraining.md``):

* full-rank baselines and LoRA: lr 1e-3 (GaLore, arXiv:2403.03507, §5.1 and
  the repository's baseline scripts); LoRA alpha 32, dropout 0.05 (§5.1),
  embeddings, norms and the output head trained at full rank as in the
  paper's LoRA/ReLoRA baselines (its Table 6 counts them as trainable);
* GaLore family: lr 0.01, scale α 0.25, update_proj_gap T 200, proj_type
  "std", applied to every ``nn.Linear`` of attention and MLP blocks (the
  repository's ``"attn"``/``"mlp"`` rule); embeddings, norms and the head
  get plain Adam inside the same optimizer;
* online_pca: Online Subspace Descent (arXiv:2408.12857), same recipe as
  GaLore (its README's 60M command);
* q_galore: INT4 basis, lazy layer-adaptive refresh, 8-bit Adam and INT8
  weights with stochastic rounding (arXiv:2407.08296), lr 0.015 at
  ≤ 130M (its ``scripts/pretrain_c4``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import hf_galore
from hf_galore.errors import GaLoreConfigError, format_choices

#: The LLaMA linears GaLore projects and LoRA adapts (all attention and MLP projections).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Method:
    """How to build one method; ``lr`` is the paper's peak learning rate for it."""

    name: str
    lr: float
    build: Callable[[nn.Module, Any], tuple[nn.Module, torch.optim.Optimizer]]
    help: str
    layerwise: bool = False


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise GaLoreConfigError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise GaLoreConfigError(f"`method` must be one of {format_choices(METHODS)}, got {name!r}") from None


# ----------------------------------------------------------------------------- param groups
def galore_config(args: Any, **overrides: Any) -> hf_galore.GaLoreConfig:
    """The example's flags as a ``GaLoreConfig`` over the attention and MLP linears."""
    values = {
        "rank": args.rank,
        "update_proj_gap": args.update_proj_gap,
        "scale": args.galore_scale,
        "proj_type": args.proj_type,
        "target_modules": LLAMA_TARGETS,
    }
    values.update(overrides)
    return hf_galore.GaLoreConfig(**values)


def adam_kwargs(args: Any) -> dict[str, Any]:
    return {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def is_target_parameter(name: str) -> bool:
    """A weight of an attention/MLP linear, or a LoRA adapter on one (what GaLore would project)."""
    return any(f".{t}." in f".{name}" for t in LLAMA_TARGETS)


def _full_rank_groups(model: nn.Module, args: Any) -> list[dict[str, Any]]:
    """Decay on matrices only (norms and biases are exempt), the usual Hugging Face rule.

    With ``args.target_lr_ratio`` != 1 the attention/MLP weights (or their LoRA
    adapters) get their own group at ``ratio × lr``: the "split" learning-rate
    rule that GaLore applies to its projected weights through ``scale``, offered
    to the full-rank and LoRA baselines so that a comparison tunes both the same way.
    """
    ratio = float(getattr(args, "target_lr_ratio", 1.0))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    split = [p for n, p in named if ratio != 1.0 and p.dim() >= 2 and is_target_parameter(n)]
    chosen = {id(p) for p in split}
    rest = [p for n, p in named if id(p) not in chosen]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    if split:
        groups.append({"params": split, "weight_decay": args.weight_decay, "lr": args.learning_rate * ratio})
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- builders
def build_adamw(model: nn.Module, args: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    return model, torch.optim.AdamW(_full_rank_groups(model, args), **adam_kwargs(args))


def build_adamw8bit(model: nn.Module, args: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    from hf_galore._optional import require

    bnb_optim = require("bitsandbytes.optim", "--method adamw8bit")
    return model, bnb_optim.AdamW8bit(_full_rank_groups(model, args), **adam_kwargs(args))


def _galore(optimizer_cls: type, layerwise: bool = False, **overrides: Any) -> Callable:
    """GaLore-family builder: ``galore_param_groups`` + one hf_galore optimizer (optionally layer-wise)."""

    def build(model, args):
        if float(getattr(args, "target_lr_ratio", 1.0)) != 1.0:
            raise GaLoreConfigError(
                f"`target_lr_ratio`={args.target_lr_ratio!r} applies to full-rank and LoRA methods; GaLore "
                "methods already move their projected weights at `galore_scale` × lr"
            )
        groups = hf_galore.galore_param_groups(model, galore_config(args, **overrides), weight_decay=args.weight_decay)
        optimizer = optimizer_cls(groups, **adam_kwargs(args))
        if layerwise:
            # Global-norm clipping needs every gradient at once, which layer-wise mode never holds:
            # `--max_grad_norm` becomes per-weight clipping here (docs/layerwise.md).
            clip = args.max_grad_norm if args.max_grad_norm > 0 else None
            optimizer = hf_galore.LayerwiseOptimizer(optimizer, per_param_max_norm=clip)
        return model, optimizer

    return build


def build_q_galore(model: nn.Module, args: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Q-GaLore: INT8 target weights (stochastic rounding), INT4 basis with lazy refresh, 8-bit Adam.

    Group sizes and lazy-refresh thresholds are hf_galore's defaults, which are
    Q-GaLore's (weights 256, cosine 0.4, growth 2, queue 5).
    """
    hf_galore.prepare_model_for_int8_weights(model, LLAMA_TARGETS, seed=args.seed)
    return _galore(hf_galore.GaLoreAdamW8bit, quant="int4", refresh="lazy")(model, args)


def build_lora(model: nn.Module, args: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """peft LoRA on the same linears at the same rank; embeddings, norms and head train fully."""
    from hf_galore._optional import require

    peft = require("peft", "--method lora")
    config = peft.LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LLAMA_TARGETS,
        bias="none",
    )
    model = peft.get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "lora_" not in name and not any(f".{t}." in name for t in LLAMA_TARGETS):
            param.requires_grad_(True)  # embeddings, norms, lm_head: trained from scratch
    return model, torch.optim.AdamW(_full_rank_groups(model, args), **adam_kwargs(args))


for _method in (
    Method("adamw", 1e-3, build_adamw, "full-rank torch AdamW (the paper's baseline)"),
    Method("adamw8bit", 1e-3, build_adamw8bit, "bitsandbytes AdamW8bit, full rank"),
    Method(
        "galore",
        1e-2,
        _galore(hf_galore.GaLoreAdamW),
        "GaLoreAdamW, default projector (auto: exact SVD on small weights, randomized on large ones)",
    ),
    Method(
        "galore_svd",
        1e-2,
        _galore(hf_galore.GaLoreAdamW, projector="svd"),
        "GaLoreAdamW, exact SVD every T steps on every weight (galore-torch)",
    ),
    Method(
        "galore_auto_switched",
        1e-2,
        _galore(hf_galore.GaLoreAdamW, projector="auto", options={"auto_min_numel": 0}),
        "GaLoreAdamW, projector auto with its size switch at 0: every weight with rank <= min(m, n)/2 takes "
        "the randomized branch (compares auto's large-weight path on a small model)",
    ),
    Method("galore_8bit", 1e-2, _galore(hf_galore.GaLoreAdamW8bit), "GaLoreAdamW8bit (8-bit GaLore)"),
    Method(
        "galore_layerwise",
        1e-2,
        _galore(hf_galore.GaLoreAdamW, layerwise=True),
        "GaLoreAdamW, each weight updated in its gradient hook",
        layerwise=True,
    ),
    Method(
        "galore_8bit_layerwise",
        1e-2,
        _galore(hf_galore.GaLoreAdamW8bit, layerwise=True),
        "8-bit GaLore updated per layer (the paper's 7B single-GPU recipe)",
        layerwise=True,
    ),
    Method(
        "online_pca",
        1e-2,
        _galore(hf_galore.GaLoreAdamW, projector="online_pca"),
        "Online Subspace Descent: basis tracked every step by online PCA",
    ),
    Method("q_galore", 1.5e-2, build_q_galore, "Q-GaLore: INT4 basis, lazy refresh, INT8 weights, 8-bit Adam"),
    Method(
        "galore_randomized",
        1e-2,
        _galore(hf_galore.GaLoreAdamW, projector="randomized"),
        "GaLoreAdamW, warm-started randomized subspace iteration instead of exact SVD",
    ),
    Method(
        "galore_rotate",
        1e-2,
        _galore(hf_galore.GaLoreAdamW, options={"rotate_moments": True}),
        "GaLoreAdamW with the moments rotated into each new basis",
    ),
    Method("lora", 1e-3, build_lora, "peft LoRA at the same rank (alpha 32, dropout 0.05)"),
):
    register_method(_method)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensors in ``optimizer.state_dict()`` (moments, bases, scales, steps).

    Nested containers are walked (bitsandbytes packs its 8-bit states in a
    dict), and a tensor shared by several parameters (bitsandbytes' quantization
    maps) is counted once.
    """
    seen: dict[tuple[int, int], int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            seen[(value.data_ptr(), value.numel())] = value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(optimizer.state_dict()["state"])
    return sum(seen.values())


__all__ = [
    "LLAMA_TARGETS",
    "METHODS",
    "Method",
    "galore_config",
    "get_method",
    "is_target_parameter",
    "optimizer_state_bytes",
    "register_method",
]
