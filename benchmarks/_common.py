"""Helpers shared by the benchmark scripts: models, state accounting, timing tables."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Iterable

import torch

#: The GaLore paper's LLaMA "60M" shape (Table 5 / configs/llama_60m.json).
LLAMA_60M = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_attention_heads": 8,
    "num_hidden_layers": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def build_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA_60M, **overrides})
    return LlamaForCausalLM(config)


def galore_targets(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The paper's targets: weights of nn.Linear modules under ``self_attn`` / ``mlp``."""
    return [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ("self_attn" in name or "mlp" in name)
    ]


def state_tensors(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    """Every tensor an optimizer's state keeps, including tensors inside objects (galore-torch's projector)."""
    seen: set[int] = set()

    def walk(value):
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from walk(v)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for v in vars(value).values():
                yield from walk(v)

    for state in optimizer.state.values():
        yield from walk(state)


def state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(logical, retained): Σ numel·itemsize, and bytes of the distinct storages kept alive."""
    logical, storages = 0, {}
    for t in state_tensors(optimizer):
        logical += t.numel() * t.element_size()
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return logical, sum(storages.values())


def distinct_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared storages counted once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment_line() -> str:
    import importlib.metadata as md

    versions = []
    for name in ("torch", "transformers", "bitsandbytes", "galore-torch", "peft"):
        try:
            versions.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " + ", ".join(versions)
