"""GaLoreConfig: defaults, optim_args parsing, validation, JSON, and the field-metadata mechanism."""

from __future__ import annotations

import dataclasses

import pytest

from hf_galore import GaLoreConfig, GaLoreConfigError

OPTIM_ARGS_CASES = [
    ("", {}),
    ("rank=64", {"rank": 64}),
    (
        "rank=64, update_proj_gap=200, scale=0.25, proj_type=std",
        {"rank": 64, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    ),
    ("scale=1e-1,proj_type=reverse_std", {"scale": 0.1, "proj_type": "reverse_std"}),
    ("quant=None", {"quant": None}),
    ("layerwise=true", {"layerwise": True}),
    ("layerwise=0", {"layerwise": False}),
    ("target_modules=q_proj;v_proj", {"target_modules": ["q_proj", "v_proj"]}),
    ("target_modules=all_linear", {"target_modules": "all-linear"}),
    ("exclude_modules=lm_head", {"exclude_modules": ["lm_head"]}),
    (
        "small_weights=error, refresh=fixed",
        {"small_weights": "error", "refresh": "fixed"},
    ),
]


@pytest.mark.parametrize("text,expected", OPTIM_ARGS_CASES)
def test_from_optim_args(text, expected):
    config = GaLoreConfig.from_optim_args(text)
    for key, value in expected.items():
        assert getattr(config, key) == value
    untouched = {f.name for f in dataclasses.fields(GaLoreConfig)} - set(expected)
    defaults = GaLoreConfig()
    assert all(getattr(config, k) == getattr(defaults, k) for k in untouched)


BAD_OPTIM_ARGS = [
    (
        "rnk=64",
        r"unknown GaLore setting 'rnk'.*Did you mean 'rank'.*Valid keys: .*update_proj_gap",
    ),
    ("rank=64,lr=3", r"unknown GaLore setting 'lr'.*Valid keys:"),
    ("rank=sixty", r"`rank` in `optim_args` must be an integer, got 'sixty'"),
    ("rank=6.5", r"`rank` in `optim_args` must be an integer, got '6.5'"),
    ("scale=big", r"`scale` in `optim_args` must be a number"),
    ("layerwise=maybe", r"`layerwise` in `optim_args` must be true or false"),
    ("rank", r"entry 'rank' is not of the form key=value"),
    ("=3", r"entry '=3' is not of the form key=value"),
    ("rank=4,rank=8", r"sets 'rank' twice"),
    ("rank=0", r"`rank` must be a positive integer"),
    ("proj_type=diagonal", r"`proj_type` must be one of .*'std'.*got 'diagonal'"),
    ("projector=magic", r"`projector` must be one of .*'svd'.*got 'magic'"),
    ("quant=int3", r"`quant` must be one of .*got 'int3'"),
    ("refresh=sometimes", r"`refresh` must be one of .*'fixed'.*got 'sometimes'"),
    (
        "small_weights=ignore",
        r"`small_weights` must be one of 'error', 'full_rank', got 'ignore'",
    ),
    # a space (or ';') where a comma belongs: say so, with the corrected text
    (
        "rank=8 update_proj_gap=2",
        (
            r"entry 'rank=8 update_proj_gap=2' holds more than one key=value: separate keys with commas, "
            r"e.g. 'rank=8, update_proj_gap=2'"
        ),
    ),
    ("scale=0.5, rank=8  proj_type = std", r"separate keys with commas, e.g. 'rank=8, proj_type = std'"),
    ("rank=8;scale=0.5", r"separate keys with commas, e.g. 'rank=8, scale=0.5'"),
]


@pytest.mark.parametrize("text,message", BAD_OPTIM_ARGS)
def test_bad_optim_args(text, message):
    with pytest.raises(GaLoreConfigError, match=message):
        GaLoreConfig.from_optim_args(text)


BAD_FIELDS = [
    ({"rank": 0}, r"`rank` must be a positive integer .* got 0"),
    ({"rank": 8.0}, r"`rank` must be a positive integer"),
    ({"update_proj_gap": -1}, r"`update_proj_gap` must be a positive integer"),
    ({"scale": float("nan")}, r"`scale` must be a finite number > 0"),
    ({"target_modules": []}, r"`target_modules` must be a non-empty list"),
    ({"target_modules": ["q_proj", 3]}, r"`target_modules` must be a non-empty list"),
    ({"target_modules": ""}, r"`target_modules` must not be an empty string"),
    (
        {"exclude_modules": 5},
        r"`exclude_modules` must be None, a list of module names, a regex string",
    ),
    ({"layerwise": "yes"}, r"`layerwise` must be True or False"),
]


@pytest.mark.parametrize("kwargs,message", BAD_FIELDS)
def test_post_init_validates(kwargs, message):
    with pytest.raises(GaLoreConfigError, match=message):
        GaLoreConfig(**kwargs)


def test_defaults_match_the_paper_and_galore_torch():
    """The paper's values; the projector is "auto", which is galore-torch's exact SVD below its size switch
    (tests/projectors/test_auto.py)."""
    config = GaLoreConfig()
    expected = {
        "rank": 128,
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
        "projector": "auto",
        "quant": None,
        "refresh": "fixed",
    }
    options = config.group_options()
    assert {k: options[k] for k in expected} == expected
    assert (config.target_modules, config.exclude_modules, config.layerwise) == (
        None,
        None,
        False,
    )


def test_target_spec_normalisation():
    assert GaLoreConfig(target_modules="all_linear").target_modules == "all-linear"
    assert GaLoreConfig(target_modules=("q_proj", "v_proj")).target_modules == [
        "q_proj",
        "v_proj",
    ]
    assert GaLoreConfig(target_modules={"v_proj", "q_proj"}).target_modules == [
        "q_proj",
        "v_proj",
    ]


def test_overrides_and_conflicts():
    config = GaLoreConfig.from_optim_args("rank=8", target_modules=["attn", "mlp"], layerwise=True)
    assert (config.rank, config.target_modules, config.layerwise) == (
        8,
        ["attn", "mlp"],
        True,
    )
    same = GaLoreConfig.from_optim_args("target_modules=attn;mlp", target_modules=("attn", "mlp"))
    assert same.target_modules == ["attn", "mlp"]
    with pytest.raises(GaLoreConfigError, match=r"`target_modules` is set twice with different values"):
        GaLoreConfig.from_optim_args("target_modules=q_proj", target_modules=["attn"])
    with pytest.raises(GaLoreConfigError, match=r"unknown GaLore setting 'rnak'.*Did you mean 'rank'"):
        GaLoreConfig.from_optim_args("", rnak=3)


def test_json_round_trip(tmp_path):
    config = GaLoreConfig(
        rank=16,
        update_proj_gap=50,
        scale=0.5,
        proj_type="left",
        target_modules=["q_proj"],
        exclude_modules=r".*\.0\..*",
        layerwise=True,
        small_weights="error",
    )
    assert GaLoreConfig.from_json_string(config.to_json_string()) == config
    path = tmp_path / "galore.json"
    config.to_json_file(path)
    assert GaLoreConfig.from_json_file(path) == config
    with pytest.raises(GaLoreConfigError, match=r"unknown GaLore setting 'ranks' in the config dict"):
        GaLoreConfig.from_dict({**config.to_dict(), "ranks": 3})
    with pytest.raises(GaLoreConfigError, match="must be an object"):
        GaLoreConfig.from_json_string("[1, 2]")


def test_group_keys_without_a_field_flow_through_options():
    """Keys the optimizers know (LOWRANK_DEFAULTS) are settable from optim_args and reach the groups."""
    config = GaLoreConfig.from_optim_args("rank=8, projector=randomized, oversample=16, rotate_moments=true")
    assert config.options == {"oversample": 16, "rotate_moments": True}
    assert config.group_options()["oversample"] == 16 and config.group_options()["projector"] == "randomized"
    assert GaLoreConfig.from_json_string(config.to_json_string()) == config
    assert GaLoreConfig.from_dict({"rank": 8, "oversample": 16}).options == {"oversample": 16}
    with pytest.raises(GaLoreConfigError, match=r"`oversample` must be an integer >= 0, got -1"):
        GaLoreConfig.from_optim_args("oversample=-1")
    with pytest.raises(GaLoreConfigError, match=r"`oversample` in `optim_args` must be an integer"):
        GaLoreConfig.from_optim_args("oversample=many")
    with pytest.raises(GaLoreConfigError, match=r"unknown GaLore setting 'oversampling' in `options`"):
        GaLoreConfig(options={"oversampling": 3})
    with pytest.raises(GaLoreConfigError, match=r"`options` sets 'rank', which is a field"):
        GaLoreConfig(options={"rank": 3})


def test_a_field_named_like_a_group_key_flows_to_the_groups():
    """Promoting a group key to a documented field needs no other wiring."""
    extended = dataclasses.make_dataclass(
        "ExtendedConfig",
        [
            (
                "oversample",
                int,
                dataclasses.field(default=4, metadata={"help": "extra columns"}),
            ),
            (
                "note",
                str,
                dataclasses.field(default="x", metadata={"help": "not a group key"}),
            ),
        ],
        bases=(GaLoreConfig,),
    )
    config = extended.from_optim_args("rank=8, oversample=10, note=hi")
    assert config.group_options()["oversample"] == 10 and "note" not in config.group_options()
    with pytest.raises(GaLoreConfigError, match=r"`oversample` must be an integer >= 0"):
        extended(oversample=-2)


def test_hf_argument_parser_reads_the_config():
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser(GaLoreConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--rank",
            "8",
            "--proj_type",
            "left",
            "--target_modules",
            "all-linear",
            "--layerwise",
            "true",
        ]
    )
    assert (config.rank, config.proj_type, config.target_modules, config.layerwise) == (
        8,
        "left",
        "all-linear",
        True,
    )


HF_ARGUMENT_CASES = [  # (command line, (target_modules, exclude_modules, options))
    (["--target_modules", "q_proj", "v_proj"], (["q_proj", "v_proj"], None, {})),
    (["--target_modules", "q_proj"], (["q_proj"], None, {})),  # one value: a one-item list, as optim_args
    (["--target_modules", "all-linear"], ("all-linear", None, {})),
    (["--exclude_modules", "lm_head", "mlp.down_proj"], (None, ["lm_head", "mlp.down_proj"], {})),
    (["--options", '{"oversample": 16}'], (None, None, {"oversample": 16})),
    (["--options", '{"oversample": 16, "proj_seed": "3", "rotate_moments": true}'],
     (None, None, {"oversample": 16, "proj_seed": 3, "rotate_moments": True})),
    ([], (None, None, {})),
]


@pytest.mark.parametrize("argv,expected", HF_ARGUMENT_CASES)
def test_hf_argument_parser_reads_list_and_dict_fields(argv, expected):
    """Issue 14: `--target_modules q_proj v_proj` and `--options '{...}'` parse as TrainingArguments' fields do."""
    transformers = pytest.importorskip("transformers")
    (config,) = transformers.HfArgumentParser(GaLoreConfig).parse_args_into_dataclasses(argv)
    assert (config.target_modules, config.exclude_modules, config.options) == expected


def test_hf_argument_parser_matches_training_arguments():
    """The same command-line forms give the same Python values as transformers' own list / dict arguments."""
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser((GaLoreConfig, transformers.TrainingArguments))
    config, args = parser.parse_args_into_dataclasses(
        ["--output_dir", "unused", "--target_modules", "q_proj", "v_proj", "--label_names", "q_proj", "v_proj",
         "--options", '{"oversample": 16}', "--lr_scheduler_kwargs", '{"oversample": 16}']
    )  # fmt: skip
    assert config.target_modules == args.label_names == ["q_proj", "v_proj"]
    assert config.options == args.lr_scheduler_kwargs == {"oversample": 16}


@pytest.mark.parametrize("text", ['{"oversample": 16', '[16]', "oversample=16"])
def test_options_text_that_is_no_json_object_is_refused(text):
    with pytest.raises(GaLoreConfigError, match=r"`options` must be a dict or a JSON object"):
        GaLoreConfig(options=text)


def test_options_from_text_are_still_checked():
    with pytest.raises(GaLoreConfigError, match="'oversampel'.*Did you mean 'oversample'"):
        GaLoreConfig(options='{"oversampel": 16}')
    with pytest.raises(GaLoreConfigError, match="`oversample` must be an integer"):
        GaLoreConfig(options='{"oversample": "many"}')
    assert GaLoreConfig(options=None).options == {}


def test_every_field_documents_itself():
    for f in dataclasses.fields(GaLoreConfig):
        assert f.metadata.get("help"), f.name
        assert f"{f.name}:" in GaLoreConfig.__doc__, f.name


def test_fidelity_and_energy_guard_keys_parse_from_optim_args():
    config = GaLoreConfig.from_optim_args(
        "rank=8, osd_order=update_then_project, lazy_schedule=offset, energy_threshold=0.95, energy_iters=0"
    )
    options = config.group_options()
    assert options["osd_order"] == "update_then_project" and options["lazy_schedule"] == "offset"
    assert options["energy_threshold"] == 0.95 and options["energy_iters"] == 0
    import torch

    from hf_galore import GaLoreAdamW

    group = GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": 2}]).param_groups[0]
    assert (group["osd_order"], group["lazy_schedule"]) == ("project_then_update", "multiple")
    assert (group["energy_threshold"], group["energy_iters"]) == (0.99, 2)
    with pytest.raises(GaLoreConfigError, match="`osd_order`"):
        GaLoreConfig.from_optim_args("rank=8, osd_order=later")
