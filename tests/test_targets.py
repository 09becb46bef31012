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


def test_each_entry_reports_the_rule_that_matched_it():
    selection = select_target_modules(TinyLM(), ["attn", "mlp", r".*\.q_proj", "lm_head"])
    rules = [(m.entry, m.rule, m.num_weights) for m in selection.matches]
    assert rules == [
        ("attn", "substring", 6),  # no module is named 'attn' or ends in '.attn'
        ("mlp", "dot-bounded suffix", 4),
        (r".*\.q_proj", "full-match regex", 2),
        ("lm_head", "exact name", 1),
    ]
    assert selection.matches[0].describe() == "target_modules 'attn' matched as a substring: 8 module names, 6 weights"


LIST_RULE_CASES = [
    # transformers' own example: each list entry is also a full-match regex ('.' matches any character)
    ([r".*.attn.*", r".*.mlp.*"], "full-match regex", _layer(0, *ATTN, *MLP) + _layer(1, *ATTN, *MLP)),
    ([r".*\.(q|v)_proj"], "full-match regex", _layer(0, *ATTN[:2]) + _layer(1, *ATTN[:2])),
    (["layers.1.self_attn"], "dot-bounded suffix", _layer(1, *ATTN)),
    (["self_attn.q"], "substring", _layer(0, "self_attn.q_proj") + _layer(1, "self_attn.q_proj")),
]


@pytest.mark.parametrize("targets,rule,expected", LIST_RULE_CASES)
def test_list_entries_try_name_suffix_regex_then_substring(targets, rule, expected):
    selection = select_target_modules(TinyLM(), targets)
    assert list(selection.modules) == expected
    assert {m.rule for m in selection.matches} == {rule}


def test_rule_order_first_match_wins():
    from hf_galore.targets import entry_roots

    names = ["a.q_proj", "a.q_proj_lora", "q_proj", "b.xq_proj"]
    assert entry_roots("q_proj", names) == ("exact name", ["a.q_proj", "q_proj"])  # suffix too, never substring
    assert entry_roots("a.q_proj", names) == ("exact name", ["a.q_proj"])
    assert entry_roots("q_proj.*", names) == ("full-match regex", ["q_proj"])
    assert entry_roots("xq_", names) == ("substring", ["b.xq_proj"])
    assert entry_roots("q_proj[", names) == (None, [])  # not a regex, no substring: no match, no crash
    assert entry_roots(".*proj", names) == ("full-match regex", ["a.q_proj", "q_proj", "b.xq_proj"])


class T5Like(nn.Module):
    """T5's layout: an attention container holding Linear layers and an nn.Embedding (relative_attention_bias)."""

    def __init__(self) -> None:
        super().__init__()
        attention = nn.Module()
        attention.q, attention.k, attention.o = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        attention.relative_attention_bias = nn.Embedding(32, 4)
        self.block = nn.ModuleList([nn.Module()])
        self.block[0].SelfAttention = attention


T5_LINEAR = ["block.0.SelfAttention.q", "block.0.SelfAttention.k", "block.0.SelfAttention.o"]
T5_CASES = [
    (["SelfAttention"], T5_LINEAR),  # a container: its Linear layers, not the Embedding
    (["Attention"], T5_LINEAR),  # a substring also hits relative_attention_bias itself: skipped
    (r".*SelfAttention.*", T5_LINEAR),  # so does a regex
    # named explicitly (dot-bounded suffix), the embedding is projected too
    (["SelfAttention", "relative_attention_bias"], [*T5_LINEAR, "block.0.SelfAttention.relative_attention_bias"]),
]


@pytest.mark.parametrize("targets,expected", T5_CASES)
def test_containers_and_patterns_take_linear_layers_only(targets, expected):
    selection = select_target_modules(T5Like(), targets)
    assert list(selection.modules) == expected
    if "relative_attention_bias" not in str(targets):
        assert any("Embedding" in n and "full rank" in n for n in selection.notes), selection.notes


def test_pattern_matching_only_non_linear_weights_is_an_error():
    with pytest.raises(TargetModulesError, match=r"'\.\*bias' matched .* but no linear layer.*name its module"):
        select_target_modules(T5Like(), [r".*bias"])


def test_exclude_typo_is_an_error_like_a_target_typo():
    with pytest.raises(
        TargetModulesError, match=r"`exclude_modules` entry 'v_prj' matched no module of TinyLM.*'v_proj'"
    ):
        select_target_modules(TinyLM(), ["attn"], ["v_prj"])
    with pytest.raises(TargetModulesError, match=r"`exclude_modules` entry '.*query' matched no module"):
        select_target_modules(TinyLM(), "all-linear", r".*\.query")
    selection = select_target_modules(TinyLM(), ["attn"], [r".*\.v_proj"])  # excludes use the same rules
    assert [m.rule for m in selection.matches] == ["substring", "full-match regex"]
    assert "v_proj" not in " ".join(selection.modules)


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


def test_exclude_that_removes_nothing_selected_warns():
    with pytest.warns(UserWarning, match="removed none of the modules `target_modules` selected"):
        select_target_modules(TinyLM(), ["q_proj"], ["v_proj"])


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


def test_rank_above_every_matched_weight_trains_them_at_full_rank_with_one_warning():
    """transformers' tiny test models at the default rank 128: nothing to project, so AdamW-like full rank."""
    model = TinyLM()  # attention weights: smaller sides 16, 8, 8
    config = GaLoreConfig(rank=64, target_modules=["attn"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_param_groups(model, config)
        plan_param_groups(model, config)  # the Trainer plans twice (check at Trainer(...), then the build)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert (
        "`rank`=64 is >= the smaller dimension of every one of the 6 matched weights (the largest is 16)"
        in (messages[0])
    )
    assert "0 weights are projected" in messages[0] and "small_weights='error'" in messages[0]
    assert plan.lowrank == [] and len(plan.small) == 6
    assert not any("rank" in g for g in plan.groups)  # every parameter in plain (AdamW-like) groups
    assert sorted(id(p) for g in plan.groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_param_groups(TinyLM(), config)  # another model: warned again
        plan_param_groups(model, GaLoreConfig(rank=32, target_modules=["attn"]))  # another setting: too
    assert len(caught) == 2
    strict = GaLoreConfig(rank=64, target_modules=["attn"], small_weights="error")
    with pytest.raises(GaLoreConfigError, match=r"`rank`=64 is >= the smaller dimension of 6 matched weights \(all"):
        plan_param_groups(model, strict)
    # the optimizer runs such groups: every weight moves, no basis anywhere
    optimizer = GaLoreAdamW(plan.groups, lr=1e-2)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model(torch.arange(8).view(2, 4)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    assert not any(k.startswith("basis") for state in optimizer.state.values() for k in state)


def test_t5_self_attention_container_leaves_relative_attention_bias_alone():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config)
    selection = select_target_modules(model, ["SelfAttention"])
    assert [n.rsplit(".", 1)[-1] for n in selection.modules] == ["q", "k", "v", "o"] * 2  # encoder, decoder
    assert "relative_attention_bias" in selection.notes[0] and "Embedding" in selection.notes[0]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", [r".*\.self_attn\..*"]])
def test_lora_factors_of_a_peft_model_are_refused(targets):
    """On a PEFT LoRA model the names match the adapter's lora_A / lora_B, which GaLore would project again."""
    peft = pytest.importorskip("peft")
    from tests import helpers

    model = peft.get_peft_model(
        helpers.tiny_llama(0, vocab=64, seq=16), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    )
    with pytest.raises(GaLoreConfigError, match=r"selects \d+ weights of PEFT adapters, e.g. \S+lora_[AB]\.default"):
        select_target_modules(model, targets)
    with pytest.raises(GaLoreConfigError, match="without `get_peft_model`"):
        galore_param_groups(model, GaLoreConfig(rank=4, target_modules=targets))


def test_a_peft_model_s_modules_to_save_may_be_projected():
    """`modules_to_save` copies are full trainable weights, not adapter factors: they stay selectable."""
    peft = pytest.importorskip("peft")
    from tests import helpers

    config = peft.LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["gate_proj"])
    model = peft.get_peft_model(helpers.tiny_llama(0, vocab=64, seq=16), config)
    selection = select_target_modules(model, ["gate_proj"])
    assert selection.modules and all("modules_to_save" in name for name in selection.modules)
