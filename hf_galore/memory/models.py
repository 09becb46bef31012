"""Where the estimated model comes from: shipped presets, config files, hub ids, built on the meta device."""

from __future__ import annotations

import difflib
import importlib.resources
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import GaLoreConfigError, UnsupportedSetupError, one_line
from .inputs import check_config_sizes, read_config_file


# ------------------------------------------------------------------ model lookup
def _preset_dir():
    return importlib.resources.files("hf_galore").joinpath("presets")


def preset_names() -> list[str]:
    """Shipped LLaMA configs (GaLore's ``configs/llama_*.json``, Table 5 shapes, and LLaMA-13B's)."""
    names = [p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json")]
    return sorted(names, key=_preset_size)


def _preset_size(name: str) -> float:
    match = re.search(r"(\d+)([mb])$", name)
    if not match:
        return math.inf
    return int(match.group(1)) * (1e3 if match.group(2) == "b" else 1)


def load_preset(name: str):
    """The transformers config of a shipped preset (``llama_60m`` … ``llama_13b``)."""
    from transformers import AutoConfig

    path = _preset_dir().joinpath(f"{name}.json")
    if not path.is_file():
        raise GaLoreConfigError(f"unknown preset {name!r}; shipped presets: {', '.join(preset_names())}")
    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _load_config(spec: str):
    if spec in preset_names():
        return load_preset(spec)
    from transformers import AutoConfig

    if os.path.isfile(spec):
        return read_config_file(spec)
    if os.path.isdir(spec):
        path = os.path.join(spec, "config.json")
        if not os.path.isfile(path):
            raise GaLoreConfigError(
                f"`model` directory {spec!r} has no config.json; pass a model directory, a config file, "
                f"a shipped preset ({', '.join(preset_names())}) or a hub id"
            )
        return read_config_file(path)
    presets = ", ".join(preset_names())
    close = difflib.get_close_matches(spec, preset_names(), n=1, cutoff=0.8)
    if close:  # a mistyped preset: do not wait for the hub
        raise GaLoreConfigError(f"unknown preset {spec!r} (did you mean {close[0]!r}?); shipped presets: {presets}")
    if spec.endswith(".json") or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        # a path, not a hub id (``org/name``): say so instead of asking the hub
        raise GaLoreConfigError(f"`model` {spec!r}: no such file or directory (and not a shipped preset: {presets})")
    try:
        return AutoConfig.from_pretrained(spec)
    except Exception as exc:  # noqa: BLE001 - OSError / ValueError from transformers, huggingface_hub validation
        raise GaLoreConfigError(
            f"`model` {spec!r} is neither a shipped preset ({presets}), a config "
            f"file or directory, nor a reachable hub id ({one_line(exc)})"
        ) from None


def _model_from_config(config, source: str | None = None) -> nn.Module:
    """Build the model on the meta device: shapes only, no memory, ~1 s for 7B; ``source`` names it in errors."""
    import transformers

    source = source or f"config {type(config).__name__}"
    check_config_sizes(config, source)
    builders = []
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is not None:
            builders.append(cls._from_config)
    builders += [transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    last_error: Exception | None = None
    for build in builders:
        try:
            with torch.device("meta"):
                model = build(config)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, IndexError) as exc:
            last_error = exc
            continue
        model._hf_galore_built_from_config = True  # estimate_memory's note on configs without `architectures`
        return model
    raise UnsupportedSetupError(
        f"could not build a model from {source} ({type(config).__name__}, "
        f"model_type {getattr(config, 'model_type', None)!r}): {one_line(last_error or ValueError())}; "
        "fix the config's fields (or pass the model itself to estimate_memory)"
    )


def resolve_model(model_or_config: Any) -> tuple[nn.Module, Any]:
    """``(module, config or None)`` for a model, a transformers config, a preset, a path or a hub id."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config, getattr(model_or_config, "config", None)
    if isinstance(model_or_config, (str, os.PathLike)):
        spec = os.fspath(model_or_config)
        config = _load_config(spec)
        return _model_from_config(config, f"`model` {spec!r}"), config
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        PretrainedConfig = ()  # type: ignore[assignment]
    if isinstance(model_or_config, PretrainedConfig):
        return _model_from_config(model_or_config), model_or_config
    raise GaLoreConfigError(
        "`model_or_config` must be an nn.Module, a transformers config, a preset name "
        f"({', '.join(preset_names())}), a config path or a hub id; got {type(model_or_config).__name__}"
    )


# --------------------------------------------------------------- target selection
def select_target_modules(model: nn.Module, target_modules: str | Sequence[str] | None) -> list[str]:
    """Names of the modules whose weight is projected (GaLore) or adapted (LoRA).

    The same rules as ``galore_param_groups`` and the Trainer
    (:func:`hf_galore.targets.select_target_modules`): a list entry matches
    an exact name, a dot-bounded suffix, a full-match regex or a substring,
    a string is a full-match regex, ``"all-linear"``
    (and ``None``) means every linear but the output head; for LLaMA that is
    exactly the paper's selection, the attention and MLP linears.
    """
    from ..targets import select_target_modules as select

    spec = "all-linear" if target_modules is None else target_modules
    if not isinstance(spec, str):
        spec = list(spec)
    return list(select(model, spec).modules)
