"""benchmarks/llama7b_step.py on its tiny preset: both methods run in fresh processes and match the estimate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import llama7b_step


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama7b") / "results.json"
    assert llama7b_step.main(["--preset", "tiny", "--projector", "randomized", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _args(**overrides) -> argparse.Namespace:
    return llama7b_step._parse(["--preset", "tiny", "--projector", "randomized", *overrides.get("argv", [])])


def test_both_methods_are_measured_and_saved(results):
    assert sorted(r["method"] for r in results.values()) == sorted(llama7b_step.METHODS)
    for got in results.values():
        assert got["peak"] >= got["rss_after"] > got["baseline_rss"] > 0
        assert got["loss_after"] < got["loss_before"]  # one real step moved the weights


def test_weights_gradients_and_states_equal_the_estimate(results):
    for got in results.values():
        est = llama7b_step.estimate(got["method"], llama7b_step._config("tiny"), _args())
        assert got["weights"] == est.weights
        assert got["gradients"] == est.gradients  # layer-wise: the largest single gradient
        if got["method"] == "galore_8bit_layerwise":
            assert got["states"] == est.optimizer_states
        else:  # the lazy policy's cosine queue appears at a weight's second refresh, after this one step
            queue = 4 * 5 * 14
            assert got["states"] == est.optimizer_states - queue


def test_activations_are_counted_from_tensors_and_match_the_estimate(results):
    """Saved by the checkpointed forward, plus one layer as recomputed: the formula's count, within 5%."""
    for got in results.values():
        est = llama7b_step.estimate(got["method"], llama7b_step._config("tiny"), _args())
        measured = got["activations_forward"] + got["activations_recomputed_layer"]
        assert got["activations_recomputed_layer"] > 0
        assert measured == pytest.approx(est.activations, rel=0.05)


def test_the_largest_step_transient_is_found_and_named(results):
    for got in results.values():
        assert got["transient"] >= 0 and got["peak"] >= got["rss_after"]
        assert got["transient"] == 0 or got["transient_weight"].endswith(".weight")
        assert got["total_seconds"] > 0


def test_rerun_is_skipped_and_report_renders(results, tmp_path, capsys):
    out = tmp_path / "saved.json"
    out.write_text(json.dumps(results))
    assert llama7b_step.main(["--preset", "tiny", "--projector", "randomized", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "peak (VmHWM - interpreter and libraries)" in table and "q_galore_layerwise" in table
    assert "transient (largest one-weight step" in table and "largest one-weight step:" in table


def test_refuses_when_the_machine_lacks_the_estimated_memory(monkeypatch):
    monkeypatch.setattr(llama7b_step, "_available_bytes", lambda: 1)
    with pytest.raises(SystemExit, match=r"needs .* GiB .* only 0.00 GiB is available; free memory or pass --force"):
        llama7b_step.measure("galore_8bit_layerwise", _args())


@pytest.mark.parametrize("argv", [["--method", "adam"], ["--rank", "0"]])
def test_bad_arguments_name_the_valid_choices(argv, capsys):
    with pytest.raises(SystemExit):
        llama7b_step._parse(argv)
    assert "--" in capsys.readouterr().err


def test_accumulation_step_holds_what_the_estimate_says(tmp_path, capsys):
    """--grad-accum 3: after a first step makes the bases, the measured step accumulates in the subspace;
    its peak live gradients (every .grad plus the accumulators) equal the estimate's."""
    out = tmp_path / "accum.json"
    argv = ["--preset", "tiny", "--method", "galore_8bit_layerwise", "--grad-accum", "3", "--out", str(out)]
    assert llama7b_step.main(argv) == 0
    (got,) = json.loads(out.read_text()).values()
    est = llama7b_step.estimate(got["method"], llama7b_step._config("tiny"), llama7b_step._parse(argv))
    assert got["grad_accum"] == 3 and got["accumulated_bytes"] > 0
    assert got["gradients"] == est.gradients
    assert got["first_step"]["gradients"] < got["gradients"]  # one micro-batch, layer-wise: one gradient
    assert "micro-batches accumulated in the subspace" in capsys.readouterr().out


def test_int8_targets_build_from_the_meta_device_equal_the_converted_model():
    import torch

    config = llama7b_step._config("tiny")
    from hf_galore import prepare_model_for_int8_weights

    converted = llama7b_step.build_model(config, torch.bfloat16)
    prepare_model_for_int8_weights(converted, "all-linear")
    direct = llama7b_step.build_int8_model(config, torch.bfloat16)
    a, b = converted.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if "rotary" not in k)
