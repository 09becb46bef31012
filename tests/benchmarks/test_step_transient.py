"""benchmarks/step_transient.py on the tiny preset: every weight shape of both methods is measured beside its estimate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

pytest.importorskip("bitsandbytes")
import step_transient


def test_tiny_preset_prints_a_row_per_shape_and_method(capsys):
    assert step_transient.main(["--preset", "tiny", "--rank", "8", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    counts = step_transient.weight_shapes(step_transient._config("tiny"))
    rows = [line for line in out.splitlines() if line.startswith(("| galore", "| q_galore"))]
    assert len(rows) == 2 * len(counts)
    assert "64×172 (2) | target, INT8" in out and "512×64 (2) | full" in out


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        step_transient.main(["--method", "adamw"])
    with pytest.raises(SystemExit):
        step_transient.main(["--rank", "0"])
