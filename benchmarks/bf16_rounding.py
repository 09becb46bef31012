"""Pure-bf16 GaLore with and without stochastic rounding, against float32 weights.

Two measurements, one run:

1. **Along the path** (the issue's table): one ``--size``² weight with
   N(0, 0.02) entries, GaLoreAdamW / GaLoreAdamW8bit / GaLoreAdafactor at
   rank ``--size/8``, scale 0.25, 20 steps of the same three random
   gradients; the bf16 weight's displacement projected on the float32
   copy's, as a fraction of it, averaged over seeds.
2. **Fine-tuning**: a tiny LLaMA (config built in code) is first trained in
   float32 on one synthetic language (a random order-1 Markov chain), then
   fine-tuned on another at a fine-tuning learning rate (``--lr``) with
   GaLoreAdamW in three ways from the same start: float32 weights, pure bf16
   with stochastic rounding (the default), pure bf16 rounded to nearest.
   Prints the held-out loss every ``--eval_every`` steps, mean ± std over
   seeds, and checks that the bf16 + SR curve stays within seed noise of the
   float32 one while round-to-nearest falls behind.

    python benchmarks/bf16_rounding.py                      # defaults below, ~2 min on one CPU core
    python benchmarks/bf16_rounding.py --seeds 0 1 2 --steps 150 --skip_path
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_line

import hf_galore
from hf_galore import GaLoreConfig, galore_param_groups

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
MODES = ("fp32", "bf16_sr", "bf16_nearest")


# ------------------------------------------------------------------ along the path
def along_path(cls, kwargs: dict, lr: float, size: int, seed: int, sr: bool) -> float:
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(size, size, generator=gen) * 0.02
    grads = [torch.randn(size, size, generator=gen) for _ in range(3)]
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        start = w0.to(dtype)
        weight = torch.nn.Parameter(start.clone())
        group = {"params": [weight], "rank": size // 8, "scale": 0.25, "update_proj_gap": 200, "stochastic_rounding": sr}
        optimizer = cls([group], lr=lr, **kwargs)
        for step in range(20):
            weight.grad = grads[step % 3].to(dtype)
            optimizer.step()
        moved[dtype] = weight.detach().double() - start.double()
    ref = moved[torch.float32]
    return float((moved[torch.bfloat16] * ref).sum() / ref.square().sum())


def path_table(size: int, seeds: list[int]) -> str:
    members = [
        ("GaLoreAdamW", hf_galore.GaLoreAdamW, {}),
        ("GaLoreAdamW8bit", hf_galore.GaLoreAdamW8bit, {}),
        ("GaLoreAdafactor", hf_galore.GaLoreAdafactor, {"relative_step": False, "scale_parameter": False}),
    ]
    lines = ["| optimizer | lr | bf16 along the fp32 path, rounded to nearest | with stochastic rounding |", "|---|---|---|---|"]
    for name, cls, kwargs in members:
        for lr in (1e-5, 1e-4, 1e-3):
            off = statistics.mean(along_path(cls, kwargs, lr, size, s, False) for s in seeds)
            on = statistics.mean(along_path(cls, kwargs, lr, size, s, True) for s in seeds)
            lines.append(f"| {name} | {lr:g} | {off:.3f} | **{on:.3f}** |")
    return "\n".join(lines)


# ------------------------------------------------------------------- fine-tuning
def markov_batches(seed: int, vocab: int, n: int, batch: int, length: int) -> list[torch.Tensor]:
    """``n`` batches from a random order-1 Markov chain (each token has ~4 likely successors)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=gen) * 3.0
    probs = torch.softmax(logits, dim=-1)
    out = []
    for _ in range(n):
        tokens = torch.empty(batch, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (batch,), generator=gen)
        for t in range(1, length):
            tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=gen).squeeze(1)
        out.append(tokens)
    return out


def _loss(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def pretrain(seed: int, args) -> dict:
    """A float32 model trained on language A: the common start of the three fine-tuning runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    data = markov_batches(1000 + seed, TINY_LLAMA["vocab_size"], args.pretrain_steps, args.batch_size, args.length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for tokens in data:
        _loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate(model, batches) -> float:
    return statistics.mean(float(_loss(model, b).float()) for b in batches)


def finetune(start: dict, mode: str, seed: int, args) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.load_state_dict(start)
    if mode != "fp32":
        model.to(torch.bfloat16)
    config = GaLoreConfig(
        rank=args.rank,
        update_proj_gap=args.update_proj_gap,
        target_modules=["self_attn", "mlp"],
        stochastic_rounding=mode != "bf16_nearest",
    )
    optimizer = hf_galore.GaLoreAdamW(galore_param_groups(model, config), lr=args.lr)
    vocab = TINY_LLAMA["vocab_size"]
    data = markov_batches(2000 + seed, vocab, args.steps + args.eval_batches, args.batch_size, args.length)
    train, held_out = data[: args.steps], data[args.steps :]
    curve = [evaluate(model, held_out)]
    for step, tokens in enumerate(train, start=1):
        _loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.eval_every == 0:
            curve.append(evaluate(model, held_out))
    return curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps (default 150)")
    parser.add_argument("--pretrain_steps", type=int, default=150, help="float32 steps on language A (default 150)")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate, all modes (default 1e-4)")
    parser.add_argument("--rank", type=int, default=16, help="GaLore rank (hidden 64 / 4)")
    parser.add_argument("--update_proj_gap", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--eval_batches", type=int, default=4)
    parser.add_argument("--path_size", type=int, default=1024, help="weight size of the along-path table (issue: 1024)")
    parser.add_argument("--path_seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip_path", action="store_true", help="only the fine-tuning comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny tensors run fastest)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"{environment_line()}\n")
    if not args.skip_path:
        print(f"Along the fp32 path: {args.path_size}x{args.path_size} weight, rank {args.path_size // 8}, "
              f"20 steps, mean of seeds {args.path_seeds}\n")
        print(path_table(args.path_size, args.path_seeds))
        print()
    curves: dict[str, list[list[float]]] = {mode: [] for mode in MODES}
    for seed in args.seeds:
        start = pretrain(seed, args)
        for mode in MODES:
            curves[mode].append(finetune(start, mode, seed, args))
    steps = [0] + list(range(args.eval_every, args.steps + 1, args.eval_every))
    print(f"Fine-tuning a tiny LLaMA ({TINY_LLAMA['hidden_size']} hidden, {TINY_LLAMA['num_hidden_layers']} layers) "
          f"with GaLoreAdamW, lr {args.lr:g}, rank {args.rank}: held-out loss, mean ± std over seeds {args.seeds}\n")
    print("| step | " + " | ".join(MODES) + " |")
    print("|---" * (len(MODES) + 1) + "|")
    for i, step in enumerate(steps):
        cells = []
        for mode in MODES:
            values = [c[i] for c in curves[mode]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    # per-seed gap to the float32 curve at the last evaluation, against the seed-to-seed spread
    last = {mode: [c[-1] for c in curves[mode]] for mode in MODES}
    gain = {mode: [c[0] - c[-1] for c in curves[mode]] for mode in MODES}
    noise = statistics.stdev(last["fp32"]) if len(args.seeds) > 1 else 0.0
    sr_gap = max(abs(a - b) for a, b in zip(last["bf16_sr"], last["fp32"]))
    near_gap = min(b - a for a, b in zip(last["fp32"], last["bf16_nearest"]))
    print("\nloss drop (first - last eval): " + ", ".join(f"{m} {statistics.mean(gain[m]):.4f}" for m in MODES))
    print(f"largest |bf16_sr - fp32| at the end: {sr_gap:.4f}; seed-to-seed std of fp32: {noise:.4f}")
    print(f"smallest bf16_nearest - fp32 at the end: {near_gap:.4f}")
    print(f"bf16 + SR within seed noise of fp32: {sr_gap <= max(noise, 1e-3)}; "
          f"round-to-nearest behind by more than the noise: {near_gap > noise}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
