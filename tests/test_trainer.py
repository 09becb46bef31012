"""Trainer integration: optim names build hf_galore optimizers, arguments reach them, errors, resume."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import hf_galore
from hf_galore import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreConfig,
    GaLoreConfigError,
)
from hf_galore.errors import StateMismatchError, UnsupportedSetupError
from hf_galore.trainer import (
    TRAINER_OPTIMIZERS,
    check_supported_engine,
    create_optimizer,
    register_trainer_optimizer,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from tests import helpers

VOCAB, SEQ = 160, 16  # vocab x hidden >= 4096: embeddings get real 8-bit states


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return helpers.tiny_llama(seed, vocab=VOCAB, seq=SEQ)


class TokenData(helpers.TokenData):
    def __init__(self, n: int = 32, seed: int = 1) -> None:
        super().__init__(VOCAB, SEQ, n, seed)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "optim": "galore_adamw",
        "optim_target_modules": ["attn", "mlp"],
        "optim_args": "rank=4, update_proj_gap=2",
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(tmp_path, model=None, callbacks=None, optimizers=(None, None), **overrides) -> Trainer:
    return Trainer(
        model=model or tiny_llama(),
        args=training_args(tmp_path, **overrides),
        train_dataset=TokenData(),
        callbacks=callbacks,
        optimizers=optimizers,
    )


NAME_CASES = [
    ("galore_adamw", GaLoreAdamW),
    ("galore_adamw_8bit", GaLoreAdamW8bit),
    ("galore_adafactor", GaLoreAdafactor),
]


@pytest.mark.parametrize("name,cls", NAME_CASES)
def test_optim_name_builds_our_optimizer_with_training_args(tmp_path, name, cls):
    trainer = make_trainer(
        tmp_path,
        optim=name,
        learning_rate=3e-3,
        weight_decay=0.05,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        optim_args="rank=4, update_proj_gap=7, scale=0.5",
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is cls and type(optimizer).__module__.startswith("hf_galore.")
    lowrank = [g for g in optimizer.param_groups if "rank" in g]
    assert sum(len(g["params"]) for g in lowrank) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all((g["rank"], g["update_proj_gap"], g["scale"]) == (4, 7, 0.5) for g in lowrank)
    decays = sorted({g["weight_decay"] for g in optimizer.param_groups})
    assert decays == [0.0, 0.05]
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-3
        if cls is GaLoreAdafactor:
            assert (group["relative_step"], group["scale_parameter"]) == (False, False)
        else:
            assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7


def test_optim_names_and_default_callbacks_are_hooked():
    """transformers >= 5: our handlers in its table; 4.x: the static method wrapped. Both build ours."""
    from transformers import trainer as trainer_module

    from hf_galore.callback import AutoGaLoreCallback
    from hf_galore.compat_transformers import uses_optimizer_table
    from hf_galore.trainer import TRANSFORMERS_GALORE_NAMES, _handler

    assert hf_galore.trainer.hook_error() is None
    wrapped = hasattr(Trainer.get_optimizer_cls_and_kwargs, "__hf_galore_original__")
    if uses_optimizer_table():
        from transformers import trainer_optimizer

        for name in TRANSFORMERS_GALORE_NAMES:
            assert trainer_optimizer._OPTIMIZER_HANDLERS[name] is _handler
        assert not wrapped
    else:
        assert wrapped
    assert trainer_module.DEFAULT_CALLBACKS.count(AutoGaLoreCallback) == 1
    args = SimpleNamespace(
        optim="galore_adamw",
        optim_args="rank=2",
        optim_target_modules=["q_proj"],
        learning_rate=0.5,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        deepspeed=None,
        fsdp=None,
        fsdp_config=None,
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, tiny_llama())
    assert cls is GaLoreAdamW and kwargs["lr"] == 0.5
    assert next(g.get("rank") for g in kwargs["params"]) == 2


def test_import_is_lazy_about_the_trainer():
    """`import hf_galore` must not pay for importing transformers.trainer (seconds)."""
    code = "import sys, hf_galore; print('transformers.trainer' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_create_optimizer_explicit_path(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path, optim="galore_adamw_8bit", learning_rate=2e-3, weight_decay=0.1)
    optimizer = create_optimizer(model, args)
    assert isinstance(optimizer, GaLoreAdamW8bit) and optimizer.param_groups[0]["lr"] == 2e-3
    assert optimizer.galore_plan.rank == 4 and len(optimizer.galore_plan.lowrank) == 14
    config = GaLoreConfig(rank=8, target_modules="all-linear")
    optimizer = create_optimizer(model, config, optim="galore_adafactor", lr=1e-3)
    assert isinstance(optimizer, GaLoreAdafactor) and optimizer.param_groups[0]["lr"] == 1e-3
    assert sum(len(g["params"]) for g in optimizer.param_groups if "rank" in g) == 14
    with pytest.raises(GaLoreConfigError, match=r"`optim`='adamw_torch' is not a GaLore optimizer"):
        create_optimizer(model, training_args(tmp_path, optim="adamw_torch"))


def test_registry_refuses_duplicates():
    with pytest.raises(GaLoreConfigError, match="'galore_adamw' is already registered"):
        register_trainer_optimizer("galore_adamw", TRAINER_OPTIMIZERS["galore_adamw"].build)


BAD_TRAINER_INPUTS = [
    (
        {"optim_args": "rank=4, rnk=2"},
        GaLoreConfigError,
        r"unknown GaLore setting 'rnk'.*Valid keys:",
    ),
    (
        {"optim_args": "rank=four"},
        GaLoreConfigError,
        r"`rank` in `optim_args` must be an integer, got 'four'",
    ),
    (
        {"optim_target_modules": ["q_prj"]},
        GaLoreConfigError,
        r"entry 'q_prj' matched no module of LlamaForCausalLM.*Closest module names: 'q_proj'",
    ),
    ({"optim_target_modules": None}, GaLoreConfigError, r"`target_modules` is not set"),
    (
        {"optim_args": "rank=16, small_weights=error"},
        GaLoreConfigError,
        r"`rank`=16 is >= the smaller dimension of 4 matched weights.*k_proj",
    ),
    (
        {"optim_args": "rank=64, small_weights=error"},
        GaLoreConfigError,
        r"`rank`=64 is >= the smaller dimension of 14 matched weights \(all of them\)",
    ),
    (
        {"optim_args": "rank=8 update_proj_gap=2"},
        GaLoreConfigError,
        r"separate keys with commas, e.g. 'rank=8, update_proj_gap=2'",
    ),
    (
        {"optim_args": "rank=4, exclude_modules=v_prj"},
        GaLoreConfigError,
        r"`exclude_modules` entry 'v_prj' matched no module of LlamaForCausalLM.*'v_proj'",
    ),
]


@pytest.mark.parametrize("overrides,error,message", BAD_TRAINER_INPUTS)
def test_bad_input_fails_at_trainer_construction(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small-weights warning precedes the rank error
        make_trainer(tmp_path, **overrides)


ENGINE_CASES = [
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, r"DeepSpeed.*FSDP2"),
    ({"fsdp": ["full_shard"], "fsdp_config": {"version": 1}}, r"FSDP1.*FSDP2"),
]


@pytest.mark.parametrize("overrides,message", ENGINE_CASES)
def test_deepspeed_and_fsdp1_are_refused(overrides, message):
    args = SimpleNamespace(deepspeed=None, fsdp=None, fsdp_config=None, optim="galore_adamw")
    args.__dict__.update(overrides)
    with pytest.raises(UnsupportedSetupError, match=message):
        check_supported_engine(args)


def test_fsdp2_and_plain_runs_pass_the_engine_check(monkeypatch):
    check_supported_engine(SimpleNamespace(deepspeed=None, fsdp=["full_shard"], fsdp_config={"version": 2}))
    check_supported_engine(SimpleNamespace(deepspeed=None, fsdp=None, fsdp_config=None))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UnsupportedSetupError, match="DeepSpeed"):
        check_supported_engine(SimpleNamespace(deepspeed=None, fsdp=None, fsdp_config=None))


def test_decay_rule_matches_the_trainer(tmp_path):
    from hf_galore.targets import decay_parameter_names

    model = tiny_llama()
    trainer = make_trainer(tmp_path, model=model)
    assert decay_parameter_names(model) == set(trainer.get_decay_parameter_names(model))


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_8bit", "galore_adafactor"])
def test_resume_is_bit_exact(tmp_path, optim):
    """Stop at step 3 of 6 (refreshes at 0, 2, 4), resume: same losses and parameters as never stopping."""
    common = {
        "optim": optim,
        "max_steps": 6,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 3,
        "optim_args": "rank=4,update_proj_gap=2",
        "weight_decay": 0.01,
    }
    full = make_trainer(tmp_path / "a", model=tiny_llama(), **common)
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("basis_right" in s or "basis_left" in s for s in state["state"].values())
    if optim == "galore_adamw_8bit":
        assert any(s.get("state1", torch.zeros(1)).dtype == torch.uint8 for s in state["state"].values())
    resumed = make_trainer(tmp_path / "b", model=tiny_llama(seed=5), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def losses(
        trainer,
    ):  # the resumed history also holds steps 1-3, read from the checkpoint
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > 3}

    assert losses(full) == losses(resumed)
    assert sorted(losses(resumed)) == [4, 5, 6]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_rank_above_every_weight_trains_at_full_rank_with_one_warning(tmp_path, capsys):
    """The default rank 128 on a hidden-32 model: trains (as galore-torch's path does), warned once."""
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, model=model, optim_args=None, max_steps=2)
        trainer.train()
    ours = [str(w.message) for w in caught if "GaLore" in str(w.message)]
    assert len(ours) == 1 and "0 weights are projected" in ours[0], ours
    assert "`rank`=128 is >= the smaller dimension of every one of the 14 matched weights" in ours[0]
    summary = capsys.readouterr().out
    assert "low-rank: 0 weights projected" in summary
    assert "matched but full rank (smaller dimension <= rank 128): 14 weights" in summary
    optimizer = hf_galore.callback.unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, GaLoreAdamW) and not any("rank" in g for g in optimizer.param_groups)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()), "every weight trains"


def tiny_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ + 2,  # RoBERTa's positions start after padding_idx
        num_labels=2,
    )
    return RobertaForSequenceClassification(config)


class LabelData(TokenData):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}


def _layers(prefix: str, leaves: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{leaf}.weight" for i in range(2) for leaf in leaves]


LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_ALL = (*LLAMA_ATTN, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ROBERTA_ATTN = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
TARGET_FORM_CASES = [
    # transformers' own example, every entry a full-match regex
    ("llama", [r".*.attn.*", r".*.mlp.*"], {"full-match regex"}, _layers("model.layers", LLAMA_ALL)),
    # the GaLore paper's: 'attn' only as a substring (of self_attn), 'mlp' a suffix
    ("llama", ["attn", "mlp"], {"substring", "dot-bounded suffix"}, _layers("model.layers", LLAMA_ALL)),
    ("llama", "all-linear", {"all-linear"}, _layers("model.layers", LLAMA_ALL)),
    (
        "roberta",
        [r".*.attention.*", r".*.intermediate.*"],
        {"full-match regex"},
        _layers("roberta.encoder.layer", (*ROBERTA_ATTN, "intermediate.dense")),
    ),
    (
        "roberta",
        ["self.", "intermediate."],  # cut inside names: substrings only
        {"substring"},
        _layers("roberta.encoder.layer", (*ROBERTA_ATTN[:3], "intermediate.dense")),
    ),
    (  # no output embeddings: every Linear, the classifier too; its out_proj (2, 32) is too small to project
        "roberta",
        "all-linear",
        {"all-linear"},
        _layers("roberta.encoder.layer", (*ROBERTA_ATTN, "intermediate.dense", "output.dense"))
        + ["classifier.dense.weight"],
    ),
]


@pytest.mark.parametrize("arch,targets,rules,expected", TARGET_FORM_CASES)
def test_target_forms_train_llama_and_roberta(tmp_path, arch, targets, rules, expected):
    model, data = (tiny_llama(), TokenData()) if arch == "llama" else (tiny_roberta(), LabelData())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roberta all-linear: classifier.out_proj is trained at full rank
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path, optim_target_modules=targets, max_steps=2, logging_steps=1),
            train_dataset=data,
        )
        trainer.train()
    optimizer = hf_galore.callback.unwrap_optimizer(trainer.optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    lowrank = sorted(names[id(p)] for g in optimizer.param_groups if "rank" in g for p in g["params"])
    assert lowrank == sorted(expected)
    projected = [p for g in optimizer.param_groups if "rank" in g for p in g["params"]]
    assert all(any(k.startswith("basis") for k in optimizer.state[p]) for p in projected)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    callback = next(cb for cb in trainer.callback_handler.callbacks if getattr(cb, "summary", None))
    reported = {
        line.split(" matched as a ")[-1].split(":")[0]
        for line in callback.summary.splitlines()
        if line.startswith("  matching: ") and " matched as " in line
    }
    assert reported == rules or rules == {"all-linear"} and "'all-linear' means every linear layer" in callback.summary


def test_small_weights_warning_is_given_once(tmp_path):
    """The Trainer plans the groups twice (the check at Trainer(...) and the optimizer build): one warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, optim_args="rank=16", max_steps=1).train()
    ours = [str(w.message) for w in caught if "GaLore" in str(w.message)]
    assert len(ours) == 1, ours
    assert ours[0].startswith("GaLore: 4 matched weights have a smaller dimension <= `rank`=16")


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [("galore_adamw", "galore_adafactor"), ("galore_adafactor", "galore_adamw")])
def test_resume_with_another_galore_optimizer_names_the_mismatch(tmp_path, saved, resumed):
    """Was ``KeyError: 'relative_step'`` (or ``'betas'``) at the first resumed step."""
    common = {"save_strategy": "steps", "save_steps": 2, "optim_args": "rank=4,update_proj_gap=2"}
    make_trainer(tmp_path / "a", optim=saved, max_steps=2, **common).train()
    trainer = make_trainer(tmp_path / "b", optim=resumed, max_steps=4, **common)
    with pytest.raises(StateMismatchError, match="saved by a different optimizer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


@pytest.mark.parametrize("name", ["galore_adamw_8bit", "galore_adamw_8bit_layerwise"])
def test_8bit_without_bitsandbytes_fails_at_trainer_construction(tmp_path, monkeypatch, name):
    """The README's promise: a missing optional dependency stops `Trainer(...)`, not `train()` after loading data."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(UnsupportedSetupError, match=rf"`optim`='{name}' needs `bitsandbytes.functional`.*pip install"):
        make_trainer(tmp_path, optim=name)
