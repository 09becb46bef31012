"""Optimizer state that does not fit its param group never reaches a kernel (error table).

Every case of ``_state_cases`` either works (its own assertions pass: e.g. a
``rank`` changed mid-run gives exactly a fresh optimizer's update) or raises
``StateMismatchError`` naming the group, the parameter, the state key and the
expected and found shapes. Cases whose bad state used to reach
``torch._fused_adamw_`` or bitsandbytes' kernel (heap corruption, SIGSEGV)
run together in one child process, so a regression fails the test instead of
killing the test run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from hf_galore import GaLoreAdamW, StateMismatchError
from hf_galore.projectors.geometry import add_to_matrix_, as_matrix
from tests.optim import _state_cases

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Works:
    """The case finishes; ``warning`` is a substring of its one GaLore warning (``None``: no warning)."""

    warning: str | None = None


@dataclass(frozen=True)
class Raises:
    """The case raises ``StateMismatchError`` whose message contains every string of ``names``."""

    names: tuple[str, ...] = field(default_factory=tuple)


REMADE = "re-made it: new basis now, moments and step from zero"
START_FRESH = "start this optimizer fresh"

#: case -> (expected, runs in the child process because it could crash before the checks)
TABLE: dict[str, tuple[Works | Raises, bool]] = {
    # settings changed during training: the state is re-made, one warning
    "rank_up_midrun_adamw": (Works(REMADE), True),
    "rank_down_midrun_adamw": (Works(REMADE), True),
    "proj_type_midrun_adamw": (Works(REMADE), True),
    "rank_up_midrun_int8_basis": (Works(REMADE), True),
    "rank_up_midrun_adafactor": (Works(REMADE), False),
    "proj_type_midrun_adafactor": (Works(REMADE), False),
    "rank_up_midrun_adamw8bit": (Works(REMADE), True),
    "rank_down_midrun_adamw8bit": (Works(REMADE), True),
    "rank_up_midrun_layerwise": (Works(REMADE), True),
    # checkpoints that do not fit: refused by name, before anything is loaded
    "load_wrong_shaped_basis": (
        Raises(("param group 1", "param 0 (shape (48, 32))", "`basis_right`", "(32, 4)", "(32, 5)", START_FRESH)),
        True,
    ),
    "load_transposed_basis": (Raises(("param group 1", "`basis_right`", "(32, 4)", "(4, 32)")), True),
    "load_wrong_shaped_moment": (
        Raises(("param group 1", "param 1 (shape (24, 48))", "`exp_avg_sq`", "(4, 48)", "(4, 24)")),
        True,
    ),
    "load_wrong_shaped_int8_basis": (Raises(("`basis_right`", "`quant`='int8'", "(32, 4)", "(32, 3)")), True),
    "load_truncated_int8_codes": (Raises(("`basis_right_q`", "(128,)", "(50,)")), True),
    "load_wrong_shaped_8bit_state": (Raises(("param 0 (shape (512, 64))", "`state1`", "(8, 512)", "(4, 512)")), True),
    "load_wrong_shaped_adafactor_row": (Raises(("`exp_avg_sq_col`", "(4,)", "(8,)")), False),
    "load_reordered_params": (
        Raises(("param group 1", "param 0 (shape (8, 24))", "`basis_right`", "should be absent", "parameter order")),
        True,
    ),
    "load_nan_basis": (Works("hold NaN/Inf; dropped them"), False),
    "load_int_steps": (Works(), False),
    # foreign state_dicts
    "load_torch_adamw_into_lowrank_groups": (
        Raises(("param group 1 is low-rank here", "no `rank`", "full-size, (48, 32)", START_FRESH)),
        True,
    ),
    "load_torch_adamw_whose_groups_gained_rank": (
        Raises(("param group 0", "`exp_avg`", "(48, 4)", "(48, 32)")),
        True,
    ),
    "load_torch_adamw_into_full_rank_groups": (Works(), False),
    "load_galore_torch_state_dict": (Raises(("galore-torch", "`projector`", START_FRESH)), False),
    # another member's checkpoint
    "load_adamw_checkpoint_into_adafactor": (
        Raises(("param group 0", "`relative_step`", "different optimizer")),
        False,
    ),
    "load_adafactor_checkpoint_into_adamw": (Raises(("param group 0", "`betas`", "different optimizer")), False),
    "load_adamw8bit_checkpoint_into_adamw": (Raises(("`state1`", "GaLoreAdamW", "different optimizer")), True),
    "load_adamw_checkpoint_into_adamw8bit": (Works(), False),
    # layouts
    "channels_last_conv_weight": (Works(), False),
}


def test_table_covers_every_case():
    assert set(TABLE) == set(_state_cases.CASES)


@pytest.fixture(scope="module")
def child_results() -> dict[str, dict]:
    """Run the crash-capable cases in one child process; a crash names the case that was running."""
    names = [name for name, (_, isolated) in TABLE.items() if isolated]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.optim._state_cases", *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {line["case"]: line for line in lines if "case" in line}
    started = [line["started"] for line in lines if "started" in line]
    assert proc.returncode == 0, (
        f"the child process died (exit {proc.returncode}) in case {started[-1] if started else None!r}:\n"
        f"{proc.stderr[-2000:]}"
    )
    return results


@pytest.mark.parametrize("name", list(TABLE))
def test_state_case(name, request):
    expected, isolated = TABLE[name]
    if name.endswith("8bit") or "8bit" in name:
        pytest.importorskip("bitsandbytes")
    if name == "load_galore_torch_state_dict":
        pytest.importorskip("galore_torch")
    result = request.getfixturevalue("child_results")[name] if isolated else _state_cases.run(name)
    if isinstance(expected, Works):
        assert result["outcome"] == "ok", f"{result['type']}: {result['message']}"
        if expected.warning is None:
            assert result["warnings"] == []
        else:
            assert len(result["warnings"]) == 1 and expected.warning in result["warnings"][0], result["warnings"]
    else:
        assert result["outcome"] == "error", "loaded without complaint"
        assert result["type"] == "StateMismatchError", f"{result['type']}: {result['message']}"
        assert {"HfGaloreError", "ValueError"} <= set(result["mro"])
        missing = [text for text in expected.names if text not in result["message"]]
        assert not missing, f"{missing} not in: {result['message']}"


def test_refused_load_changes_nothing():
    """The check runs before ``torch.optim.Optimizer`` copies anything: a refused state_dict leaves the optimizer as it was."""
    _, opt, sd = _state_cases._trained()
    before = {k: v.clone() for k, v in opt.state[opt.param_groups[1]["params"][0]].items() if torch.is_tensor(v)}
    pid = _state_cases._lowrank_ids(sd)[0]
    bad = {
        "state": {**sd["state"], pid: {**sd["state"][pid], "basis_right": torch.randn(32, 5)}},
        "param_groups": [{**g, "lr": 0.5} for g in sd["param_groups"]],
    }
    with pytest.raises(StateMismatchError):
        opt.load_state_dict(bad)
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)
    after = opt.state[opt.param_groups[1]["params"][0]]
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_schedule_warns_once_and_counts_every_weight():
    """A rank schedule over several changes: one warning in all, every re-made weight counted."""
    model = _state_cases.tiny_mlp()
    opt = _state_cases._adamw(model, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rank in (4, 6, 8):
            opt.param_groups[1]["rank"] = rank
            _state_cases.train(model, opt, 2)
    assert sum("re-made" in str(w.message) for w in caught) == 1
    assert opt.galore_stats.state_resets == 2 * 3  # 4 -> 6 -> 8, three weights each
    assert opt.galore_stats.as_dict()["state_resets"] == 6


def test_the_shape_check_reads_no_values():
    """Cheap enough for every step: shapes only, so it works on meta tensors (no data, no device sync)."""
    from hf_galore.optim.state_checks import find_mismatch

    param = torch.empty(48, 32, device="meta")
    group = {"rank": 4, "proj_type": "std", "quant": None}
    state = {
        "basis_right": torch.empty(32, 4, device="meta"),
        "exp_avg": torch.empty(48, 4, device="meta"),
        "exp_avg_sq": torch.empty(48, 4, device="meta"),
    }
    opt = GaLoreAdamW([torch.nn.Parameter(torch.zeros(2, 2))])
    assert find_mismatch(opt, param, state, group) is None
    state["exp_avg_sq"] = torch.empty(48, 8, device="meta")
    assert find_mismatch(opt, param, state, group) == ("exp_avg_sq", (48, 4), (48, 8))
    del state["exp_avg_sq"]
    assert find_mismatch(opt, param, state, group) == ("exp_avg_sq", (48, 4), None)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_add_to_matrix_reaches_the_tensor(layout):
    weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2).contiguous(memory_format=layout)
    expected = weight.clone() + 1.0
    add_to_matrix_(weight, lambda m: m.add_(1.0))
    assert torch.equal(weight, expected)
    assert weight.is_contiguous(memory_format=layout)
    assert as_matrix(weight).shape == (2, 12)


def test_a_checkpoint_from_before_a_hyper_parameter_existed_loads_with_its_default():
    """Only a member's identifying keys (`betas` / `relative_step`...) mark another optimizer's groups."""
    _, opt, sd = _state_cases._trained()
    for group in sd["param_groups"]:
        del group["eps"]
    opt.load_state_dict(sd)
    assert all(group["eps"] == 1e-8 for group in opt.param_groups)


def test_a_saved_low_rank_group_cannot_take_a_1d_param():
    """The saved group's `rank` would apply after loading: a bias there is refused by name, not at the first step."""
    _, _, sd = _state_cases._trained()
    for pid in sd["param_groups"][0]["params"]:  # the biases' state: the matrices below would not fit it
        del sd["state"][pid]
    model = _state_cases.tiny_mlp()
    groups = _state_cases.split_groups(model)  # both groups full-rank here
    opt = GaLoreAdamW(groups[::-1], lr=1e-2)  # ... and the biases where the checkpoint had its matrices
    with pytest.raises(StateMismatchError, match=r"param group 1, param 0 \(shape \(48,\)\).* >= 2 dimensions"):
        opt.load_state_dict(sd)


NO_RESET_SETUPS = [
    *[("adamw", {"proj_type": p}) for p in ("std", "reverse_std", "left", "right", "full")],
    *[("adafactor", {"proj_type": p}) for p in ("std", "left", "full")],
    *[("adamw8bit", {"proj_type": p}) for p in ("std", "right", "full")],
    ("adamw", {"projector": "randomized"}),
    ("adamw", {"projector": "online_pca"}),
    ("adamw", {"quant": "int8"}),
    ("adamw", {"quant": "int4", "proj_type": "full"}),
    ("adamw", {"refresh": "lazy"}),
    ("adamw", {"refresh": "staggered", "rotate_moments": True}),
    ("adamw", {"rank": 64}),  # above every weight's smaller side: the effective rank is what is stored
]


@pytest.mark.parametrize("member,keys", NO_RESET_SETUPS, ids=lambda v: str(v))
def test_state_that_fits_is_never_remade(member, keys):
    """No false alarm: the per-step check must leave every supported setup's state alone."""
    if member == "adamw8bit":
        pytest.importorskip("bitsandbytes")
        model, make = _state_cases._big_model(), _state_cases._eight_bit
    else:
        model = _state_cases.tiny_mlp()
        make = _state_cases._adamw if member == "adamw" else _state_cases._adafactor
    opt = make(model, {"update_proj_gap": 2, **keys})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _state_cases.train(model, opt, 5)
        opt.load_state_dict(opt.state_dict())  # and its own checkpoint loads
        _state_cases.train(model, opt, 2)
    assert opt.galore_stats.state_resets == 0


_EDIT_RANK = """
import warnings, torch
from hf_galore import GaLoreAdamW
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(32, 16))
group = {{"params": [w], "rank": 4}} if {drop} else {{"params": [w]}}
opt = GaLoreAdamW([group], lr=1e-2)
lowrank_keys = set(opt.param_groups[0]) - {{"params", "lr", "betas", "eps", "weight_decay", "skip_nonfinite",
    "stochastic_rounding", "sr_seed", "maximize", "foreach", "capturable", "differentiable", "fused",
    "decoupled_weight_decay", "amsgrad"}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(6):
        w.grad = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        if step == 3:
            if {drop}:
                for key in lowrank_keys:
                    del opt.param_groups[0][key]
            else:
                opt.param_groups[0]["rank"] = 4
        opt.step()
shapes = {{k: tuple(v.shape) for k, v in opt.state[w].items() if torch.is_tensor(v) and v.dim()}}
print(shapes, opt.galore_stats.state_resets, sum("no longer fits" in str(c.message) for c in caught))
"""


@pytest.mark.parametrize(
    "drop,expected",
    [
        # rank added to a full-rank group mid-run: was KeyError 'projector'
        (False, "{'basis_right': (16, 4), 'exp_avg': (32, 4), 'exp_avg_sq': (32, 4)} 1 1"),
        # rank removed mid-run: low-rank moments reached the full-rank fused kernel (heap corruption)
        (True, "{'exp_avg': (32, 16), 'exp_avg_sq': (32, 16)} 1 1"),
    ],
)
def test_rank_added_to_or_removed_from_a_group_mid_run_remakes_the_state(drop, expected):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _EDIT_RANK.format(drop=drop)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected
