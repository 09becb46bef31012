"""One bad batch does not end a bf16 Trainer run: the step is skipped, counted and logged."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_galore.callback import unwrap_optimizer
from tests import helpers

VOCAB, SEQ = 64, 16


class Watch(TrainerCallback):
    """Copies the poisoned weight and its optimizer state before the bad step and compares after it."""

    def __init__(self, weight: torch.nn.Parameter, bad_step: int) -> None:
        self.weight, self.bad_step = weight, bad_step
        self.checked = False

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == self.bad_step:
            self.before = self.weight.detach().clone()
            saved = unwrap_optimizer(optimizer).state[self.weight]
            self.state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == self.bad_step + 1:
            assert torch.equal(self.weight, self.before)
            after = unwrap_optimizer(optimizer).state[self.weight]
            assert after.keys() == self.state.keys()
            for key, value in self.state.items():
                assert torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value
            self.checked = True


@pytest.mark.parametrize(
    "optim,bad_step",
    [("galore_adamw", 2), ("galore_adamw_8bit_layerwise", 3), ("galore_adafactor", 3)],  # 2: a refresh step
)
def test_nan_gradient_in_bf16_training_is_skipped_and_logged(tmp_path, optim, bad_step):
    model = helpers.tiny_llama(0, vocab=VOCAB, seq=SEQ)
    weight = model.model.layers[0].self_attn.q_proj.weight
    backward = {"count": 0}

    def poison(grad):  # one NaN in one gradient, at one step
        backward["count"] += 1
        if backward["count"] == bad_step + 1:
            grad = grad.clone()
            grad[0, 0] = float("nan")
        return grad

    weight.register_hook(poison)
    watch = Watch(weight, bad_step)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        optim=optim,
        optim_target_modules=["attn", "mlp"],
        optim_args="rank=4, update_proj_gap=2",
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        bf16=True,
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_grad_norm=0.0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=helpers.TokenData(VOCAB, SEQ),
        callbacks=[watch],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert watch.checked
    assert sum("was skipped" in str(w.message) for w in caught) == 1
    log = next(h for h in trainer.state.log_history if "galore/skipped_steps" in h)
    assert log["galore/skipped_steps"] == 1 and math.isfinite(log["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(unwrap_optimizer(trainer.optimizer).state[weight]["step"]) == 4  # 5 steps, one skipped
