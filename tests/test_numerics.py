"""hf_galore.numerics: exact checks and norms, for every floating dtype, without full-size temporaries."""

from __future__ import annotations

import math

import pytest
import torch

from hf_galore.numerics import NORM_BLOCK_ELEMENTS, NORM_ROW_ELEMENTS, all_finite, l2_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_entry_anywhere_is_found(dtype, bad):
    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(x)
    for index in [(0, 0), (36, 52), (18, 7)]:
        y = x.clone()
        y[index] = bad
        assert not all_finite(y)
        assert not all_finite(y.t())  # strided views too


def test_large_finite_values_are_finite():
    """A sum or a dot product would overflow here; the check must not call these gradients non-finite."""
    x = torch.full((64, 64), 3e38)
    assert all_finite(x) and all_finite(-x)
    assert all_finite(torch.empty(0, 5))


def test_l2_norm_of_one_block_is_vector_norm_bit_for_bit():
    x = torch.randn(250, 260, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert x.numel() <= NORM_ROW_ELEMENTS
    assert torch.equal(l2_norm(x), torch.linalg.vector_norm(x, dtype=torch.float32))
    assert l2_norm(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "one_dim"])
def test_l2_norm_of_many_blocks_matches_float64(dtype, layout):
    """Several blocks (and a ragged last one), in every layout, against an independent float64 norm."""
    shape = (NORM_BLOCK_ELEMENTS // 1000 * 3 + 17, 1000)
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.01).to(dtype)
    if layout == "transposed":
        x = x.t()
    elif layout == "one_dim":
        x = x.reshape(-1)
    exact = x.double().norm().item()
    assert l2_norm(x).dtype == torch.float32
    assert l2_norm(x).item() == pytest.approx(exact, rel=2e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_l2_norm_propagates_a_bad_value(bad):
    x = torch.ones(NORM_BLOCK_ELEMENTS + 5)
    x[-1] = bad
    result = l2_norm(x).item()
    assert math.isnan(result) if math.isnan(bad) else result == bad


def test_l2_norm_copies_one_block_not_the_tensor(monkeypatch):
    """The float32 temporary is one block: every reduction call sees at most NORM_BLOCK_ELEMENTS values."""
    seen = []
    real = torch.linalg.vector_norm

    def spy(t, *args, **kwargs):
        seen.append(t.numel())
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "vector_norm", spy)
    l2_norm(torch.ones(3 * NORM_BLOCK_ELEMENTS + 1, dtype=torch.bfloat16))
    # 3 whole blocks, the one-value tail, and the combination of the row norms
    assert len(seen) == 5 and max(seen) <= NORM_BLOCK_ELEMENTS
