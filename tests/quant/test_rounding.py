import pytest
import torch

from hf_galore.quant.rounding import (
    BLOCK_ELEMENTS,
    DEVICE_BLOCK_ELEMENTS,
    TABLE_SIZE,
    add_rounded_,
    block_elements,
    noise_table,
    round_into_,
    table_size,
    write_rounded_,
)


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values of ``dtype`` just below and just above each float32 value (as float64)."""
    nearest = x.to(dtype)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    down = torch.nextafter(nearest, torch.full_like(nearest, float("-inf")))
    above = nearest.double() >= x.double()
    lo = torch.where(above, down, nearest).double()
    hi = torch.where(above, nearest, up).double()
    exact = nearest.double() == x.double()
    return torch.where(exact, x.double(), lo), torch.where(exact, x.double(), hi)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    gen = torch.Generator().manual_seed(0)
    # weights of every sign and scale, including fp16 subnormals (< 2**-14) and exactly representable values
    x = torch.cat([
        torch.randn(400, generator=gen) * 0.02,
        torch.randn(100, generator=gen) * 3e-6,
        torch.tensor([1.0, -0.5, 0.0, 2.0**-20]),
    ])
    lo, hi = _neighbours(x, dtype)
    draws = 3000
    total = torch.zeros_like(x, dtype=torch.float64)
    for key in range(draws):
        out = torch.empty(x.shape, dtype=dtype)
        round_into_(out, x.clone(), key)
        value = out.double()
        assert bool(((value == lo) | (value == hi)).all())
        total += value
    spacing = (hi - lo).clamp(min=1e-300)
    bias = ((total / draws - x.double()) / spacing).abs()
    # the mean of 3000 Bernoulli draws has std <= 0.0092 spacing; nearest rounding would be off by up to 0.5
    assert float(bias.max()) < 0.05
    exact = hi == lo
    assert bool((total[exact] / draws == x.double()[exact]).all())


def test_rounding_depends_only_on_key_and_block():
    x = torch.randn(5000) * 0.02
    outs = []
    for key, block in [(7, 0), (7, 0), (8, 0), (7, 1)]:
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        round_into_(out, x.clone(), key, block)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_special_values_survive(dtype):
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, 1.0, -1.0])
    out = torch.empty(x.shape, dtype=dtype)
    round_into_(out, x.clone(), key=3)
    assert out[0] == float("inf") and out[1] == float("-inf") and torch.isnan(out[2])
    assert out[3] == 0 and out[4] == 1 and out[5] == -1


def test_noise_table_holds_every_16_bit_value_equally_often():
    table = noise_table(torch.device("cpu"))
    assert table.numel() == TABLE_SIZE and table.dtype == torch.int32
    counts = torch.bincount(table, minlength=1 << 16)
    assert counts.numel() == 1 << 16 and bool((counts == TABLE_SIZE >> 16).all())
    assert not torch.equal(table[: 1 << 16], torch.arange(1 << 16, dtype=torch.int32))  # shuffled


def test_add_rounded_matches_on_strided_and_contiguous_weights_across_blocks():
    gen = torch.Generator().manual_seed(1)
    base = (torch.randn(3, BLOCK_ELEMENTS // 512 + 7, 1024, generator=gen) * 0.02).to(torch.bfloat16)
    delta = torch.randn(base.shape, generator=gen) * 1e-5
    contiguous = base.clone()
    add_rounded_(contiguous, delta, alpha=-1.0, decay=0.999, key=11)
    strided = base.clone().transpose(0, 2).contiguous().transpose(0, 2)
    assert not strided.is_contiguous()
    add_rounded_(strided, delta, alpha=-1.0, decay=0.999, key=11)
    assert torch.equal(contiguous, strided)
    # the expected value is the float32 result: averaged over the elements the error is tiny
    exact = base.double() * 0.999 - delta.double()
    assert abs(float((contiguous.double() - exact).mean())) < 1e-7
    assert not torch.equal(contiguous, exact.to(torch.bfloat16))  # not round-to-nearest


def test_write_rounded_hands_fill_float32_blocks():
    param = torch.zeros(BLOCK_ELEMENTS + 5, dtype=torch.float16)
    seen = []

    def fill(master, start, stop):
        assert master.dtype == torch.float32 and master.numel() == stop - start
        seen.append((start, stop))
        master.add_(0.5)

    write_rounded_(param, fill, key=0)
    assert seen == [(0, BLOCK_ELEMENTS), (BLOCK_ELEMENTS, BLOCK_ELEMENTS + 5)]
    assert bool((param == 0.5).all())


def test_blocks_longer_than_the_noise_table_still_round_to_a_neighbour():
    x = torch.randn(TABLE_SIZE + 1000) * 0.02
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    round_into_(out, x.clone(), key=5)
    lo, hi = _neighbours(x, torch.bfloat16)
    assert bool(((out.double() == lo) | (out.double() == hi)).all())


def test_accelerators_round_in_larger_blocks():
    """Per-block kernel launches dominate off the CPU; the table covers one such block."""
    assert block_elements("cpu") == BLOCK_ELEMENTS and table_size("cpu") == TABLE_SIZE
    assert block_elements("cuda") == DEVICE_BLOCK_ELEMENTS == table_size("cuda")


def test_round_into_refuses_float32_targets():
    with pytest.raises(TypeError, match="bf16 or fp16"):
        round_into_(torch.empty(3), torch.zeros(3), key=0)
