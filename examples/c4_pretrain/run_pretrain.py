"""Pretrain LLaMA from scratch with GaLore (or a baseline), the recipe of the GaLore paper.

GaLore (Zhao et al., arXiv:2403.03507, §5.1 and App. C.1) trains LLaMA 60M–7B
on C4: sequences of 256 tokens, 131K tokens per step (512 sequences),
linear warm-up over the first 10% of steps then cosine decay to 10% of the
peak lr, lr 0.01 with scale 0.25, rank 128 / 256 / 256 / 1024 / 1024 and
update_proj_gap 200 (500 at 7B), weight decay 0, bf16 weights, no clipping
below 7B, evaluation every 1000 steps. See docs/pretraining.md.

Offline (the default: no network; LLaMA-20M shape on Python's own sources)::

    python examples/c4_pretrain/run_pretrain.py --method galore --num_training_steps 200 --max_length 128

The paper's 60M run on one GPU (needs the Hub for C4 and ``t5-base``)::

    python examples/c4_pretrain/run_pretrain.py --dataset c4 --model_config llama_60m \\
        --method galore --bf16 --batch_size 256 --tokens_per_step 131072 \\
        --num_training_steps 10000 --eval_every 1000

Several GPUs: the same flags under ``torchrun --nproc_per_node 4 ...`` or
``accelerate launch ...``; gradient accumulation is derived so that every
optimizer step sees ``--tokens_per_step`` tokens. Resume with
``--resume_from_checkpoint latest`` (bit-exact on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

import hf_galore

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_data import (
    IGNORE_INDEX,
    HubUnreachableError,
    build_offline_corpus,
    c4_batches,
    c4_tokenizer,
    corpus_summary,
    offline_batches,
)
from pretrain_methods import METHODS, get_method, optimizer_state_bytes

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Held-out tokens per evaluation when ``--eval_tokens`` is not given: on the offline corpus 16,384
#: (a quarter of its ~64K held-out tokens at ``--max_length 128``, as benchmarks/convergence.py uses;
#: every evaluation of all of them cost a third of the quick start's time), on C4 the paper's 10M.
DEFAULT_EVAL_TOKENS = {"offline": 16_384, "c4": 10_000_000}


def _is_galore(optimizer: torch.optim.Optimizer) -> bool:
    """A GaLore optimizer, or the layer-wise wrapper of one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return isinstance(inner, hf_galore.GaLoreOptimizer)

#: Per-size recipe of the paper (GaLore Table 5 and the repository's ``scripts/benchmark_c4``):
#: rank, steps, warm-up, gap, per-GPU batch on A100s, GPUs. lr is per method (``pretrain_methods.py``);
#: the 7B run uses lr 0.005 and clipping 1.0. Total batch is 512 sequences × 256 tokens everywhere.
PAPER_RECIPES: dict[str, dict[str, int]] = {
    "llama_60m": {"rank": 128, "steps": 10_000, "warmup": 1_000, "gap": 200, "batch_per_gpu": 256, "gpus": 1},
    "llama_130m": {"rank": 256, "steps": 20_000, "warmup": 2_000, "gap": 200, "batch_per_gpu": 256, "gpus": 1},
    "llama_350m": {"rank": 256, "steps": 60_000, "warmup": 6_000, "gap": 200, "batch_per_gpu": 128, "gpus": 4},
    "llama_1b": {"rank": 1024, "steps": 100_000, "warmup": 10_000, "gap": 200, "batch_per_gpu": 16, "gpus": 8},
    "llama_7b": {"rank": 1024, "steps": 150_000, "warmup": 15_000, "gap": 500, "batch_per_gpu": 8, "gpus": 64},
}

#: Learning rates that differ from the method's default at some sizes: GaLore's 7B scripts use 0.005;
#: Q-GaLore's ``scripts/pretrain_c4`` use 0.01 at 350M/1B and 0.004 at 7B.
PAPER_LR_BY_SIZE: dict[tuple[str, str], float] = {
    **{(m, "llama_7b"): 5e-3 for m in ("galore", "galore_8bit", "galore_layerwise", "galore_8bit_layerwise")},
    ("q_galore", "llama_350m"): 1e-2,
    ("q_galore", "llama_1b"): 1e-2,
    ("q_galore", "llama_7b"): 4e-3,
}


@dataclass
class PretrainArguments:
    """Flags of the example; ``None`` means "the paper's value for this model/method"."""

    # --- what to train
    method: str = field(default="galore", metadata={"help": f"one of {sorted(METHODS)}"})
    model_config: str = field(
        default="llama_20m", metadata={"help": "a name in configs/ (llama_20m … llama_7b) or a path to a config.json"}
    )
    dataset: Literal["offline", "c4"] = field(
        default="offline", metadata={"help": "offline: Python's stdlib sources; c4: allenai/c4 streamed (network)"}
    )
    # --- optimizer (None: the paper's value)
    learning_rate: float | None = field(default=None, metadata={"help": "peak lr; default per method (pretrain_methods.py)"})
    rank: int | None = field(default=None, metadata={"help": "GaLore / LoRA rank; default per size, else hidden/4"})
    update_proj_gap: int | None = field(default=None, metadata={"help": "T: steps between basis refreshes (200)"})
    galore_scale: float = field(default=0.25, metadata={"help": "α, the scale of the projected update"})
    proj_type: str = field(default="std", metadata={"help": "which side is projected (galore-torch convention)"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = field(default=0.0, metadata={"help": "0 in the paper"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "0 disables clipping (paper: 1.0 at 7B only)"})
    target_lr_ratio: float = field(
        default=1.0,
        metadata={
            "help": "full-rank and LoRA methods: lr multiplier of the attention/MLP weights (or their adapters); "
            "0.25 gives them GaLore's split rule (projected weights at scale × lr, the rest at lr)"
        },
    )
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (paper §5.1: 32)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (paper §5.1: 0.05)"})
    # --- schedule and batch
    num_training_steps: int = field(default=200, metadata={"help": "optimizer steps (paper: 10K at 60M)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up share of the steps (paper: 10%%)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this share of the peak (0.1)"})
    max_length: int = field(default=256, metadata={"help": "sequence length (paper: 256)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per device per micro-batch"})
    tokens_per_step: int | None = field(
        default=None,
        metadata={"help": "tokens per optimizer step, all devices; paper 131072 (512 × 256). Default: one micro-batch"},
    )
    # --- precision and memory
    bf16: bool = field(default=False, metadata={"help": "keep weights in bfloat16, as the paper's runs do"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    # --- evaluation, logging, checkpoints
    eval_every: int = field(default=50, metadata={"help": "steps between held-out evaluations (paper: 1000)"})
    eval_tokens: int | None = field(
        default=None,
        metadata={
            "help": "held-out tokens per evaluation; default 16384 (offline; a larger number reads more, up to "
            "all of the held-out set) / 10M (c4, the paper)"
        },
    )
    log_every: int = 10
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints; 0: only at the end"})
    output_dir: str = "runs/c4_pretrain"
    export_model: bool = field(
        default=True,
        metadata={"help": "write <output_dir>/final_model with save_pretrained (q_galore: INT8 layers dequantized)"},
    )
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint dir or 'latest'"})
    seed: int = 0
    # --- offline corpus
    vocab_size: int = field(default=8192, metadata={"help": "offline tokenizer's vocabulary"})
    max_corpus_chars: int = field(default=8_000_000, metadata={"help": "characters of stdlib source to use"})
    cache_dir: str | None = field(default=None, metadata={"help": "where the tokenizer and blocks are cached"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    # --- CPU
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch's CPU threads (torch.set_num_threads); default on a CPU-only machine: 1, unless "
            "OMP_NUM_THREADS is set; with CUDA: torch's default"
        },
    )


def resolve_defaults(args: PretrainArguments) -> PretrainArguments:
    """Fill the ``None`` fields with the paper's values for this model size and method."""
    method = get_method(args.method)
    recipe = PAPER_RECIPES.get(Path(args.model_config).stem, {})
    if args.learning_rate is None:
        args.learning_rate = PAPER_LR_BY_SIZE.get((args.method, Path(args.model_config).stem), method.lr)
    if args.update_proj_gap is None:
        args.update_proj_gap = recipe.get("gap", 200)
    if args.rank is None:
        args.rank = recipe.get("rank") or load_model_config(args.model_config).hidden_size // 4
    if args.eval_tokens is None:
        args.eval_tokens = DEFAULT_EVAL_TOKENS[args.dataset]
    for name in ("eval_tokens", "num_threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {value}")
    return args


def default_num_threads(environ: Mapping[str, str], cuda_available: bool) -> int | None:
    """The command line's thread count when ``--num_threads`` is not given; ``None``: leave torch's.

    On a CPU-only machine one thread: on cores shared with other work, torch's
    default (a thread per core) oversubscribes them, and a quick-start step on
    2 busy cores took 3.3 s with 2 threads against 1.6 s with one (on 2 idle
    cores 2 threads are faster, 0.58 s against 0.78 s: ask for them with
    ``--num_threads 2``). ``OMP_NUM_THREADS`` (torchrun sets it to 1 per
    process) is the user's choice and is kept.
    """
    if cuda_available or environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return 1


def load_model_config(name_or_path: str, vocab_size: int | None = None) -> Any:
    """A ``LlamaConfig`` from ``configs/<name>.json`` or a path; ``vocab_size`` overrides (offline tokenizer)."""
    from transformers import LlamaConfig

    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("llama_*.json"))
        raise ValueError(f"`model_config`={name_or_path!r} is neither a file nor one of {known}")
    config = LlamaConfig.from_json_file(str(path))
    if vocab_size is not None:
        config.vocab_size = vocab_size
    return config


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The paper's schedule: linear warm-up from 0, then cosine from 1 down to ``min_ratio``."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def accumulation_steps(tokens_per_step: int | None, batch_size: int, max_length: int, world: int) -> int:
    """Micro-batches per optimizer step so each step sees exactly ``tokens_per_step`` tokens."""
    per_micro = batch_size * max_length * world
    if tokens_per_step is None:
        return 1
    if tokens_per_step % per_micro:
        raise ValueError(
            f"`tokens_per_step`={tokens_per_step} is not a multiple of batch_size × max_length × devices "
            f"= {batch_size} × {max_length} × {world} = {per_micro}; pick a batch size that divides it"
        )
    return tokens_per_step // per_micro


def _build_model(args: PretrainArguments, vocab_size: int | None):
    from transformers import LlamaForCausalLM

    config = load_model_config(args.model_config, vocab_size)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    if args.bf16:
        model = model.to(torch.bfloat16)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@torch.no_grad()
def evaluate(
    model, batches, max_tokens_per_device: int | None, accelerator, on_batch: Callable[[int], None] | None = None
) -> tuple[float, int]:
    """Mean token loss on held-out batches (summed over devices) and the tokens it covers.

    Each device stops on its own after ``max_tokens_per_device``, so no
    collective runs inside the loop. ``on_batch(tokens)`` follows progress
    (the eval progress bar).
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss_sum += model(**batch).loss.double() * n
        count += n
        if on_batch is not None:
            on_batch(int(n))
        if max_tokens_per_device is not None and count >= max_tokens_per_device:
            break
    loss_sum = accelerator.reduce(loss_sum, "sum")
    count = accelerator.reduce(count, "sum")
    model.train(was_training)
    return float(loss_sum / count.clamp(min=1)), int(count)


def _heldout_batches(args, corpus, tokenizer, rank: int, world: int):
    if args.dataset == "offline":
        usable = corpus.heldout.shape[0] - corpus.heldout.shape[0] % world  # equal share per device
        blocks = corpus.heldout[:usable][rank::world]
        for i in range(0, blocks.shape[0], args.batch_size):
            ids = blocks[i : i + args.batch_size].long()
            yield {"input_ids": ids, "labels": ids.clone()}
    else:
        yield from c4_batches("validation", tokenizer, args.max_length, args.batch_size, args.seed, 0, rank, world)


def _latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, args: PretrainArguments, accelerator) -> None:
    """Model weights, optimizer, scheduler, step and RNG: everything an exact continuation needs."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(accelerator.unwrap_model(model).state_dict(), path / "model.pt")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "torch_rng": torch.get_rng_state(),
            },
            path / "training_state.pt",
        )
        (path / "args.json").write_text(json.dumps(asdict(args), indent=2))
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> int:
    """Restore what :func:`save_checkpoint` wrote; every file loads with ``weights_only=True``."""
    model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    accelerator.unwrap_model(model).load_state_dict(model_state)
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def export_model(model, path: Path, accelerator) -> None:
    """The trained model as a ``save_pretrained`` directory that plain ``from_pretrained`` loads.

    Q-GaLore's INT8 layers store codes and scales, not ``weight``: they are
    dequantized back into ``nn.Linear`` first (in place; run it after the
    last step). A LoRA model saves its adapter, as PEFT does.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        hf_galore.dequantize_int8_weights(model)
        model.save_pretrained(path)
    accelerator.wait_for_everyone()


def train(args: PretrainArguments) -> dict[str, Any]:
    """Run the example; returns the eval curve, final perplexity, optimizer-state bytes and timings."""
    from accelerate import Accelerator

    args = resolve_defaults(args)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    # Launched by torchrun / accelerate launch on a machine without CUDA: accelerate only sets up
    # multi-process CPU training (gloo) when told `cpu=True`.
    accelerator = Accelerator(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    method = get_method(args.method)
    if method.layerwise and world > 1:
        raise ValueError(
            f"`--method {args.method}` updates weights inside gradient hooks, before DDP has reduced the "
            "gradients; use it on one device, or the non-layer-wise method under torchrun"
        )
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    corpus = tokenizer = None
    if args.dataset == "offline":
        with accelerator.main_process_first():
            corpus = build_offline_corpus(
                args.max_length, args.vocab_size, args.max_corpus_chars, cache_dir=args.cache_dir
            )
        vocab_size = corpus.vocab_size
    else:
        tokenizer = c4_tokenizer()
        vocab_size = None  # the config's 32,000, as in the paper
    eval_tokens = args.eval_tokens

    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        # The optimizer is built on the unsharded parameters before `prepare`;
        # under FSDP it would update tensors the sharded model no longer uses.
        raise ValueError(
            f"run_pretrain.py supports one device and DDP (torchrun / accelerate's multi-GPU config), not "
            f"{accelerator.distributed_type.name}; see docs/distributed.md for GaLore under FSDP2"
        )
    model = _build_model(args, vocab_size)
    model, optimizer = method.build(model, args)
    model.train()
    model = accelerator.prepare(model)
    if world > 1 and _is_galore(optimizer):
        # every rank uses rank 0's basis by construction, not by relying on identical SVDs
        hf_galore.synchronize_bases(optimizer)
    warmup = int(args.warmup_ratio * args.num_training_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.num_training_steps, warmup, args.min_lr_ratio)
    )
    micro_steps = accumulation_steps(args.tokens_per_step, args.batch_size, args.max_length, world)

    output_dir = Path(args.output_dir)
    start_step = 0
    if args.resume_from_checkpoint:
        ckpt = (
            _latest_checkpoint(output_dir)
            if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint)
        )
        if ckpt is None or not ckpt.exists():
            raise FileNotFoundError(f"`resume_from_checkpoint`={args.resume_from_checkpoint!r}: no checkpoint found")
        start_step = load_checkpoint(ckpt, model, optimizer, scheduler, accelerator)

    if args.dataset == "offline":
        batches = offline_batches(corpus.train, args.batch_size, args.seed, start_step, micro_steps, rank, world)
    else:
        skip = start_step * micro_steps * args.batch_size
        batches = c4_batches("train", tokenizer, args.max_length, args.batch_size, args.seed, skip, rank, world)

    eval_seconds = 0.0

    def run_eval(step: int) -> dict[str, float]:
        """Held-out loss and perplexity; on the main process a progress bar while it runs, then one line."""
        nonlocal eval_seconds
        t0 = time.perf_counter()
        per_device = -(-eval_tokens // world)
        bar = None
        if args.progress and accelerator.is_main_process:
            from tqdm.auto import tqdm

            total = per_device
            if args.dataset == "offline":  # every held-out token counts: the whole share is known
                rows = corpus.heldout.shape[0] // world
                total = min(total, rows * (corpus.heldout.shape[1] - 1))
            bar = tqdm(total=total, desc=f"eval @ {step}", unit="tok", unit_scale=True, leave=False)
        batches = _heldout_batches(args, corpus, tokenizer, rank, world)
        loss, tokens = evaluate(model, batches, per_device, accelerator, None if bar is None else bar.update)
        if bar is not None:
            bar.close()
        eval_seconds += time.perf_counter() - t0
        entry = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss), "eval_tokens": tokens}
        if accelerator.is_main_process:
            line = json.dumps(entry)
            if progress is not None:
                progress.write(line)  # above the training bar, which stays intact
            else:
                print(line, flush=True)
        return entry

    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if accelerator.is_main_process:
        info = {
            "method": args.method,
            "lr": args.learning_rate,
            "rank": args.rank,
            "params": n_params,
            "trainable": n_trainable,
            "tokens_per_step": args.batch_size * args.max_length * world * micro_steps,
            "grad_accumulation": micro_steps,
            "devices": world,
        }
        if corpus is not None:
            info.update(corpus_summary(corpus))
        print(json.dumps(info), flush=True)

    history: list[dict[str, float]] = []
    train_losses: list[float] = []
    log_path = output_dir / f"metrics-{args.method}.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    def record(entry: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with log_path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    progress = None
    if args.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=args.num_training_steps, initial=start_step, desc=args.method, dynamic_ncols=True)

    started = time.perf_counter()
    for step in range(start_step, args.num_training_steps):
        step_loss = 0.0
        for micro in range(micro_steps):
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            with contextlib.ExitStack() as stack:
                if micro < micro_steps - 1:  # only accumulate: no all-reduce, no layer-wise update yet
                    stack.enter_context(accelerator.no_sync(model))
                    if method.layerwise:
                        stack.enter_context(optimizer.accumulating())
                loss = model(**batch).loss / micro_steps
                accelerator.backward(loss)
            step_loss += float(loss.detach())
        if args.max_grad_norm > 0 and not method.layerwise:  # layer-wise clips per weight in its hook
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(step_loss)
        done = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if done % args.log_every == 0:
            record({"step": done, "train_loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        if args.eval_every and done % args.eval_every == 0 and done < args.num_training_steps:
            entry = run_eval(done)
            history.append(entry)
            record(entry)
        if args.save_every and done % args.save_every == 0 and done < args.num_training_steps:
            save_checkpoint(output_dir / f"checkpoint-{done}", model, optimizer, scheduler, done, args, accelerator)
    train_seconds = time.perf_counter() - started - eval_seconds  # training only, evaluations excluded
    if progress is not None:
        progress.close()

    final = run_eval(args.num_training_steps)
    history.append(final)
    record(final)
    save_checkpoint(
        output_dir / f"checkpoint-{args.num_training_steps}",
        model,
        optimizer,
        scheduler,
        args.num_training_steps,
        args,
        accelerator,
    )
    if args.export_model:
        export_model(accelerator.unwrap_model(model), output_dir / "final_model", accelerator)
    result = {
        "method": args.method,
        "eval_loss": final["eval_loss"],
        "eval_ppl": final["eval_ppl"],
        "history": history,
        "train_losses": train_losses,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "train_seconds": train_seconds,
        "params": n_params,
        "trainable_params": n_trainable,
        "learning_rate": args.learning_rate,
        "rank": args.rank,
    }
    stats = getattr(getattr(optimizer, "optimizer", optimizer), "galore_stats", None)
    if stats is not None:  # GaLore-family methods: what the basis refreshes cost
        result["galore_stats"] = {
            "refreshes": stats.refreshes,
            "refresh_seconds": stats.refresh_seconds,
            "energy_fallbacks": stats.energy_fallbacks,
        }
    if accelerator.is_main_process:
        print(
            json.dumps({k: result[k] for k in ("method", "eval_loss", "eval_ppl", "optimizer_state_bytes")}),
            flush=True,
        )
    return result


def parse_args(argv: list[str] | None = None) -> PretrainArguments:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> None:
    """The command line: the CPU thread default, then :func:`train`; an unreachable hub is one error line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.num_threads is None:
        args.num_threads = default_num_threads(os.environ, torch.cuda.is_available())
    if args.num_threads is not None and args.num_threads >= 1:
        torch.set_num_threads(args.num_threads)
    try:
        train(args)
    except HubUnreachableError as exc:
        raise SystemExit(f"run_pretrain.py: error: {exc}") from None


if __name__ == "__main__":
    main()
