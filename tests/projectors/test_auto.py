"""projector="auto": exact SVD below its size switch (bit for bit), the guarded randomized finder above it."""

from __future__ import annotations

import io

import pytest
import torch

from hf_galore import GaLoreAdamW, GaLoreConfig
from hf_galore.errors import GaLoreConfigError
from hf_galore.memory import METHODS
from hf_galore.optim.validation import LOWRANK_DEFAULTS
from hf_galore.projectors import get_projector
from hf_galore.projectors.auto import AUTO_DEFAULTS, auto_uses_randomized
from hf_galore.projectors.randomized import guarded_randomized_basis
from hf_galore.projectors.svd import top_singular_basis
from tests.helpers import split_groups, tiny_mlp, train
from tests.projectors.test_randomized import energy, flat


def low_rank_plus_noise(m: int, n: int, signal_rank: int, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """A rank-``signal_rank`` matrix with a decaying spectrum plus a Gaussian floor (a gradient-like matrix)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, signal_rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, signal_rank, generator=g)).Q
    sigma = 1.0 / torch.arange(1, signal_rank + 1, dtype=torch.float32)
    signal = (u * sigma) @ v.t()
    return signal + noise * float(sigma[-1]) * torch.randn(m, n, generator=g) / n**0.5


# --------------------------------------------------------------------------- the rule
@pytest.mark.parametrize(
    "shape,rank,expected",
    [
        ((128, 128), 32, False),  # llama_micro attention: below the size switch
        ((128, 352), 32, False),  # llama_micro MLP (45,056 values)
        ((255, 256), 64, False),  # one row short of 65,536 values
        ((256, 256), 128, True),  # at the switch, r = min/2
        ((256, 256), 129, False),  # r above min/2: the exact SVD is cheaper
        ((512, 512), 128, True),  # LLaMA-60M attention
        ((1376, 512), 128, True),  # LLaMA-60M MLP
        ((4096, 11008), 1024, True),  # LLaMA-7B MLP at rank 1024
        ((11008, 4096), 3000, False),
    ],
)
def test_rule_at_the_default_constants(shape, rank, expected):
    assert auto_uses_randomized(shape, rank, {}) is expected
    assert auto_uses_randomized(shape, rank, dict(LOWRANK_DEFAULTS)) is expected


def test_rule_follows_the_group_keys():
    assert not auto_uses_randomized((128, 352), 32, {})
    assert auto_uses_randomized((128, 352), 32, {"auto_min_numel": 0})
    assert not auto_uses_randomized((512, 512), 128, {"auto_max_rank_ratio": 0.2})
    assert auto_uses_randomized((512, 512), 128, {"auto_max_rank_ratio": 0.25})
    assert not auto_uses_randomized((512, 512), 128, {"auto_min_numel": 512 * 512 + 1})


def test_auto_is_the_default_everywhere():
    assert LOWRANK_DEFAULTS["projector"] == "auto"
    assert GaLoreConfig().projector == "auto"
    assert GaLoreConfig().group_options()["projector"] == "auto"
    assert METHODS.lookup("galore").projector == "auto"
    assert {k: LOWRANK_DEFAULTS[k] for k in AUTO_DEFAULTS} == AUTO_DEFAULTS
    weight = torch.nn.Parameter(torch.zeros(8, 8))
    assert GaLoreAdamW([{"params": [weight], "rank": 2}]).param_groups[0]["projector"] == "auto"


@pytest.mark.parametrize(
    "key,value",
    [("auto_min_numel", -1), ("auto_min_numel", 1.5), ("auto_min_numel", True),
     ("auto_max_rank_ratio", 0), ("auto_max_rank_ratio", 1.5), ("auto_max_rank_ratio", float("nan"))],
)
def test_bad_switch_keys_are_refused_by_name(key, value):
    weight = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(GaLoreConfigError, match=key) as info:
        GaLoreAdamW([{"params": [weight], "rank": 2, key: value}])
    assert repr(value) in str(info.value)


# --------------------------------------------------------------------------- below the switch: exactly svd
@pytest.mark.parametrize("shape,side", [((128, 352), "left"), ((352, 128), "right"), ((64, 64), "left")])
def test_below_the_switch_the_basis_is_the_svd_basis_bit_for_bit(shape, side):
    g = low_rank_plus_noise(*shape, signal_rank=40)
    previous = top_singular_basis(low_rank_plus_noise(*shape, signal_rank=40, seed=1), 16, side)
    state: dict = {"step": 3}
    found = get_projector("auto").find(g, 16, side, previous=previous, state=state, group=dict(LOWRANK_DEFAULTS))
    expected = get_projector("svd").find(g, 16, side, previous=previous, state={}, group=dict(LOWRANK_DEFAULTS))
    assert torch.equal(found, expected)
    assert "energy_fallbacks" not in state


def test_default_optimizer_equals_projector_svd_below_the_switch():
    """No projector named vs projector="svd": the same weights bit for bit (what galore-torch parity rests on)."""
    models = {}
    for keys in ({}, {"projector": "svd"}):
        model = tiny_mlp()
        opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=3, **keys), lr=1e-2)
        train(model, opt, steps=8)  # refreshes at steps 0, 3, 6
        models[keys.get("projector", "default")] = model
    for p, q in zip(models["default"].parameters(), models["svd"].parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- above the switch: guarded randomized
@pytest.mark.parametrize("side", ["left", "right"])
def test_above_the_switch_energy_reaches_the_threshold(side):
    m, n = (256, 512) if side == "left" else (512, 256)
    g0 = low_rank_plus_noise(m, n, signal_rank=96, seed=0)
    g1 = g0 + 0.3 * low_rank_plus_noise(m, n, signal_rank=96, seed=1)
    rank = 32
    assert auto_uses_randomized(g1.shape, rank, {})
    finder = get_projector("auto")
    state: dict = {"step": 0}
    cold = finder.find(g0, rank, side, previous=None, state=state, group=dict(LOWRANK_DEFAULTS))
    state["step"] = 200
    warm = finder.find(g1, rank, side, previous=cold, state=state, group=dict(LOWRANK_DEFAULTS))
    for g, basis in ((g0, cold), (g1, warm)):
        exact = energy(g, top_singular_basis(g, rank, side), side)
        assert energy(g, basis, side) >= 0.99 * exact
        assert torch.allclose(basis.t() @ basis, torch.eye(rank), atol=1e-5)
    # it is the randomized finder's basis (not an exact SVD in disguise), with the same seed
    expected, fell_back = guarded_randomized_basis(
        g1, rank, side, previous=cold, step=200, group=dict(LOWRANK_DEFAULTS)
    )
    assert not fell_back and state.get("energy_fallbacks", 0) == 0
    assert torch.equal(warm, expected)
    assert not torch.equal(warm, top_singular_basis(g1, rank, side))


def test_above_the_switch_a_flat_spectrum_falls_back_to_the_exact_svd():
    g = flat(256, 512)
    state: dict = {"step": 0}
    basis = get_projector("auto").find(g, 64, "left", previous=None, state=state, group=dict(LOWRANK_DEFAULTS))
    assert state["energy_fallbacks"] == 1
    assert torch.equal(basis, top_singular_basis(g, 64, "left"))


def test_a_failed_svd_below_the_switch_falls_back_to_randomized(monkeypatch):
    import hf_galore.projectors.auto as auto_module

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(auto_module, "top_singular_basis", broken)
    model = tiny_mlp()
    opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    with pytest.warns(RuntimeWarning, match="randomized"):
        train(model, opt, steps=3)
    assert opt.galore_stats.fallbacks == 3 * 2  # 3 weights x refreshes at steps 0 and 2
    assert opt.galore_stats.refresh_failures == 0


# --------------------------------------------------------------------------- determinism and resume
def _reload(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("min_numel", [0, 65536])  # every weight randomized / every weight exact
def test_resume_is_bit_exact(min_numel):
    def build(model):
        groups = split_groups(model, rank=4, update_proj_gap=2, auto_min_numel=min_numel)
        return GaLoreAdamW(groups, lr=1e-2)

    model = tiny_mlp()
    optimizer = build(model)
    train(model, optimizer, 5)
    resumed_model = tiny_mlp(seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed = build(resumed_model)
    resumed.load_state_dict(_reload(optimizer.state_dict()))
    train(model, optimizer, 4)
    train(resumed_model, resumed, 4)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    # the switched run really took the randomized branch: it differs from the exact one
    reference = tiny_mlp()
    ref_opt = GaLoreAdamW(split_groups(reference, rank=4, update_proj_gap=2, projector="svd"), lr=1e-2)
    train(reference, ref_opt, 9)
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert same is (min_numel > 0)


def test_deterministic_across_optimizers():
    runs = []
    for _ in range(2):
        model = tiny_mlp()
        opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=2, auto_min_numel=0), lr=1e-2)
        train(model, opt, 6)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        assert torch.equal(p, q)
