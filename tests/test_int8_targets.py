"""``load_checkpoint_into_int8``: a float checkpoint loads straight into INT8 layers, never as a float model."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_galore import GaLoreConfigError, Int8Linear, load_checkpoint_into_int8, prepare_model_for_int8_weights
from hf_galore.int8_targets import checkpoint_files

CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "tie_word_embeddings": False,
}


def _float_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides})).to(torch.bfloat16)


def _save_sharded(model: torch.nn.Module, directory, shards: int = 3) -> list:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    size = -(-len(keys) // shards)
    paths = []
    for i in range(shards):
        path = directory / f"model-{i}.safetensors"
        save_file({k: state[k] for k in keys[i * size : (i + 1) * size]}, str(path))
        paths.append(path)
    return paths


def _empty_model(**overrides) -> LlamaForCausalLM:
    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides}))
    return model.to(torch.bfloat16)


def test_sharded_float_checkpoint_loads_into_int8_layers_as_converting_the_float_model(tmp_path):
    reference = _float_model()
    paths = _save_sharded(reference, tmp_path)
    prepare_model_for_int8_weights(reference, "all-linear")

    model = _empty_model()
    names = prepare_model_for_int8_weights(model, "all-linear")
    assert all(isinstance(model.get_submodule(n), Int8Linear) for n in names)
    assert model.get_submodule(names[0]).weight_int8.is_meta  # nothing quantized yet
    load_checkpoint_into_int8(model, paths, progress=False)

    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_directory_with_index_and_tied_embeddings(tmp_path):
    import json

    reference = _float_model(tie_word_embeddings=True)
    paths = _save_sharded(reference, tmp_path, shards=2)
    state = reference.state_dict()
    weight_map = {}
    for path in paths:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            weight_map.update({k: path.name for k in handle.keys()})  # noqa: SIM118 (safe_open is not iterable)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert checkpoint_files(tmp_path) == sorted(paths)

    model = _empty_model(tie_word_embeddings=True)
    prepare_model_for_int8_weights(model, "all-linear")
    load_checkpoint_into_int8(model, tmp_path, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])


def test_a_missing_shard_is_named(tmp_path):
    paths = _save_sharded(_float_model(), tmp_path)
    model = _empty_model()
    prepare_model_for_int8_weights(model, "all-linear")
    with pytest.raises(GaLoreConfigError, match=r"did not provide \d+ tensor\(s\).*model\."):
        load_checkpoint_into_int8(model, paths[:-1], progress=False)


@pytest.mark.parametrize("bad", ["missing.safetensors", "empty_dir"])
def test_bad_checkpoint_paths_are_refused(tmp_path, bad):
    target = tmp_path / bad
    if bad == "empty_dir":
        target.mkdir()
    with pytest.raises(GaLoreConfigError, match="`checkpoint`"):
        checkpoint_files(target)
