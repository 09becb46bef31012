"""INT8 weights with stochastic rounding (Q-GaLore): unbiasedness, layer maths, optimizer updates."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from hf_galore import GaLoreAdamW, prepare_model_for_int8_weights
from hf_galore.errors import GaLoreConfigError
from hf_galore.quant import (
    Int8Linear,
    dequantize_rows,
    int8_add_,
    int8_weight_bytes,
    quantize_rows,
)


def test_stochastic_rounding_is_unbiased():
    """Mean of many SR draws equals the input (z-test), while round-to-nearest is biased."""
    g = torch.Generator().manual_seed(0)
    row = torch.rand(1, 256, generator=g) * 2 - 1
    row[0, 0] = 1.0  # fixes the scale of the group: 1/127
    draws = 4000
    x = row.expand(draws, 256).contiguous()
    q, scale = quantize_rows(x, 256, generator=torch.Generator().manual_seed(1))
    mean = dequantize_rows(q, scale, 256, torch.float32).mean(dim=0)
    step = 1.0 / 127
    # each draw is x ± one step: std <= step/2, so the mean's std <= step / (2 sqrt(N))
    z = (mean - row[0]).abs() / (step / (2 * math.sqrt(draws)))
    assert float(z.max()) < 5.0
    q_near, scale_near = quantize_rows(row, 256)
    bias_near = (dequantize_rows(q_near, scale_near, 256, torch.float32) - row).abs().mean()
    bias_sr = (mean - row[0]).abs().mean()
    assert bias_sr < bias_near / 5


@pytest.mark.parametrize("in_features,group_size", [(64, 16), (70, 32), (40, 256)])
def test_int8_linear_matches_its_dequantized_float_layer(in_features, group_size):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 12)
    layer = Int8Linear.from_linear(linear, group_size=group_size)
    w = layer.dequantize()
    assert (w - linear.weight).abs().max() <= layer.weight_scale.max() / 2 + 1e-7
    x = torch.randn(5, 3, in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_w = w.clone().requires_grad_(True)
    ref_b = linear.bias.detach().clone().requires_grad_(True)
    out, ref = layer(x), nn.functional.linear(x_ref, ref_w, ref_b)
    assert torch.allclose(out, ref, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(layer.weight.grad, ref_w.grad, atol=1e-4)
    assert torch.allclose(layer.bias.grad, ref_b.grad, atol=1e-4)
    # the placeholder parameter holds one element, whatever its shape
    assert layer.weight.untyped_storage().nbytes() == 4
    assert int8_weight_bytes(nn.Sequential(layer)) == 12 * in_features + layer.weight_scale.numel() * 4


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 8))


def test_prepare_model_replaces_targets_and_refuses_no_match():
    model = make_model()
    assert prepare_model_for_int8_weights(model, ["0"], group_size=16) == ["0"]
    assert isinstance(model[0], Int8Linear) and type(model[2]) is nn.Linear
    with pytest.raises(GaLoreConfigError, match="q_proj"):
        prepare_model_for_int8_weights(make_model(), ["q_proj"])
    with pytest.raises(GaLoreConfigError, match="matched no nn.Linear"):
        prepare_model_for_int8_weights(model, ["0"])  # already INT8


def lowrank_groups(model):
    matrices = [m.weight for m in model if isinstance(m, nn.Linear)]
    others = [m.bias for m in model if isinstance(m, nn.Linear)]
    return [{"params": matrices, "rank": 4, "update_proj_gap": 5}, {"params": others}]


def test_training_int8_weights_tracks_float_training():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    losses = {}
    for kind in ("float", "int8"):
        model = make_model()
        if kind == "int8":
            prepare_model_for_int8_weights(model, "all-linear", group_size=16)
        opt = GaLoreAdamW(lowrank_groups(model), lr=1e-2, weight_decay=0.1)
        for _ in range(30):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            opt.step()
        losses[kind] = loss.item()
    start = (make_model()(x) - y).square().mean().item()
    assert losses["float"] < 0.8 * start
    assert losses["int8"] == pytest.approx(losses["float"], rel=0.05)


def test_updates_below_one_quantization_step_still_move_the_weight_on_average():
    """Round-to-nearest would drop an update of 0.1 step every time; SR applies it in expectation."""
    layer = Int8Linear(256, 64, bias=False, group_size=256)
    layer.store_(torch.rand(64, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    start = layer.dequantize()
    delta = 0.1 * float(layer.weight_scale.mean())
    for _ in range(40):  # the path lowrank.apply_update takes for an INT8 weight
        assert int8_add_(layer.weight, lambda master, first, last: master.add_(delta))
    drift = layer.dequantize() - start
    assert float(drift.mean()) == pytest.approx(40 * delta, rel=0.05)
    assert int(layer.sr_step) == 40
    # the same updates rounded to nearest are (almost all) lost
    nearest = start
    for _ in range(40):
        nearest = dequantize_rows(*quantize_rows(nearest + delta, 256), 256, torch.float32)
    assert float((nearest - start).mean()) < 0.25 * float(drift.mean())
    assert not int8_add_(torch.nn.Parameter(torch.zeros(2, 2)), lambda master, first, last: None)


def test_row_blocked_update_equals_the_whole_weight_at_once(monkeypatch):
    """Blocks of rows (a few here, ~2^18 values in use) give the codes, scales and stream of one whole-tensor pass."""
    import hf_galore.quant.int8 as int8_module

    weight = torch.randn(37, 300, generator=torch.Generator().manual_seed(4))
    delta = torch.randn(37, 300, generator=torch.Generator().manual_seed(5)) * 1e-3
    whole = Int8Linear(300, 37, bias=False, group_size=64)
    whole.store_(weight)
    # the reference: one float32 master of the whole weight, rounded in one call
    master = dequantize_rows(whole.weight_int8, whole.weight_scale, 64, torch.float32) + delta
    stream = torch.Generator().manual_seed(
        int8_module.derive_seed(int(whole.sr_seed), int(whole.sr_step), *whole.weight_int8.shape)
    )
    q_ref, scale_ref = quantize_rows(master, 64, generator=stream)

    monkeypatch.setattr(int8_module, "INT8_BLOCK_ELEMENTS", 5 * 300)  # 5 rows per block: 8 blocks
    blocked = Int8Linear(300, 37, bias=False, group_size=64)
    blocked.store_(weight)
    seen = []

    def fill(rows, first, last):
        seen.append((first, last))
        rows.add_(delta[first:last])

    assert int8_add_(blocked.weight, fill)
    assert seen == [(i, min(37, i + 5)) for i in range(0, 37, 5)]
    assert torch.equal(blocked.weight_int8, q_ref) and torch.equal(blocked.weight_scale, scale_ref)
    assert int(blocked.sr_step) == 1
    # dequantizing by blocks is the whole-tensor product, bit for bit, in every dtype
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expanded = blocked.weight_scale.repeat_interleave(64, dim=1)[:, :300]
        assert torch.equal(blocked.dequantize(dtype), (blocked.weight_int8.float() * expanded).to(dtype))


def test_model_checkpoint_resumes_the_rounding_stream():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    model = make_model()
    prepare_model_for_int8_weights(model, "all-linear", group_size=16)
    opt = GaLoreAdamW(lowrank_groups(model), lr=1e-2)

    def steps(m, o, n):
        for _ in range(n):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()

    steps(model, opt, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    steps(model, opt, 3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model()
    prepare_model_for_int8_weights(resumed, "all-linear", group_size=16)
    resumed.load_state_dict(saved["model"])
    opt2 = GaLoreAdamW(lowrank_groups(resumed), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    steps(resumed, opt2, 3)
    for a, b in zip(model, resumed):
        if isinstance(a, Int8Linear):
            assert torch.equal(a.weight_int8, b.weight_int8)
            assert torch.equal(a.weight_scale, b.weight_scale)


@pytest.mark.slow
def test_tiny_llama_trains_with_int8_weights_int4_basis_and_lazy_refresh():
    """The Q-GaLore recipe end to end: INT8 weights, INT4 basis, lazy refresh, via GaLoreConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_galore import GaLoreConfig, galore_param_groups

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=100)
    model = LlamaForCausalLM(config)
    names = prepare_model_for_int8_weights(model, ["attn", "mlp"], group_size=32)
    assert len(names) == 14
    galore = GaLoreConfig(rank=8, update_proj_gap=5, target_modules=["attn", "mlp"], quant="int4", refresh="lazy")
    opt = GaLoreAdamW(galore_param_groups(model, galore), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert opt.galore_stats.refreshes == 14 * 2  # steps 0 and 5
    int8_params = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert len(int8_params) == 14
    assert all(p.untyped_storage().nbytes() == 4 for p in int8_params)


def test_int8_weight_in_a_full_rank_group_is_refused():
    model = make_model()
    prepare_model_for_int8_weights(model, ["0"], group_size=16)
    with pytest.raises(GaLoreConfigError, match="INT8 weight"):
        GaLoreAdamW([{"params": [model[0].weight]}])


def test_a_skipped_step_leaves_int8_codes_scales_and_rounding_stream_as_they_were():
    """A NaN gradient skips the step (docs/optimizers.md): the run equals one without that step."""
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))

    def run(poison_at: int | None) -> nn.Sequential:
        model = make_model()
        prepare_model_for_int8_weights(model, "all-linear", group_size=16)
        opt = GaLoreAdamW(lowrank_groups(model), lr=1e-2, weight_decay=0.1)
        steps = [0, 1, 2, 3] if poison_at is None else [0, 1, "bad", 2, 3]
        for step in steps:
            opt.zero_grad()
            model(x).square().mean().backward()
            if step == "bad":
                model[2].bias.grad[0] = float("nan")
            opt.step()
        return model

    clean, poisoned = run(None), run(poison_at=2)
    for a, b in zip(clean.state_dict().values(), poisoned.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_name", ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"])
def test_int8_weight_moves_like_the_float_weight_for_every_optimizer(optimizer_name):
    """Regression (issue 13): Adafactor's ``scale_parameter`` read the RMS of the all-zero INT8 placeholder,
    so the INT8 weight moved ~1/50 as far as the same weight in float."""
    import hf_galore

    cls = getattr(hf_galore, optimizer_name)
    kwargs = {"lr": 1e-2, "relative_step": False} if optimizer_name == "GaLoreAdafactor" else {"lr": 1e-2}
    displacement = {}
    for kind in ("float", "int8"):
        model = make_model()
        if kind == "int8":
            prepare_model_for_int8_weights(model, "all-linear", group_size=16)
        start = torch.cat([_dense(m).flatten() for m in model if hasattr(m, "weight")])
        opt = cls(lowrank_groups(model), **kwargs)
        g = torch.Generator().manual_seed(2)  # the same gradients for both runs
        for _ in range(20):
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=g)
            opt.step()
        displacement[kind] = torch.cat([_dense(m).flatten() for m in model if hasattr(m, "weight")]) - start
    # the INT8 weight's displacement projected on the float one's path (SR noise is orthogonal on average)
    along = float(displacement["int8"] @ displacement["float"]) / float(displacement["float"].square().sum())
    assert along == pytest.approx(1.0, abs=0.15)


def _dense(module):
    return module.dequantize() if isinstance(module, Int8Linear) else module.weight.detach().clone()


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_dequantized_tiny_llama_saves_and_loads_as_a_plain_model(tmp_path):
    """Issue 14: export a Q-GaLore model; a plain ``from_pretrained`` gets every weight and the same logits."""
    from transformers import AutoModelForCausalLM

    from hf_galore import GaLoreConfig, dequantize_int8_weights, galore_param_groups
    from tests.helpers import tiny_llama

    model = tiny_llama()
    assert len(prepare_model_for_int8_weights(model, LLAMA_LINEARS, group_size=16)) == 14
    opt = GaLoreAdamW(galore_param_groups(model, GaLoreConfig(rank=4, target_modules=LLAMA_LINEARS)), lr=1e-2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # weights moved by stochastic rounding, not just the initial rounding
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    codes = q_proj.dequantize()

    assert dequantize_int8_weights(model) is model
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    exported = model.model.layers[0].self_attn.q_proj
    assert type(exported) is nn.Linear and exported.weight.dtype == torch.float32
    assert torch.equal(exported.weight, codes)
    assert not exported.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)

    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, expected)


def test_dequantize_keeps_bias_dtype_and_trainability():
    from hf_galore import dequantize_int8_weights

    model = make_model().to(torch.bfloat16)
    model[0].bias.requires_grad_(False)
    prepare_model_for_int8_weights(model, ["0"], group_size=16)
    bias, codes = model[0].bias, model[0].dequantize(torch.bfloat16)
    dequantize_int8_weights(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.bfloat16  # the layer's own dtype
    assert torch.equal(model[0].weight, codes) and model[0].weight.requires_grad
    assert model[0].bias is bias and not model[0].bias.requires_grad  # the same bias parameter

    model = make_model()
    prepare_model_for_int8_weights(model, ["0"], group_size=16)
    codes = model[0].dequantize(torch.float32)
    dequantize_int8_weights(model, dtype=torch.float64)
    assert model[0].weight.dtype == model[0].bias.dtype == torch.float64
    assert torch.equal(model[0].weight, codes.double())
    assert model[0].in_features == codes.shape[1] and model[0].out_features == codes.shape[0]


def test_dequantize_keeps_a_shared_layer_shared():
    from hf_galore import dequantize_int8_weights

    model = make_model()
    prepare_model_for_int8_weights(model, ["0"], group_size=16)
    model.alias = model[0]  # the same layer under a second name (tied weights)
    dequantize_int8_weights(model)
    assert type(model.alias) is nn.Linear and model.alias is model[0]


def test_prepare_frees_each_float_weight_as_it_converts(monkeypatch):
    """Layer by layer: when layer k is converted, the float weights of layers < k are gone (issue 18:
    keeping them all alive until the end made the peak the float model plus the INT8 one)."""
    import weakref

    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    originals = [weakref.ref(layer.weight) for layer in model]
    alive_at_call = []
    original_from_linear = Int8Linear.from_linear.__func__

    def recording(cls, linear, **kwargs):
        alive_at_call.append(sum(ref() is not None for ref in originals))
        return original_from_linear(cls, linear, **kwargs)

    monkeypatch.setattr(Int8Linear, "from_linear", classmethod(recording))
    assert prepare_model_for_int8_weights(model, ["0", "1", "2", "3"], group_size=16) == ["0", "1", "2", "3"]
    assert alive_at_call == [4, 3, 2, 1]
    assert all(ref() is None for ref in originals)
