"""GaLoreAdamW8bit: bitsandbytes kernels by keyword, on CPU, tracking the 32-bit optimizer."""

from __future__ import annotations

import inspect
import io

import pytest
import torch

from hf_galore import GaLoreAdamW, GaLoreAdamW8bit, GaLoreConfigError
from hf_galore.errors import StateMismatchError
from hf_galore.optim import adamw8bit
from tests.helpers import max_param_diff, regression_batch, split_groups, tiny_mlp, train

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


def test_eight_bit_trains_as_32_bit_galore_across_refreshes():
    """With a refresh every 10 steps: the same loss (within 5%), full-rank tensors within 5%.

    Documented tolerance (docs/optimizers.md). The projected weights'
    displacements are not compared here: at a refresh the two runs take SVDs
    of slightly different gradients, and where singular values near the rank
    are close the bases part (the first weight measured 0.33 of its
    displacement apart on one CPU, 0.47 on another, same code): the drift,
    not the quantization, sets that figure. The quantization error alone is
    bounded per weight by the one-basis test below.
    """
    m8, m32, start = tiny_mlp(dims=BIG), tiny_mlp(dims=BIG), tiny_mlp(dims=BIG)
    keys = {"rank": 48, "update_proj_gap": 10}
    train(m8, GaLoreAdamW8bit(split_groups(m8, **keys), lr=1e-3), 20)
    train(m32, GaLoreAdamW(split_groups(m32, **keys), lr=1e-3), 20)
    x, y = regression_batch(1, d_in=BIG[0], d_out=BIG[-1])
    with torch.no_grad():
        first, loss8, loss32 = ((m(x) - y).square().mean().item() for m in (start, m8, m32))
    assert loss8 < 0.95 * first and loss32 < 0.95 * first  # both trained (measured 0.981 -> 0.883)
    assert abs(loss8 - loss32) <= 0.05 * (first - loss32)  # and got equally far
    for p8, p32, p0 in zip(m8.parameters(), m32.parameters(), start.parameters()):
        if not (p8.dim() == 2 and p8.numel() >= 4096):
            moved8, moved32 = (p8 - p0).flatten(), (p32 - p0).flatten()
            assert (moved8 - moved32).norm() <= 0.05 * moved32.norm()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eight_bit_tracks_32_bit_galore_on_one_basis(seed):
    """Without a refresh (one basis for both runs) the 8-bit error is quantization alone: at most 10%.

    Measured 0.034–0.046. With refreshes (the test above) the two runs' bases
    drift apart, SVDs of slightly different gradients, and seed 0 reaches 0.33.
    """
    m8, m32, start = tiny_mlp(seed, dims=BIG), tiny_mlp(seed, dims=BIG), tiny_mlp(seed, dims=BIG)
    keys = {"rank": 48, "update_proj_gap": 100}
    train(m8, GaLoreAdamW8bit(split_groups(m8, **keys), lr=1e-3), 20)
    train(m32, GaLoreAdamW(split_groups(m32, **keys), lr=1e-3), 20)
    checked = 0
    for p8, p32, p0 in zip(m8.parameters(), m32.parameters(), start.parameters()):
        if p8.dim() == 2 and p8.numel() >= 4096:
            moved8, moved32 = (p8 - p0).flatten(), (p32 - p0).flatten()
            assert (moved8 - moved32).norm() <= 0.1 * moved32.norm()
            checked += 1
    assert checked == 2


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


# ------------------------------------------------------------- per-direction blocks of low-rank moments
RANK, LENGTH = 4, 1100  # rows of 1100 values: 4·256 + 76, so whole-tensor blocks would straddle directions


def spiked_gradient(shape: tuple[int, int], magnitudes: list[float]) -> torch.Tensor:
    """``U diag(magnitudes) Vᵀ`` with orthonormal ``U``, ``V``: a gradient whose projected rows have these sizes."""
    gen = torch.Generator().manual_seed(3)
    k = len(magnitudes)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64))[0]
    return ((u * torch.tensor(magnitudes, dtype=torch.float64)) @ v.t()).float()


def projected_rows(state: dict, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` in the basis's coordinates, one row per direction (``Bᵀ M`` or ``(M B)ᵀ``)."""
    if "basis_left" in state:
        return state["basis_left"].t() @ matrix
    return (matrix @ state["basis_right"]).t()


@pytest.mark.parametrize("shape", [(64, LENGTH), (LENGTH, 64)], ids=["left", "right"])
def test_every_quantization_block_holds_one_direction(shape):
    """After one step ``m = (1 − β₁)·R``: each block's absmax is the largest value of one row of ``R``."""
    weight = torch.nn.Parameter(torch.zeros(shape))
    group = {"params": [weight], "rank": RANK, "update_proj_gap": 100, "scale": 1.0}
    opt = GaLoreAdamW8bit([group], lr=1e-3, betas=(0.9, 0.999))
    grad = spiked_gradient(shape, [1.0, 1e-3, 1e-4, 1e-5])
    weight.grad = grad.clone()
    opt.step()
    state = opt.state[weight]
    padded = adamw8bit.padded_length(LENGTH)
    assert padded == 1280 and adamw8bit.padded_length(512) == 512
    assert tuple(state["state1"].shape) == tuple(state["state2"].shape) == (RANK, padded)
    blocks = padded // adamw8bit.BLOCK_SIZE
    assert tuple(state["absmax1"].shape) == tuple(state["absmax2"].shape) == (RANK * blocks,)
    rows = torch.nn.functional.pad(projected_rows(state, grad), (0, padded - LENGTH))
    expected = 0.1 * rows.abs().view(RANK, blocks, adamw8bit.BLOCK_SIZE).amax(dim=-1)
    torch.testing.assert_close(state["absmax1"].view(RANK, blocks), expected, rtol=1e-5, atol=0.0)
    # the padding's zero gradients leave its moments at (about) zero: under 1e-4 of the block's scale
    qmap = opt._qmaps_on(weight.device)[0]
    assert torch.all(qmap[state["state1"][:, LENGTH:].long()].abs() < 1e-4)


@pytest.mark.parametrize("shape", [(64, LENGTH), (LENGTH, 64)], ids=["left", "right"])
def test_tiny_direction_next_to_a_large_one_keeps_its_update(shape):
    """Adam moves every projected direction by about ``lr`` per step, however small its gradient.

    A tiny direction that shared a block with a 10⁴× larger one lost its
    second moment under that block's scale (its update blew up or vanished);
    with a block per direction it tracks the 32-bit optimizer.
    """
    grad = spiked_gradient(shape, [1.0, 1e-4, 1e-4, 1e-4])
    moved = {}
    for cls in (GaLoreAdamW8bit, GaLoreAdamW):
        weight = torch.nn.Parameter(torch.zeros(shape))
        group = {"params": [weight], "rank": RANK, "update_proj_gap": 100, "scale": 1.0}
        opt = cls([group], lr=1e-3)
        for _ in range(5):
            weight.grad = grad.clone()
            opt.step()
        moved[cls] = projected_rows(opt.state[weight], weight.detach())
    eight, full = moved[GaLoreAdamW8bit], moved[GaLoreAdamW]
    assert full[1:].norm(dim=1).min() > 0.5 * full[0].norm()  # Adam: tiny directions move as far as the large one
    relative = (eight - full).norm(dim=1) / full.norm(dim=1)
    assert relative.max() <= 0.1, relative  # measured ≤ 0.047 (the earlier layout: 0.32 on direction 1)


def test_checkpoint_of_the_earlier_layout_is_refused_by_name():
    """States whose blocks ran across directions (unpadded rows) cannot be read per direction: refused, not misread."""
    shape = (64, LENGTH)

    def make():
        weight = torch.nn.Parameter(torch.zeros(shape))
        return weight, GaLoreAdamW8bit([{"params": [weight], "rank": RANK, "update_proj_gap": 100}], lr=1e-3)

    weight, opt = make()
    weight.grad = spiked_gradient(shape, [1.0, 0.5, 0.25, 0.125])
    opt.step()
    saved = opt.state_dict()
    state = saved["state"][0]
    old_blocks = -(-RANK * LENGTH // adamw8bit.BLOCK_SIZE)  # 18 blocks over the whole tensor, not 4·5
    state["state1"] = torch.zeros(RANK, LENGTH, dtype=torch.uint8)
    state["state2"] = torch.zeros(RANK, LENGTH, dtype=torch.uint8)
    state["absmax1"] = torch.zeros(old_blocks)
    state["absmax2"] = torch.zeros(old_blocks)
    _, fresh = make()
    with pytest.raises(StateMismatchError, match="earlier GaLoreAdamW8bit layout") as info:
        fresh.load_state_dict(saved)
    assert "(4, 1100)" in str(info.value) and "(4, 1280)" in str(info.value)
    assert "other group settings" not in str(info.value)


@pytest.mark.parametrize("shape", [(64, LENGTH), (LENGTH, 64)], ids=["left", "right"])
def test_padded_state_estimate_equals_bytes_held_and_the_hand_count(shape):
    """The declared layout (``state_layout``) is what is held, and what the summary and estimator count."""
    from hf_galore.callback import estimate_state_bytes, optimizer_state_bytes

    weight = torch.nn.Parameter(torch.zeros(shape))
    opt = GaLoreAdamW8bit([{"params": [weight], "rank": RANK, "update_proj_gap": 100}], lr=1e-3)
    weight.grad = spiked_gradient(shape, [1.0, 0.5, 0.25, 0.125])
    opt.step()
    blocks = RANK * 5  # 1100 values padded to 5 blocks of 256 per direction
    by_hand = 4 + 2 * RANK * 1280 + 2 * 4 * blocks + 64 * RANK * 4  # step, uint8 moments, absmax, fp32 basis
    assert optimizer_state_bytes(opt) == estimate_state_bytes(opt) == by_hand
    low = (RANK, LENGTH) if shape[0] < shape[1] else (LENGTH, RANK)  # the projected gradient's shape
    layout = GaLoreAdamW8bit.state_layout(low, {"rank": RANK}, {}, dtype=torch.float32)
    shapes = {key: entry.shape for key, entry in layout.items()}
    assert shapes == {"state1": (RANK, 1280), "state2": (RANK, 1280), "absmax1": (blocks,), "absmax2": (blocks,)}
    assert {key: tuple(opt.state[weight][key].shape) for key in shapes} == shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_skipped_step_snapshots_one_kernel_slice_at_a_time(monkeypatch, dtype):
    """A NaN step leaves a large full-rank weight and its 8-bit state bit-identical, and what is copied
    to put them back is one kernel call's slice, never the whole weight (an embedding and its states)."""
    from hf_galore.optim import base, functional

    monkeypatch.setattr(adamw8bit, "CALL_ELEMENTS", 1024)
    copied, whole = [], []
    original = functional.restored_where

    def recording(found_inf, tensors):
        copied.extend(t.numel() for t in tensors)
        return original(found_inf, tensors)

    monkeypatch.setattr(adamw8bit, "restored_where", recording)
    monkeypatch.setattr(base, "restored_where", lambda f, tensors: whole.append(len(tensors)) or original(f, tensors))
    weight = torch.nn.Parameter(torch.randn(40, 128, generator=torch.Generator().manual_seed(0)).to(dtype))
    optimizer = GaLoreAdamW8bit([weight], lr=1e-2, weight_decay=0.1)
    weight.grad = torch.randn(40, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    optimizer.step()
    before = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    copied.clear()
    weight.grad[3, 5] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        optimizer.step()
    assert torch.equal(weight.detach(), before[0])
    for key, value in optimizer.state[weight].items():
        assert torch.equal(value, before[1][key]), key
    assert copied and max(copied) <= 1024  # 5 slices of at most 1024 values, no whole-tensor copy
    assert not whole  # the base class's whole-tensor snapshot is not used


# ------------------------------------------ bitsandbytes' and galore-torch's keywords (issue 26)
def test_the_keywords_llama_factory_and_ms_swift_pass_are_accepted():
    """`GaLoreAdamW8bit(..., optim_bits=8, is_paged=False)` (what `Trainer.get_optimizer_cls_and_kwargs` gives
    for adamw_bnb_8bit) was a TypeError, so their 8-bit GaLore paths crashed."""
    models = [tiny_mlp(seed=5, dims=(96, 80, 8)), tiny_mlp(seed=5, dims=(96, 80, 8))]
    plain = GaLoreAdamW8bit(split_groups(models[0], rank=4), lr=1e-3)
    like_bnb = GaLoreAdamW8bit(
        split_groups(models[1], rank=4),
        lr=1e-3,
        optim_bits=8,
        is_paged=False,
        percentile_clipping=100,
        block_wise=True,
        args=None,
        amsgrad=False,
        min_8bit_size=4096,
    )
    GaLoreAdamW8bit(split_groups(tiny_mlp(), rank=4), optim_bits=32)  # bitsandbytes' compatibility default
    train(models[0], plain, 3)
    train(models[1], like_bnb, 3)
    assert max_param_diff(*models) == 0.0


@pytest.mark.parametrize(
    "keyword, value, reason",
    [
        ("is_paged", True, "paged optimizer state"),
        ("percentile_clipping", 5, "percentile gradient clipping is not implemented"),
        ("block_wise", False, "always block-wise"),
        ("args", object(), "config object is not read"),
        ("correct_bias", False, "always corrects the bias"),
    ],
)
def test_bitsandbytes_keywords_without_an_implementation_are_refused_by_name(keyword, value, reason):
    with pytest.raises(GaLoreConfigError, match=rf"`{keyword}`=.* is not supported by GaLoreAdamW8bit: .*{reason}"):
        GaLoreAdamW8bit(split_groups(tiny_mlp(), rank=4), **{keyword: value})
    with pytest.raises(GaLoreConfigError, match=r"`optim_bits` must be one of 32, 8, got 16"):
        GaLoreAdamW8bit(split_groups(tiny_mlp(), rank=4), optim_bits=16)


def test_min_8bit_size_is_honoured():
    w = torch.nn.Parameter(torch.randn(80, 96))
    default = GaLoreAdamW8bit([w], lr=1e-3)
    larger = GaLoreAdamW8bit([{"params": [w]}], lr=1e-3, min_8bit_size=1 << 20)
    for opt in (default, larger):
        w.grad = torch.randn(80, 96)
        opt.step()
    assert "state1" in default.state[w] and "exp_avg" not in default.state[w]
    assert "exp_avg" in larger.state[w] and larger.param_groups[0]["min_8bit_size"] == 1 << 20
