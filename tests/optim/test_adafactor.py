"""GaLoreAdafactor against galore-torch's GaLoreAdafactor and transformers' Adafactor."""

from __future__ import annotations

import io

import pytest
import torch

from hf_galore import GaLoreAdafactor, GaLoreConfigError
from tests.helpers import max_param_diff, split_groups, tiny_mlp, train

galore_torch = pytest.importorskip("galore_torch")

SETTINGS = [
    {},  # relative step, parameter scaling (the defaults)
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9},
]


@pytest.mark.parametrize("hp", SETTINGS)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_matches_galore_torch_adafactor(hp, proj_type):
    ours_model, ref_model = tiny_mlp(), tiny_mlp()
    keys = {"rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type}
    train(ours_model, GaLoreAdafactor(split_groups(ours_model, **keys), **hp), 30)
    train(ref_model, galore_torch.GaLoreAdafactor(split_groups(ref_model, **keys), **hp), 30)
    assert max_param_diff(ours_model, ref_model) <= 1e-5
    assert max_param_diff(ours_model, tiny_mlp()) > 1e-3


def test_full_rank_matches_transformers_adafactor():
    from transformers.optimization import Adafactor

    ours_model, ref_model = tiny_mlp(), tiny_mlp()
    hp = {"lr": 1e-2, "relative_step": False, "scale_parameter": True, "weight_decay": 0.1, "beta1": 0.8}
    train(ours_model, GaLoreAdafactor(ours_model.parameters(), **hp), 15)
    train(ref_model, Adafactor(ref_model.parameters(), **hp), 15)
    assert max_param_diff(ours_model, ref_model) <= 1e-6


@pytest.mark.parametrize(
    "hp,message",
    [
        ({"lr": 1e-3}, "relative_step"),
        ({"relative_step": False}, "`lr` is required"),
        ({"lr": 1e-3, "relative_step": False, "warmup_init": True}, "warmup_init"),
        ({"beta1": 1.5}, "`beta1`"),
        ({"clip_threshold": 0.0}, "`clip_threshold`"),
    ],
)
def test_bad_arguments(hp, message):
    with pytest.raises(GaLoreConfigError, match=message):
        GaLoreAdafactor(tiny_mlp().parameters(), **hp)


def test_lowrank_state_is_factored_and_resume_is_bit_exact():
    keys = {"rank": 4, "update_proj_gap": 3}

    def run(steps, ckpt=None):
        model = tiny_mlp()
        opt = GaLoreAdafactor(split_groups(model, **keys))
        if ckpt is not None:
            model.load_state_dict(ckpt["m"])
            opt.load_state_dict(ckpt["o"])
        train(model, opt, steps)
        return model, opt

    straight, _ = run(7)
    first, opt = run(4)
    w = first[0].weight  # (48, 32): right projection, R is (48, 4)
    assert opt.state[w]["exp_avg_sq_row"].shape == (48,)
    assert opt.state[w]["exp_avg_sq_col"].shape == (4,)
    buffer = io.BytesIO()
    torch.save({"m": first.state_dict(), "o": opt.state_dict()}, buffer)
    buffer.seek(0)
    resumed, _ = run(3, torch.load(buffer, weights_only=True))
    assert max_param_diff(straight, resumed) == 0.0
