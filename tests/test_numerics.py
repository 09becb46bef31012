"""hf_galore.numerics.all_finite: exact, for every floating dtype, without full-size temporaries."""

from __future__ import annotations

import pytest
import torch

from hf_galore.numerics import all_finite


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
