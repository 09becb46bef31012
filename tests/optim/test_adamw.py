"""GaLoreAdamW against independent computations: galore-torch, torch.optim.AdamW, a naive loop."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from hf_galore import GaLoreAdafactor, GaLoreAdamW, GaLoreConfigError, UnsupportedSetupError
from hf_galore.projectors.geometry import sides_for
from tests.helpers import max_param_diff, regression_batch, split_groups, tiny_mlp, train

galore_torch = pytest.importorskip("galore_torch")

LOWRANK = {"rank": 4, "update_proj_gap": 5, "scale": 0.25}


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_matches_galore_torch_after_30_steps(proj_type):
    # weight_decay 0 and gradients large against eps: the only regime where the
    # two eps placements agree (docs/optimizers.md).
    ours_model, ref_model = tiny_mlp(), tiny_mlp()
    keys = {**LOWRANK, "proj_type": proj_type}
    ours = GaLoreAdamW(split_groups(ours_model, **keys), lr=1e-2, eps=1e-8)
    ref = galore_torch.GaLoreAdamW(split_groups(ref_model, **keys), lr=1e-2, eps=1e-8, no_deprecation_warning=True)
    train(ours_model, ours, 30, loss_scale=1e3)
    train(ref_model, ref, 30, loss_scale=1e3)
    assert max_param_diff(ours_model, ref_model) <= 1e-5
    # and training really moved the weights (a zero update would also "match")
    assert max_param_diff(ours_model, tiny_mlp()) > 1e-2


@pytest.mark.parametrize(
    "hparams",
    [
        {"lr": 1e-3, "weight_decay": 0.0},
        {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
        {"lr": 1e-2, "betas": (0.0, 0.5), "eps": 0.0, "weight_decay": 1.0},
    ],
)
def test_full_rank_group_equals_torch_adamw(hparams):
    ours_model, fused_model, default_model = tiny_mlp(), tiny_mlp(), tiny_mlp()
    train(ours_model, GaLoreAdamW(ours_model.parameters(), **hparams), 20)
    train(fused_model, torch.optim.AdamW(fused_model.parameters(), fused=True, **hparams), 20)
    train(default_model, torch.optim.AdamW(default_model.parameters(), **hparams), 20)
    # the same fused kernel: bit-exact; torch's default (single-tensor) path: rounding only
    assert max_param_diff(ours_model, fused_model) == 0.0
    # eps=0 with beta1=0 divides by sqrt(v) alone, which amplifies rounding:
    # torch's own fused and single-tensor paths differ by ~1.6e-5 there.
    tolerance = 1e-4 if hparams.get("eps", 1e-8) == 0.0 else 1e-6
    assert max_param_diff(ours_model, default_model) <= tolerance


def test_multi_tensor_fallback_equals_fused_path(monkeypatch):
    from hf_galore.optim import adamw as adamw_module

    fused_model, fallback_model = tiny_mlp(), tiny_mlp()
    keys = {"rank": 4, "update_proj_gap": 5}
    train(fused_model, GaLoreAdamW(split_groups(fused_model, **keys), lr=1e-2, weight_decay=0.1), 10)
    monkeypatch.setattr(adamw_module, "fused_adamw_supports", lambda tensors: False)
    train(fallback_model, GaLoreAdamW(split_groups(fallback_model, **keys), lr=1e-2, weight_decay=0.1), 10)
    assert max_param_diff(fused_model, fallback_model) <= 1e-6


def _naive_galore_adamw(weight, grads, *, rank, gap, scale, lr, betas, eps, wd, proj_type):
    """A from-the-paper loop with torch-AdamW eps placement and decoupled decay."""
    w = weight.clone().double()
    m = v = basis = None
    for t, g in enumerate(grads, start=1):
        g = g.double()
        side = sides_for(proj_type, g.shape)[0]
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = u[:, :rank] if side == "left" else vh[:rank].t()
        r = basis.t() @ g if side == "left" else g @ basis
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = betas[0] * m + (1 - betas[0]) * r
        v = betas[1] * v + (1 - betas[1]) * r * r
        n = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        back = basis @ n if side == "left" else n @ basis.t()
        w = w * (1 - lr * wd) - lr * scale * back
    return w


@pytest.mark.parametrize("shape,proj_type", [((24, 10), "std"), ((10, 24), "std"), ((24, 10), "reverse_std")])
def test_matches_naive_loop_with_weight_decay_and_eps(shape, proj_type):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(*shape))
    start = weight.detach().clone()
    grads = [torch.randn(*shape) * 1e-3 for _ in range(12)]  # small: eps matters
    hp = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-4, "weight_decay": 0.5}
    opt = GaLoreAdamW(
        [{"params": [weight], "rank": 3, "update_proj_gap": 4, "scale": 0.5, "proj_type": proj_type}], **hp
    )
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    expected = _naive_galore_adamw(
        start,
        grads,
        rank=3,
        gap=4,
        scale=0.5,
        lr=hp["lr"],
        betas=hp["betas"],
        eps=hp["eps"],
        wd=hp["weight_decay"],
        proj_type=proj_type,
    )
    torch.testing.assert_close(weight.detach().double(), expected, atol=1e-6, rtol=1e-5)


def test_refresh_happens_at_steps_0_T_2T():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3}])
    refreshes = []
    for step in range(8):
        w.grad = torch.randn(16, 8)
        before = opt.galore_stats.refreshes
        opt.step()
        if opt.galore_stats.refreshes > before:
            refreshes.append(step)
    assert refreshes == [0, 3, 6]


def test_none_gradients_are_skipped():
    model = tiny_mlp()
    opt = GaLoreAdamW(split_groups(model, **LOWRANK), lr=1e-2)
    x, y = regression_batch()
    (model(x) - y).square().mean().backward()
    model[-1].weight.grad = None
    frozen = model[-1].weight.detach().clone()
    opt.step()
    assert torch.equal(model[-1].weight, frozen)
    assert model[-1].weight not in opt.state
    assert not torch.equal(model[0].weight, tiny_mlp()[0].weight)


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(UnsupportedSetupError, match="sparse"):
        opt.step()


BAD_GROUPS = [
    ({"rank": 0}, "`rank`"),
    ({"rank": -3}, "`rank`"),
    ({"rank": 2.5}, "`rank`"),
    ({"rank": True}, "`rank`"),
    ({"rank": 4, "update_proj_gap": 0}, "`update_proj_gap`"),
    ({"rank": 4, "proj_type": "diagonal"}, "`proj_type`.*'std'"),
    ({"rank": 4, "projector": "magic"}, "`projector`.*'svd'"),
    ({"rank": 4, "quant": "int3"}, "`quant`"),
    ({"rank": 4, "scale": -1.0}, "`scale`"),
    ({"rank": 4, "lr": -1e-3}, "`lr`"),
    ({"rank": 4, "eps": -1.0}, "`eps`"),
    ({"rank": 4, "weight_decay": -0.1}, "`weight_decay`"),
    ({"rank": 4, "betas": (1.0, 0.999)}, r"`betas\[0\]`"),
    ({"rank": 4, "betas": (0.9, -0.1)}, r"`betas\[1\]`"),
]


@pytest.mark.parametrize("keys,message", BAD_GROUPS)
def test_bad_group_values_are_refused_with_the_argument_name(keys, message):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(GaLoreConfigError, match=message):
        GaLoreAdamW([{"params": [w], **keys}])
    # GaLoreConfigError is a ValueError, as torch.optim's errors are
    with pytest.raises(ValueError):
        GaLoreAdamW([{"params": [w], **keys}])


def test_one_dimensional_parameter_in_lowrank_group_is_refused():
    with pytest.raises(GaLoreConfigError, match="1-D"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(8))], "rank": 2}])


def test_conv_weight_is_projected_as_its_matrix():
    torch.manual_seed(0)
    conv = torch.nn.Parameter(torch.randn(6, 3, 2, 2))
    flat = torch.nn.Parameter(conv.detach().reshape(6, 12).clone())
    grads = [torch.randn(6, 3, 2, 2) for _ in range(5)]
    opts = [GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2}], lr=0.1) for p in (conv, flat)]
    for g in grads:
        conv.grad, flat.grad = g.clone(), g.reshape(6, 12).clone()
        for opt in opts:
            opt.step()
    assert torch.equal(conv.detach().reshape(6, 12), flat.detach())
    assert opts[0].state[conv]["exp_avg"].shape == (2, 12)  # 6 < 12: left side


def test_rank_larger_than_weight_is_clamped():
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = GaLoreAdamW([{"params": [w], "rank": 64}])
    w.grad = torch.randn(5, 3)
    opt.step()
    assert opt.state[w]["basis_right"].shape == (3, 3)


def test_full_projection_uses_both_sides():
    w = torch.nn.Parameter(torch.randn(12, 9))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "proj_type": "full"}])
    w.grad = torch.randn(12, 9)
    opt.step()
    state = opt.state[w]
    assert state["basis_left"].shape == (12, 3) and state["basis_right"].shape == (9, 3)
    assert state["exp_avg"].shape == (3, 3)


def test_bf16_weights_train_with_fp32_svd():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=1e-2)
    before = w.detach().clone()
    w.grad = torch.randn(32, 16, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[w]
    assert state["basis_right"].dtype == torch.bfloat16
    assert state["exp_avg"].dtype == torch.bfloat16
    assert not torch.equal(before, w.detach())


def _state_bytes(optimizer) -> tuple[int, int]:
    """(Σ numel·itemsize, Σ bytes of the distinct storages) over all state tensors."""
    logical, storages = 0, {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                logical += value.numel() * value.element_size()
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return logical, sum(storages.values())


def test_state_bytes_equal_analytical_count_without_hidden_views():
    model = tiny_mlp(dims=(64, 96, 48, 8))
    opt = GaLoreAdamW(split_groups(model, rank=8), lr=1e-3)
    train(model, opt, 1)
    logical, retained = _state_bytes(opt)
    expected = 0
    for p in model.parameters():
        expected += 4  # float32 step
        if p.dim() < 2:
            expected += 2 * p.numel() * 4
        else:
            m, n = p.shape
            r = min(8, m, n)
            expected += 2 * r * max(m, n) * 4 + r * min(m, n) * 4  # moments + basis
    assert logical == expected
    assert retained == logical


def test_galore_state_is_smaller_than_adamw_for_projected_weights():
    w = torch.nn.Parameter(torch.randn(256, 128))
    opt = GaLoreAdamW([{"params": [w], "rank": 16}])
    w.grad = torch.randn(256, 128)
    opt.step()
    logical, _ = _state_bytes(opt)
    assert logical < 0.3 * (2 * w.numel() * 4)


def test_nonfinite_gradient_at_refresh_keeps_the_basis():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 2}])
    w.grad = torch.randn(16, 8)
    opt.step()
    basis = opt.state[w]["basis_right"].clone()
    w.grad = torch.randn(16, 8)
    opt.step()  # step 1: no refresh
    bad = torch.randn(16, 8)
    bad[3, 4] = float("nan")
    w.grad = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()  # step 2: refresh due, gradient poisoned
    assert torch.equal(opt.state[w]["basis_right"], basis)
    assert opt.galore_stats.skipped_nonfinite == 1
    assert torch.isfinite(opt.state[w]["basis_right"]).all()


def test_nonfinite_first_gradient_leaves_weight_untouched():
    w = torch.nn.Parameter(torch.randn(16, 8))
    before = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.full((16, 8), float("inf"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(w.detach(), before)
    w.grad = torch.randn(16, 8)
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), before)
    assert int(opt.state[w]["step"]) == 1


def test_svd_failure_keeps_training(monkeypatch):
    from hf_galore.projectors import svd

    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 1}])
    w.grad = torch.randn(16, 8)
    opt.step()
    basis = opt.state[w]["basis_right"].clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(svd.torch.linalg, "svd", broken)
    w.grad = torch.randn(16, 8)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert opt.galore_stats.refresh_failures + opt.galore_stats.fallbacks >= 1
    assert torch.isfinite(w).all()
    assert opt.state[w]["basis_right"].shape == basis.shape


def _continue_after_reload(optimizer_cls, model_factory, groups_factory, steps_before, steps_after, **hp):
    """Train, save, torch.load(weights_only=True), load into fresh objects, continue."""
    straight = model_factory()
    straight_opt = optimizer_cls(groups_factory(straight), **hp)
    train(straight, straight_opt, steps_before + steps_after)

    first = model_factory()
    first_opt = optimizer_cls(groups_factory(first), **hp)
    train(first, first_opt, steps_before)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = model_factory(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = optimizer_cls(groups_factory(resumed), **hp)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, steps_after)
    return straight, resumed, resumed_opt


def test_save_weights_only_load_continue_is_bit_exact():
    straight, resumed, opt = _continue_after_reload(
        GaLoreAdamW, tiny_mlp, lambda m: split_groups(m, rank=4, update_proj_gap=3), 4, 5, lr=1e-2, weight_decay=0.1
    )
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert all(isinstance(s["step"], torch.Tensor) for s in opt.state.values())


@pytest.mark.parametrize(
    "cls,hp", [(GaLoreAdamW, {"lr": 1e-2}), (GaLoreAdafactor, {"lr": 1e-2, "relative_step": False})]
)
def test_deep_copied_optimizer_continues_like_the_original(cls, hp):
    """``copy.deepcopy`` (and pickling) kept only torch's three keys: the copy failed at its first step."""
    model = tiny_mlp()
    opt = cls(split_groups(model, rank=4, update_proj_gap=3), **hp)
    train(model, opt, 4)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    train(model, opt, 5)
    train(model_copy, opt_copy, 5)
    for p, q in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(p, q)
    assert (
        opt_copy.galore_stats.refreshes == 3
    )  # fresh counters: the copy refreshed once (step 6) for each of 3 weights
    assert len(opt_copy._optimizer_state_dict_post_hooks) == len(opt._optimizer_state_dict_post_hooks)


def test_state_dict_holds_only_tensors_and_scalars():
    model = tiny_mlp()
    opt = GaLoreAdamW(split_groups(model, rank=4))
    train(model, opt, 2)
    allowed = (torch.Tensor, int, float, bool, str, type(None))
    for state in opt.state_dict()["state"].values():
        for key, value in state.items():
            assert isinstance(value, allowed), (key, type(value))


def test_load_restores_float32_basis_for_bf16_weights():
    w = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.randn(8, 4, dtype=torch.bfloat16)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["extra_fp32"] = torch.randn(3, dtype=torch.float32)
    opt2 = GaLoreAdamW([{"params": [w], "rank": 2}])
    opt2.load_state_dict(sd)
    assert opt2.state[w]["extra_fp32"].dtype == torch.float32  # torch alone would cast it to bf16
    assert math.isclose(float(opt2.state[w]["step"]), 1.0)


def test_strided_gradients_take_a_correct_path():
    """Regression: the fused kernel reads raw memory, so a column-sliced gradient must not reach it."""
    torch.manual_seed(0)
    base = torch.randn(4, 46)
    strided = base[:, :23]
    assert not strided.is_contiguous()
    w_strided = torch.nn.Parameter(torch.zeros(4, 23))
    w_dense = torch.nn.Parameter(torch.zeros(4, 23))
    opts = [GaLoreAdamW([w], lr=0.1) for w in (w_strided, w_dense)]
    w_strided.grad, w_dense.grad = strided, strided.contiguous()
    for opt in opts:
        opt.step()
    assert torch.equal(w_strided.detach(), w_dense.detach())


def test_checkpoint_without_newer_group_keys_loads_with_their_defaults():
    """A rank group saved before `refresh`/`rotate_moments` existed, even one with no state yet."""
    w = torch.nn.Parameter(torch.randn(8, 4))
    idle = torch.nn.Parameter(torch.randn(8, 4))  # never gets a gradient: no saved state
    opt = GaLoreAdamW([{"params": [w], "rank": 2}, {"params": [idle], "rank": 2}])
    w.grad = torch.randn(8, 4)
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["refresh"], group["rotate_moments"]
    fresh = GaLoreAdamW([{"params": [w], "rank": 2}, {"params": [idle], "rank": 2}])
    fresh.load_state_dict(old)
    for group in fresh.param_groups:
        assert group["refresh"] == "fixed" and group["rotate_moments"] is False
    w.grad, idle.grad = torch.randn(8, 4), torch.randn(8, 4)
    fresh.step()
    assert int(fresh.state[w]["step"]) == 2 and int(fresh.state[idle]["step"]) == 1


# ------------------------------------------------ callers written for peers (issue 26)
def test_galore_torch_keywords_are_accepted_with_their_meaning():
    """galore-torch's GaLoreAdamW takes `correct_bias` / `no_deprecation_warning` (a TypeError here before)."""
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    ref = torch.nn.Parameter(w.detach().clone())
    ours = GaLoreAdamW([w], lr=1e-2, eps=1e-6, correct_bias=False, no_deprecation_warning=True)
    theirs = galore_torch.GaLoreAdamW([ref], lr=1e-2, eps=1e-6, correct_bias=False, no_deprecation_warning=True)
    for step in range(8):
        grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        w.grad, ref.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    # without bias correction eps sits where both put it: the same update up to float rounding
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)
    GaLoreAdamW([w], correct_bias=True, no_deprecation_warning=False)  # the defaults: torch's AdamW maths


def test_tensor_betas_are_accepted_as_torch_accepts_them():
    """Issue 26: `betas=(tensor(0.9), tensor(0.999))` was refused ("must be in [0, 1), got tensor(0.9000)")."""
    models = [tiny_mlp(seed=2), tiny_mlp(seed=2)]
    opts = [
        GaLoreAdamW(split_groups(models[0], rank=4), lr=1e-2, betas=(torch.tensor(0.9), torch.tensor(0.99))),
        # the tensors' own values (0.9 in float32 is 0.89999998)
        GaLoreAdamW(
            split_groups(models[1], rank=4), lr=1e-2, betas=(float(torch.tensor(0.9)), float(torch.tensor(0.99)))
        ),
    ]
    for model, opt in zip(models, opts):
        train(model, opt, 4)
    assert max_param_diff(*models) == 0.0
    with pytest.raises(GaLoreConfigError, match=r"`betas\[0\]` must be in \[0, 1\), got tensor\(\[0.9000, 0.9000\]\)"):
        GaLoreAdamW(split_groups(tiny_mlp(), rank=4), betas=(torch.tensor([0.9, 0.9]), 0.99))


@pytest.mark.parametrize("flags", [{"fused": False}, {"foreach": True}, {"foreach": False}, {"fused": True}])
def test_implementation_flags_pick_the_kernel_and_keep_the_maths(flags, monkeypatch):
    """`fused` / `foreach` are honoured: they choose torch's fused, multi-tensor or one-tensor kernel."""
    import hf_galore.optim.adamw as adamw_module

    calls = {"fused": 0, "foreach": 0}
    fused, steps = adamw_module.adam_steps_fused, adamw_module.adam_steps
    monkeypatch.setattr(
        adamw_module,
        "adam_steps_fused",
        lambda *a, **k: calls.__setitem__("fused", calls["fused"] + 1) or fused(*a, **k),
    )
    monkeypatch.setattr(
        adamw_module, "adam_steps", lambda *a, **k: calls.__setitem__("foreach", calls["foreach"] + 1) or steps(*a, **k)
    )
    models = [tiny_mlp(seed=4), tiny_mlp(seed=4)]
    train(models[0], GaLoreAdamW(split_groups(models[0], rank=4), lr=1e-2, **flags), 3)
    counted = dict(calls)
    train(models[1], GaLoreAdamW(split_groups(models[1], rank=4), lr=1e-2), 3)
    assert max_param_diff(*models) < 1e-6
    if flags.get("fused"):
        assert counted == {"fused": 3, "foreach": 0}
    elif flags.get("foreach") is False:  # one call per low-rank weight (3 weights)
        assert counted == {"fused": 9, "foreach": 0}
    else:
        assert counted == {"fused": 0, "foreach": 3}


def test_lr_none_is_refused_at_construction():
    """Issue 26: `lr=None` built and failed at step 1."""
    with pytest.raises(GaLoreConfigError, match="`lr` must be a number >= 0 for GaLoreAdamW, got None"):
        GaLoreAdamW(split_groups(tiny_mlp(), rank=4), lr=None)
