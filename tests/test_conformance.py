"""Conformance matrix: every registered component in combination, with the same checks for each.

Each part is tested alone elsewhere; bugs hide where parts meet. The matrix
crosses every registered base optimizer (``BASE_OPTIMIZERS``) with every registered projector, basis codec,
refresh policy and ``proj_type``, with float or INT8 weights (read from the
registries, so a new component joins automatically), reduced to a pairwise
covering set: every pair of values of any two factors appears in at least one
case. Each case checks

* save → ``torch.load(weights_only=True)`` → load → continue is bit-exact;
* the start-up summary's state estimate equals the bytes the optimizer holds;
* every state entry fits its group (``state_checks.find_mismatch``);
* every refresh reaches the refresh policy once, with the bases of all the
  weight's sides (``RefreshPolicy.after_refresh``'s contract: a two-sided
  weight advances a policy's schedule as a one-sided one does);
* layer-wise mode computes the regular updates (same weights to 1e-6);
* gradient accumulation in the subspace (layer-wise by default, and the
  regular optimizer's ``accumulate="lowrank"``) gives the weights of full
  accumulation, with refreshes inside the run (float re-association: 1e-5),
  and holds no gradient of a projected weight between micro-batches of a
  step without a refresh, unless its finder tracks every step;
* INT8 weights move like float weights: under the same gradients, the INT8
  weight's displacement projected on the float one's path is 1 ± 0.15.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Iterator

import pytest
import torch

from hf_galore import LayerwiseOptimizer, prepare_model_for_int8_weights
from hf_galore.callback import estimate_state_bytes, optimizer_state_bytes
from hf_galore.optim.members import BASE_OPTIMIZERS
from hf_galore.optim.schedules import REFRESH_POLICIES
from hf_galore.optim.state_checks import find_mismatch
from hf_galore.projectors import PROJECTORS
from hf_galore.projectors.geometry import PROJ_TYPES, matrix_shape, sides_for
from hf_galore.projectors.storage import CODECS
from hf_galore.quant import Int8Linear
from tests.helpers import max_param_diff, regression_batch, split_groups, tiny_mlp, train

#: Hyper-parameters of the matrix's runs; a member not listed gets ``DEFAULT_HYPERPARAMS``.
HYPERPARAMS = {"adafactor": {"lr": 1e-2, "relative_step": False, "weight_decay": 0.1}}
DEFAULT_HYPERPARAMS = {"lr": 1e-2, "weight_decay": 0.1}
#: members that need an optional package
REQUIRES = {"adamw8bit": "bitsandbytes"}

FACTORS = {
    "optimizer": sorted(BASE_OPTIMIZERS),
    "projector": sorted(PROJECTORS),
    "quant": sorted(CODECS, key=str),
    "refresh": sorted(REFRESH_POLICIES),
    "proj_type": sorted(PROJ_TYPES),
    "weights": ["float", "int8"],
}


def pairwise_cases(factors: dict[str, list]) -> list[dict]:
    """A small set of combinations covering every pair of values of any two factors (greedy, deterministic)."""
    names = list(factors)
    uncovered = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va in factors[a]
        for vb in factors[b]
    }
    candidates = [dict(zip(names, values)) for values in itertools.product(*factors.values())]

    def pairs(case):
        return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}

    cases = []
    while uncovered:
        best = max(candidates, key=lambda case: len(pairs(case) & uncovered))
        cases.append(best)
        uncovered -= pairs(best)
    return cases


CASES = pairwise_cases(FACTORS)


def _case_id(case: dict) -> str:
    return "-".join(f"{v}" for v in case.values())


def _model(case: dict, seed: int = 0, weights: str | None = None) -> torch.nn.Module:
    model = tiny_mlp(seed=seed)
    if (weights or case["weights"]) == "int8":
        prepare_model_for_int8_weights(model, "all-linear", group_size=16)
    return model


def _build(case: dict, model: torch.nn.Module, layerwise: bool = False, accumulate: str = "auto"):
    name = case["optimizer"]
    if name in REQUIRES:
        pytest.importorskip(REQUIRES[name])
    cls, hp = BASE_OPTIMIZERS[name], HYPERPARAMS.get(name, DEFAULT_HYPERPARAMS)
    keys = {
        "rank": 4,
        "update_proj_gap": 2,
        "projector": case["projector"],
        "quant": case["quant"],
        "refresh": case["refresh"],
        "proj_type": case["proj_type"],
        "quant_group_size": 16,
        # projector="auto": switch at 0 so that the tiny weights take its randomized branch (ignored by the others)
        "auto_min_numel": 0,
        "accumulate": accumulate,
    }
    optimizer = cls(split_groups(model, **keys), **hp)
    return LayerwiseOptimizer(optimizer) if layerwise else optimizer


def _reload(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_every_pair_of_component_values_is_covered():
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        seen = {(case[a], case[b]) for case in CASES}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
    assert len(CASES) < 0.5 * len(list(itertools.product(*FACTORS.values())))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_component_combination_conforms(case):
    check_combination(case)


def check_combination(case: dict) -> None:
    """The matrix's checks for one combination (components registered at run time included)."""
    # resume: save -> weights_only load -> continue == never stopping, bit for bit
    model = _model(case)
    optimizer = _build(case, model)
    with _policy_calls(case["refresh"]) as calls:
        train(model, optimizer, 5)
    refreshes = optimizer.galore_stats.refreshes
    resumed_model = _model(case, seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed = _build(case, resumed_model)
    resumed.load_state_dict(_reload(optimizer.state_dict()))
    train(model, optimizer, 4)
    train(resumed_model, resumed, 4)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)

    # bytes: the start-up summary's estimate is what the optimizer holds
    estimate, held = estimate_state_bytes(optimizer), optimizer_state_bytes(optimizer)
    assert estimate == held, f"start-up summary estimates {estimate} B of state, the optimizer holds {held} B"

    # every refresh reaches the refresh policy once, with every side's bases
    assert len(calls) == refreshes > 0, f"{len(calls)} refresh-policy calls for {refreshes} refreshes"
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "rank" in group and p.dim() >= 2:
                sides = len(sides_for(group["proj_type"], matrix_shape(tuple(p.shape))))
                seen = [(n_old, n_new) for state, n_old, n_new in calls if state is optimizer.state[p]]
                assert seen and all(n == (sides, sides) for n in seen), (
                    f"a {sides}-sided weight's refreshes reached the policy with (old, new) bases {seen}"
                )

    # every state entry fits its group
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert find_mismatch(optimizer, p, optimizer.state[p], group) is None

    # layer-wise mode computes the regular updates
    layerwise_model = _model(case)
    layerwise = _build(case, layerwise_model, layerwise=True)
    regular_model = _model(case)
    regular = _build(case, regular_model)
    train(layerwise_model, layerwise, 5)
    train(regular_model, regular, 5)
    assert max_param_diff(regular_model, layerwise_model) <= 1e-6
    assert all(torch.equal(_dense(a), _dense(b)) for a, b in zip(_linears(regular_model), _linears(layerwise_model)))

    # accumulation in the subspace: the weights of full accumulation, no projected gradient held between
    # micro-batches (except at refresh steps, and for a finder that moves its basis every step)
    results = {}
    for how in ("full", "layerwise", "lowrank"):
        model = _model(case)
        optimizer = _build(case, model, layerwise=how == "layerwise", accumulate="lowrank" if how == "lowrank" else "auto")
        record = _train_accumulating(model, optimizer, 5)
        results[how] = model
        if how != "full":
            assert all(held == must for held, must in record), (how, record)
            # and the subspace was used: some step left a projected weight without a held gradient
            assert PROJECTORS[case["projector"]].tracks_every_step or any(
                len(must) < 3 for _, must in record
            ), record
    for how in ("layerwise", "lowrank"):
        assert max_param_diff(results["full"], results[how]) <= 1e-5, how

    # INT8 weights move like float weights (the same gradients for both)
    if case["weights"] == "int8":
        moved = {}
        for weights in ("float", "int8"):
            model = _model(case, weights=weights)
            start = torch.cat([_dense(m).flatten() for m in _linears(model)])
            optimizer = _build(case, model)
            g = torch.Generator().manual_seed(2)
            for _ in range(20):
                for param in model.parameters():
                    param.grad = torch.randn(param.shape, generator=g)
                optimizer.step()
            moved[weights] = torch.cat([_dense(m).flatten() for m in _linears(model)]) - start
        along = float(moved["int8"] @ moved["float"]) / float(moved["float"].square().sum())
        assert along == pytest.approx(1.0, abs=0.15), f"the INT8 weights moved {along:.3g}x as far as float ones"


@contextlib.contextmanager
def _policy_calls(name: str) -> Iterator[list[tuple[dict, int, int]]]:
    """Record ``(state, len(old), len(new))`` for each call of the registered policy's ``after_refresh``."""
    policy = REFRESH_POLICIES.lookup(name)
    original = policy.after_refresh
    calls: list[tuple[dict, int, int]] = []

    def spy(state, group, step, old, new):
        calls.append((state, len(old), len(new)))
        return original(state, group, step, old, new)

    policy.after_refresh = spy
    try:
        yield calls
    finally:
        del policy.after_refresh


def _train_accumulating(model: torch.nn.Module, optimizer, steps: int, micro: int = 3) -> list[tuple[set, set]]:
    """``steps`` steps of ``micro`` micro-batches. Per step: (projected weights that held a gradient after a
    non-final micro-batch, those that must: no basis yet, a refresh due by the policy, a finder tracking every step)."""
    x, y = regression_batch(1, n=48)
    groups = [group for group in optimizer.param_groups if "rank" in group]
    projected = [(p, group) for group in groups for p in group["params"]]
    record = []
    for _ in range(steps):
        optimizer.zero_grad()
        must = set()
        for index, (p, group) in enumerate(projected):
            state = optimizer.state.get(p)
            due = not state or REFRESH_POLICIES.lookup(group["refresh"]).due(state, group, int(state["step"]))
            if due or PROJECTORS[group["projector"]].tracks_every_step:
                must.add(index)
        held = set()
        for i, (xb, yb) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            last = i == micro - 1
            hold = isinstance(optimizer, LayerwiseOptimizer) and not last
            with optimizer.accumulating() if hold else contextlib.nullcontext():
                ((model(xb) - yb).square().mean() * 100.0 / micro).backward()
            if not last:
                held |= {index for index, (p, _) in enumerate(projected) if p.grad is not None}
        record.append((held, must))
        optimizer.step()
    return record


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _dense(module: torch.nn.Module) -> torch.Tensor:
    return module.dequantize() if isinstance(module, Int8Linear) else module.weight.detach()
