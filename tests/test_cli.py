"""``hf-galore`` command line: subcommands, the estimate table/JSON, and one-line errors."""

from __future__ import annotations

import importlib.resources
import json
import signal
import time

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


def test_grad_accum_and_accumulate_reach_the_estimate(capsys):
    argv = ["estimate", "llama_60m", "--method", "galore_layerwise", "--grad-accum", "4", "--json"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert json.loads(out)["gradients"] == estimate_memory("llama_60m", "galore_layerwise", grad_accum=4).gradients
    code, out, _ = run(capsys, *argv[:-1], "--accumulate", "full", "--json")
    full = estimate_memory("llama_60m", "galore_layerwise", grad_accum=4, options={"accumulate": "full"})
    assert code == 0 and json.loads(out)["gradients"] == full.gradients > estimate_memory("llama_60m", "galore_layerwise", grad_accum=4).gradients
    code, _, err = run(capsys, *argv[:-1], "--accumulate", "subspace")
    assert code == 2 and "accumulate" in err and "lowrank" in err


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


# ------------------------------------------------------------------ hostile input: bounded, one-line errors
def _config_file(tmp_path, name: str = "config.json", **fields) -> str:
    """The llama_60m preset as a config file, with ``fields`` overriding it."""
    data = json.loads(importlib.resources.files("hf_galore").joinpath("presets/llama_60m.json").read_text())
    data.update(fields)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _deep_json_file(tmp_path, depth: int) -> str:
    path = tmp_path / "deep.json"
    path.write_text('{"model_type": "llama", "extra": ' + '{"a": ' * depth + "1" + "}" * depth + "}")
    return str(path)


def assert_one_line_error(capsys, argv: list[str], fragments: list[str], within_s: float) -> None:
    start = time.monotonic()
    code, out, err = run(capsys, *argv)
    elapsed = time.monotonic() - start
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hf-galore estimate: error: "), lines[0]
    assert len(lines[0]) <= 1100
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert elapsed < within_s, f"took {elapsed:.1f} s"


@pytest.mark.timeout(90)
def test_config_with_ten_million_layers_is_refused_at_once(capsys, tmp_path):
    path = _config_file(tmp_path, num_hidden_layers=10**7)
    assert_one_line_error(
        capsys, ["estimate", path], [path, "`num_hidden_layers`=10,000,000", "over 1,024", "fix the config"], 15
    )


@pytest.mark.timeout(90)
def test_target_modules_regex_that_backtracks_is_refused_within_its_budget(capsys):
    assert_one_line_error(
        capsys,
        ["estimate", "llama_60m", "--target-modules", "(.*)*x"],
        ["`--target-modules` pattern '(.*)*x'", "took over 2 s", "simplify it"],
        30,
    )


@pytest.mark.parametrize(
    "fields,fragments",
    [
        ({"hidden_size": -8}, ["`hidden_size` must be a positive integer, got -8", "fix the config"]),
        ({"vocab_size": "abc"}, ["`vocab_size` must be a positive integer, got 'abc'", "fix the config"]),
        ({"num_attention_heads": 3}, ["not a valid llama config", "not a multiple of the number of attention heads"]),
        ({"rms_norm_eps": "x"}, ["not a valid llama config", "'rms_norm_eps' expected float"]),
        ({"hidden_act": "nope"}, ["could not build a model", "KeyError 'nope'", "fix the config's fields"]),
        ({"model_type": "lama"}, ["`model_type` 'lama' is not a model type", "closest: llama"]),
    ],
)
def test_bad_config_field_is_one_line_naming_field_and_value(capsys, tmp_path, fields, fragments):
    path = _config_file(tmp_path, **fields)
    assert_one_line_error(capsys, ["estimate", path], [path, *fragments], 30)


@pytest.mark.parametrize("depth", [100_000, 500])
def test_deeply_nested_config_is_refused(capsys, tmp_path, depth):
    # 100,000 levels overflow json's parser; 500 parse, then overflow transformers' recursive copy.
    path = _deep_json_file(tmp_path, depth)
    assert_one_line_error(capsys, ["estimate", path], [path, "nests", "deep", "not a transformers config"], 30)


@pytest.mark.parametrize(
    "content,fragments",
    [
        (b"", ["is empty"]),
        (b"{not json", ["is not valid JSON", "line 1 column 2"]),
        (b"[1, 2]", ["holds a JSON list, not an object"]),
        (b"\xff\xfe\x00", ["is not UTF-8 text"]),
        (b'{"hidden_size": 8}', ["has no `model_type`"]),
    ],
)
def test_damaged_config_file_is_one_line_naming_it(capsys, tmp_path, content, fragments):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    assert_one_line_error(capsys, ["estimate", str(path)], [str(path), *fragments], 30)


def test_model_directory_without_config_and_missing_path_name_what_to_pass(capsys, tmp_path):
    assert_one_line_error(capsys, ["estimate", str(tmp_path)], [str(tmp_path), "has no config.json"], 30)
    missing = str(tmp_path / "nope.json")
    assert_one_line_error(capsys, ["estimate", missing], [missing, "no such file or directory"], 30)


def test_pattern_budget_keeps_a_timer_already_armed():
    """pytest-timeout (and any caller) arms SIGALRM too: the budget must not cancel its deadline."""
    from hf_galore.memory.inputs import check_patterns_in_time

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        check_patterns_in_time(["q_proj|v_proj"], ["model.layers.0.self_attn.q_proj"] * 10, budget_s=1.0)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
