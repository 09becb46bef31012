"""Tiny seeded models and training loops shared by the tests."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def tiny_mlp(seed: int = 0, dims=(32, 48, 24, 8)) -> nn.Sequential:
    """An MLP whose weights have both m > n and m < n shapes."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def split_groups(model: nn.Module, **lowrank_keys) -> list[dict]:
    """Matrices in a low-rank group, everything else full-rank."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": others}, {"params": matrices, **lowrank_keys}]


def regression_batch(seed: int = 1, n: int = 64, d_in: int = 32, d_out: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, loss_scale: float = 1.0, seed: int = 1):
    """Full-batch regression steps; ``loss_scale`` makes gradients large against eps."""
    x, y = regression_batch(seed, d_in=model[0].in_features, d_out=model[-1].out_features)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(x) - y).square().mean() * loss_scale
        loss.backward()
        optimizer.step()
    return model


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def tiny_llama(seed: int = 0, vocab: int = 64, seq: int = 16):
    """A 2-layer LLaMA small enough for Trainer tests (built in code, no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
    )
    return LlamaForCausalLM(config)


class TokenData(torch.utils.data.Dataset):
    """``n`` seeded random token sequences, labels = inputs (causal LM)."""

    def __init__(self, vocab: int, seq: int, n: int = 32, seed: int = 1) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
