"""Param-group keys: a low-rank group is as strict as ``optim_args`` (issue 14), lenient to torch's own keys."""

from __future__ import annotations

import pytest
import torch

from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreConfigError
from hf_galore.optim.layerwise import LayerwiseOptimizer
from tests.helpers import split_groups, tiny_mlp, train


def _adamw8bit(params, **kwargs):
    pytest.importorskip("bitsandbytes")
    from hf_galore import GaLoreAdamW8bit

    return GaLoreAdamW8bit(params, **kwargs)


def _layerwise(params, **kwargs):
    return LayerwiseOptimizer(params, GaLoreAdamW, **kwargs)


BUILDERS = {
    "adamw": GaLoreAdamW,
    "adamw8bit": _adamw8bit,
    "adafactor": GaLoreAdafactor,
    "layerwise": _layerwise,
}

# (misspelled key, the key the error must suggest)
TYPOS = [
    ("update_proj_gp", "update_proj_gap"),
    ("projecter", "projector"),
    ("scal", "scale"),
    ("proj_typ", "proj_type"),
    ("oversampel", "oversample"),
]


@pytest.mark.parametrize("typo,suggestion", TYPOS)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_unknown_lowrank_key_names_the_key_and_the_closest_valid_one(name, typo, suggestion):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(GaLoreConfigError, match=rf"unknown key '{typo}'.*Did you mean '{suggestion}'\?") as info:
        BUILDERS[name]([{"params": [w], "rank": 2, typo: 50}])
    assert isinstance(info.value, ValueError)  # as torch.optim's own errors
    assert "update_proj_gap" in str(info.value)  # lists the valid keys


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(GaLoreConfigError, match="unknown key 'zzz'") as info:
        GaLoreAdamW([{"params": [w], "rank": 2, "zzz": 1}])
    assert "Did you mean" not in str(info.value)
    assert "rank, " in str(info.value) and "weight_decay" in str(info.value)


def test_add_param_group_refuses_before_adding_the_group():
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([{"params": [a], "rank": 2}])
    with pytest.raises(GaLoreConfigError, match="'scal'"):
        opt.add_param_group({"params": [b], "rank": 2, "scal": 0.5})
    assert len(opt.param_groups) == 1  # the bad group was not half-added


def test_each_optimizer_accepts_its_own_hyper_parameters_in_a_lowrank_group():
    w = torch.nn.Parameter(torch.randn(8, 8))
    GaLoreAdamW([{"params": [w], "rank": 2, "lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}])
    opt = GaLoreAdafactor(
        [
            {
                "params": [w],
                "rank": 2,
                "beta1": 0.9,
                "clip_threshold": 2.0,
                "relative_step": False,
                "lr": 1e-3,
                "scale_parameter": False,
                "decay_rate": -0.7,
                "warmup_init": False,
            }
        ]
    )
    assert opt.param_groups[0]["clip_threshold"] == 2.0
    # Adafactor's key is not AdamW's and vice versa
    with pytest.raises(GaLoreConfigError, match="'clip_threshold'"):
        GaLoreAdamW([{"params": [w], "rank": 2, "clip_threshold": 1.0}])
    with pytest.raises(GaLoreConfigError, match="'betas'.*Did you mean 'beta1'"):
        GaLoreAdafactor([{"params": [w], "rank": 2, "betas": (0.9, 0.99)}])


def test_groups_copied_from_torch_adamw_and_a_scheduler_are_accepted():
    # A torch.optim.AdamW group after a scheduler ran holds initial_lr, foreach, fused, ...
    model = tiny_mlp()
    torch_opt = torch.optim.AdamW(split_groups(model, rank=4), lr=1e-2)
    torch.optim.lr_scheduler.OneCycleLR(torch_opt, max_lr=1e-2, total_steps=10)
    copied = [dict(group) for group in torch_opt.param_groups]
    assert {"initial_lr", "max_lr", "foreach", "fused", "amsgrad", "maximize"} <= set(copied[0])
    opt = GaLoreAdamW(copied)
    assert [group.get("rank") for group in opt.param_groups] == [group.get("rank") for group in copied]
    assert any(group.get("rank") == 4 for group in opt.param_groups)
    # named parameters (torch >= 2.6) keep working
    named = GaLoreAdamW([{"params": list(model[0].named_parameters())[:1], "rank": 4}])
    assert named.param_groups[0]["param_names"] == ["weight"]


#: (optimizer, flag, value, words of the reason): values no member can honour, refused in every group
#: (issue 26: a full-rank group took `maximize=True` / `amsgrad=True` and ignored them)
REFUSED_FLAGS = [
    ("adamw", "amsgrad", True, "AMSGrad's running maximum"),
    ("adamw", "capturable", True, "CUDA-graph capture"),
    ("adamw", "differentiable", True, "cannot be differentiated"),
    ("adamw", "decoupled_weight_decay", False, "always decoupled"),
    ("adafactor", "fused", True, "has no fused kernel"),
    ("adafactor", "foreach", True, "one tensor at a time"),
    ("adafactor", "amsgrad", True, "AMSGrad"),
    ("adamw8bit", "fused", False, "bitsandbytes' 8-bit kernel is a fused kernel"),
    ("adamw8bit", "foreach", True, "one tensor at a time"),
]


def _member(name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    from hf_galore.optim.members import BASE_OPTIMIZERS

    return BASE_OPTIMIZERS[name]


def _hyper(name):
    return {"lr": 1e-2, "relative_step": False} if name == "adafactor" else {"lr": 1e-2}


@pytest.mark.parametrize("name, flag, value, reason", REFUSED_FLAGS)
@pytest.mark.parametrize("where", ["constructor", "lowrank group", "full-rank group"])
def test_torch_flags_a_member_cannot_honour_are_refused_everywhere(name, flag, value, reason, where):
    cls = _member(name)
    w = torch.nn.Parameter(torch.randn(8, 8))
    if where == "constructor":
        build = lambda: cls([{"params": [w], "rank": 2}], **_hyper(name), **{flag: value})
    elif where == "lowrank group":
        build = lambda: cls([{"params": [w], "rank": 2, flag: value}], **_hyper(name))
    else:
        build = lambda: cls([{"params": [w], flag: value}], **_hyper(name))
    with pytest.raises(GaLoreConfigError, match=rf"`{flag}`={value!r} is not supported by {cls.__name__}: .*{reason}"):
        build()


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor"])
def test_constructors_take_torchs_flags_with_the_values_they_honour(name):
    cls = _member(name)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = cls(
        [{"params": [w], "rank": 2}],
        **_hyper(name),
        maximize=False,
        foreach=None,
        fused=None,
        capturable=False,
        differentiable=False,
        amsgrad=False,
        decoupled_weight_decay=True,
    )
    assert opt.param_groups[0]["maximize"] is False and opt.param_groups[0]["fused"] is None
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'fuse'\. Did you mean 'fused'\?"):
        cls([w], **_hyper(name), fuse=True)


def test_fused_and_foreach_together_are_refused_as_torch_does():
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(GaLoreConfigError, match="`fused`=True and `foreach`=True cannot be set together"):
        GaLoreAdamW([w], fused=True, foreach=True)


def test_fused_on_parameters_the_kernel_cannot_run_on_is_refused():
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(GaLoreConfigError, match="`fused`=True needs floating-point parameters"):
        GaLoreAdamW([w], fused=True)


def test_schedulers_and_state_dict_round_trip_still_work():
    model = tiny_mlp()
    opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    assert all(group["initial_lr"] == 1e-2 for group in opt.param_groups)  # added later: not checked
    train(model, opt, 3)
    sched.step()
    state = opt.state_dict()
    fresh = GaLoreAdamW(split_groups(tiny_mlp(), rank=4, update_proj_gap=2), lr=1e-2)
    fresh.load_state_dict(state)  # saved groups carry initial_lr: restored, not re-checked
    assert [g["initial_lr"] for g in fresh.param_groups] == [1e-2] * len(opt.param_groups)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups] == [5e-3] * 2


def test_full_rank_groups_keep_their_own_keys():
    # Groups without `rank` are plain torch groups; hf_galore does not own their other keys.
    w = torch.nn.Parameter(torch.randn(8))
    GaLoreAdamW([{"params": [w], "my_tag": "bias"}])


@pytest.mark.parametrize(
    "group,match",
    [
        ({"rnak": 8}, "unknown key 'rnak' in a param group. Did you mean 'rank'?"),
        ({"ranks": 8}, "unknown key 'ranks' in a param group. Did you mean 'rank'?"),
        (
            {"update_proj_gap": 50, "scale": 0.5},
            "without `rank` sets the low-rank key\\(s\\) 'scale', 'update_proj_gap'",
        ),
        ({"projector": "randomized"}, "without `rank` sets the low-rank key\\(s\\) 'projector'"),
    ],
)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_group_that_lost_its_rank_is_refused_not_trained_at_full_rank(name, group, match):
    """A misspelt or forgotten `rank` would silently train the weights at full rank (issue 14)."""
    w = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(GaLoreConfigError, match=match):
        BUILDERS[name]([{"params": [w], **group}], lr=1e-3)
