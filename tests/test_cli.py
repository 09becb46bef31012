"""``hf-galore`` command line: subcommands, the estimate table/JSON, and one-line errors."""

from __future__ import annotations

import json

import pytest

from hf_galore import estimate_memory
from hf_galore.cli import main
from hf_galore.memory import FIELDS, METHODS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_subcommands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "subcommands" in out and "estimate" in out


def test_estimate_help_lists_every_method(capsys):
    code, out, _ = run(capsys, "estimate", "--help")
    assert code == 0
    for method in METHODS:
        assert method in out


def test_json_has_the_estimator_fields_in_bytes(capsys):
    code, out, err = run(capsys, "estimate", "llama_60m", "--method", "galore_8bit", "--rank", "64", "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    expected = estimate_memory("llama_60m", "galore_8bit", rank=64, dtype="bf16")
    for field in FIELDS:
        assert data[field] == getattr(expected, field)
    assert data["total"] == data["weights"] + data["gradients"] + data["optimizer_states"] + data["activations"]
    assert data["model"] == "llama_60m" and data["rank"] == 64


def test_table_prints_bytes_of_each_component(capsys):
    argv = ["estimate", "llama_60m", "--method", "lora", "--rank", "8", "--dtype", "fp32", "--batch-size", "2",
            "--seq-len", "64", "--activation-checkpointing", "--target-modules", "q_proj,v_proj"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    expected = estimate_memory("llama_60m", "lora", rank=8, dtype="fp32", batch_size=2, seq_len=64,
                               activation_checkpointing=True, target_modules=["q_proj", "v_proj"])
    for field in FIELDS:
        line = next(line for line in out.splitlines() if line.startswith(field))
        assert f"{getattr(expected, field):,}" in line


BAD_ARGS = [
    (["estimate", "llama_60m", "--method", "sgd"], ["unknown method 'sgd'", "galore_8bit_layerwise", "lora"]),
    (["estimate", "llama_60m", "--dtype", "int3"], ["unknown dtype 'int3'", "bf16", "fp32"]),
    (["estimate", "llama_60m", "--rank", "0"], ["`rank` must be a positive integer"]),
    (["estimate", "llama_60m", "--rank", "-8"], ["`rank` must be a positive integer"]),
    (["estimate", "llama_60m", "--batch-size", "0"], ["`batch-size` must be a positive integer"]),
    (["estimate", "llama_60m", "--seq-len", "many"], ["`seq-len` must be a positive integer"]),
    (["estimate", "llama_6b"], ["unknown preset 'llama_6b'", "llama_7b", "llama_60m"]),
    (["estimate", "llama_60m", "--target-modules", "q_prj"], ["Closest module names: 'q_proj'"]),
    (["estimate", "llama_60m", "--proj-type", "diagonal"], ["`proj_type` must be one of"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
]


@pytest.mark.parametrize("argv,fragments", BAD_ARGS)
def test_bad_input_is_one_line_exit_2_without_traceback(capsys, argv, fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-galore") and "error:" in lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_no_subcommand_prints_help_and_fails(capsys):
    code, out, _ = run(capsys)
    assert code == 2
    assert "estimate" in out
