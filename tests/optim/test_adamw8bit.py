"""GaLoreAdamW8bit: bitsandbytes kernels by keyword, on CPU, tracking the 32-bit optimizer."""

from __future__ import annotations

import inspect
import io

import pytest
import torch

from hf_galore import GaLoreAdamW, GaLoreAdamW8bit
from hf_galore.optim import adamw8bit
from tests.helpers import max_param_diff, split_groups, tiny_mlp, train

bnb = pytest.importorskip("bitsandbytes")

BIG = (96, 128, 80, 8)  # big enough that moments are 8-bit (>= 4096 elements)


def test_eight_bit_changes_the_parameters():
    # A silently-zero update (what positional bitsandbytes calls once produced)
    # must fail this test.
    model = tiny_mlp(dims=BIG)
    opt = GaLoreAdamW8bit(split_groups(model, rank=48, update_proj_gap=10), lr=1e-2)
    train(model, opt, 3)
    start = tiny_mlp(dims=BIG)
    for p, q in zip(model.parameters(), start.parameters()):
        assert (p - q).abs().max() > 1e-4
    eight_bit = [s for s in opt.state.values() if "state1" in s]
    assert eight_bit and all(s["state1"].dtype == torch.uint8 for s in eight_bit)


def test_eight_bit_tracks_32_bit_galore():
    # Documented tolerance (docs/optimizers.md): after 20 steps each weight's
    # displacement points the same way as the 32-bit run's (cosine >= 0.9) and
    # differs from it by at most 40% of its length; full-rank tensors by 5%.
    m8, m32, start = tiny_mlp(dims=BIG), tiny_mlp(dims=BIG), tiny_mlp(dims=BIG)
    keys = {"rank": 48, "update_proj_gap": 10}
    train(m8, GaLoreAdamW8bit(split_groups(m8, **keys), lr=1e-3), 20)
    train(m32, GaLoreAdamW(split_groups(m32, **keys), lr=1e-3), 20)
    for p8, p32, p0 in zip(m8.parameters(), m32.parameters(), start.parameters()):
        moved8, moved32 = (p8 - p0).flatten(), (p32 - p0).flatten()
        cosine = torch.nn.functional.cosine_similarity(moved8, moved32, dim=0)
        assert cosine >= 0.9
        bound = 0.4 if p8.dim() == 2 and p8.numel() >= 4096 else 0.05
        assert (moved8 - moved32).norm() <= bound * moved32.norm()


def test_full_rank_group_equals_bitsandbytes_adamw8bit():
    ours_model, ref_model = tiny_mlp(dims=BIG), tiny_mlp(dims=BIG)
    hp = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    train(ours_model, GaLoreAdamW8bit(ours_model.parameters(), **hp), 10)
    train(ref_model, bnb.optim.AdamW8bit(ref_model.parameters(), **hp), 10)
    assert max_param_diff(ours_model, ref_model) <= 1e-6


def test_bitsandbytes_is_called_with_keywords_only(monkeypatch):
    calls = []
    model = tiny_mlp(dims=BIG)
    opt = GaLoreAdamW8bit(split_groups(model, rank=48), lr=1e-3)
    real = opt._update_8bit

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(opt, "_update_8bit", recording)
    train(model, opt, 1)
    assert calls and all(args == () for args, _ in calls)
    signature = inspect.signature(real)
    for _, kwargs in calls:
        signature.bind(**kwargs)  # every keyword exists in the installed bitsandbytes


def test_eight_bit_never_touches_cuda(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda called")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    model = tiny_mlp(dims=BIG)
    train(model, GaLoreAdamW8bit(split_groups(model, rank=48), lr=1e-3), 2)


def test_eight_bit_resume_is_bit_exact_and_keeps_uint8_states():
    def run(steps, opt_state=None, model_state=None):
        model = tiny_mlp(dims=BIG)
        if model_state is not None:
            model.load_state_dict(model_state)
        opt = GaLoreAdamW8bit(split_groups(model, rank=48, update_proj_gap=2), lr=1e-3)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        train(model, opt, steps)
        return model, opt

    straight, _ = run(6)
    first, first_opt = run(3)
    buffer = io.BytesIO()
    torch.save({"m": first.state_dict(), "o": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed, resumed_opt = run(3, ckpt["o"], ckpt["m"])
    assert max_param_diff(straight, resumed) == 0.0
    assert any(s.get("state1", torch.empty(0)).dtype == torch.uint8 for s in resumed_opt.state.values())


def test_small_tensors_keep_32_bit_moments():
    w = torch.nn.Parameter(torch.randn(10, 10))
    opt = GaLoreAdamW8bit([w])
    w.grad = torch.randn(10, 10)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.float32
    assert adamw8bit.MIN_8BIT_SIZE == 4096


@pytest.mark.parametrize("rank", [None, 8])
def test_sliced_kernel_calls_equal_one_call(monkeypatch, rank):
    """Large tensors go to bitsandbytes in block-aligned slices (bounded CPU temporaries), bit for bit."""
    torch.manual_seed(0)
    weight = torch.randn(96, 160)  # 15,360 values: 60 blocks of 256
    grads = [torch.randn(96, 160) for _ in range(4)]

    def run(call_elements: int) -> torch.Tensor:
        monkeypatch.setattr(adamw8bit, "CALL_ELEMENTS", call_elements)
        p = torch.nn.Parameter(weight.clone())
        group = {"params": [p]} if rank is None else {"params": [p], "rank": rank, "update_proj_gap": 2}
        opt = GaLoreAdamW8bit([group], lr=1e-2, weight_decay=0.1, stochastic_rounding=False)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach().clone()

    whole = run(1 << 30)
    sliced = run(1280)  # 5 blocks per call, last slice shorter
    assert torch.equal(whole, sliced)
