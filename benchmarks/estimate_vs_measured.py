"""``estimate_memory`` against what one real training step holds, method by method, on one model.

For each method the script builds the model from a preset (default: the
GaLore paper's LLaMA-60M, 58M parameters), its optimizer through the public
path (``galore_param_groups`` + ``GaLoreConfig``; ``prepare_model_for_int8_weights``
for Q-GaLore; ``LayerwiseOptimizer`` for layer-wise; peft for LoRA), runs
``--steps`` real forward/backward/step iterations and compares, side by side:

* weights: bytes of the distinct storages of parameters (and INT8 buffers);
* gradients: bytes of ``p.grad`` after a backward (layer-wise: the peak of
  live gradients seen by a hook that runs just before the update);
* optimizer state: Σ numel·itemsize of every state tensor (logical) and the
  bytes of the distinct storages they keep alive (retained);
* activations: bytes of the tensors autograd saves for backward
  (``saved_tensors_hooks``) at ``--batch × --seq``.

    python benchmarks/estimate_vs_measured.py                       # llama_60m, bf16, rank 128
    python benchmarks/estimate_vs_measured.py --layers 2 --dtype fp32   # quicker on a busy CPU
    python benchmarks/estimate_vs_measured.py --methods galore,q_galore --dtype fp32
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import distinct_storage_bytes

ALL_METHODS = (
    "adamw",
    "adamw8bit",
    "galore",
    "galore_8bit",
    "galore_adafactor",
    "online_pca",
    "q_galore",
    "galore_8bit_layerwise",
    "lora",
)


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama_60m", help="preset or config path (default llama_60m)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated estimate_memory methods")
    parser.add_argument("--rank", type=int, default=128, help="GaLore / LoRA rank (default 128)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="weights and states (default bf16)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument(
        "--steps", type=int, default=2, help="steps (default 2: OSD and lazy-refresh state appear at step 2)"
    )
    parser.add_argument("--layers", type=int, default=None, help="override the preset's decoder layers")
    return parser.parse_args(argv)


def _config(args: argparse.Namespace):
    from hf_galore.memory import load_preset

    config = load_preset(args.model)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    return config


def _build(method: str, config, dtype: torch.dtype, rank: int):
    """(model, optimizer, optimizer whose .state holds the tensors) through the public API."""
    from transformers import AutoModelForCausalLM

    import hf_galore

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if method == "lora":
        import peft

        model = peft.get_peft_model(
            model, peft.LoraConfig(r=rank, target_modules="all-linear"), autocast_adapter_dtype=False
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return model, optimizer, optimizer
    base = method.removesuffix("_layerwise")
    if base in ("adamw", "adamw8bit"):
        cls = hf_galore.GaLoreAdamW if base == "adamw" else hf_galore.GaLoreAdamW8bit
        optimizer = cls(model.parameters())
    else:
        options = {"galore": {}, "galore_8bit": {}, "galore_adafactor": {}}.get(base)
        if base == "online_pca":
            options = {"projector": "online_pca"}
        if base == "q_galore":
            from hf_galore import prepare_model_for_int8_weights

            prepare_model_for_int8_weights(model, "all-linear")
            # gap 1: the lazy policy's cosine FIFO appears at the second refresh
            options = {"quant": "int4", "refresh": "lazy", "update_proj_gap": 1}
        galore = hf_galore.GaLoreConfig(rank=rank, target_modules="all-linear", **options)
        groups = hf_galore.galore_param_groups(model, galore)
        cls = {
            "galore": hf_galore.GaLoreAdamW,
            "online_pca": hf_galore.GaLoreAdamW,
            "galore_adafactor": hf_galore.GaLoreAdafactor,
        }.get(base, hf_galore.GaLoreAdamW8bit)
        optimizer = cls(groups)
    return model, optimizer, optimizer


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model, optimizer, holder = _build(method, _config(args), dtype, args.rank)
    from hf_galore.quant import Int8Linear

    buffers = [b for m in model.modules() if isinstance(m, Int8Linear) for b in m.buffers()]
    weights = distinct_storage_bytes([*model.parameters(), *buffers])
    live, peak, sizes = [0], [0], {}

    def count(p):  # runs before the layer-wise update hook: sees each gradient before it is freed
        sizes[id(p)] = p.grad.numel() * p.grad.element_size()
        live[0] += sizes[id(p)]
        peak[0] = max(peak[0], live[0])

    def drop(p):  # runs after it: the gradient is gone
        live[0] -= sizes.pop(id(p), 0)

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.register_post_accumulate_grad_hook(count)
    if method.endswith("_layerwise"):
        from hf_galore.optim.layerwise import LayerwiseOptimizer

        optimizer = LayerwiseOptimizer(holder)
        for p in params:
            p.register_post_accumulate_grad_hook(drop)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    protected = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        b.untyped_storage().data_ptr() for b in model.buffers()
    }
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in protected and t.is_floating_point():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    started = time.perf_counter()
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        live[0] = 0
        if step == args.steps - 1:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    logical, storages = 0, {}
    for state in holder.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                logical += value.numel() * value.element_size()
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return {
        "weights": weights,
        "gradients": peak[0],
        "states": logical,
        "retained": sum(storages.values()),
        "activations": sum(saved.values()),
        "seconds": time.perf_counter() - started,
    }


def main(argv=None) -> None:
    args = _parse(argv)
    from tqdm import tqdm

    import hf_galore

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for method in tqdm(methods, desc="methods"):
        got = measure(method, args)
        est = hf_galore.estimate_memory(
            _config(args), method, rank=args.rank, dtype=args.dtype, batch_size=args.batch, seq_len=args.seq
        )
        rows.append((method, est, got))
    mib = 2**20
    layers = f" ({args.layers} layers)" if args.layers is not None else ""
    print(
        f"\n{args.model}{layers}, {args.dtype}, rank {args.rank}, batch {args.batch} x {args.seq}, "
        f"{args.steps} steps; MiB"
    )
    print(
        "| method | weights est / measured | gradients est / measured | states est / measured (retained) "
        "| activations est / measured | states est ÷ measured |"
    )
    print("|---|---|---|---|---|---|")
    for method, est, got in rows:
        print(
            f"| {method} | {est.weights / mib:.2f} / {got['weights'] / mib:.2f} "
            f"| {est.gradients / mib:.2f} / {got['gradients'] / mib:.2f} "
            f"| {est.optimizer_states / mib:.2f} / {got['states'] / mib:.2f} ({got['retained'] / mib:.2f}) "
            f"| {est.activations / mib:.2f} / {got['activations'] / mib:.2f} "
            f"| {est.optimizer_states / got['states']:.6f} |"
        )


if __name__ == "__main__":
    main()
