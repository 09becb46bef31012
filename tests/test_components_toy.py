"""A component declares itself once: a toy projector and a toy base optimizer, defined and registered here.

Nothing in the package names them. Registered from this file (and removed
after), they get option validation, ``optim_args`` / ``GaLoreConfig`` parsing,
``estimate_memory`` equal to the bytes held, the start-up summary, the
conformance matrix's checks (bit-exact resume, state shapes, layer-wise ==
regular, INT8 weights) and FSDP2 state sharding on two gloo processes.

Run as a module under torchrun, this file is also the two-process worker of
the FSDP2 test (``python -m torch.distributed.run ... -m tests.test_components_toy OUT``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_galore.declare import Option, StateKey, StateTensor, check_beta, check_non_negative_int, check_positive_int
from hf_galore.errors import GaLoreConfigError
from hf_galore.optim.base import GaLoreOptimizer
from hf_galore.optim.members import BASE_OPTIMIZERS, register_base_optimizer
from hf_galore.projectors import PROJECTORS, BasisFinder, register_projector
from hf_galore.projectors.geometry import side_size

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the toy components
class ToyPowerFinder(BasisFinder):
    """Subspace iteration from a seeded Gaussian start; keeps the energy it missed, per side."""

    name = "toy_power"
    options = (
        Option("toy_iters", 3, check_positive_int, "subspace-iteration rounds"),
        Option("toy_seed", 0, check_non_negative_int, "seed of the start"),
    )

    def state_layout(self, shape, rank, sides, group):
        return {f"toy_{side}_missed": StateTensor((), torch.float32) for side in sides}

    def find(self, matrix, rank, side, *, previous, state, group):
        a = matrix if side == "left" else matrix.t()
        g = torch.Generator().manual_seed(int(group["toy_seed"]))
        q = torch.linalg.qr(torch.randn(a.shape[0], rank, generator=g)).Q
        for _ in range(int(group["toy_iters"])):
            q = torch.linalg.qr(a @ (a.t() @ q)).Q
        captured = (q.t() @ a).square().sum()
        state[f"toy_{side}_missed"] = (1.0 - captured / a.square().sum().clamp_min(1e-30)).reshape(())
        return q.contiguous()


class ToySGDM(GaLoreOptimizer):
    """SGD with heavy-ball momentum: ``b ← μ·b + g``, step ``lr·b``, decoupled weight decay."""

    name = "toy_sgdm"
    state_keys = {"momentum_buffer": StateKey(follows_gradient=True, rotate="linear")}  # noqa: RUF012
    _group_identity = ("momentum",)

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _validate_group(self, group):
        super()._validate_group(group)
        check_beta("momentum", group["momentum"])

    @classmethod
    def state_layout(cls, like, group, state, *, dtype):
        return {"momentum_buffer": cls._entry("momentum_buffer", like, dtype)}

    def _init_moments(self, state, like, group):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(like, memory_format=torch.contiguous_format)

    def _lowrank_updates(self, group, params, grads, states):
        lr = float(group["lr"])
        updates = []
        for grad, state in zip(grads, states):
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(grad.to(buf.dtype))
            updates.append(buf * lr)
        return updates, [lr] * len(updates)


@contextlib.contextmanager
def toys_registered() -> Iterator[None]:
    """Register both toys for the duration, then remove them (the registries are as before)."""
    register_projector(ToyPowerFinder())
    try:
        register_base_optimizer(ToySGDM)
        try:
            yield
        finally:
            BASE_OPTIMIZERS.unregister("toy_sgdm")
    finally:
        PROJECTORS.unregister("toy_power")


@pytest.fixture
def toys():
    with toys_registered():
        yield


def tiny(seed: int = 0, dims=(32, 48, 24, 8)) -> nn.Sequential:
    from tests.helpers import tiny_mlp

    return tiny_mlp(seed, dims)


# ------------------------------------------------------------------------ validation
def test_options_exist_only_while_registered():
    from hf_galore import GaLoreAdamW, GaLoreConfig
    from tests.helpers import split_groups

    with pytest.raises(GaLoreConfigError, match="unknown GaLore setting 'toy_iters'"):
        GaLoreConfig(options={"toy_iters": 2})
    with toys_registered():
        assert GaLoreConfig(projector="toy_power", options={"toy_iters": 2}).options == {"toy_iters": 2}
        GaLoreAdamW(split_groups(tiny(), rank=4, projector="toy_power", toy_iters=2))
    with pytest.raises(GaLoreConfigError, match="unknown key 'toy_iters'"):
        GaLoreAdamW(split_groups(tiny(), rank=4, toy_iters=2))
    with pytest.raises(GaLoreConfigError, match="`projector` must be one of .*got 'toy_power'"):
        GaLoreConfig(projector="toy_power")
    assert "toy_sgdm" not in BASE_OPTIMIZERS


def test_bad_option_values_are_refused_by_name(toys):
    from hf_galore import GaLoreConfig
    from tests.helpers import split_groups

    with pytest.raises(GaLoreConfigError, match=r"`toy_iters` must be a positive integer \(>= 1\), got 0"):
        ToySGDM(split_groups(tiny(), rank=4, projector="toy_power", toy_iters=0))
    with pytest.raises(GaLoreConfigError, match="`toy_seed` must be an integer >= 0, got -1"):
        GaLoreConfig(projector="toy_power", options={"toy_seed": -1})
    with pytest.raises(GaLoreConfigError, match="Did you mean 'toy_iters'"):
        ToySGDM(split_groups(tiny(), rank=4, toy_iter=2))
    with pytest.raises(GaLoreConfigError, match=r"`momentum` must be in \[0, 1\), got 1.5"):
        ToySGDM(split_groups(tiny(), rank=4), momentum=1.5)


def test_a_clashing_declaration_is_refused_at_registration(toys):
    class Clash(ToyPowerFinder):
        name = "toy_clash"
        options = (Option("toy_iters", 7, check_positive_int),)

    with pytest.raises(GaLoreConfigError, match="'toy_iters' is declared by both projector 'toy_power'"):
        register_projector(Clash())
    assert "toy_clash" not in PROJECTORS

    class Twisted(ToySGDM):
        name = "toy_twisted"
        state_keys = {"momentum_buffer": StateKey(rotate="squared")}  # noqa: RUF012

    with pytest.raises(GaLoreConfigError, match="'momentum_buffer' with rotate='squared'"):
        register_base_optimizer(Twisted)


def test_optim_args_parse_the_toy_options_by_their_declared_type(toys):
    from hf_galore import GaLoreConfig

    config = GaLoreConfig.from_optim_args("rank=4, projector=toy_power, toy_iters=5, toy_seed=3")
    assert config.projector == "toy_power"
    assert config.options == {"toy_iters": 5, "toy_seed": 3}
    assert config.group_options()["toy_iters"] == 5
    assert GaLoreConfig.from_json_string(config.to_json_string()) == config
    with pytest.raises(GaLoreConfigError, match="`toy_iters` in `optim_args` must be an integer, got 'many'"):
        GaLoreConfig.from_optim_args("projector=toy_power, toy_iters=many")


# -------------------------------------------------------------------- bytes, summary
def _trained(optimizer_cls, **keys):
    from tests.helpers import split_groups, train

    model = tiny()
    optimizer = optimizer_cls(split_groups(model, rank=4, update_proj_gap=2, **keys), lr=1e-2)
    train(model, optimizer, 3)
    return model, optimizer


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_estimate_memory_equals_the_bytes_held(toys, proj_type):
    from hf_galore.callback import estimate_state_bytes, optimizer_state_bytes
    from hf_galore.memory import estimate_memory

    model, optimizer = _trained(ToySGDM, projector="toy_power", proj_type=proj_type)
    held = optimizer_state_bytes(optimizer)
    est = estimate_memory(
        model, "galore", rank=4, dtype="fp32", target_modules=["0", "2", "4"], proj_type=proj_type,
        optimizer="toy_sgdm", options={"projector": "toy_power"},
    )
    assert est.optimizer_states == held == estimate_state_bytes(optimizer)
    # by hand: per weight a float32 step, the momentum of the projected gradient, the bases and one
    # float32 scalar per side; per bias a step and a momentum of its own size
    expected = 0
    for p in model.parameters():
        if p.dim() == 1:
            expected += 4 + 4 * p.numel()
            continue
        m, n = p.shape
        sides = ("left", "right") if proj_type == "full" else (("right",) if m >= n else ("left",))
        low = (4 if "left" in sides else m) * (4 if "right" in sides else n)
        expected += 4 + 4 * low + sum(4 * side_size(s, (m, n)) * 4 + 4 for s in sides)
    assert held == expected
    for p in model.parameters():
        if p.dim() == 2:
            m, n = p.shape
            sides = ("left", "right") if proj_type == "full" else (("right",) if m >= n else ("left",))
            assert {k for k in optimizer.state[p] if k.startswith("toy_")} == {f"toy_{s}_missed" for s in sides}


def test_estimate_memory_refuses_unknown_options(toys):
    from hf_galore.memory import estimate_memory

    with pytest.raises(GaLoreConfigError, match="Did you mean 'toy_iters'"):
        estimate_memory(tiny(), "galore", rank=4, options={"projector": "toy_power", "toy_itres": 2})
    with pytest.raises(GaLoreConfigError, match="`optimizer` must be one of"):
        estimate_memory(tiny(), "galore", rank=4, optimizer="toy_adam")


def test_start_up_summary_names_the_toys_and_their_state(toys):
    from hf_galore.callback import MB, build_summary, optimizer_state_bytes

    model, optimizer = _trained(ToySGDM, projector="toy_power")
    summary = build_summary(optimizer, model)
    assert summary.startswith("hf_galore: ToySGDM, basis refresh every 2 steps (projector='toy_power'")
    assert "low-rank: 3 weights projected" in summary
    assert f"optimizer state: {optimizer_state_bytes(optimizer) / MB:.2f} MB vs" in summary


# ------------------------------------------------------------- the conformance checks
@pytest.mark.parametrize(
    "case",
    [
        {"optimizer": "toy_sgdm", "projector": "toy_power", "quant": None, "refresh": "fixed",
         "proj_type": "std", "weights": "float"},
        {"optimizer": "toy_sgdm", "projector": "svd", "quant": "int8", "refresh": "lazy",
         "proj_type": "full", "weights": "int8"},
        {"optimizer": "adamw", "projector": "toy_power", "quant": "int4", "refresh": "staggered",
         "proj_type": "reverse_std", "weights": "int8"},
    ],
    ids=lambda case: "-".join(str(v) for v in case.values()),
)
def test_toys_pass_the_conformance_checks(toys, case):
    """Resume bit for bit, estimate == held, shapes fit, layer-wise == regular, INT8 moves like float."""
    from tests.test_conformance import check_combination

    check_combination(case)


def test_rotate_moments_carries_the_toy_momentum_into_the_new_basis(toys):
    """``rotate_moments`` reads the toy's declaration (``rotate="linear"``): ``M ← C M``, ``C = P_newᵀ P_old``."""
    from hf_galore.optim.lowrank import rotate_moments_
    from hf_galore.optim.stats import RefreshStats

    g = torch.Generator().manual_seed(0)
    old = torch.linalg.qr(torch.randn(12, 3, generator=g)).Q
    new = torch.linalg.qr(torch.randn(12, 3, generator=g)).Q
    momentum = torch.randn(3, 5, generator=g)
    state = {"momentum_buffer": momentum.clone()}
    rotate_moments_(state, [("left", new.t() @ old)], RefreshStats())
    torch.testing.assert_close(state["momentum_buffer"], new.t() @ (old @ momentum))


# ------------------------------------------------------------------------- FSDP2
@pytest.mark.distributed
def test_fsdp2_shards_the_toy_state_and_equals_one_process(tmp_path):
    from tests.distributed.conftest import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "tests.test_components_toy", str(tmp_path),
    ]
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    files = [tmp_path / f"toy.rank{rank}.json" for rank in range(2)]
    assert all(f.exists() for f in files), done.stderr[-4000:]
    for rank, f in enumerate(files):
        result = json.loads(f.read_text())
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
        assert result["max_diff_vs_one_process"] < 1e-6
        # the momentum follows the gradient (declared): each rank holds its shard, as DTensors in checkpoints
        mine, one = result["state_bytes"], result["state_bytes_one_process"]
        for key in ("bases", "lowrank_moments", "full_rank"):
            assert mine[key] <= 0.6 * one[key], key
        assert result["momentum_dtensors"] == 3
        assert result["momentum_rel_diff"] < 1e-5
        # the finder's declared state is computed on rank 0 and replicated: equal to one process
        assert result["finder_state_equal"]


def _fsdp2_toy_scenario() -> dict:
    """Both ranks: toy optimizer + toy projector on a ``fully_shard`` MLP vs the same in one process.

    Run by ``tests/distributed/_worker.py``'s ``main`` (process group, error report, result files).
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hf_galore.distributed import optimizer_state_bytes
    from hf_galore.distributed._shards import Rows
    from tests.distributed._worker import DIMS, batch, local_rows, loss_fn, max_diff
    from tests.helpers import split_groups

    keys = {"rank": 4, "update_proj_gap": 3, "projector": "toy_power", "toy_iters": 4}
    model = tiny(0, DIMS)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = ToySGDM(split_groups(model, **keys), lr=1e-2)
    ref = tiny(0, DIMS)
    ref_opt = ToySGDM(split_groups(ref, **keys), lr=1e-2)
    for step in range(7):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model, local_rows(x), local_rows(y)).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
    saved = opt.state_dict()
    dtensors = sum(  # low-rank momentum: a plain local shard in training, a DTensor in checkpoints
        isinstance(saved["state"][pid]["momentum_buffer"], DTensor)
        and not isinstance(opt.state[p]["momentum_buffer"], DTensor)
        for group, saved_group in zip(opt.param_groups, saved["param_groups"])
        if "rank" in group
        for p, pid in zip(group["params"], saved_group["params"])
    )
    worst, finder_equal = 0.0, True
    for p, q in zip(model.parameters(), ref.parameters()):
        if p.dim() < 2:
            continue
        mine, theirs = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        rows = Rows(p)
        if mine.shape[1] == theirs.shape[1]:
            mine = rows.all_gather_rows(mine, theirs.shape[0])
        else:
            mine = rows.all_gather_cols(mine, theirs.shape[1])
        worst = max(worst, ((mine - theirs).abs().max() / theirs.abs().max()).item())
        for key, value in ref_opt.state[q].items():
            if key.startswith("toy_"):
                finder_equal &= math.isclose(float(opt.state[p][key]), float(value), rel_tol=1e-4, abs_tol=1e-6)
    return {
        "max_diff_vs_one_process": max_diff(model, ref),
        "state_bytes": optimizer_state_bytes(opt),
        "state_bytes_one_process": optimizer_state_bytes(ref_opt),
        "momentum_dtensors": dtensors,
        "momentum_rel_diff": worst,
        "finder_state_equal": finder_equal,
    }


if __name__ == "__main__":
    from tests.distributed import _worker

    with toys_registered():
        _worker.SCENARIOS["toy"] = _fsdp2_toy_scenario
        _worker.main([sys.argv[1], "toy"])
