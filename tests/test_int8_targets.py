"""``load_checkpoint_into_int8``: a float checkpoint loads straight into INT8 layers, never as a float model."""

from __future__ import annotations

from pathlib import Path

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


# ------------------------------------------------------------ a checkpoint folder is untrusted input
def _indexed_checkpoint(directory, shards: int = 2) -> tuple[dict[str, str], list]:
    """A sharded checkpoint of the float model in ``directory`` with its index; returns (weight_map, paths)."""
    import json

    from safetensors import safe_open

    paths = _save_sharded(_float_model(), directory, shards=shards)
    weight_map = {}
    for path in paths:
        with safe_open(str(path), "pt") as handle:
            weight_map.update({k: path.name for k in handle.keys()})  # noqa: SIM118 (safe_open is not iterable)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map, paths


def _write_index(directory, weight_map: dict) -> None:
    import json

    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _int8_model() -> LlamaForCausalLM:
    model = _empty_model()
    prepare_model_for_int8_weights(model, "all-linear")
    return model


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entry_resolving_outside_the_folder_is_refused_naming_it(tmp_path, how):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(CONFIG["vocab_size"], CONFIG["hidden_size"])}, str(secret))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    weight_map, _ = _indexed_checkpoint(folder)
    if how == "dotdot":
        entry = "../elsewhere/secret.safetensors"
    elif how == "absolute":
        entry = str(secret)
    else:
        (folder / "linked.safetensors").symlink_to(secret)
        entry = "linked.safetensors"
    weight_map["model.embed_tokens.weight"] = entry
    _write_index(folder, weight_map)
    model = _int8_model()
    with pytest.raises(GaLoreConfigError) as info:
        load_checkpoint_into_int8(model, folder, progress=False)
    message = str(info.value)
    assert "'model.embed_tokens.weight'" in message and repr(entry) in message, message
    assert "outside the checkpoint folder" in message or "not a relative path inside" in message, message
    assert "\n" not in message
    assert model.model.embed_tokens.weight.is_meta  # nothing was read from outside


def test_symlinked_shard_of_a_hub_cache_snapshot_still_loads(tmp_path):
    """The hub cache links snapshots/<rev>/<file> to ../../blobs/<hash>: that is inside the checkpoint."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    weight_map, paths = _indexed_checkpoint(tmp_path)
    for i, path in enumerate(paths):
        blob = blobs / f"blob{i}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    _write_index(snapshot, weight_map)
    model = load_checkpoint_into_int8(_int8_model(), snapshot, progress=False)
    assert not any(p.is_meta for p in model.parameters())


def test_truncated_shard_is_one_error_naming_the_file(tmp_path):
    _, paths = _indexed_checkpoint(tmp_path)
    paths[1].write_bytes(paths[1].read_bytes()[:1000])
    with pytest.raises(GaLoreConfigError, match="cannot be read as safetensors") as info:
        load_checkpoint_into_int8(_int8_model(), tmp_path, progress=False)
    assert repr(str(paths[1])) in str(info.value) and "re-download or re-save" in str(info.value)


def test_index_that_is_not_json_is_one_error_naming_it(tmp_path):
    _indexed_checkpoint(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(index.read_text()[:50])
    with pytest.raises(GaLoreConfigError, match=r"is not valid JSON \(.* at line 1 column \d+\)") as info:
        load_checkpoint_into_int8(_int8_model(), tmp_path, progress=False)
    assert repr(str(index)) in str(info.value)


@pytest.mark.parametrize("content", ['{"metadata": {}}', "[1, 2]", '{"weight_map": {"lm_head.weight": 3}}'])
def test_index_without_a_weight_map_of_file_names_is_refused(tmp_path, content):
    _indexed_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(GaLoreConfigError, match="`checkpoint` index .*model.safetensors.index.json"):
        checkpoint_files(tmp_path)


def test_shard_missing_from_the_folder_is_named_before_anything_loads(tmp_path):
    _, paths = _indexed_checkpoint(tmp_path)
    paths[0].unlink()
    model = _int8_model()
    with pytest.raises(GaLoreConfigError, match="names 1 shard\\(s\\) that are not in the folder") as info:
        load_checkpoint_into_int8(model, tmp_path, progress=False)
    assert repr(str(paths[0])) in str(info.value)
    assert all(p.is_meta for p in model.parameters())


def test_shard_of_another_shape_is_named(tmp_path):
    paths = _save_sharded(_float_model(hidden_size=32, num_attention_heads=2), tmp_path, shards=1)
    with pytest.raises(GaLoreConfigError, match="does not fit the model: ") as info:
        load_checkpoint_into_int8(_int8_model(), paths, progress=False)
    assert repr(str(paths[0])) in str(info.value)
