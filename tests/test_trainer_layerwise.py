"""Layer-wise GaLore in the Trainer: optim="galore_adamw_layerwise" trains, schedules, clips, logs, resumes.

The regular optimizer in the same Trainer is the oracle (same data order,
seed and schedule), so layer-wise runs must match it step for step.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch

from hf_galore import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreConfig,
    LayerwiseOptimizer,
    UnsupportedSetupError,
    create_optimizer,
)
from hf_galore import trainer_layerwise as layerwise_module
from hf_galore.callback import GaLoreCallback
from hf_galore.trainer_layerwise import check_trainer_args, loss_scaler

transformers = pytest.importorskip("transformers")
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainerState, TrainingArguments

from tests import helpers

VOCAB, SEQ = 64, 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return helpers.tiny_llama(seed, vocab=VOCAB, seq=SEQ)


class TokenData(helpers.TokenData):
    def __init__(self, n: int = 32, seed: int = 1) -> None:
        super().__init__(VOCAB, SEQ, n, seed)


def make_trainer(tmp_path, optimizers=(None, None), name="out", model=None, **overrides) -> Trainer:
    kwargs = {
        "output_dir": str(tmp_path / name),
        "optim": "galore_adamw_layerwise",
        "optim_target_modules": ["attn", "mlp"],
        "optim_args": "rank=4, update_proj_gap=2",
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        "max_grad_norm": 0.0,
    }
    kwargs.update(overrides)
    return Trainer(
        model=tiny_llama() if model is None else model,
        args=TrainingArguments(**kwargs),
        train_dataset=TokenData(),
        optimizers=optimizers,
    )


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _logged(trainer: Trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "loss" in entry]


#: The oracle's ``max_grad_norm``: clips nothing (coefficient clamped to exactly 1), but makes every
#: transformers release log the norm (4.x logs ``grad_norm`` only when clipping is on).
NO_CLIP = 1e9


def regular_oracle(tmp_path, **overrides) -> Trainer:
    """The regular optimizer in the same Trainer: its ``grad_norm`` is torch's ``clip_grad_norm_`` of the real gradients."""
    return make_trainer(tmp_path, optim="galore_adamw", name="regular", **{"max_grad_norm": NO_CLIP, **overrides})


class LogRecorder(TrainerCallback):
    """A callback passed by the user, so it runs after the reporting integrations: what a reporter sees."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


NAME_CASES = [
    ("galore_adamw_layerwise", GaLoreAdamW),
    ("galore_adamw_8bit_layerwise", GaLoreAdamW8bit),
    ("galore_adafactor_layerwise", GaLoreAdafactor),
]


@pytest.mark.parametrize("name,cls", NAME_CASES)
def test_optim_name_builds_one_real_layerwise_optimizer(tmp_path, monkeypatch, name, cls):
    monkeypatch.setattr(layerwise_module, "_WARNED_CLIP", set())  # the warning is once per process and value
    trainer = make_trainer(tmp_path, optim=name, weight_decay=0.05, max_grad_norm=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = trainer.create_optimizer()
    assert type(optimizer) is LayerwiseOptimizer and type(optimizer.optimizer) is cls
    assert optimizer.per_param_max_norm == 0.5
    assert any("clips each weight's gradient" in str(w.message) for w in caught)
    assert optimizer.param_groups is optimizer.optimizer.param_groups
    assert sum(len(g["params"]) for g in optimizer.param_groups if "rank" in g) == 14
    assert sorted({g["weight_decay"] for g in optimizer.param_groups}) == [0.0, 0.05]


def test_config_layerwise_flag_builds_it_explicitly():
    """The explicit path `create_optimizer(model, GaLoreConfig(layerwise=True))` works on any transformers."""
    optimizer = create_optimizer(tiny_llama(), GaLoreConfig(rank=4, target_modules=["attn", "mlp"], layerwise=True))
    assert type(optimizer) is LayerwiseOptimizer and type(optimizer.optimizer) is GaLoreAdamW
    assert optimizer.per_param_max_norm is None and optimizer.hooks_registered


@pytest.mark.slow
@pytest.mark.parametrize("accumulation,checkpointing", [(1, False), (2, True)])
def test_matches_regular_trainer_with_schedule_and_grad_norm(tmp_path, accumulation, checkpointing):
    setup = {"gradient_accumulation_steps": accumulation, "gradient_checkpointing": checkpointing}
    regular = regular_oracle(tmp_path, **setup)
    layerwise = make_trainer(tmp_path, name="layerwise", **setup)  # max_grad_norm=0: no clipping either
    regular.train()
    layerwise.train()
    assert isinstance(layerwise.optimizer.optimizer, LayerwiseOptimizer)  # inside accelerate's wrapper
    assert _max_diff(_params(regular), _params(layerwise)) <= 1e-6
    assert _max_diff(_params(regular), [p.detach() for p in tiny_llama().parameters()]) > 1e-3
    lrs = _logged(layerwise, "learning_rate")
    # decays linearly (transformers < 4.51 logs the rate after the step: the last one is 0)
    assert lrs == pytest.approx(_logged(regular, "learning_rate")) and lrs[0] > lrs[-1] >= 0
    norms, exact = _logged(layerwise, "grad_norm"), _logged(regular, "grad_norm")
    assert len(norms) == 4 and min(norms) > 0
    if accumulation == 1:
        assert norms == pytest.approx(exact, rel=1e-4)
    else:  # refresh steps (0, 2) hold full gradients: exact; between, the window accumulated in the subspace
        assert norms[0::2] == pytest.approx(exact[0::2], rel=1e-4)
        for logged, true in zip(norms[1::2], exact[1::2]):  # its norm is an upper bound (docs/layerwise.md)
            assert true * (1 - 1e-4) <= logged <= true * accumulation**0.5
    inner = layerwise.optimizer.optimizer.optimizer
    assert {float(s["step"]) for s in inner.state.values()} == {4.0}  # one tick per optimizer step
    assert layerwise.lr_scheduler.last_epoch == 4


@pytest.mark.slow
def test_max_grad_norm_clips_per_parameter_and_logs_the_global_norm(tmp_path, monkeypatch):
    """The logged grad_norm is the global pre-clip norm, in log_history and for every reporting callback.

    The Trainer's own norm comes after the hooks freed every gradient (5.x
    logs 0.0; 4.x with clipping too): ``GaLoreCallback.on_log`` replaces it
    before the user's callbacks and the reporting integrations see the log.
    """
    monkeypatch.setattr(layerwise_module, "_WARNED_CLIP", set())
    regular = regular_oracle(tmp_path, max_steps=1)
    recorder = LogRecorder()
    clipped = make_trainer(tmp_path, name="clipped", max_steps=2, max_grad_norm=0.05)
    clipped.add_callback(recorder)
    unclipped = make_trainer(tmp_path, name="unclipped", max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for trainer in (regular, clipped, unclipped):
            trainer.train()
    assert sum("clips each weight's gradient to norm 0.05" in str(w.message) for w in caught) == 1
    assert clipped.optimizer.optimizer.per_param_max_norm == 0.05
    first = _logged(clipped, "grad_norm")[0]
    assert first == pytest.approx(_logged(regular, "grad_norm")[0], rel=1e-4) and first > 0.05
    reported = [entry["grad_norm"] for entry in recorder.logs if "loss" in entry]
    assert reported == _logged(clipped, "grad_norm") and len(reported) == 2
    assert _max_diff(_params(clipped), _params(unclipped)) > 1e-4  # clipping changed the update


class ClipEachWeight(TrainerCallback):
    """Clips every gradient on its own with torch, just before the regular optimizer steps."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.clipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            if p.grad is not None:
                self.clipped += int(p.grad.norm() > self.max_norm)
                torch.nn.utils.clip_grad_norm_([p], self.max_norm)


@pytest.mark.slow
def test_clipping_is_per_parameter(tmp_path):
    """Layer-wise ``max_grad_norm=c`` equals the regular optimizer on gradients clipped weight by weight by torch."""
    clip = 0.05
    reference = ClipEachWeight(clip)
    regular = regular_oracle(tmp_path, max_steps=2)
    regular.add_callback(reference)
    clipped = make_trainer(tmp_path, name="clipped", max_steps=2, max_grad_norm=clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        regular.train()
        clipped.train()
    assert reference.clipped > 0  # the threshold bites
    assert _max_diff(_params(regular), _params(clipped)) <= 1e-6
    assert _logged(clipped, "grad_norm") == pytest.approx(_logged(regular, "grad_norm"), rel=1e-4)


@pytest.mark.slow
def test_explicit_optimizer_without_clip_refuses_max_grad_norm(tmp_path):
    model = tiny_llama()
    optimizer = LayerwiseOptimizer(GaLoreAdamW([{"params": list(model.parameters())}], lr=1e-2))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(optimizer, None))
    with pytest.raises(UnsupportedSetupError, match="max_grad_norm=0.*per_param_max_norm=1.0"):
        trainer.train()


BAD_SETUPS = [
    ({"max_grad_norm": 1.0}, {}, None, "global gradient norm"),
    ({"max_grad_norm": 0.0}, {}, object(), "fp16 loss scaling.*bf16=True"),
    (
        {"max_grad_norm": 0.0, "gradient_accumulation_steps": 4},
        {"sync": None},
        None,
        "sync='auto'",
    ),
]


@pytest.mark.parametrize("args,kwargs,scaler,message", BAD_SETUPS)
def test_refused_trainer_setups(args, kwargs, scaler, message):
    optimizer = LayerwiseOptimizer(GaLoreAdamW(tiny_llama().parameters()), **kwargs)
    with pytest.raises(UnsupportedSetupError, match=message):
        check_trainer_args(optimizer, SimpleNamespace(**args), scaler)


def test_the_callback_refuses_fp16_loss_scaling_at_train_begin(tmp_path):
    """The scaler is read from accelerate's optimizer wrapper (``AcceleratedOptimizer.scaler``), the callback's view."""
    trainer = make_trainer(tmp_path)
    inner = trainer.create_optimizer()
    scaler = object()
    wrapper = SimpleNamespace(optimizer=inner, scaler=scaler)
    assert loss_scaler(wrapper) is scaler and loss_scaler(SimpleNamespace(optimizer=inner)) is None
    callback = GaLoreCallback(print_summary=False)
    with pytest.raises(UnsupportedSetupError, match="fp16 loss scaling.*bf16=True"):
        callback.on_train_begin(trainer.args, TrainerState(), None, model=trainer.model, optimizer=wrapper)


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    """Stop after step 2 of 4 (refreshes at steps 0 and 2), resume: same losses and parameters as never stopping."""
    straight = make_trainer(tmp_path, name="straight", save_strategy="steps", save_steps=2)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("basis_left" in s or "basis_right" in s for s in state["state"].values())
    assert {float(s["step"]) for s in state["state"].values()} == {2.0}
    resumed = make_trainer(tmp_path, name="resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert _max_diff(_params(straight), _params(resumed)) == 0.0
    later = [(e["step"], e["loss"], e["grad_norm"]) for e in resumed.state.log_history if "loss" in e and e["step"] > 2]
    assert later == [
        (e["step"], e["loss"], e["grad_norm"]) for e in straight.state.log_history if "loss" in e and e["step"] > 2
    ]
    assert len(later) == 2


def _train(tmp_path, model, name, optim, **overrides) -> Trainer:
    trainer = make_trainer(tmp_path, name=name, model=model, optim=optim, max_steps=2, **overrides)
    trainer.train()
    return trainer


def test_a_model_reused_after_a_layerwise_run_trains_like_a_fresh_copy(tmp_path):
    """The notebook pattern: compare optimizers on one model object, one Trainer after the other."""
    model = tiny_llama()
    first = _train(tmp_path, model, "first", "galore_adamw_layerwise")
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # removed at train end
    fresh = copy.deepcopy(model)
    _train(tmp_path, model, "reused", "galore_adamw")  # raised "received a second final gradient"
    _train(tmp_path, fresh, "fresh", "galore_adamw")
    assert _max_diff([p.detach() for p in model.parameters()], [p.detach() for p in fresh.parameters()]) == 0.0
    # the same Trainer trains again layer-wise: its hooks are re-armed for the run, removed after it
    from transformers import TrainerCallback

    armed = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            armed.append(optimizer.optimizer.hooks_registered)

    first.add_callback(Probe())
    first.args.max_steps = 3
    first.train()
    assert armed == [True, True, True]
    assert first.optimizer.optimizer.hooks_registered is False
    inner = first.optimizer.optimizer.optimizer
    assert {float(s["step"]) for s in inner.state.values()} == {5.0}  # 2 + 3 steps, one tick each


class _StopAt(TrainerCallback):
    """Raises ``error`` at the end of step ``step``: a callback bug, or Ctrl-C in a notebook."""

    def __init__(self, step: int, error: BaseException) -> None:
        self.step, self.error = step, error

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("callback bug"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_hooks_end_when_train_raises(tmp_path, error):
    """A run stopped by an exception leaves no live hook: a plain AdamW loop on the model gets every gradient."""
    model = tiny_llama()
    trainer = make_trainer(tmp_path, model=model)
    trainer.add_callback(_StopAt(2, error))
    with pytest.raises(type(error)):
        trainer.train()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = TokenData()[0]
    ids = batch["input_ids"].unsqueeze(0)
    for _ in range(2):  # two steps: the second raised "received a second final gradient" with hooks left live
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads), f"{sum(g is None for g in grads)} of {len(grads)} gradients missing"
        plain.step()
        plain.zero_grad()
    # the same Trainer trains again: its hooks are re-armed for the run and removed after it
    trainer.pop_callback(_StopAt)
    trainer.train()
    assert trainer.optimizer.optimizer.hooks_registered is False


def test_train_class_is_untouched_by_the_guard(tmp_path):
    """The guard wraps one instance's ``train``; the class (and other Trainers) keep transformers' method."""
    trainer = make_trainer(tmp_path)
    assert "train" in vars(trainer) and vars(Trainer)["train"] is Trainer.__dict__["train"]
    plain = Trainer(
        model=tiny_llama(),
        args=TrainingArguments(output_dir=str(tmp_path / "plain"), report_to=[], use_cpu=True),
        train_dataset=TokenData(),
    )
    assert "train" not in vars(plain)  # no GaLore optimizer: nothing wrapped


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate optimizer.pt", r"optimizer\.pt is truncated or damaged"),
        ("empty trainer_state.json", r"trainer_state\.json is empty"),
        ("truncate model.safetensors", r"model\.safetensors is truncated: \d+ bytes, its header describes \d+"),
    ],
)
def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path, damage, message):
    from hf_galore.checkpoint_files import CheckpointFileError

    make_trainer(tmp_path, name="run", max_steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    action, name = damage.split(" ")
    path = checkpoint / name
    data = path.read_bytes()
    path.write_bytes(b"" if action == "empty" else data[: len(data) // 2])
    resumed = make_trainer(tmp_path, name="run", max_steps=4)
    with pytest.raises(CheckpointFileError, match=message) as info:
        resumed.train(resume_from_checkpoint=True)  # the last checkpoint of output_dir
    assert str(checkpoint) in str(info.value) and info.value.__cause__ is not None
    assert not any(p._post_accumulate_grad_hooks for p in resumed.model.parameters())


class ProjectedGradientBytes(TrainerCallback):
    """After every non-final micro-batch: (step, bytes of gradients the projected weights still hold)."""

    def __init__(self) -> None:
        self.held: list[tuple[int, int]] = []

    def on_substep_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        projected = [p for g in optimizer.param_groups if "rank" in g for p in g["params"]]
        held = sum(p.grad.numel() * p.grad.element_size() for p in projected if p.grad is not None)
        self.held.append((state.global_step, held))


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, _ in NAME_CASES])
def test_accumulation_holds_no_projected_gradient_between_refreshes(tmp_path, name):
    """gradient_accumulation_steps=8: between refreshes (gap 2: steps 0 and 2 refresh) no projected weight
    holds a gradient across micro-batches, and the weights equal full accumulation (`accumulate=full`)."""
    if "8bit" in name:
        pytest.importorskip("bitsandbytes")
    setup = {"optim": name, "gradient_accumulation_steps": 8, "per_device_train_batch_size": 2, "max_steps": 3}
    full = make_trainer(tmp_path, name="full", optim_args="rank=4, update_proj_gap=2, accumulate=full", **setup)
    subspace = make_trainer(tmp_path, name="subspace", **setup)
    counters = {}
    for key, trainer in (("full", full), ("subspace", subspace)):
        counters[key] = ProjectedGradientBytes()
        trainer.add_callback(counters[key])
        trainer.train()
    projected = sum(
        p.numel() * p.element_size() for g in subspace.optimizer.param_groups if "rank" in g for p in g["params"]
    )
    assert len(counters["subspace"].held) == 3 * 7  # seven non-final micro-batches per step
    assert {held for step, held in counters["full"].held} == {projected}
    assert {step: held for step, held in counters["subspace"].held} == {0: projected, 1: 0, 2: projected}
    assert _max_diff(_params(full), _params(subspace)) <= 1e-5
    assert _max_diff(_params(full), [p.detach() for p in tiny_llama().parameters()]) > 1e-3


@pytest.mark.slow
def test_regular_optimizer_lowrank_accumulation_in_the_trainer(tmp_path):
    """optim_args `accumulate=lowrank` with the regular optimizer: the weights of full accumulation; the
    Trainer's global clipping (it reads `.grad`) is refused by name at train start."""
    setup = {"optim": "galore_adamw", "gradient_accumulation_steps": 4, "max_steps": 3}
    full = make_trainer(tmp_path, name="full", **setup)
    lowrank = make_trainer(tmp_path, name="lowrank", optim_args="rank=4, update_proj_gap=2, accumulate=lowrank", **setup)
    full.train()
    lowrank.train()
    assert _max_diff(_params(full), _params(lowrank)) <= 1e-5
    clipped = make_trainer(
        tmp_path, name="clipped", optim_args="rank=4, accumulate=lowrank", max_grad_norm=1.0, **setup
    )
    with pytest.raises(UnsupportedSetupError, match="max_grad_norm"):
        clipped.train()
