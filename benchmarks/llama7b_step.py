"""One real training step of LLaMA-7B on this machine's CPU: peak resident memory beside ``estimate_memory``.

The GaLore paper's headline is that 8-bit GaLore (layer-wise) trains LLaMA-7B
within a 24 GB card, and Q-GaLore within 16 GB. A GPU is not always at hand,
but the host's resident set is a measurement of the same bytes: the model is
LLaMA-7B (GaLore Table 5 shape, 6.74B parameters) in bf16 with activation
checkpointing, batch ``--batch`` × ``--seq`` tokens, every attention / MLP
weight (224) projected at ``--rank``; one forward, one backward with the
layer-wise updates (and the cold refresh of every basis) inside it.

Methods (each runs in a fresh process, so peaks do not leak between them):

* ``galore_8bit_layerwise``: ``GaLoreAdamW8bit`` in a ``LayerwiseOptimizer``;
* ``q_galore_layerwise``: the same after ``prepare_model_for_int8_weights``
  (INT8 weights, converted layer by layer), with INT4 bases and the lazy
  refresh policy (Q-GaLore).

Measured per method, from the tensors and from the kernel's accounting:
weights (distinct storages of parameters and INT8 codes and scales), optimizer state
(Σ bytes of every state tensor), the peak of live gradients (hooks before and
after each update), activations (the storages autograd saves in the
checkpointed forward, plus those of one layer run without checkpointing, as
the backward pass recomputes it), the largest temporaries of one weight's
step (refresh + update: ``VmHWM`` reset when its update starts, read when it
ends, minus the resident set at its start and the optimizer state the step
creates and keeps), and the peak resident set
(``VmHWM``, reset before the step; the largest of all readings) — beside
``estimate_memory`` for the same setup, whose ``peak`` adds the transient
working set of one refresh or update to its total.

The model is built on the meta device and materialised in place with a
cheap deterministic init (uniform, std 0.02, one seeded generator per
tensor): nothing pays for the float32 random initialisation of
``from_config``. The process lowers glibc's mmap threshold to 64 KiB itself
(``mallopt``), so freed temporaries go back to the system at once instead of
staying in the heap; ``--no-allocator-tuning`` measures without it.

    python benchmarks/llama7b_step.py --method galore_8bit_layerwise   # 18 min on 2 AVX-512 BF16 cores
    python benchmarks/llama7b_step.py --method q_galore_layerwise      # 27 min there
    python benchmarks/llama7b_step.py --method q_galore_layerwise --layers 1   # for CPUs without fast bf16
    python benchmarks/llama7b_step.py --report          # the table from the saved results
    python benchmarks/llama7b_step.py --preset tiny --method all --out /tmp/x.json   # seconds, a smoke test

Results are saved per method to ``--out`` (JSON, default
``benchmarks/results/llama7b_step.json``) as soon as a method finishes; a
rerun skips methods already there unless ``--rerun``. Before starting, the
script checks that the machine has the memory the estimate needs and
refuses with a clear message otherwise (``--force`` to try anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import distinct_storage_bytes, state_bytes

METHODS = ("galore_8bit_layerwise", "q_galore_layerwise")
#: A small LLaMA for smoke tests (seconds on a CPU).
TINY = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "llama7b_step.json"
GIB = 2**30
#: Headroom the machine must have above the estimated peak before a run starts.
MARGIN_BYTES = GIB // 2


# ------------------------------------------------------------------ arguments
def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--method", default="all", help=f"one of {', '.join(METHODS)}, a comma-separated list, or all (default)"
    )
    parser.add_argument("--preset", default="llama_7b", help="shipped preset (llama_60m … llama_13b) or tiny")
    parser.add_argument("--rank", type=int, default=None, help="projection rank (default 1024; tiny: 8)")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="keep only this many decoder layers (every weight shape stays; for CPUs too slow for all 32)",
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches of the measured step (default 1). Above 1, a first step of one micro-batch makes "
        "the bases, then the measured step accumulates this many in the subspace",
    )
    parser.add_argument(
        "--projector", default=None, help="basis finder (default: the package's default, as a user would get)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument(
        "--int8-build",
        choices=("meta", "convert"),
        default="meta",
        help="q_galore_layerwise: build the INT8 layers from the meta device (default; no dense model ever exists) "
        "or build the bf16 model and convert it layer by layer",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default %(default)s)")
    parser.add_argument("--rerun", action="store_true", help="measure methods already in --out again")
    parser.add_argument("--report", action="store_true", help="print the table from --out and exit")
    parser.add_argument("--force", action="store_true", help="run even if free memory is below the estimate")
    parser.add_argument(
        "--no-allocator-tuning",
        dest="allocator_tuning",
        action="store_false",
        help="leave glibc's malloc settings alone (measures the allocator's retention too)",
    )
    parser.add_argument(
        "--build-only",
        action="store_true",
        help="build the model (INT8 targets included) and measure it, without the step: a model whose step "
        "this CPU cannot run in time still shows it can be built within the memory",
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is None:
        args.rank = 8 if args.preset == "tiny" else 1024
    for name in ("rank", "batch", "seq", "layers", "grad_accum"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    methods = METHODS if args.method == "all" else tuple(m.strip() for m in args.method.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--method {args.method!r}: unknown {unknown}; valid: {', '.join(METHODS)} or all")
    args.methods = methods
    return args


# ------------------------------------------------------------- process memory
def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def limit_allocator_retention() -> bool:
    """Make glibc return freed blocks over 64 KiB to the system at once (``mallopt(M_MMAP_THRESHOLD)``).

    Why: glibc raises its mmap threshold (up to 32 MiB) each time a mapped
    block is freed, so later temporaries of a refresh or an update come from
    the heap, which it keeps; a 7B step then holds gigabytes of freed
    memory. Fixing the threshold (which also turns the dynamic raise off)
    keeps the resident set equal to the live tensors. Returns ``False``
    where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 16))


# --------------------------------------------------------------------- model
def _config(preset: str, layers: int | None = None):
    """The preset's LlamaConfig; ``layers`` keeps only that many decoder layers (same shapes, less work)."""
    from transformers import LlamaConfig

    if preset == "tiny":
        config = LlamaConfig(**TINY)
    else:
        from hf_galore.memory import load_preset

        config = load_preset(preset)
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, mininterval=1.0)


def _meta_llama(config, dtype):
    """LLaMA on the meta device, in ``dtype``: shapes only, nothing allocated."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _init_(tensor, name: str, index: int, seed: int):
    """The benchmark's cheap deterministic init of parameter number ``index``, in place: norms 1, the rest
    uniform(-b, b) with std 0.02 (the config's initializer_range), one seeded generator per tensor."""
    import torch

    if name.endswith("norm.weight"):
        return tensor.fill_(1.0)
    bound = 0.02 * math.sqrt(3.0)
    generator = torch.Generator(device=tensor.device).manual_seed(seed * 100_003 + index)
    return tensor.uniform_(-bound, bound, generator=generator)


def _ready(model, config, device: str):
    """RoPE's non-persistent buffers (never materialised from the meta device) rebuilt; checkpointing on."""
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def build_model(config, dtype, seed: int = 0, device: str = "cpu"):
    """LLaMA on the meta device, materialised on ``device`` with a cheap deterministic init (no float32 pass)."""
    import torch

    model = _meta_llama(config, dtype)
    model.to_empty(device=device)
    params = list(model.named_parameters())
    with torch.no_grad(), _progress(len(params), "build") as bar:
        for index, (name, param) in enumerate(params):
            _init_(param, name, index, seed)
            bar.update()
    return _ready(model, config, device)


def build_int8_model(config, dtype, seed: int = 0, device: str = "cpu"):
    """LLaMA whose targets are INT8 layers, built from the meta device: no dense copy of the model ever exists.

    The documented path for loading a float checkpoint into INT8 layers
    (``prepare_model_for_int8_weights`` on a meta model, then each dense
    weight quantized as it is assigned, as ``load_checkpoint_into_int8``
    does), fed one generated tensor at a time instead of checkpoint shards:
    the values and order of :func:`build_model`. The peak is the INT8 model
    plus one dense weight.
    """
    import torch

    from hf_galore import prepare_model_for_int8_weights

    model = _meta_llama(config, dtype)
    dense = [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # build_model's order and seeds
    prepare_model_for_int8_weights(model, "all-linear", progress=True)
    with torch.no_grad(), _progress(len(dense), "build (INT8 targets from the meta device)") as bar:
        for index, (name, shape) in enumerate(dense):
            value = _init_(torch.empty(shape, dtype=dtype, device=device), name, index, seed)
            model.load_state_dict({name: value}, strict=False, assign=True)
            del value
            bar.update()
    model = _ready(model, config, device)
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise RuntimeError(f"still on the meta device after the build: {empty[:5]}")
    return model


def build_optimizer(method: str, model, args: argparse.Namespace, **options: Any):
    """(LayerwiseOptimizer, the GaLoreAdamW8bit inside it) through the public API; ``options``: GaLoreConfig's."""
    import hf_galore
    from hf_galore.optim.layerwise import LayerwiseOptimizer

    if args.projector is not None:
        options["projector"] = args.projector
    if method == "q_galore_layerwise":
        options.update(quant="int4", refresh="lazy")
    config = hf_galore.GaLoreConfig(rank=args.rank, target_modules="all-linear", **options)
    groups = hf_galore.galore_param_groups(model, config)
    inner = hf_galore.GaLoreAdamW8bit(groups, lr=args.lr)
    return LayerwiseOptimizer(inner), inner


def estimate(method: str, config, args: argparse.Namespace):
    import hf_galore

    return hf_galore.estimate_memory(
        config,
        method,
        rank=args.rank,
        dtype="bf16",
        batch_size=args.batch,
        seq_len=args.seq,
        activation_checkpointing=True,
        projector=args.projector,
        grad_accum=getattr(args, "grad_accum", 1),
    )


# ------------------------------------------------------ activations, from tensors
def saved_tensor_bytes(model, ids, exclude: set[int]):
    """(bytes of the distinct floating-point storages autograd saves in one forward, the loss).

    ``exclude``: storage addresses not to count (parameters, INT8 codes and scales).
    The same count ``tests/test_memory.py`` checks the activation formula with.
    """
    import torch

    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if tensor.is_floating_point() and storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    return sum(seen.values()), loss


def recomputed_layer_bytes(model, ids, exclude: set[int]) -> int:
    """What one decoder layer saves when it runs without checkpointing (as the backward pass recomputes it).

    Measured as the model cut to one layer minus the model cut to none, both
    without checkpointing (two short forwards, whose graphs are dropped).
    """
    layers = model.model.layers
    model.gradient_checkpointing_disable()
    try:
        model.model.layers = layers[:1]
        one, _ = saved_tensor_bytes(model, ids, exclude)
        model.model.layers = layers[:0]
        none, _ = saved_tensor_bytes(model, ids, exclude)
    finally:
        model.model.layers = layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return one - none


# ---------------------------------------------------------------- one method
def measure(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, prepare, and run one step of ``method`` in this process; the measured figures."""
    import torch

    tuned = limit_allocator_retention() if args.allocator_tuning else False
    torch.manual_seed(0)
    config = _config(args.preset, args.layers)
    expected = estimate(method, config, args)
    needed = expected.peak + MARGIN_BYTES
    available = _available_bytes()
    if available < needed and not args.force:
        raise SystemExit(
            f"{method}: the estimate needs {needed / GIB:.2f} GiB (peak {expected.peak / GIB:.2f} GiB + "
            f"{MARGIN_BYTES / GIB:.1f} GiB margin) but only {available / GIB:.2f} GiB is available; "
            "free memory or pass --force"
        )
    result: dict[str, Any] = {
        "method": method,
        "preset": args.preset,
        "layers": args.layers,
        "rank": args.rank,
        "batch": args.batch,
        "seq": args.seq,
        "projector": args.projector,
        "grad_accum": args.grad_accum,
        "allocator_tuning": tuned,
        "threads": torch.get_num_threads(),
    }
    import bitsandbytes.functional  # noqa: F401  (libraries loaded before the baseline is read)
    import transformers.models.llama.modeling_llama  # noqa: F401

    result["baseline_rss"] = _status_bytes("VmRSS")  # the interpreter and libraries, before any tensor
    from_meta = method == "q_galore_layerwise" and args.int8_build == "meta"
    result["int8_build"] = args.int8_build if method == "q_galore_layerwise" else None
    started = time.perf_counter()
    _reset_peak()
    model = build_int8_model(config, torch.bfloat16) if from_meta else build_model(config, torch.bfloat16)
    result["build_seconds"] = time.perf_counter() - started
    result["build_peak"] = _status_bytes("VmHWM")
    if method == "q_galore_layerwise" and not from_meta:
        from hf_galore import prepare_model_for_int8_weights

        started = time.perf_counter()
        _reset_peak()
        prepare_model_for_int8_weights(model, "all-linear", progress=True)
        result["int8_seconds"] = time.perf_counter() - started
        result["int8_peak"] = _status_bytes("VmHWM")
    optimizer, inner = build_optimizer(method, model, args)
    params = [p for group in inner.param_groups for p in group["params"]]
    from hf_galore import Int8Linear

    # parameters and the INT8 layers' codes and scales (not RoPE's tables, which no estimate counts)
    buffers = [b for m in model.modules() if isinstance(m, Int8Linear) for b in m.buffers()]
    result["weights"] = distinct_storage_bytes([*model.parameters(), *buffers])
    if args.build_only:  # the model at full size, built as the method builds it; no step
        result["build_only"] = True
        result["rss_after"] = _status_bytes("VmRSS")
        return result

    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *buffers]}
    result["activations_recomputed_layer"] = recomputed_layer_bytes(model, ids, exclude)

    # Per weight, two hooks around the layer-wise update (registered before and after it; hooks run in
    # order): the live gradients, and the step's own temporaries as resident memory: VmHWM is reset when
    # the update starts and read when it ends, less the optimizer state the step creates and keeps (the
    # overall peak is the largest of all readings).
    names = {id(p): name for name, p in model.named_parameters()}
    live, peak_grads, sizes, held_before = [0], [0], {}, {}
    accumulators = [0]  # bytes of the gradients accumulated in the subspace (grad_accum > 1)
    kept: set[int] = set()  # parameters whose gradient stays in .grad across micro-batches (counted once)

    def accumulated() -> int:
        return sum(e.low.numel() * e.low.element_size() for e in inner._pending.values())

    peak, entry, transient = [0], [0], {"bytes": 0, "weight": None}
    bar = _progress(len(params), "backward (update + refresh per weight)")

    def held(p) -> int:  # the weight's optimizer state: created in its first step, kept, not a temporary
        return distinct_storage_bytes(t for t in inner.state.get(p, {}).values() if torch.is_tensor(t))

    def count(p) -> None:
        held_before[id(p)] = held(p)
        sizes[id(p)] = p.grad.numel() * p.grad.element_size()
        if id(p) not in kept:  # autograd accumulated into a gradient already counted
            live[0] += sizes[id(p)]
        peak_grads[0] = max(peak_grads[0], live[0] + accumulators[0])
        peak[0] = max(peak[0], _status_bytes("VmHWM"))
        _reset_peak()
        entry[0] = _status_bytes("VmRSS")

    def drop(p) -> None:
        high = _status_bytes("VmHWM")
        peak[0] = max(peak[0], high)
        created = held(p) - held_before.pop(id(p), 0)
        if high - entry[0] - created > transient["bytes"]:
            transient.update(bytes=high - entry[0] - created, weight=names.get(id(p)))
        _reset_peak()
        size = sizes.pop(id(p), 0)
        if p.grad is None:  # updated, or accumulated in the subspace; a gradient still held stays counted
            live[0] -= size
            kept.discard(id(p))
        else:
            kept.add(id(p))
        accumulators[0] = accumulated()
        bar.update()

    optimizer.remove_hooks()
    for p in params:
        p.register_post_accumulate_grad_hook(count)
    optimizer.register_hooks()
    for p in params:
        p.register_post_accumulate_grad_hook(drop)

    layers = model.model.layers
    forward_bar = _progress(len(layers), "forward")

    def advance(*_) -> None:  # a forward hook must return None, or it replaces the layer's output
        forward_bar.update()

    handles = [layer.register_forward_hook(advance) for layer in layers]

    before_step = _status_bytes("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    result["activations_forward"], loss = saved_tensor_bytes(model, ids, exclude)
    result["forward_seconds"] = time.perf_counter() - started
    result["activations_rss"] = _status_bytes("VmRSS") - before_step
    forward_bar.close()
    for handle in handles:
        handle.remove()
    started = time.perf_counter()
    loss.backward()
    optimizer.step()
    result["backward_seconds"] = time.perf_counter() - started
    bar.close()
    if args.grad_accum > 1:
        # the first step made the bases (a refresh step: every gradient full); the measured one accumulates
        result["first_step"] = {"peak": max(peak[0], _status_bytes("VmHWM")), "gradients": peak_grads[0]}
        result["first_backward_seconds"] = result["backward_seconds"]
        result["loss_before"] = loss.item()
        loss = None
        live[0], peak_grads[0], peak[0], accumulators[0] = 0, 0, 0, 0
        kept.clear()
        transient.update(bytes=0, weight=None)
        bar = _progress(len(params) * args.grad_accum, f"{args.grad_accum} micro-batches, in the subspace")
        _reset_peak()
        started = time.perf_counter()
        for k in range(args.grad_accum):
            batch = torch.randint(
                0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(2 + k)
            )
            final = k == args.grad_accum - 1
            with contextlib.nullcontext() if final else optimizer.accumulating():
                (model(input_ids=batch, labels=batch).loss / args.grad_accum).backward()
            if not final:
                result.setdefault("accumulated_bytes", accumulated())
        optimizer.step()
        result["backward_seconds"] = time.perf_counter() - started
        bar.close()
    result["peak"] = max(peak[0], _status_bytes("VmHWM"))
    result["rss_after"] = _status_bytes("VmRSS")
    result["transient"] = transient["bytes"]
    result["transient_weight"] = transient["weight"]
    result["gradients"] = peak_grads[0]
    result["states"] = state_bytes(inner)[0]  # logical: Σ numel · itemsize
    if loss is not None:
        result["loss_before"] = loss.item()
    with torch.no_grad():
        result["loss_after"] = float(model(input_ids=ids, labels=ids).loss)
    return result


# ----------------------------------------------------------------- the table
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _key(args: argparse.Namespace, method: str) -> str:
    layers = "" if args.layers is None else f"|{args.layers}layers"
    accum = f"|accum{args.grad_accum}" if getattr(args, "grad_accum", 1) > 1 else ""
    accum += "|build" if getattr(args, "build_only", False) else ""
    return f"{method}|{args.preset}{layers}|r{args.rank}|{args.batch}x{args.seq}{accum}|{args.projector or 'default'}"


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Measured vs estimated per component; the estimate is recomputed with today's code."""
    lines = []
    for got in results:
        est = estimate(
            got["method"], _config(got["preset"], got.get("layers")), argparse.Namespace(**{**vars(args), **got})
        )
        if got.get("build_only"):
            lines.append(_render_build(got, est))
            continue
        acts = got.get("activations_forward", 0) + got.get("activations_recomputed_layer", 0)
        rows = [
            ("weights", est.weights, got["weights"]),
            ("optimizer states", est.optimizer_states, got["states"]),
            ("gradients (peak live)", est.gradients, got["gradients"]),
            (
                "activations (saved for backward: checkpointed forward + one recomputed layer)",
                est.activations,
                acts if "activations_forward" in got else None,
            ),
            ("transient (largest one-weight step, in the backward pass)", est.transient, got.get("transient")),
            (
                "above the steady state (activations + gradient + transient; peak - RSS after the step)",
                est.activations + est.gradients + est.transient,
                got["peak"] - got["rss_after"],
            ),
            ("peak (VmHWM - interpreter and libraries)", est.peak, got["peak"] - got["baseline_rss"]),
        ]
        lines.append(
            f"\n{got['method']}: {got['preset']}"
            + (f" cut to {got['layers']} decoder layers" if got.get("layers") else "")
            + f", rank {got['rank']}, batch {got['batch']} x {got['seq']}"
            + (f", {got['grad_accum']} micro-batches accumulated in the subspace" if got.get("grad_accum", 1) > 1 else "")
            + ", "
            f"projector {got['projector'] or 'default'}, allocator tuning {got['allocator_tuning']}, "
            f"{got['threads']} threads"
        )
        lines.append("| component | estimate GiB | measured GiB | measured / estimate |")
        lines.append("|---|---:|---:|---:|")
        for name, e, m in rows:
            if m is None:  # a result saved before this component was measured
                lines.append(f"| {name} | {e / GIB:.3f} | not measured | n/a |")
                continue
            ratio = f"{m / e:.3f}" if e else "n/a"
            lines.append(f"| {name} | {e / GIB:.3f} | {m / GIB:.3f} | {ratio} |")
        timing = (
            f"build {got['build_seconds']:.0f} s"
            + (" (INT8 targets from the meta device)" if got.get("int8_build") == "meta" else "")
            + f" (peak {got['build_peak'] / GIB:.2f} GiB)"
            + (
                f", INT8 conversion {got['int8_seconds']:.0f} s (peak {got['int8_peak'] / GIB:.2f} GiB)"
                if "int8_seconds" in got
                else ""
            )
            + f", forward {got['forward_seconds']:.0f} s, backward with updates {got['backward_seconds']:.0f} s; "
            f"loss {got['loss_before']:.3f} -> {got['loss_after']:.3f}; resident after the step "
            f"{got['rss_after'] / GIB:.2f} GiB; peak VmHWM {got['peak'] / GIB:.2f} GiB including "
            f"{got['baseline_rss'] / GIB:.2f} GiB of interpreter and libraries"
        )
        lines.append(timing)
        if got.get("grad_accum", 1) > 1:
            first = got["first_step"]
            lines.append(
                f"the measured step came after a first step of one micro-batch (every basis made: "
                f"{got['first_backward_seconds']:.0f} s, peak VmHWM {first['peak'] / GIB:.2f} GiB, peak live gradients "
                f"{first['gradients'] / GIB:.3f} GiB); accumulators held between micro-batches "
                f"{got['accumulated_bytes'] / GIB:.3f} GiB"
            )
        if "transient_weight" in got:
            lines.append(
                f"largest one-weight step: {got['transient_weight']}; resident growth over the forward "
                f"{got['activations_rss'] / GIB:.3f} GiB for {got['activations_forward'] / GIB:.3f} GiB saved "
                f"by it; the method's process took {got['total_seconds'] / 60:.1f} min in all"
            )
    return "\n".join(lines)


def _render_build(got: dict[str, Any], est) -> str:
    """The lines of a ``--build-only`` result: the built model beside the estimate's weights."""
    how = "INT8 targets from the meta device" if got.get("int8_build") == "meta" else "dense build"
    return (
        f"\n{got['method']}: {got['preset']}, build only ({how}): weights {got['weights'] / GIB:.3f} GiB "
        f"(estimate {est.weights / GIB:.3f}, {got['weights'] / est.weights:.3f}x); build peak VmHWM "
        f"{got['build_peak'] / GIB:.2f} GiB including {got['baseline_rss'] / GIB:.2f} GiB of interpreter and "
        f"libraries, resident after {got['rss_after'] / GIB:.2f} GiB; {got['build_seconds']:.0f} s"
    )


def run_child(script: str, argv: list[str], method: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script`` for one ``method`` in a fresh process (``--child``); its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), *argv, "--child", method],
        env=env,
        check=False,
        stdout=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed (exit {proc.returncode}); its messages are above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return 0
    saved = _load(args.out)
    if not args.report:
        for method in args.methods:
            key = _key(args, method)
            if key in saved and not args.rerun:
                print(f"{method}: already measured in {args.out} (--rerun to measure again)", file=sys.stderr)
                continue
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
            started = time.perf_counter()
            saved[key] = run_child(__file__, argv, method, env)
            saved[key]["total_seconds"] = time.perf_counter() - started
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(saved, indent=1, sort_keys=True))
    chosen = [saved[_key(args, m)] for m in args.methods if _key(args, m) in saved]
    if not chosen:
        print(f"no results for {', '.join(args.methods)} in {args.out}", file=sys.stderr)
        return 1
    print(render(chosen, args))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
