"""hf_galore.checkpoint_files: each kind of damage is found and named, intact files pass."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from hf_galore.checkpoint_files import damaged_checkpoint_error, file_problem, find_damaged_file


def _torch_file(path):
    torch.save({"state": {0: {"exp_avg": torch.arange(4096.0)}}}, path)
    return path


def test_intact_files_pass(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    save_file({"w": torch.ones(8, 8)}, tmp_path / "model.safetensors")
    _torch_file(tmp_path / "optimizer.pt")
    (tmp_path / "README.md").write_text("")  # unknown kinds are not judged, even when empty
    assert find_damaged_file(tmp_path) is None
    for name in ("trainer_state.json", "model.safetensors", "optimizer.pt"):
        assert file_problem(tmp_path / name) is None
    assert damaged_checkpoint_error(tmp_path / "missing") is None


def _flip_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "damage", "problem"),
    [
        ("trainer_state.json", lambda p: p.write_text('{"global_step": '), r"invalid JSON \(Expecting value at line 1"),
        ("trainer_state.json", lambda p: p.write_bytes(b"\xff\xfe{}"), r"not UTF-8 text"),
        ("trainer_state.json", lambda p: p.write_text("[" * 100_000), r"nested too deeply|invalid JSON"),
        ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-10]), r"truncated: \d+ bytes, its header describes"),
        ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), r"damaged header: it claims"),
        ("model.safetensors", lambda p: p.write_bytes(b"\x01"), r"truncated: 1 bytes"),
        ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:100]), r"not a torch.save archive"),
        ("optimizer.pt", _flip_middle, r"fails its checksum|damaged archive"),
        ("optimizer.pt", lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
    ],
)
def test_damage_is_named(tmp_path, name, damage, problem):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text("{}")
    elif name.endswith(".safetensors"):
        save_file({"w": torch.ones(8, 8)}, path)
    else:
        _torch_file(path)
    damage(path)
    assert file_problem(path) is not None
    error = damaged_checkpoint_error(tmp_path)
    assert error is not None and name in str(error)
    assert re.search(problem, str(error)), str(error)
    assert "\n" not in str(error)
