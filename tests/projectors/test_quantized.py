"""Group-wise INT8 / INT4 basis storage: error bound, memory bound, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from hf_galore import GaLoreAdamW
from hf_galore.projectors.quantized import (
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    stored_bytes,
    unpack_int4,
)
from hf_galore.projectors.storage import get_codec
from hf_galore.projectors.svd import top_singular_basis
from tests.helpers import split_groups, tiny_mlp, train

# (codec, shape, group size, max stored bytes / fp32 bytes)
CASES = [
    ("int8", (512, 128), 256, 1 / 3),
    ("int8", (100, 7), 256, 1 / 3),
    ("int8", (33, 5), 64, 1 / 3),
    ("int4", (512, 128), 256, 1 / 6),
    ("int4", (300, 11), 256, 1 / 6),
    ("int4", (97, 3), 128, 1 / 6),
]


@pytest.mark.parametrize("name,shape,group_size,max_ratio", CASES)
def test_round_trip_within_bound_and_memory(name, shape, group_size, max_ratio):
    basis = top_singular_basis(torch.randn(shape[0], shape[0] + 3, generator=torch.Generator().manual_seed(0)),
                               shape[1], "left")
    codec = get_codec(name)
    state: dict = {}
    codec.encode(state, "basis_left", basis, torch.float32, group={"quant_group_size": group_size})
    decoded = codec.decode(state, "basis_left")
    assert decoded.shape == basis.shape and decoded.dtype == torch.float32
    # every value within half a quantization step of its group
    levels = 255 if name == "int8" else 15
    flat = basis.reshape(-1)
    groups = torch.arange(flat.numel()) // group_size
    step = state["basis_left_scale"].float()[groups]
    err = (decoded.reshape(-1) - flat).abs()
    assert torch.all(err <= step / 2 + 1e-6)
    # step is (max - min)/levels of the group, up to float16 rounding
    width = torch.stack([flat[groups == g].max() - flat[groups == g].min() for g in groups.unique()])
    assert torch.all(state["basis_left_scale"].float() <= width / levels * 1.002 + 1e-7)
    ratio = stored_bytes(state, "basis_left") / (basis.numel() * 4)
    assert ratio <= max_ratio


def test_int4_packing_round_trips_odd_lengths():
    codes = torch.randint(0, 16, (101,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(codes)
    assert packed.numel() == 51
    assert torch.equal(unpack_int4(packed, 101), codes)


def test_constant_group_is_exact():
    values = torch.full((300,), 0.25)
    codes, scale, lo = quantize_groupwise(values, 4, 256)
    assert torch.allclose(dequantize_groupwise(codes, scale, lo, 256), values, atol=1e-6)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_checkpoint_round_trip_is_bit_exact(quant):
    """save -> torch.load(weights_only) -> load -> continue equals never stopping."""
    model = tiny_mlp()
    opt = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=3, quant=quant), lr=1e-2)
    train(model, opt, steps=4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, steps=4, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_mlp()
    resumed.load_state_dict(saved["model"])
    opt2 = GaLoreAdamW(split_groups(resumed, rank=4, update_proj_gap=3, quant=quant), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    for p in resumed.parameters():
        if p.dim() == 2:
            state = opt2.state[p]
            key = next(k for k in state if k.endswith("_q"))
            assert state[key].dtype == torch.uint8
            assert state[key.replace("_q", "_scale")].dtype == torch.float16
    train(resumed, opt2, steps=4, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_refresh_does_not_hold_a_second_decoded_basis(quant, monkeypatch):
    """A refresh decodes the stored basis itself; the step's own decoded copy is released before it.

    Decoding makes a new float32 tensor every time: had the step kept its
    copy, a refresh would hold two, beside its working set (16 MiB more per
    side at 4096x4096, rank 1024, measured with benchmarks/step_transient.py).
    """
    import weakref

    from hf_galore.optim import lowrank

    codec = get_codec(quant)
    decoded: list[weakref.ref] = []
    real_decode, real_refresh = codec.decode, lowrank.refresh_basis
    alive_at_refresh: list[int] = []

    def decode(state, key):
        out = real_decode(state, key)
        if out is not None:
            decoded.append(weakref.ref(out))
        return out

    def refresh(*args, **kwargs):
        alive_at_refresh.append(sum(ref() is not None for ref in decoded))
        return real_refresh(*args, **kwargs)

    monkeypatch.setattr(codec, "decode", decode)
    monkeypatch.setattr(lowrank, "refresh_basis", refresh)
    param = torch.nn.Parameter(torch.randn(64, 48, generator=torch.Generator().manual_seed(0)))
    opt = GaLoreAdamW([{"params": [param], "rank": 8, "update_proj_gap": 2, "quant": quant}], lr=1e-3)
    for step in range(5):
        param.grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(step + 1))
        opt.step()
    assert alive_at_refresh == [0, 0, 0]  # steps 0, 2, 4 refresh; the step's decoded bases are gone each time
