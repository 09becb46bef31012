"""Untrusted input to the estimator: config files and ``--target-modules`` patterns, checked before they are used.

A config file or a pattern from the command line can be anything: a file of
10**7 layers (a meta model that takes days to build), a JSON nested 100,000
deep, a negative width, a regex that backtracks for hours. Each is refused
here with one message that names the file or argument, the bad value and
what to do, before transformers or ``re`` see it.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import GaLoreConfigError, one_line

#: Largest config file read: transformers configs are a few KB; a bigger file is not one (a weights file, say).
MAX_CONFIG_FILE_BYTES = 16 * 2**20

#: Deepest nesting of objects and lists read from a config file. Real configs nest 3 or 4 levels
#: (``text_config.rope_scaling``); transformers copies configs recursively, so 500 levels overflow the stack.
MAX_CONFIG_DEPTH = 32

#: Bounds of the sizes a config may ask the estimator for. The model is built on the meta device, module by
#: module, so the time grows with the layer (and expert) count: 1,024 layers take a few seconds, 10**7 would
#: take days. The largest published models have under 200 layers, widths under 60K and vocabularies under 300K.
MAX_LAYERS = 1024
MAX_EXPERTS = 1024
MAX_LAYER_EXPERTS = 2**16
MAX_WIDTH = 2**20
MAX_VOCAB = 2**22

#: Seconds a ``--target-modules`` pattern may take to match every module name of the model. A sane pattern
#: takes microseconds; one with nested quantifiers such as ``(.*)*x`` backtracks for hours in ``re``.
REGEX_BUDGET_S = 2.0

#: Config fields the estimator (and the meta model it builds) reads, by kind, with their upper bound.
_LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")
_WIDTH_FIELDS = (
    "hidden_size",
    "n_embd",
    "d_model",
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "head_dim",
    "moe_intermediate_size",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
)
_BOUNDS: dict[str, tuple[int, str]] = {
    **{f: (MAX_LAYERS, "layers") for f in _LAYER_FIELDS},
    **{f: (MAX_EXPERTS, "experts") for f in _EXPERT_FIELDS},
    **{f: (MAX_WIDTH, "widths and head counts") for f in _WIDTH_FIELDS},
    "vocab_size": (MAX_VOCAB, "vocabularies"),
}


def short(value: object, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters, so a huge bad value still gives a short message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def nesting_depth(data: Any) -> int:
    """How many objects / lists deep ``data`` nests (a scalar: 0), walked without recursion."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_config_sizes(config: Any, source: str) -> None:
    """Refuse config fields the estimator reads that are not positive integers within sane bounds.

    ``config`` is a transformers config or its dict (nested sub-configs such as
    ``text_config`` are checked too); ``source`` names it in the message. A
    bad size would otherwise surface as a traceback deep in transformers, or a
    meta model of 10**7 layers that takes days to build.
    """
    try:
        data = config if isinstance(config, dict) else config.to_dict()
    except RecursionError:
        raise GaLoreConfigError(
            f"{source} nests too deeply to be copied (over {MAX_CONFIG_DEPTH} levels); fix the config"
        ) from None
    stack: list[tuple[str, dict]] = [("", data)]
    layers = experts = 1
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
                continue
            if key not in _BOUNDS or value is None:
                continue
            bound, kind = _BOUNDS[key]
            values = value if isinstance(value, list) and value else [value]  # per-layer lists (Gemma3n, OpenELM)
            for item in values:
                if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
                    raise GaLoreConfigError(
                        f"{source}: `{prefix}{key}` must be a positive integer, got {short(value)}; fix the config"
                    )
                if item > bound:
                    raise GaLoreConfigError(
                        f"{source}: `{prefix}{key}`={item:,} is over {bound:,}, the bound hf_galore's estimator "
                        f"puts on {kind}; fix the config (no published model is that large)"
                    )
            if key in _LAYER_FIELDS:
                layers = max(layers, max(values))
            elif key in _EXPERT_FIELDS and key != "num_experts_per_tok":
                experts = max(experts, max(values))
    if layers * experts > MAX_LAYER_EXPERTS:
        raise GaLoreConfigError(
            f"{source}: {layers:,} layers x {experts:,} experts = {layers * experts:,} expert blocks, over "
            f"{MAX_LAYER_EXPERTS:,}, the bound hf_galore's estimator puts on them; fix the config"
        )


def read_config_file(path: str) -> Any:
    """A transformers config from a ``config.json``: every way the file can be bad is one message naming it."""
    from transformers import CONFIG_MAPPING, AutoConfig

    source = f"config file {path!r}"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise GaLoreConfigError(f"{source} cannot be read: {one_line(exc)}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise GaLoreConfigError(
            f"{source} is over {MAX_CONFIG_FILE_BYTES:,} bytes: it is not a transformers config "
            "(a config.json is a few KB); pass the config.json or its directory"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GaLoreConfigError(f"{source} is not UTF-8 text: it is not a transformers config (JSON)") from None
    if not text.strip():
        raise GaLoreConfigError(f"{source} is empty; a transformers config is a JSON object with a `model_type`")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GaLoreConfigError(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); fix the file"
        ) from None
    except RecursionError:
        raise GaLoreConfigError(
            f"{source} nests too deeply to be read (over {MAX_CONFIG_DEPTH} levels): it is not a transformers config"
        ) from None
    if not isinstance(data, dict):
        raise GaLoreConfigError(
            f"{source} holds a JSON {type(data).__name__}, not an object: it is not a transformers config"
        )
    depth = nesting_depth(data)
    if depth > MAX_CONFIG_DEPTH:
        raise GaLoreConfigError(
            f"{source} nests {depth:,} levels deep, over {MAX_CONFIG_DEPTH}: it is not a transformers config "
            "(they nest a few levels); fix the file"
        )
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise GaLoreConfigError(f"{source} has no `model_type`; it is not a transformers config")
    if not isinstance(model_type, str):
        raise GaLoreConfigError(f"{source}: `model_type` must be a string such as 'llama', got {short(model_type)}")
    check_config_sizes(data, source)
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise GaLoreConfigError(
            f"{source}: `model_type` {short(model_type)} is not a model type this transformers knows{hint}"
        )
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # noqa: BLE001 - transformers and huggingface_hub validate fields with many types
        raise GaLoreConfigError(f"{source} is not a valid {model_type} config: {one_line(exc)}") from None


class _PatternTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`_PatternTimeout` in this block after ``seconds`` (SIGALRM).

    ``re`` checks for signals while it backtracks, so the alarm interrupts a
    runaway match. Only the main thread of a POSIX process can take the
    alarm; elsewhere the block runs without a budget. A timer already armed
    (pytest-timeout's, say) keeps its deadline: if it is due first it is left
    alone, else it is re-armed with its remaining time afterwards.
    """
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, _ = signal.getitimer(signal.ITIMER_REAL)
    if 0 < pending <= seconds:
        yield
        return

    def expire(signum, frame):
        raise _PatternTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    pending, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending > 0:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - start), 1e-3), interval)


def check_patterns_in_time(patterns: Sequence[str], names: Sequence[str], budget_s: float = REGEX_BUDGET_S) -> None:
    """Refuse a ``--target-modules`` pattern that ``re`` cannot match against ``names`` within ``budget_s``.

    Target selection (``hf_galore.targets``) full-matches each pattern with
    ``re`` against every module name; this runs exactly those matches first,
    with the same engine, under a time budget, so a pattern that passes here
    matches as fast there, and one with catastrophic backtracking is an
    error instead of a hang.
    """
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error:
            continue  # target selection reports (or, in a list, skips) an invalid regex itself
        try:
            with _time_budget(budget_s):
                for name in names:
                    compiled.fullmatch(name)
        except _PatternTimeout:
            raise GaLoreConfigError(
                f"`--target-modules` pattern {short(pattern, 80)} took over {budget_s:g} s to match the model's "
                f"{len(names)} module names (catastrophic backtracking: a quantified group inside another, such "
                "as '(.*)*' or '(a+)+'); simplify it, e.g. '.*x' instead of '(.*)*x', or list module names"
            ) from None
