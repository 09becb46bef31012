"""transformers' GaLore Trainer tests, run against hf_galore with galore-torch absent.

These are the ``test_galore*`` cases of transformers' optimizer test suite
(``tests/trainer/test_trainer_optimizers.py``, class
``TrainerOptimizerIntegrationTest``; ``tests/trainer/test_trainer.py`` in
older releases), 11 cases in all, with their helpers
(``_get_llama_and_dataset``, ``_train_with_llama``,
``_check_lr_display_without_scheduler``, ``_check_lr_display_with_scheduler``)
rewritten as pytest functions. Their inputs and assertions are kept; what
changed, and why:

* ``require_galore_torch`` is gone and galore-torch is made unimportable
  (``conftest.py``): after ``import hf_galore`` the same ``optim`` names must
  work without it.
* ``require_torch_accelerator`` is gone (GPU-only decorator): everything runs
  on CPU. For the same reason ``test_galore_adafactor`` drops its CUDA peak
  memory bounds (650-700 MB measured by ``TorchTracemalloc`` on an
  accelerator), which mean nothing on CPU.
* The tiny LLaMA keeps transformers' config (vocab 100, hidden 32, 3 layers,
  4 heads) but sets ``intermediate_size=64`` instead of LLaMA's default 11008,
  so the 11 cases take seconds on CPU. Hidden 32 stays the smaller side of
  every matched weight, so the default rank 128 is still above all of them,
  as in transformers' run (nothing is projected; see ``test_galore``).
* Implementation details become their intent, with a comment where they are.
* Each training test also checks that an hf_galore optimizer did the steps.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from packaging.version import Version
from torch import nn

import hf_galore  # noqa: F401  (registers the optim names in the Trainer)
from hf_galore.callback import is_hf_galore_optimizer, unwrap_optimizer
from hf_galore.targets import select_target_modules

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

#: Whether the Trainer logs the learning rate its step used (since transformers 4.51) or the next one.
LOGS_RATE_OF_THE_STEP = Version(transformers.__version__).release >= (4, 51)
#: transformers' module-level targets for the GaLore tests: every list entry a full-match regex.
ATTN_MLP_TARGET_MODULES = [r".*attn.*", r".*mlp.*"]
#: The rules hf_galore reports for a regex match (a list entry, or a whole string).
REGEX_RULES = {"full-match regex", "full-match regex (a string)"}


class RepeatDataset(torch.utils.data.Dataset):
    """transformers' test dataset: the same token sequence ``length`` times (input ids = labels)."""

    def __init__(self, x: torch.Tensor, length: int = 64) -> None:
        self.x, self.length = x, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x, "labels": self.x}


def _get_llama_and_dataset() -> tuple[LlamaForCausalLM, RepeatDataset]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,  # transformers: LLaMA's default 11008 (see the module docstring)
    )
    return LlamaForCausalLM(config), RepeatDataset(torch.randint(0, 100, (128,)))


def _args(output_dir, **kwargs) -> TrainingArguments:
    # Local settings only: no reporting integrations, no progress bars; nothing the assertions read.
    return TrainingArguments(str(output_dir), report_to="none", disable_tqdm=True, save_strategy="no", **kwargs)


def _assert_hf_galore_ran(trainer: Trainer) -> None:
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert is_hf_galore_optimizer(optimizer), type(optimizer)
    assert trainer.state.global_step == 24  # 64 samples / batch 8 x 3 epochs: every step was taken


def _train_with_llama(tmp_path, optim: str, optim_target_modules=None, **extra_kwargs) -> Trainer:
    """Smoke test: the tiny LLaMA on ``RepeatDataset`` with ``optim`` (transformers' defaults otherwise)."""
    tiny_llama, train_dataset = _get_llama_and_dataset()
    kwargs = {"learning_rate": 1e-9, "logging_steps": 5, "optim": optim}
    if optim_target_modules is not None:
        kwargs["optim_target_modules"] = optim_target_modules
    kwargs.update(extra_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 128 > every weight's smaller side: the full-rank warning
        trainer = Trainer(tiny_llama, _args(tmp_path, **kwargs), train_dataset=train_dataset)
        trainer.train()
    _assert_hf_galore_ran(trainer)
    return trainer


def _check_lr_display_without_scheduler(tmp_path, optim: str, optim_target_modules) -> None:
    tiny_llama, train_dataset = _get_llama_and_dataset()
    learning_rate = 1e-9
    args = _args(
        tmp_path,
        learning_rate=learning_rate,
        logging_steps=5,
        optim=optim,
        optim_target_modules=optim_target_modules,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(tiny_llama, args, train_dataset=train_dataset)
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
    # transformers asserts `get_learning_rates() == [learning_rate, learning_rate]`: galore-torch's setup
    # makes exactly two groups (non-target, target). The number of groups is an implementation detail;
    # hf_galore also splits by the Trainer's weight-decay rule (up to 4 groups). The behaviour a user sees,
    # kept here: every group reports the learning rate that was set.
    learning_rates = trainer.get_learning_rates()
    assert len(learning_rates) == len(trainer.optimizer.param_groups) >= 2
    assert learning_rates == [learning_rate] * len(learning_rates)


def _check_lr_display_with_scheduler(tmp_path, optim: str, optim_target_modules, num_train_epochs: int = 2) -> None:
    """Warmup then cosine: the logged learning rate rises to the set value, then falls to ~0."""
    tiny_llama, train_dataset = _get_llama_and_dataset()
    learning_rate = 2e-4
    num_warmup_steps = 5
    args = _args(
        tmp_path,
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        warmup_steps=num_warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=1,
        optim=optim,
        optim_target_modules=optim_target_modules,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(tiny_llama, args, train_dataset=train_dataset)
        trainer.train()
    logs = trainer.state.log_history[1:-1]

    # transformers >= 4.51 logs the rate the step used; older releases the one after the scheduler
    # stepped, so the peak comes one log earlier (their own test reads index `num_warmup_steps - 2`)
    peak = num_warmup_steps - (1 if LOGS_RATE_OF_THE_STEP else 2)
    assert logs[peak]["learning_rate"] == learning_rate
    assert np.allclose(logs[-1]["learning_rate"], 0, atol=5e-6)
    increasing = [logs[i]["learning_rate"] < logs[i + 1]["learning_rate"] for i in range(peak)]
    decreasing = [logs[i]["learning_rate"] > logs[i + 1]["learning_rate"] for i in range(peak, len(logs) - 1)]
    assert all(increasing)
    assert all(decreasing)
    assert len(decreasing) > len(increasing)
    assert is_hf_galore_optimizer(unwrap_optimizer(trainer.optimizer))


# ------------------------------------------------------------------ the cases
class _MatchModel(nn.Module):
    """Holds exactly the module names transformers' matching test uses."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        block = nn.Module()
        block.ln_1 = nn.LayerNorm(8)
        block.attn = nn.Module()
        block.attn.q_proj = nn.Linear(8, 8)
        block.mlp = nn.Module()
        block.mlp.up_proj = nn.Linear(8, 16)
        self.model.transformer.h = nn.ModuleList([block])
        self.model.lm_head = nn.Linear(8, 100)


MODULE_NAMES = [
    "model.transformer.h.0.ln_1",
    "model.transformer.h.0.attn.q_proj",
    "model.lm_head",
    "model.transformer.h.0.mlp.up_proj",
]
MATCH_CASES = [
    # (optim_target_modules, matched per MODULE_NAMES, is_regex) exactly as in transformers' test
    ([r".*.attn.*", r".*.mlp.*"], [False, True, False, True], True),
    (["q_proj", "up_proj"], [False, True, False, True], False),
    (r".*.attn.*", [False, True, False, False], True),
    ("model.transformer.h.0.attn.q_proj", [False, True, False, False], False),
    (["attn", "mlp"], [False, True, False, True], False),
]


def test_galore_matched_modules():
    """transformers checks `check_target_module_exists(spec, name, return_is_regex=True)` per module name.

    hf_galore selects over the whole model, so the same table is checked on
    a model with exactly those names: the matched names must be the same.
    transformers' ``is_regex`` flag (it only silences its "matched but
    ignored" warning) corresponds to the rule hf_galore reports per entry in
    the start-up summary; it must say "regex" exactly where transformers does.
    """
    model = _MatchModel()
    for spec, expected, is_regex in MATCH_CASES:
        selection = select_target_modules(model, spec)
        assert [name in selection.modules for name in MODULE_NAMES] == expected, spec
        rules = {match.rule for match in getattr(selection, "matches", [])}
        assert (rules <= REGEX_RULES) if is_regex else not (rules & REGEX_RULES), (spec, rules)


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise", "galore_adamw_8bit"])
def test_galore(tmp_path, optim):
    trainer = _train_with_llama(tmp_path, optim, optim_target_modules=ATTN_MLP_TARGET_MODULES)
    # Default rank 128 >= hidden 32: galore-torch runs these weights through a full-size "projection";
    # hf_galore trains them at full rank, says so once, and projects none.
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert not any("rank" in group for group in optimizer.param_groups)


def test_galore_extra_args(tmp_path):
    trainer = _train_with_llama(
        tmp_path,
        "galore_adamw",
        optim_target_modules=ATTN_MLP_TARGET_MODULES,
        optim_args="rank=64, update_proj_gap=100, scale=0.10",
    )
    # The args reach the optimizer: rank 64 is still >= 32, so no group is low-rank, and the config says so.
    from hf_galore.trainer import config_from_training_args

    config = config_from_training_args(trainer.args)
    assert (config.rank, config.update_proj_gap, config.scale) == (64, 100, 0.10)


def test_galore_layerwise_with_scheduler(tmp_path):
    _train_with_llama(
        tmp_path,
        "galore_adamw_layerwise",
        optim_target_modules=ATTN_MLP_TARGET_MODULES,
        lr_scheduler_type="cosine",
    )


@pytest.mark.parametrize(
    "optim_target_modules", [ATTN_MLP_TARGET_MODULES, ["q_proj", "k_proj", "v_proj"], "all-linear"]
)
def test_galore_adafactor(tmp_path, optim_target_modules):
    # transformers also bounds the CUDA peak memory (650-700 MB); GPU-only, dropped (module docstring).
    tiny_llama, train_dataset = _get_llama_and_dataset()
    args = _args(
        tmp_path,
        learning_rate=1e-9,
        logging_steps=5,
        optim="galore_adafactor",
        optim_target_modules=optim_target_modules,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(tiny_llama, args, train_dataset=train_dataset)
        trainer.train()
    _assert_hf_galore_ran(trainer)
    assert type(unwrap_optimizer(trainer.optimizer)).__name__ == "GaLoreAdafactor"


def test_galore_lr_display_without_scheduler(tmp_path):
    _check_lr_display_without_scheduler(tmp_path, "galore_adamw", ATTN_MLP_TARGET_MODULES)


def test_galore_lr_display_with_scheduler(tmp_path):
    _check_lr_display_with_scheduler(tmp_path, "galore_adamw", ATTN_MLP_TARGET_MODULES)


# ------------------------------------------------------------ beyond the port
@pytest.mark.parametrize("targets", [ATTN_MLP_TARGET_MODULES, [r".*.attn.*", r".*.mlp.*"], "all-linear"])
def test_same_forms_project_when_the_rank_fits(tmp_path, targets):
    """Not in transformers: at rank 8 the same target forms really project (transformers' run projects nothing)."""
    trainer = _train_with_llama(tmp_path, "galore_adamw", optim_target_modules=targets, optim_args="rank=8")
    optimizer = unwrap_optimizer(trainer.optimizer)
    projected = [p for group in optimizer.param_groups if "rank" in group for p in group["params"]]
    assert len(projected) == 3 * 7  # 3 layers x (q, k, v, o, gate, up, down)
    assert all(any(key.startswith("basis") for key in optimizer.state[p]) for p in projected)
    rules = {m.rule for m in select_target_modules(trainer.model, targets).matches}
    assert rules == ({"all-linear"} if targets == "all-linear" else {"full-match regex"})
