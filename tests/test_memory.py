"""``estimate_memory`` against the bytes our optimizers really hold, and against the papers.

The oracle for weights, gradients and optimizer state is the live tensors of
a tiny LLaMA after one real training step; for activations it is the set of
tensors autograd saves for backward (``saved_tensors_hooks``).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from hf_galore import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreConfigError,
    estimate_memory,
)
from hf_galore.memory import (
    METHODS,
    MemoryEstimate,
    preset_names,
    select_target_modules,
)

transformers = pytest.importorskip("transformers")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny_llama_config(layers: int = 2, hidden: int = 64, vocab: int = 256):
    # GQA (k/v 32 × 64) and an MLP of 128 so that, at rank 32, some projected
    # gradients have >= 4096 elements (8-bit moments) and some fewer (16/32-bit).
    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def tiny_llama(dtype: torch.dtype, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config(layers)).to(dtype)


def is_target(name: str) -> bool:
    """The paper's selection, written independently of the estimator: attention and MLP linears."""
    return name.endswith(".weight") and (".self_attn." in name or ".mlp." in name)


def groups_for(model: nn.Module, lowrank_keys: dict | None) -> list[dict]:
    """Targets in a low-rank group, except those with a side <= rank (full rank, as galore_param_groups)."""
    if lowrank_keys is None:
        return [{"params": list(model.parameters())}]
    projected = lambda n, p: is_target(n) and min(p.shape) > lowrank_keys["rank"]
    targets = [p for n, p in model.named_parameters() if projected(n, p)]
    others = [p for n, p in model.named_parameters() if not projected(n, p)]
    return [{"params": others}, {"params": targets, **lowrank_keys}]


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def held_state_bytes(optimizer: torch.optim.Optimizer, prefix: str = "") -> int:
    return tensor_bytes(v for s in optimizer.state.values() for k, v in s.items() if k.startswith(prefix))


# (method, optimizer factory, low-rank group keys or None, estimate_memory kwargs)
EXACT_CASES = [
    ("adamw", torch.optim.AdamW, None, {}),
    ("adamw", GaLoreAdamW, None, {}),
    ("adamw8bit", GaLoreAdamW8bit, None, {}),
    ("adafactor", GaLoreAdafactor, None, {}),
    ("galore", GaLoreAdamW, {"rank": 8}, {"rank": 8}),
    ("galore", GaLoreAdamW, {"rank": 48}, {"rank": 48}),  # k/v (32 × 64) train at full rank
    ("galore", GaLoreAdamW, {"rank": 8, "proj_type": "reverse_std"}, {"rank": 8, "proj_type": "reverse_std"}),
    ("galore", GaLoreAdamW, {"rank": 8, "proj_type": "full"}, {"rank": 8, "proj_type": "full"}),
    ("galore_8bit", GaLoreAdamW8bit, {"rank": 32}, {"rank": 32}),
    ("galore_8bit", GaLoreAdamW8bit, {"rank": 4}, {"rank": 4}),
    ("galore_adafactor", GaLoreAdafactor, {"rank": 16}, {"rank": 16}),
    # the default projector "auto" with its size switch at 0 (every weight on the randomized branch),
    # and projector="svd" named: the same bytes as the default
    ("galore", GaLoreAdamW, {"rank": 8, "auto_min_numel": 0}, {"rank": 8}),
    ("galore", GaLoreAdamW, {"rank": 8, "projector": "svd"}, {"rank": 8}),
]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("method,factory,lowrank,kwargs", EXACT_CASES)
def test_estimate_equals_bytes_held_after_one_step(method, factory, lowrank, kwargs, dtype):
    if factory is GaLoreAdamW8bit:
        pytest.importorskip("bitsandbytes")
    model = tiny_llama(DTYPES[dtype])
    optimizer = factory(groups_for(model, lowrank))
    one_step(model, optimizer)
    est = estimate_memory(model, method, dtype=dtype, **kwargs)
    assert est.weights == tensor_bytes(model.parameters())
    assert est.gradients == tensor_bytes(p.grad for p in model.parameters())
    assert est.optimizer_states == held_state_bytes(optimizer)
    assert est.projection_bases == held_state_bytes(optimizer, prefix="basis")
    assert (est.projection_bases > 0) == (lowrank is not None)
    assert est.total == est.weights + est.gradients + est.optimizer_states + est.activations


def distinct_storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_online_pca_counts_the_basis_optimizer_state(dtype):
    """OSD adds Adam state for the basis from the second step on (projectors/online_pca.py)."""
    model = tiny_llama(DTYPES[dtype])
    optimizer = GaLoreAdamW(groups_for(model, {"rank": 8, "projector": "online_pca"}))
    for _ in range(2):
        optimizer.zero_grad()
        one_step(model, optimizer)
    est = estimate_memory(model, "online_pca", rank=8, dtype=dtype)
    assert est.optimizer_states == held_state_bytes(optimizer)
    assert est.projection_bases == held_state_bytes(optimizer, prefix="basis")
    assert held_state_bytes(optimizer, prefix="osd_") > 0


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_q_galore_int8_weights_int4_bases_lazy_refresh(dtype):
    """Q-GaLore: INT8 target weights (quant/int8.py), INT4 bases, 8-bit moments, lazy-refresh FIFO."""
    pytest.importorskip("bitsandbytes")
    from hf_galore import prepare_model_for_int8_weights
    from hf_galore.quant import Int8Linear

    reference = tiny_llama(DTYPES[dtype])
    model = tiny_llama(DTYPES[dtype])
    prepare_model_for_int8_weights(model, "all-linear")
    keys = {"rank": 16, "quant": "int4", "refresh": "lazy", "update_proj_gap": 1}
    optimizer = GaLoreAdamW8bit(groups_for(model, keys))
    for _ in range(2):  # the lazy FIFO appears at the second refresh
        optimizer.zero_grad()
        one_step(model, optimizer)
    est = estimate_memory(reference, "q_galore", rank=16, dtype=dtype)
    int8_buffers = [b for m in model.modules() if isinstance(m, Int8Linear) for b in m.buffers()]
    assert est.weights == distinct_storage_bytes([*model.parameters(), *int8_buffers])
    assert est.gradients == tensor_bytes(p.grad for p in model.parameters())
    assert est.optimizer_states == held_state_bytes(optimizer)
    assert est.projection_bases == held_state_bytes(optimizer, prefix="basis")
    assert held_state_bytes(optimizer, prefix="lazy_cos") > 0


def test_layerwise_optimizer_holds_the_estimated_state_and_no_gradients():
    layerwise = pytest.importorskip("hf_galore.optim.layerwise")
    model = tiny_llama(torch.float32)
    optimizer = layerwise.LayerwiseOptimizer(GaLoreAdamW(groups_for(model, {"rank": 8})))
    one_step(model, optimizer)
    est = estimate_memory(model, "galore_layerwise", rank=8, dtype="fp32")
    assert est.optimizer_states == held_state_bytes(optimizer.optimizer)
    assert all(p.grad is None for p in model.parameters())


def _peak_live_gradients(model, build, micro: int, steps: int = 2) -> int:
    """The largest total of ``.grad`` bytes plus subspace accumulators seen in any gradient hook or after any
    micro-batch, over the last of ``steps`` steps of ``micro`` micro-batches. The sampling hooks are
    registered before ``build()`` makes the optimizer, so they run before its hooks."""
    params = list(model.parameters())
    peak = {"on": False, "bytes": 0}
    pending = {}

    def live() -> int:
        accumulated = tensor_bytes(entry.low for entry in pending.values())
        return tensor_bytes(p.grad for p in params if p.grad is not None) + accumulated

    def sample(_param) -> None:
        if peak["on"]:
            peak["bytes"] = max(peak["bytes"], live())

    for p in params:
        p.register_post_accumulate_grad_hook(sample)
    optimizer = build()
    pending = getattr(optimizer, "optimizer", optimizer)._pending
    layerwise = hasattr(optimizer, "accumulating")
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        peak["on"] = step == steps - 1
        optimizer.zero_grad()
        for i in range(micro):
            ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
            with optimizer.accumulating() if layerwise and i < micro - 1 else contextlib.nullcontext():
                model(input_ids=ids, labels=ids).loss.backward()
            if peak["on"]:
                peak["bytes"] = max(peak["bytes"], live())
        optimizer.step()
    return peak["bytes"]


@pytest.mark.parametrize(
    "method,layerwise,accumulate",
    [
        ("galore_layerwise", True, "auto"),  # in the subspace
        ("galore_layerwise", True, "full"),  # every gradient held across the window
        ("galore", False, "lowrank"),  # the regular optimizer's hooks
        ("galore", False, "auto"),  # regular: in .grad
    ],
)
def test_gradients_with_accumulation_are_the_measured_peak(method, layerwise, accumulate):
    """`estimate_memory(grad_accum=3)`'s gradients = the peak live gradient bytes (every .grad plus the
    subspace accumulators) of a step without a refresh, measured in the hooks."""
    layerwise_module = pytest.importorskip("hf_galore.optim.layerwise")
    model = tiny_llama(torch.float32)

    def build():
        inner = GaLoreAdamW(groups_for(model, {"rank": 8, "accumulate": accumulate}))
        return layerwise_module.LayerwiseOptimizer(inner) if layerwise else inner

    measured = _peak_live_gradients(model, build, micro=3)
    est = estimate_memory(model, method, rank=8, dtype="fp32", grad_accum=3, options={"accumulate": accumulate})
    assert est.gradients == measured
    everything = sum(p.numel() * 4 for p in model.parameters())
    assert (measured < everything / 2) == (accumulate != "full" and (layerwise or accumulate == "lowrank"))


def test_grad_accum_is_checked_and_one_changes_nothing():
    model = tiny_llama(torch.float32)
    with pytest.raises(GaLoreConfigError, match="`grad_accum`"):
        estimate_memory(model, "galore", rank=8, grad_accum=0)
    for method in ("galore", "galore_layerwise", "q_galore_layerwise", "adamw"):
        assert estimate_memory(model, method, rank=8, grad_accum=1) == estimate_memory(model, method, rank=8)


def test_7b_accumulation_figures():
    """The figures docs/layerwise.md quotes: 7B 8-bit layer-wise, rank 1024, two micro-batches."""
    kw = {"rank": 1024, "activation_checkpointing": True, "grad_accum": 2}
    subspace = estimate_memory("llama_7b", "galore_8bit_layerwise", **kw)
    full = estimate_memory("llama_7b", "galore_8bit_layerwise", options={"accumulate": "full"}, **kw)
    assert round(subspace.peak / 2**30, 1) == 21.9 and round(full.peak / 2**30, 1) == 30.9
    assert any("3.016 GiB of accumulators" in note for note in subspace.notes)


def test_param_groups_of_the_trainer_path_hold_the_estimated_bytes():
    """``galore_param_groups`` (what the Trainer uses) with regex targets and small weights at full rank."""
    from hf_galore import GaLoreConfig, galore_param_groups

    model = tiny_llama(torch.float32)
    config = GaLoreConfig(rank=32, target_modules=r".*\.(q_proj|k_proj|up_proj)")
    with pytest.warns(UserWarning, match="full rank"):
        optimizer = GaLoreAdamW(galore_param_groups(model, config))
    one_step(model, optimizer)
    est = estimate_memory(model, "galore", rank=32, dtype="fp32", target_modules=config.target_modules)
    assert est.optimizer_states == held_state_bytes(optimizer)
    assert est.projection_bases == held_state_bytes(optimizer, prefix="basis") == 4 * 4 * (64 * 32)
    assert any("train at full rank" in note for note in est.notes)


def test_8bit_case_covers_both_moment_layouts():
    """The rank-32 8-bit case above must exercise uint8 and 16/32-bit moments, or it proves little."""
    pytest.importorskip("bitsandbytes")
    model = tiny_llama(torch.float32)
    optimizer = GaLoreAdamW8bit(groups_for(model, {"rank": 32}))
    one_step(model, optimizer)
    kinds = {("state1" in s, "basis_left" in s or "basis_right" in s) for s in optimizer.state.values()}
    assert kinds == {(True, True), (False, True), (True, False), (False, False)}


def test_lora_matches_peft_with_adamw():
    peft = pytest.importorskip("peft")
    model = tiny_llama(torch.float32)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=names))
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    one_step(wrapped, optimizer)
    est = estimate_memory(tiny_llama(torch.float32), "lora", rank=8, dtype="fp32", target_modules=names)
    assert est.weights == tensor_bytes(wrapped.parameters())
    assert est.gradients == tensor_bytes(p.grad for p in trainable)
    assert est.optimizer_states == held_state_bytes(optimizer)
    assert est.trainable_params == sum(p.numel() for p in trainable)


def test_layerwise_gradients_are_the_largest_single_gradient():
    """Hook-driven stepping frees each gradient at once: the live peak is the largest one."""
    model = tiny_llama(torch.float32)
    live, peak = [0], [0]

    def hook(p):
        live[0] += p.grad.numel() * p.grad.element_size()
        peak[0] = max(peak[0], live[0])
        live[0] -= p.grad.numel() * p.grad.element_size()
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    for method in ("galore_layerwise", "galore_8bit_layerwise", "adamw_layerwise"):
        est = estimate_memory(model, method, rank=8, dtype="fp32")
        assert est.gradients == peak[0] == 256 * 64 * 4  # embedding / head
        regular = estimate_memory(model, method.removesuffix("_layerwise"), rank=8, dtype="fp32")
        assert est.optimizer_states == regular.optimizer_states


def saved_activation_bytes(model: nn.Module, batch: int, seq: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.is_floating_point():
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_activation_estimate_matches_saved_tensors(dtype):
    model = tiny_llama(DTYPES[dtype]).train()
    measured = saved_activation_bytes(model, 2, 32)
    est = estimate_memory(model, "adamw", dtype=dtype, batch_size=2, seq_len=32).activations
    assert est == pytest.approx(measured, rel=0.02)


def test_activation_checkpointing_keeps_layer_inputs_plus_one_recomputed_layer():
    measured = {}
    for layers in (1, 2):
        for ckpt in (False, True):
            model = tiny_llama(torch.float32, layers=layers).train()
            if ckpt:
                if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            measured[layers, ckpt] = saved_activation_bytes(model, 2, 32)
    one_layer = measured[2, False] - measured[1, False]
    est = estimate_memory(
        tiny_llama_config(2), "adamw", dtype="fp32", batch_size=2, seq_len=32, activation_checkpointing=True
    )
    # end-of-forward checkpoints, plus one layer rebuilt during backward
    assert est.activations == pytest.approx(measured[2, True] + one_layer, rel=0.03)
    assert est.activations < estimate_memory(tiny_llama_config(2), "adamw", dtype="fp32", batch_size=2,
                                             seq_len=32).activations


# -------------------------------------------------------------- paper's LLaMA sizes
#: Parameter counts derived from the papers' LLaMA configs (GaLore Table 5 shapes, untied head, vocab 32,000).
PRESET_PARAMS = {
    "llama_60m": 58_073_600,
    "llama_130m": 134_105_856,
    "llama_350m": 367_969_280,
    "llama_1b": 1_339_082_752,
    "llama_7b": 6_738_415_616,
    "llama_13b": 13_015_864_320,  # LLaMA-13B (arXiv:2302.13971 Table 2)
}


def test_presets_have_the_papers_parameter_counts():
    assert preset_names() == ["llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_3b", "llama_7b", "llama_13b"]
    for name, params in PRESET_PARAMS.items():
        assert estimate_memory(name, "adamw").total_params == params


def test_60m_galore_states_match_the_derived_formula():
    """GaLore §5.1 formula for 60M: 81,871,872 state elements at 2 B (+ 4 B per step counter)."""
    est = estimate_memory("llama_60m", "galore", rank=128, dtype="bf16")
    tensors = 2 + 8 * (7 + 2) + 1  # embeddings, head, 8 × (7 linears + 2 norms), final norm
    assert est.optimizer_states == 2 * 81_871_872 + 4 * tensors
    assert est.projection_bases == 2 * 3_670_016
    assert est.weights == 2 * 58_073_600


#: GaLore Table 2 (weights + optimizer states, G), with Table 2's ranks.
TABLE2 = [
    ("llama_60m", 128, 0.36, 0.24),
    ("llama_130m", 256, 0.76, 0.52),
    ("llama_350m", 256, 2.06, 1.22),
    ("llama_1b", 512, 7.80, 4.38),
]


@pytest.mark.parametrize("preset,rank,full,galore", TABLE2)
def test_weights_plus_states_within_ten_percent_of_table2(preset, rank, full, galore):
    """The paper's figures are not reproducible exactly by any simple reading (docs/memory.md); read as GiB they are within 10%."""
    gib = 2**30
    assert estimate_memory(preset, "adamw").weights_and_states / gib == pytest.approx(full, rel=0.10)
    assert estimate_memory(preset, "galore", rank=rank).weights_and_states / gib == pytest.approx(galore, rel=0.10)


def test_7b_ordering_and_8bit_layerwise_fits_24gb():
    kw = {"rank": 1024, "activation_checkpointing": True}
    adam = estimate_memory("llama_7b", "adamw", **kw).total
    adam8 = estimate_memory("llama_7b", "adamw8bit", **kw).total
    galore8_lw = estimate_memory("llama_7b", "galore_8bit_layerwise", **kw)
    assert adam > adam8 > galore8_lw.total
    assert galore8_lw.total < 24 * 10**9
    assert galore8_lw.gradients == 32000 * 4096 * 2  # embedding gradient in bf16


# ----------------------------------------------------------------------- bad input
BAD_INPUT = [
    (("llama_60m", "sgd"), {}, "`method` must be one of"),
    (("llama_60m", "galore"), {"dtype": "int3"}, "`dtype` must be one of"),
    (("llama_60m", "galore"), {"rank": 0}, "`rank` must be a positive integer"),
    (("llama_60m", "galore"), {"rank": -4}, "`rank` must be a positive integer"),
    (("llama_60m", "galore"), {"rank": True}, "`rank` must be a positive integer"),
    (("llama_60m", "galore"), {"batch_size": 0}, "`batch_size` must be a positive integer"),
    (("llama_60m", "galore"), {"seq_len": -1}, "`seq_len` must be a positive integer"),
    (("llama_60m", "galore"), {"proj_type": "diagonal"}, "`proj_type` must be one of"),
    (("llama_60m", "galore"), {"target_modules": ["q_prj"]}, "Closest module names: 'q_proj'"),
    (("llama_60m", "galore"), {"train_non_targets": True}, "`method='lora'` only"),
    (("llama_61m", "galore"), {}, "llama_60m"),
    (("llama_60m", "galore"), {"projector": "qr"}, "`projector` must be one of"),
    (("llama_60m", "adamw"), {"projector": "svd"}, "`projector` applies to methods with a basis"),
    ((3.5, "galore"), {}, "`model_or_config` must be"),
]


@pytest.mark.parametrize("args,kwargs,message", BAD_INPUT)
def test_bad_input_names_the_argument_and_valid_values(args, kwargs, message):
    with pytest.raises(GaLoreConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        estimate_memory(*args, **kwargs)


def test_unknown_method_error_lists_every_method():
    with pytest.raises(GaLoreConfigError) as info:
        estimate_memory("llama_60m", "sgd")
    for name in METHODS:
        assert repr(name) in str(info.value)


def test_config_file_and_config_object_give_the_preset_figures(tmp_path):
    import json

    from hf_galore.memory import load_preset

    config = load_preset("llama_60m")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    by_name = estimate_memory("llama_60m", "galore")
    assert estimate_memory(config, "galore") == by_name
    assert estimate_memory(str(path), "galore") == by_name


def test_target_selection_follows_peft_rules():
    model = tiny_llama(torch.float32)
    linears = select_target_modules(model, "all-linear")
    assert len(linears) == 14 and "lm_head" not in linears
    assert select_target_modules(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert select_target_modules(model, r".*\.1\.mlp\.up_proj") == ["model.layers.1.mlp.up_proj"]
    # not a dot-bounded suffix: matched as a substring (transformers' optim_target_modules rule)
    assert select_target_modules(model, ["attn", "mlp"]) == linears
    with pytest.raises(GaLoreConfigError, match="Closest module names: 'q_proj'"):
        select_target_modules(model, ["q_prj"])


def test_estimate_dict_and_table_agree():
    est = estimate_memory("llama_60m", "galore_8bit", rank=128)
    data = est.to_dict()
    assert isinstance(est, MemoryEstimate)
    for field in ("weights", "gradients", "optimizer_states", "activations", "total"):
        assert data[field] == getattr(est, field)
        assert f"{getattr(est, field):,}" in est.to_table()
    assert math.isclose(data["total"], sum(data[f] for f in ("weights", "gradients", "optimizer_states", "activations")))


def test_docs_memory_tables_match_the_estimator():
    """docs/memory.md quotes estimator output; a change in state layout must update it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
    sizes = {"60M": "llama_60m", "130M": "llama_130m", "350M": "llama_350m", "1B": "llama_1b"}
    checked = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in sizes:
            method = cells[2].split()[0]
            kwargs = {} if cells[1] == "–" else {"rank": int(cells[1])}
            if cells[2].endswith("†"):
                kwargs["train_non_targets"] = True
            est = estimate_memory(sizes[cells[0]], method, **kwargs)
            assert cells[3] == f"{est.weights / 1e9:.3f}", line
            assert cells[5].startswith(f"{est.weights_and_states / 1e9:.3f} / "), line
            checked += 1
        elif len(cells) == 8 and cells[1] in ("yes", "no") and cells[0] in METHODS:
            est = estimate_memory(
                "llama_7b", cells[0], rank=1024, activation_checkpointing=cells[1] == "yes"
            )
            assert cells[7] == f"{est.total / 1e9:.2f} / {est.total / 2**30:.2f}", line
            checked += 1
    assert checked == 16 + 10


def test_q_galore_on_gpt2_conv1d_says_its_weights_stay_float():
    """Issue 14: GPT-2's Conv1D targets are not made INT8, so q_galore counts them in bf16: say so."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    est = estimate_memory(model, "q_galore", rank=8, dtype="bf16")
    note = (
        "8 targeted weights are not nn.Linear (e.g. GPT-2's Conv1D): "
        "prepare_model_for_int8_weights leaves them in bf16"
    )
    assert any(n.startswith(note) for n in est.notes), est.notes
    # and that is what the figure counts: every weight at 2 bytes, as plain GaLore
    assert est.weights == estimate_memory(model, "galore", rank=8).weights == 2 * est.total_params
    # a LLaMA's targets are nn.Linear: INT8, no such note
    llama = estimate_memory(tiny_llama(torch.float32), "q_galore", rank=8, dtype="bf16")
    assert not any("not nn.Linear" in n for n in llama.notes)
    assert llama.weights < estimate_memory(tiny_llama(torch.float32), "galore", rank=8).weights


def test_frozen_parameters_cost_only_their_weights():
    model = tiny_llama(torch.float32)
    model.model.embed_tokens.weight.requires_grad_(False)
    optimizer = GaLoreAdamW(groups_for(model, {"rank": 8}))
    one_step(model, optimizer)
    est = estimate_memory(model, "galore", rank=8, dtype="fp32")
    assert est.weights == tensor_bytes(model.parameters())
    assert est.gradients == tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    assert est.optimizer_states == held_state_bytes(optimizer)


def test_roberta_base_full_finetuning_matches_table4():
    """GaLore Table 4: full fine-tuning of RoBERTa-base = 747M (bf16 weights + Adam states)."""
    config = transformers.RobertaConfig(
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
        architectures=["RobertaForSequenceClassification"],
    )
    est = estimate_memory(config, "adamw")
    assert est.total_params == 124_647_170
    assert est.weights_and_states / 1e6 == pytest.approx(747, rel=0.002)


# --------------------------------------------------------------------- transients
def test_peak_is_total_plus_the_largest_transient():
    est = estimate_memory("llama_7b", "galore_8bit_layerwise", rank=1024, activation_checkpointing=True)
    assert est.transient > 0
    assert est.peak == est.total + est.transient
    assert est.to_dict()["peak"] == est.peak
    assert f"{est.peak:,}" in est.to_table()


def test_transient_is_the_largest_refresh_or_update_by_hand():
    """One 96 x 200 linear (left side): the refresh's and the update's temporaries, counted."""
    from hf_galore.optim.adamw8bit import CPU_KERNEL_BYTES_PER_VALUE, CPU_KERNEL_BYTES_PER_VALUE_16BIT

    model = nn.Sequential(nn.Linear(200, 96, bias=False))
    k, n = 96, 200

    def randomized(r):  # the larger of the subspace iteration and the energy check
        w = r + 8
        return 4 * max(2 * n * w + 2 * k * w, n * w + 5 * k * w + k * r)

    copy = 4 * k * n  # the float32 copy of a bf16 gradient a refresh works on (none for a float32 one)
    svd = 2 * 4 * k * n + 5 * 4 * k * k

    def est(method, rank, dtype, **kw):
        return estimate_memory(model, method, rank=rank, target_modules=["0"], dtype=dtype, **kw).transient

    # rank 16: R is 16 x 200 = 3200 values, under 8-bit Adam's 4096: 32-bit moments (3 float32 copies) + R
    assert est("galore", 16, "fp32", projector="randomized") == max(randomized(16), 4 * 3200 + 3 * 4 * 3200)
    assert est("galore", 16, "fp32") == svd
    assert est("galore", 16, "bf16") == copy + 4 * k * 16 + svd  # and the previous bf16 basis in float32
    assert est("galore_8bit", 16, "fp32", projector="randomized") == max(randomized(16), 4 * 3200 + 3 * 4 * 3200)
    # rank 32: R is 32 x 200 = 6400 values, 8-bit: rows padded to 256 (a padded copy and the step buffer),
    # the kernel on 8192 values with the skipped-step snapshot of the values and both states
    padded = 32 * 256
    update8 = 4 * 6400 + 2 * 4 * padded + padded * (CPU_KERNEL_BYTES_PER_VALUE + 4 + 2)
    assert est("galore_8bit", 32, "fp32", projector="randomized") == max(randomized(32), update8)
    update8_bf16 = 2 * 6400 + 2 * 2 * padded + padded * (CPU_KERNEL_BYTES_PER_VALUE_16BIT + 2 + 2)
    previous = 4 * k * 32  # the previous bf16 basis, read as float32 by the finder
    assert est("galore_8bit", 32, "bf16", projector="randomized") == max(copy + previous + randomized(32), update8_bf16)
    # Q-GaLore: the INT4 basis decoded to float32, and the INT8 write-back (the step, its float32 copy for
    # bf16, and one row block in float32 with three requantization temporaries; all 96 rows fit one block)
    decoded = 4 * k * 32
    write_back = 4 * 6400 + 4 * 4 * k * n
    q = est("q_galore", 32, "fp32", projector="randomized")
    assert q == max(decoded + randomized(32), 4 * 6400 + decoded + max(update8 - 4 * 6400, write_back))
    write_back16 = 2 * 6400 + 4 * 6400 + 4 * 4 * k * n
    q16 = est("q_galore", 32, "bf16", projector="randomized")
    assert q16 == max(copy + decoded + randomized(32), 2 * 6400 + decoded + max(update8_bf16 - 2 * 6400, write_back16))
    assert est("galore", 16, "bf16", projector="randomized") == max(copy + 4 * k * 16 + randomized(16), 2 * 3200 + 3 * 4 * 3200)


def test_randomized_refresh_needs_less_than_exact_svd_on_7b_shapes():
    from hf_galore.memory import refresh_transient_bytes

    assert refresh_transient_bytes("randomized", 4096, 11008, 1024) < refresh_transient_bytes("svd", 4096, 11008, 1024)


def test_auto_refresh_transient_follows_its_switch():
    """projector="auto" (the default) needs the randomized finder's temporaries above its switch, the SVD's below."""
    from hf_galore.memory import refresh_transient_bytes

    assert refresh_transient_bytes("auto", 4096, 11008, 1024) == refresh_transient_bytes("randomized", 4096, 11008, 1024)
    assert refresh_transient_bytes("auto", 96, 200, 16) == refresh_transient_bytes("svd", 96, 200, 16)
    assert refresh_transient_bytes("auto", 512, 512, 300) == refresh_transient_bytes("svd", 512, 512, 300)
