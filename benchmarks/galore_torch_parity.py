"""Parameter difference between hf_galore's and galore-torch 1.0's GaLoreAdamW, by gradient size.

The two place Adam's eps differently (hf_galore: after bias correction, as
torch.optim.AdamW; galore-torch: before), so they agree only while gradients
are large against eps. This trains two copies of the same model on the same
batches, one with each optimizer (weight decay 0, eps 1e-8, lr 1e-3 for the
LLaMA and 1e-2 for the MLP, rank 4/8, T = 5, scale 0.25), and prints the
largest absolute parameter difference after ``--steps`` steps next to the
median absolute gradient entry of the projected weights at the first step:

* ``mlp, loss x1e3``: the regime of ``tests/optim/test_adamw.py`` (scaled gradients);
* ``mlp, loss x1``: the same model, unscaled;
* ``llama``: a 2-layer LLaMA (hidden 128) on random tokens, next-token loss:
  gradients of a real language-model loss.

A last row trains the LLaMA at full rank with ``torch.optim.AdamW`` against
galore-torch's ``GaLoreAdamW`` (no low-rank group): the eps placement alone,
with hf_galore's ``GaLoreAdamW`` in place of galore-torch's in brackets.

    python benchmarks/galore_torch_parity.py            # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from hf_galore import GaLoreAdamW


def _groups(model: torch.nn.Module, rank: int, gap: int) -> list[dict]:
    lowrank = [p for n, p in model.named_parameters() if p.dim() == 2 and ("proj" in n or n[0].isdigit())]
    ids = {id(p) for p in lowrank}
    others = [p for p in model.parameters() if id(p) not in ids]
    keys = {"rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    return [{"params": lowrank, **keys}, {"params": others}]


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8)
    )


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=344, num_attention_heads=4, num_hidden_layers=2, vocab_size=512
    )
    return LlamaForCausalLM(config)


def run(kind: str, steps: int, loss_scale: float = 1.0, gap: int = 5) -> tuple[float, float, float]:
    import galore_torch

    base = _llama() if kind == "llama" else _mlp()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    lr, rank = (1e-3, 8) if kind == "llama" else (1e-2, 4)
    opts = [
        GaLoreAdamW(_groups(models[0], rank, gap), lr=lr, eps=1e-8, weight_decay=0.0),
        galore_torch.GaLoreAdamW(
            _groups(models[1], rank, gap), lr=lr, eps=1e-8, weight_decay=0.0, no_deprecation_warning=True
        ),
    ]
    gen = torch.Generator().manual_seed(1)
    grad_size = 0.0
    for step in range(steps):
        if kind == "llama":
            batch = {"input_ids": torch.randint(0, 512, (4, 32), generator=gen)}
        else:
            batch = (torch.randn(64, 32, generator=gen), torch.randn(64, 8, generator=gen))
        for model, opt in zip(models, opts):
            opt.zero_grad()
            if kind == "llama":
                loss = model(**batch, labels=batch["input_ids"]).loss
            else:
                loss = (model(batch[0]) - batch[1]).square().mean()
            (loss * loss_scale).backward()
            if step == 0 and model is models[0]:
                grads = torch.cat([p.grad.abs().flatten() for p in opt.param_groups[0]["params"]])
                grad_size = float(grads.median())
            opt.step()
    diffs = [[], []]  # projected weights, other parameters
    for index, (ga, gb) in enumerate(zip(opts[0].param_groups, opts[1].param_groups)):
        for a, b in zip(ga["params"], gb["params"]):
            diffs[index].append(float((a.detach() - b.detach()).abs().max()))
    return max(diffs[0]), max(diffs[1], default=0.0), grad_size


def full_rank(steps: int) -> tuple[float, float]:
    """Max abs difference (torch AdamW vs galore-torch, torch AdamW vs hf_galore) at full rank."""
    import galore_torch

    base = _llama()
    models = [copy.deepcopy(base) for _ in range(3)]
    opts = [
        torch.optim.AdamW(models[0].parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0),
        galore_torch.GaLoreAdamW(
            models[1].parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0, no_deprecation_warning=True
        ),
        GaLoreAdamW(models[2].parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0),
    ]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = {"input_ids": torch.randint(0, 512, (4, 32), generator=gen)}
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(**batch, labels=batch["input_ids"]).loss.backward()
            opt.step()

    def diff(a, b):
        return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))

    return diff(models[0], models[1]), diff(models[0], models[2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"| model | T | median abs grad (projected) | max abs diff after {args.steps} steps: projected | others |")
    print("|---|---|---|---|---|")
    cases = (
        ("mlp, loss x1e3", "mlp", 1e3, 5),
        ("mlp, loss x1", "mlp", 1.0, 5),
        ("llama", "llama", 1.0, 5),
        ("llama", "llama", 1.0, 1000),
    )
    for label, kind, scale, gap in cases:
        projected, others, grad = run(kind, args.steps, scale, gap)
        print(f"| {label} | {gap} | {grad:.2e} | {projected:.1e} | {others:.1e} |", flush=True)
    vs_galore_torch, vs_ours = full_rank(args.steps)
    print(f"| llama, full rank: torch AdamW vs galore-torch (vs hf_galore) | – | – | – | {vs_galore_torch:.1e} ({vs_ours:.1e}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
