"""benchmarks/gpu_suite.py on the CPU with its tiny preset: every method runs three steps, cold and warm refresh."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_suite


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "results.json"
    assert gpu_suite.main(["--preset", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    return {r["method"]: r for r in json.loads(out.read_text()).values()}


def test_every_method_runs_three_steps_on_the_cpu(results):
    assert sorted(results) == sorted(gpu_suite.METHODS)
    for got in results.values():
        assert got["allocated"] > 0 and got["first_step_seconds"] > 0
        assert got["losses"][-1] < got["losses"][0]


def test_projected_methods_refresh_cold_then_warm(results):
    projected = 2 * 7 * 2  # two layers of seven linears, refreshed at steps 0 and 2
    assert results["galore_8bit_layerwise"]["refreshes"] == projected
    assert results["adamw8bit"]["refreshes"] == 0


def test_verdicts_judge_only_the_7b_preset():
    got = {"preset": "llama_7b", "method": "galore_8bit_layerwise", "allocated": 17.5e9, "reserved": 21e9}
    got["first_step_seconds"] = 12.0
    assert gpu_suite.verdicts(got) == [
        "allocated 17.50 GB (target <= 18 GB): met",
        "reserved 21.00 GB (target <= 20 GB): missed",
        "first_step_seconds 12.0 s (target <= 30 s): met",
    ]
    assert gpu_suite.verdicts({**got, "preset": "tiny"}) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_device_is_refused_clearly():
    with pytest.raises(SystemExit, match="no CUDA device is visible"):
        gpu_suite.measure("adamw8bit", gpu_suite._parse(["--preset", "tiny"]))
