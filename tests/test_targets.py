"""Module selection (names, suffixes, containers, substrings, regex, all-linear) and the param groups."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hf_galore import (
    GaLoreAdamW,
    GaLoreConfig,
    GaLoreConfigError,
    TargetModulesError,
    galore_param_groups,
)
from hf_galore.targets import plan_param_groups, select_target_modules


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d // 2, bias=False)
        self.o_proj = nn.Linear(d // 2, d)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.input_layernorm = nn.LayerNorm(d)


class TinyLM(nn.Module):
    """Names shaped like a transformers decoder: model.layers.N.{self_attn,mlp}, lm_head."""

    def __init__(self, d: int = 16, vocab: int = 40, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        for block in self.model.layers:
            a = block.self_attn
            h = h + a.o_proj(a.v_proj(block.input_layernorm(h))) + block.mlp(h) + a.q_proj(h)
        return self.lm_head(self.model.norm(h))


def _layer(i: int, *leaves: str) -> list[str]:
    return [f"model.layers.{i}.{leaf}" for leaf in leaves]


ATTN = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.0", "mlp.2")

MATCH_CASES = [
    # (target_modules, exclude_modules, expected module names in model order)
    (["q_proj"], None, _layer(0, "self_attn.q_proj") + _layer(1, "self_attn.q_proj")),
    (["self_attn.q_proj", "v_proj"], None, _layer(0, *ATTN[:2]) + _layer(1, *ATTN[:2])),
    (["model.layers.1.self_attn.o_proj"], None, _layer(1, "self_attn.o_proj")),
    (
        ["mlp"],
        None,
        _layer(0, *MLP) + _layer(1, *MLP),
    ),  # a container selects its 2-D weights
    (
        ["attn", "mlp"],
        None,
        _layer(0, *ATTN, *MLP) + _layer(1, *ATTN, *MLP),
    ),  # the paper's usage
    (
        ["mlp", "attn"],
        None,
        _layer(0, *ATTN, *MLP) + _layer(1, *ATTN, *MLP),
    ),  # order of entries irrelevant
    (
        r".*\.q_proj",
        None,
        _layer(0, "self_attn.q_proj") + _layer(1, "self_attn.q_proj"),
    ),
    (r"model\.layers\.0\.mlp", None, _layer(0, *MLP)),
    (
        r"q_proj",
        None,
        None,
    ),  # regex is a full match: no module is named exactly 'q_proj'
    (
        "all-linear",
        None,
        _layer(0, *ATTN, *MLP) + _layer(1, *ATTN, *MLP),
    ),  # lm_head skipped
    ("all-linear", ["layers.0"], _layer(1, *ATTN, *MLP)),  # excludes win
    ("all-linear", r".*\.mlp\..*", _layer(0, *ATTN) + _layer(1, *ATTN)),
    (
        ["attn"],
        ["v_proj"],
        _layer(0, "self_attn.q_proj", "self_attn.o_proj") + _layer(1, "self_attn.q_proj", "self_attn.o_proj"),
    ),
    (["lm_head"], None, ["lm_head"]),  # named explicitly, the head can be projected
    (["embed_tokens"], None, ["model.embed_tokens"]),  # so can a dense embedding
]


@pytest.mark.parametrize("targets,excludes,expected", MATCH_CASES)
def test_matching(targets, excludes, expected):
    model = TinyLM()
    if expected is None:
        with pytest.raises(TargetModulesError):
            select_target_modules(model, targets, excludes)
        return
    assert list(select_target_modules(model, targets, excludes).modules) == expected


def test_substring_fallback_is_noted():
    notes = select_target_modules(TinyLM(), ["attn", "mlp"]).notes
    assert len(notes) == 1 and "'attn'" in notes[0] and "substring" in notes[0]


BAD_TARGETS = [
    (
        ["q_prj"],
        None,
        r"entry 'q_prj' matched no module of TinyLM .*Closest module names: 'q_proj'",
    ),
    (["attn", "feed_forward"], None, r"entry 'feed_forward' matched no module"),
    (
        r".*\.query",
        None,
        r"matched no module of TinyLM \(a string is a regex matched against the whole name\)",
    ),
    (r"(", None, r"`target_modules` '\(' is not a valid regex"),
    (
        ["norm"],
        None,
        r"entry 'norm' matched \['model.norm'\] but none of them holds a weight with 2 or more",
    ),
    (["q_proj"], ["self_attn"], r"leaves no module with a 2-D weight"),
    (None, None, r"`target_modules` is not set: .*'all-linear'"),
]


@pytest.mark.parametrize("targets,excludes,message", BAD_TARGETS)
def test_bad_targets(targets, excludes, message):
    with pytest.raises(GaLoreConfigError, match=message):
        select_target_modules(TinyLM(), targets, excludes)


def test_unmatched_exclude_warns():
    with pytest.warns(UserWarning, match="excluded no module"):
        select_target_modules(TinyLM(), ["q_proj"], ["nothing_like_this"])


def test_sparse_non_float_and_frozen_targets():
    model = TinyLM()
    model.model.embed_tokens.sparse = True
    with pytest.raises(
        GaLoreConfigError,
        match=r"`model.embed_tokens` produces sparse gradients.*sparse=False",
    ):
        select_target_modules(model, ["embed_tokens"])
    model = TinyLM()
    model.model.layers[0].self_attn.q_proj.weight = nn.Parameter(
        torch.zeros(16, 16, dtype=torch.int8), requires_grad=False
    )
    with pytest.raises(
        GaLoreConfigError,
        match=r"`model.layers.0.self_attn.q_proj.weight` has dtype torch.int8",
    ):
        select_target_modules(model, ["q_proj"])
    model = TinyLM()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    selection = select_target_modules(model, ["q_proj"])
    assert list(selection.modules) == ["model.layers.1.self_attn.q_proj"]
    assert "frozen" in selection.notes[0]
    model.model.layers[1].self_attn.q_proj.weight.requires_grad_(False)
    with pytest.raises(TargetModulesError, match="frozen weight"):
        select_target_modules(model, ["q_proj"])


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_split_lowrank_fullrank_and_decay():
    model = TinyLM()
    config = GaLoreConfig(rank=4, update_proj_gap=10, scale=0.5, target_modules=["attn", "mlp"])
    groups = galore_param_groups(model, config, weight_decay=0.1)
    named = dict(model.named_parameters())
    lowrank = [g for g in groups if "rank" in g]
    full = [g for g in groups if "rank" not in g]
    low_ids = set().union(*(_ids(g["params"]) for g in lowrank))
    expected_low = {id(p) for n, p in named.items() if n.endswith("weight") and ("self_attn" in n or "mlp" in n)}
    assert low_ids == expected_low and len(low_ids) == 10
    assert all(g["rank"] == 4 and g["update_proj_gap"] == 10 and g["scale"] == 0.5 for g in lowrank)
    # Every trainable parameter exactly once.
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    no_decay = set().union(*(_ids(g["params"]) for g in groups if g["weight_decay"] == 0.0))
    expected_no_decay = {id(p) for n, p in named.items() if "bias" in n or "norm" in n}
    assert no_decay == expected_no_decay
    assert all(g["weight_decay"] == 0.1 for g in groups if not (_ids(g["params"]) & expected_no_decay))
    assert {
        id(named["lm_head.weight"]),
        id(named["model.embed_tokens.weight"]),
    } <= set().union(*(_ids(g["params"]) for g in full))
    # Without weight_decay the optimizer's default applies to decay groups; no-decay groups still get 0.
    groups = galore_param_groups(model, config)
    assert [g.get("weight_decay") for g in groups] == [None, None, 0.0]


def test_groups_drive_the_optimizer():
    model = TinyLM()
    config = GaLoreConfig(rank=4, target_modules="all-linear")
    optimizer = GaLoreAdamW(galore_param_groups(model, config, weight_decay=0.01), lr=1e-2)
    before = model.lm_head.weight.detach().clone()
    model(torch.arange(8).view(2, 4)).square().mean().backward()
    optimizer.step()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[q]["basis_right"].shape == (
        16,
        4,
    )  # projected: m >= n → right basis (n, r)
    assert "basis_right" not in optimizer.state[model.lm_head.weight]
    assert not torch.equal(before, model.lm_head.weight)


def test_small_weights_full_rank_or_error():
    model = TinyLM()  # v_proj is 8x16, o_proj 16x8: smaller dimension 8
    config = GaLoreConfig(rank=8, target_modules=["attn"])
    with pytest.warns(UserWarning, match=r"4 matched weights have a smaller dimension <= `rank`=8"):
        plan = plan_param_groups(model, config)
    assert [n for n, _ in plan.small] == [
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ]
    assert [n for n, _ in plan.lowrank] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    small_ids = {id(dict(model.named_parameters())[n]) for n, _ in plan.small}
    assert all(not (_ids(g["params"]) & small_ids) for g in plan.groups if "rank" in g)
    strict = GaLoreConfig(rank=8, target_modules=["attn"], small_weights="error")
    with pytest.raises(
        GaLoreConfigError,
        match=r"`rank`=8 is >= the smaller dimension of 4 matched weights, "
        r"e.g. model.layers.0.self_attn.v_proj.weight \(8, 16\)",
    ):
        plan_param_groups(model, strict)
    with (
        pytest.raises(GaLoreConfigError, match=r"smaller dimension of every matched weight"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        plan_param_groups(model, GaLoreConfig(rank=64, target_modules=["attn"]))
