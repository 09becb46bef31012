"""Cases for ``test_state_checks.py``: optimizer state that does not fit its param group.

Each case is a function that either finishes (after asserting the behaviour it
expects) or raises. Several of these cases crashed the interpreter
(``corrupted double-linked list``, SIGSEGV) before state shapes were checked,
because the fused Adam kernel reads raw memory; the test therefore runs them
in a child process: ``python -m tests.optim._state_cases NAME...`` prints one
JSON line per case (``{"case", "outcome", "type", "message", "warnings"}``),
flushed before the next case starts, so a crash names the case that caused it.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from hf_galore import GaLoreAdafactor, GaLoreAdamW
from tests.helpers import regression_batch, split_groups, tiny_mlp, train

CASES: dict[str, Callable[[], None]] = {}


def case(fn: Callable[[], None]) -> Callable[[], None]:
    CASES[fn.__name__] = fn
    return fn


def _adamw8bit():
    from hf_galore import GaLoreAdamW8bit

    return GaLoreAdamW8bit


def _big_model() -> nn.Sequential:
    """Low-rank gradients of >= 4096 values at rank 8, so 8-bit Adam keeps 8-bit states."""
    return tiny_mlp(dims=(64, 512, 8))


def _grads(model: nn.Module, seed: int = 5) -> None:
    x, y = regression_batch(seed, d_in=model[0].in_features, d_out=model[-1].out_features)
    model.zero_grad()
    (model(x) - y).square().mean().backward()


def _lowrank_state_shapes(opt) -> list[dict[str, tuple[int, ...]]]:
    group = next(g for g in opt.param_groups if "rank" in g)
    return [
        {k: tuple(v.shape) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        for p in group["params"]
    ]


def _change_midrun(make_opt, model, change: dict, remade: set[int], steps_before: int = 4) -> None:
    """Train, change the low-rank group's settings, check the next step against two references.

    The weights at positions ``remade`` (their state no longer fits) restart:
    new basis now, moments and step from zero, so their update equals that of
    a new optimizer built with the new settings, on the same weights and
    gradients. The others (e.g. a weight whose projected side and rank stay
    the same) continue exactly as without the change.
    """
    opt = make_opt(model, {})
    train(model, opt, steps_before)
    unchanged = {"model": copy.deepcopy(model)}
    unchanged["opt"] = make_opt(unchanged["model"], {})
    unchanged["opt"].load_state_dict(copy.deepcopy(opt.state_dict()))
    group = next(g for g in opt.param_groups if "rank" in g)
    group.update(change)
    fresh = copy.deepcopy(model)
    fresh_opt = make_opt(fresh, change)
    for m in (model, fresh, unchanged["model"]):
        _grads(m)
    for o in (opt, fresh_opt, unchanged["opt"]):
        o.step()
    fresh_params = next(g for g in fresh_opt.param_groups if "rank" in g)["params"]
    same_params = next(g for g in unchanged["opt"].param_groups if "rank" in g)["params"]
    for i, p in enumerate(group["params"]):
        q = fresh_params[i] if i in remade else same_params[i]
        assert torch.isfinite(p).all()
        assert torch.equal(p, q), f"param {i}: max diff {(p - q).abs().max().item()}"
    shapes, fresh_shapes = _lowrank_state_shapes(opt), _lowrank_state_shapes(fresh_opt)
    assert all(shapes[i] == fresh_shapes[i] for i in remade), (shapes, fresh_shapes)
    train(model, opt, 3)  # and it keeps going
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.galore_stats.state_resets == len(remade)


def _adamw(model, keys, **kw):
    base = {"rank": 4, "update_proj_gap": 4}
    return GaLoreAdamW(split_groups(model, **{**base, **keys}), lr=1e-2, **kw)


def _adamw_int8(model, keys):
    base = {"rank": 4, "update_proj_gap": 4, "quant": "int8"}
    return GaLoreAdamW(split_groups(model, **{**base, **keys}), lr=1e-2)


def _adafactor(model, keys):
    base = {"rank": 4, "update_proj_gap": 4}
    return GaLoreAdafactor(split_groups(model, **{**base, **keys}), beta1=0.9)


def _eight_bit(model, keys):
    base = {"rank": 8, "update_proj_gap": 4}
    return _adamw8bit()(split_groups(model, **{**base, **keys}), lr=1e-2)


# --------------------------------------------------- settings changed mid-run
@case
def rank_up_midrun_adamw():
    _change_midrun(_adamw, tiny_mlp(), {"rank": 8}, remade={0, 1, 2})


@case
def rank_down_midrun_adamw():
    _change_midrun(_adamw, tiny_mlp(), {"rank": 2}, remade={0, 1, 2})


@case
def proj_type_midrun_adamw():
    _change_midrun(_adamw, tiny_mlp(), {"proj_type": "left"}, remade={0})  # (48, 32) was right


@case
def rank_up_midrun_int8_basis():
    _change_midrun(_adamw_int8, tiny_mlp(), {"rank": 8}, remade={0, 1, 2})


@case
def rank_up_midrun_adafactor():
    _change_midrun(_adafactor, tiny_mlp(), {"rank": 8}, remade={0, 1, 2})


@case
def proj_type_midrun_adafactor():
    _change_midrun(_adafactor, tiny_mlp(), {"proj_type": "full"}, remade={0, 1, 2})


@case
def rank_up_midrun_adamw8bit():
    _change_midrun(_eight_bit, _big_model(), {"rank": 16}, remade={0})  # (8, 512) stays rank 8


@case
def rank_down_midrun_adamw8bit():  # 8-bit states -> 32-bit moments (below 4096 values)
    _change_midrun(_eight_bit, _big_model(), {"rank": 4}, remade={0, 1})


@case
def rank_up_midrun_layerwise():
    """Layer-wise mode updates in gradient hooks through the same checked path as ``step()``."""
    from hf_galore import LayerwiseOptimizer

    def run_schedule(model, opt):
        train(model, opt, 4)
        opt.param_groups[1]["rank"] = 8
        train(model, opt, 3)

    regular, hooked = tiny_mlp(), tiny_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's own warning
        run_schedule(regular, _adamw(regular, {}))
    opt = LayerwiseOptimizer(_adamw(hooked, {}))
    run_schedule(hooked, opt)
    for p, q in zip(regular.parameters(), hooked.parameters()):
        assert torch.isfinite(q).all()
        assert torch.allclose(p, q, rtol=0, atol=1e-6), (p - q).abs().max().item()
    assert opt.galore_stats.state_resets == 3


# ------------------------------------------------------ loaded checkpoints
def _trained(make_opt=_adamw, model=None, steps: int = 3):
    model = model or tiny_mlp()
    opt = make_opt(model, {})
    train(model, opt, steps)
    return model, opt, opt.state_dict()


def _lowrank_ids(state_dict) -> list[int]:
    return next(g for g in state_dict["param_groups"] if "rank" in g)["params"]


@case
def load_wrong_shaped_basis():
    model, opt, sd = _trained()
    pid = _lowrank_ids(sd)[0]  # weight (48, 32): std projects on the right, basis (32, 4)
    sd["state"][pid]["basis_right"] = torch.randn(32, 5)
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_transposed_basis():
    model, opt, sd = _trained()
    pid = _lowrank_ids(sd)[0]
    sd["state"][pid]["basis_right"] = sd["state"][pid]["basis_right"].t().contiguous()
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_wrong_shaped_moment():
    model, opt, sd = _trained()
    pid = _lowrank_ids(sd)[1]  # weight (24, 48): left, moments (4, 48)
    sd["state"][pid]["exp_avg_sq"] = torch.zeros(4, 24)
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_wrong_shaped_int8_basis():
    model, opt, sd = _trained(_adamw_int8)
    pid = _lowrank_ids(sd)[0]
    state = sd["state"][pid]
    state["basis_right_shape"] = torch.tensor([32, 3])
    state["basis_right_q"] = state["basis_right_q"][:96].clone()
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_truncated_int8_codes():
    model, opt, sd = _trained(_adamw_int8)
    pid = _lowrank_ids(sd)[0]
    sd["state"][pid]["basis_right_q"] = sd["state"][pid]["basis_right_q"][:50].clone()
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_wrong_shaped_8bit_state():
    model, opt, sd = _trained(_eight_bit, _big_model())
    pid = _lowrank_ids(sd)[0]  # (512, 64) weight, rank 8: state1 kept transposed, (8, 512)
    sd["state"][pid]["state1"] = torch.zeros(4, 512, dtype=torch.uint8)
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_wrong_shaped_adafactor_row():
    model, opt, sd = _trained(_adafactor)
    pid = _lowrank_ids(sd)[0]  # R is (48, 4): row (48,), col (4,)
    sd["state"][pid]["exp_avg_sq_col"] = torch.zeros(8)
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_reordered_params():
    _, _, sd = _trained()
    fresh = tiny_mlp()
    groups = split_groups(fresh, rank=4, update_proj_gap=50)
    groups[1]["params"] = groups[1]["params"][::-1]
    new = GaLoreAdamW(groups, lr=1e-2)
    new.load_state_dict(sd)
    train(fresh, new, 1)


@case
def load_nan_basis():
    """A non-finite basis in a checkpoint is dropped (warned, counted) and recomputed at the next step."""
    model, opt, sd = _trained()
    pid = _lowrank_ids(sd)[0]
    sd["state"][pid]["basis_right"][0, 0] = float("nan")
    opt.load_state_dict(sd)
    train(model, opt, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters()), "NaN reached the weights"
    assert opt.galore_stats.dropped_bases == 1
    assert all(
        torch.isfinite(s["basis_right" if "basis_right" in s else "basis_left"]).all()
        for s in opt.state.values()
        if "exp_avg" in s and s["exp_avg"].dim() == 2 and ("basis_right" in s or "basis_left" in s)
    )


@case
def load_int_steps():
    """An int ``step`` (torch < 1.12, galore-torch) is converted: the resumed run equals the uninterrupted one."""
    model, opt, sd = _trained()
    sd = copy.deepcopy(sd)
    for state in sd["state"].values():
        state["step"] = int(state["step"])
    twin = copy.deepcopy(model)
    twin_opt = _adamw(twin, {})
    twin_opt.load_state_dict(sd)
    train(model, opt, 2)
    train(twin, twin_opt, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q), (p - q).abs().max().item()


@case
def load_torch_adamw_into_lowrank_groups():
    model = tiny_mlp()
    groups = split_groups(model)  # the same two groups, without `rank`
    torch_opt = torch.optim.AdamW(groups, lr=1e-2)
    train(model, torch_opt, 2)
    opt = _adamw(model, {})
    opt.load_state_dict(torch_opt.state_dict())
    train(model, opt, 1)


@case
def load_torch_adamw_whose_groups_gained_rank():
    model = tiny_mlp()
    torch_opt = torch.optim.AdamW([p for p in model.parameters() if p.dim() >= 2], lr=1e-2)
    train(model, torch_opt, 2)
    sd = torch_opt.state_dict()
    sd["param_groups"][0].update(rank=4, update_proj_gap=50, scale=0.25, proj_type="std")
    opt = GaLoreAdamW([{"params": [p for p in model.parameters() if p.dim() >= 2], "rank": 4}], lr=1e-2)
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_torch_adamw_into_full_rank_groups():
    """Full-rank GaLoreAdamW groups are torch AdamW: its state loads and the run continues identically."""
    model = tiny_mlp()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, torch_opt, 2)
    twin = copy.deepcopy(model)
    opt = GaLoreAdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # as if saved to disk
    train(model, torch_opt, 2)
    train(twin, opt, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), (p - q).abs().max().item()


@case
def load_galore_torch_state_dict():
    import galore_torch

    model = tiny_mlp()
    theirs = galore_torch.GaLoreAdamW(
        split_groups(model, rank=4, update_proj_gap=50, scale=0.25, proj_type="std"), lr=1e-2
    )
    train(model, theirs, 2)
    opt = _adamw(model, {})
    opt.load_state_dict(theirs.state_dict())
    train(model, opt, 1)


@case
def load_adamw_checkpoint_into_adafactor():
    model, _, sd = _trained(_adamw)
    opt = GaLoreAdafactor(split_groups(model, rank=4, update_proj_gap=50))
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_adafactor_checkpoint_into_adamw():
    model, _, sd = _trained(_adafactor)
    opt = _adamw(model, {})
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_adamw8bit_checkpoint_into_adamw():
    model, _, sd = _trained(_eight_bit, _big_model())
    opt = _adamw(model, {"rank": 8})
    opt.load_state_dict(sd)
    train(model, opt, 1)


@case
def load_adamw_checkpoint_into_adamw8bit():
    """32-bit moments are a layout GaLoreAdamW8bit also uses: they load and the run goes on."""
    model, _, sd = _trained(lambda m, k: _adamw(m, {"rank": 8}), _big_model())
    opt = _eight_bit(model, {})
    opt.load_state_dict(sd)
    train(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ layouts
@case
def channels_last_conv_weight():
    """A channels_last conv kernel is projected as its (out, in·kh·kw) matrix and updated in place."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3)
    twin = copy.deepcopy(conv)
    conv = conv.to(memory_format=torch.channels_last)
    start = conv.weight.detach().clone()
    x = torch.randn(4, 8, 6, 6)
    for module in (conv, twin):
        opt = GaLoreAdamW([{"params": [module.weight], "rank": 4, "update_proj_gap": 2}], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            module(x).square().mean().backward()
            opt.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert (conv.weight - start).abs().max() > 1e-3, "the update did not reach the parameter"
    # the two layouts' convolutions sum in different orders (the gradients differ in the last bits, and
    # Adam's first steps carry that: 1.5e-6 apart on one CPU); a mis-laid update would be ~1e-3 off
    assert torch.allclose(conv.weight, twin.weight, rtol=0, atol=1e-5), (conv.weight - twin.weight).abs().max()


def run(name: str) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            CASES[name]()
            result = {"case": name, "outcome": "ok", "type": None, "message": ""}
        except Exception as exc:  # noqa: BLE001  (reported, not raised: the parent checks it)
            result = {
                "case": name,
                "outcome": "error",
                "type": type(exc).__name__,
                "message": str(exc),
                "mro": [c.__name__ for c in type(exc).__mro__],
            }
    result["warnings"] = [str(w.message) for w in caught if "GaLore" in str(w.message)]
    return result


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names or list(CASES):
        print(json.dumps({"started": name}), flush=True)
        print(json.dumps(run(name)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
