"""GaLoreCallback: the start-up check and summary, logged statistics, one instance acting, state bytes."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from hf_galore import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreConfig,
    galore_param_groups,
)
from hf_galore.errors import UnsupportedSetupError

pytest.importorskip("transformers")

from transformers import TrainerCallback

from hf_galore.callback import (
    MB,
    GaLoreCallback,
    adamw_state_bytes,
    estimate_state_bytes,
    optimizer_state_bytes,
    unwrap_optimizer,
)
from hf_galore.trainer import EXPLICIT_PATH, create_optimizer

from .test_trainer import make_trainer, tiny_llama, training_args

OPTIMIZERS = [
    (GaLoreAdamW, {"lr": 1e-3}),
    (GaLoreAdamW8bit, {"lr": 1e-3}),
    (GaLoreAdafactor, {"lr": 1e-3, "relative_step": False}),
    (GaLoreAdafactor, {"lr": 1e-3, "relative_step": False, "beta1": 0.9}),
]


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_state_estimate_equals_measured_bytes(cls, kwargs, proj_type):
    model = tiny_llama()
    config = GaLoreConfig(rank=4, proj_type=proj_type, target_modules="all-linear")
    optimizer = cls(galore_param_groups(model, config), **kwargs)
    model(input_ids=torch.arange(16).view(1, 16), labels=torch.arange(16).view(1, 16)).loss.backward()
    optimizer.step()
    measured = optimizer_state_bytes(optimizer)
    assert estimate_state_bytes(optimizer) == measured
    assert measured < adamw_state_bytes(optimizer)
    reference = torch.optim.AdamW(model.parameters())
    reference.step()
    assert adamw_state_bytes(optimizer) == optimizer_state_bytes(reference)


@pytest.mark.parametrize(
    "options",
    [
        {"quant": "int8"},
        {"quant": "int4"},
        {"projector": "online_pca"},
        {"projector": "randomized"},
        {"projector": "auto", "options": {"auto_min_numel": 0}},  # auto on its randomized branch
        {"projector": "svd"},
        {"refresh": "lazy"},
        {"quant": "int4", "refresh": "lazy", "projector": "online_pca"},
        # the FIFO's declared length is the group's (it was the default 5 whatever the group said)
        {"refresh": "lazy", "options": {"lazy_queue": 7}},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS[:3])
def test_summary_estimate_equals_measured_bytes_for_every_component(cls, kwargs, options):
    """Regression (issue 13): the summary's estimate was +21% with int4, +17.5% with int8, -29% with OSD."""
    model = tiny_llama()
    config = GaLoreConfig(rank=4, update_proj_gap=1, target_modules="all-linear", **options)
    optimizer = cls(galore_param_groups(model, config), **kwargs)
    ids = torch.arange(16).view(1, 16)
    for _ in range(3):  # the lazy policy's FIFO appears at a weight's second refresh
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert estimate_state_bytes(optimizer) == optimizer_state_bytes(optimizer)


def test_unwrap_optimizer():
    inner = GaLoreAdamW([torch.nn.Parameter(torch.zeros(2))])
    assert unwrap_optimizer(SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner))) is inner
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert unwrap_optimizer(plain) is plain


def _galore_logs(trainer) -> list[dict]:
    return [
        {k: v for k, v in h.items() if k.startswith("galore/") or k == "step"}
        for h in trainer.state.log_history
        if "loss" in h
    ]


@pytest.mark.slow
def test_logs_summary_and_single_instance(tmp_path, capsys):
    user = GaLoreCallback()
    trainer = make_trainer(tmp_path, callbacks=[user, GaLoreCallback()])  # plus the automatic one
    trainer.train()
    printed = capsys.readouterr().out
    assert printed.count("hf_galore: GaLoreAdamW (optim='galore_adamw')") == 1
    assert user.summary is not None and user.summary in printed
    assert [cb.summary for cb in trainer.callback_handler.callbacks if isinstance(cb, GaLoreCallback)].count(None) == 2
    assert "low-rank: 14 weights" in user.summary
    assert "model.layers.*.mlp.gate_proj.weight  (64, 32) rank 4 x2" in user.summary
    assert "matched as a substring" in user.summary  # 'attn' is inside 'self_attn'
    logs = _galore_logs(trainer)
    state_mb = round(optimizer_state_bytes(unwrap_optimizer(trainer.optimizer)) / MB, 4)
    # update_proj_gap=2: every one of the 14 weights refreshes at steps 0 and 2 (logs at steps 2 and 4).
    assert [(h["step"], h["galore/refreshes"], h["galore/optimizer_state_mb"]) for h in logs] == [
        (2, 14, state_mb),
        (4, 28, state_mb),
    ]
    assert "galore/subspace_overlap" not in logs[0]  # no basis replaced yet
    assert 0.0 < logs[1]["galore/subspace_overlap"] <= 1.0
    assert logs[1]["galore/refresh_seconds"] >= logs[0]["galore/refresh_seconds"] > 0


def test_summary_lists_small_weights(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, optim_args="rank=16", max_steps=1)
        trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GaLoreCallback) and cb.summary)
    assert "matched but full rank (smaller dimension <= rank 16): 4 weights" in callback.summary
    assert "model.layers.*.self_attn.k_proj.weight  (16, 32) x2" in callback.summary


def test_flag_set_but_optimizer_not_ours_is_an_error(tmp_path):
    model = tiny_llama()
    trainer = make_trainer(tmp_path, model=model, optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(
        UnsupportedSetupError,
        match=r"`optim`='galore_adamw' was set but the Trainer holds AdamW",
    ) as e:
        trainer.train()
    assert EXPLICIT_PATH in str(e.value)


def test_explicit_optimizer_is_recognised(tmp_path, capsys):
    model = tiny_llama()
    args = training_args(tmp_path, max_steps=2, logging_steps=1)
    trainer = make_trainer(
        tmp_path,
        model=model,
        optimizers=(create_optimizer(model, args), None),
        max_steps=2,
        logging_steps=1,
    )
    trainer.train()
    assert "low-rank: 14 weights" in capsys.readouterr().out
    assert [h["galore/refreshes"] for h in _galore_logs(trainer)] == [14, 14]


def test_inert_without_galore(tmp_path, capsys):
    trainer = make_trainer(tmp_path, optim="adamw_torch", max_steps=2, logging_steps=1)
    trainer.train()
    assert "hf_galore" not in capsys.readouterr().out
    assert _galore_logs(trainer) == [{"step": 1}, {"step": 2}]


def test_hand_built_optimizer_needs_no_trainer_flags(tmp_path, capsys):
    """`optim="galore_adamw"` without `optim_target_modules`: the passed-in optimizer's own groups rule."""
    model = tiny_llama()
    groups = galore_param_groups(model, GaLoreConfig(rank=2, target_modules=["q_proj"]))
    trainer = make_trainer(
        tmp_path,
        model=model,
        optimizers=(GaLoreAdamW(groups, lr=1e-3), None),
        optim_target_modules=None,
        max_steps=1,
        logging_steps=1,
    )
    trainer.train()
    assert "low-rank: 2 weights" in capsys.readouterr().out
    assert [h["galore/refreshes"] for h in _galore_logs(trainer)] == [2]


class RecordingReporter(TrainerCallback):
    """Stands in for TensorBoard / W&B: keeps a copy of every log it is handed."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("user_callback", [False, True])
def test_reporters_before_the_callback_see_galore_values(tmp_path, user_callback):
    """Issue 14: a user's GaLoreCallback sits after the reporters transformers adds; they still get galore/*."""
    reporter = RecordingReporter()
    callbacks = [reporter, GaLoreCallback(print_summary=False)] if user_callback else [reporter]
    trainer = make_trainer(tmp_path, callbacks=callbacks)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    if user_callback:  # the ordering that hid the values: reporter first, then the user's callback
        assert names.index("RecordingReporter") < names.index("GaLoreCallback")
    trainer.train()
    train_logs = [log for log in reporter.logs if "loss" in log]
    assert [log.get("galore/refreshes") for log in train_logs] == [14, 28]
    assert all("galore/optimizer_state_mb" in log for log in train_logs)
    assert [h["galore/refreshes"] for h in _galore_logs(trainer)] == [14, 28]  # written once, not twice


def test_user_callback_settings_still_rule_when_another_instance_writes(tmp_path):
    reporter = RecordingReporter()
    trainer = make_trainer(tmp_path, callbacks=[reporter, GaLoreCallback(print_summary=False, log_stats=False)],
                           max_steps=2)
    trainer.train()
    assert [log for log in reporter.logs if "loss" in log]  # there were training logs ...
    assert not any(k.startswith("galore/") for log in reporter.logs for k in log)  # ... without galore/*


def test_without_the_automatic_instance_the_users_callback_writes_in_its_place(tmp_path):
    from hf_galore.callback import AutoGaLoreCallback

    after = RecordingReporter()
    trainer = make_trainer(tmp_path, callbacks=[GaLoreCallback(print_summary=False), after])
    trainer.remove_callback(AutoGaLoreCallback)
    trainer.train()
    assert [log.get("galore/refreshes") for log in after.logs if "loss" in log] == [14, 28]
    assert [h["galore/refreshes"] for h in _galore_logs(trainer)] == [14, 28]


def test_a_short_run_with_default_logging_steps_logs_galore_stats(tmp_path):
    """max_steps below `logging_steps` (500 by default): the closing summary carries the `galore/*` values."""
    trainer = make_trainer(tmp_path, max_steps=2, logging_steps=500)
    output = trainer.train()
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and not any("loss" in h for h in trainer.state.log_history)
    assert summary["galore/refreshes"] == 14 and summary["galore/skipped_steps"] == 0
    assert output.metrics["galore/refreshes"] == 14  # what train() returns, as the reporters see it
    assert "grad_norm" not in summary


def test_start_up_summary_says_where_gradients_accumulate():
    from hf_galore import GaLoreAdamW, LayerwiseOptimizer
    from hf_galore.callback import MB, build_summary
    from tests.helpers import split_groups, tiny_mlp

    model = tiny_mlp(0)
    layerwise = LayerwiseOptimizer(GaLoreAdamW(split_groups(model, rank=4), lr=1e-3))
    projected = [p for p in model.parameters() if p.dim() == 2]
    accumulators = sum(4 * min(p.shape) * max(p.shape) * 4 // min(p.shape) for p in projected)  # r x max side
    full = sum(p.numel() * 4 for p in projected)
    line = next(line for line in build_summary(layerwise, model).splitlines() if "gradient accumulation" in line)
    assert f"in the subspace, {accumulators / MB:.2f} MB of accumulators instead of {full / MB:.2f} MB" in line
    regular = GaLoreAdamW(split_groups(tiny_mlp(0), rank=4), lr=1e-3)
    assert "gradient accumulation: in full, in `.grad`" in build_summary(regular, model)
