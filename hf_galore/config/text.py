"""The text forms of a ``GaLoreConfig``: the ``optim_args`` grammar, typed values, ``--options`` JSON.

Kept apart from the fields (``hf_galore.config``) so that the grammar can be
read and tested on its own; the fields decide what a key means, this module
only how its text is written.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any, Literal, Union

from ..errors import GaLoreConfigError
from ..optim.validation import lowrank_options

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}



def split_optim_args(text: str | None) -> list[tuple[str, str]]:
    """``"rank=64, update_proj_gap=200"`` as ``[("rank", "64"), ("update_proj_gap", "200")]``.

    Entries are separated by commas (list values separate their items with
    ``;``). An entry without ``=``, a missing comma (``"rank=8 scale=0.5"``)
    and a key set twice are errors that show the accepted form.
    """
    if text is None:
        return []
    if not isinstance(text, str):
        raise GaLoreConfigError(f"`optim_args` must be a string like 'rank=64,scale=0.25', got {text!r}")
    another_key = re.compile(r"[\s;]+[A-Za-z_]\w*\s*=")  # inside a value: a missing comma before key=
    entries: list[tuple[str, str]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise GaLoreConfigError(
                f"`optim_args` entry {item!r} is not of the form key=value "
                "(expected e.g. 'rank=64, update_proj_gap=200, scale=0.25')"
            )
        if another_key.search(raw):  # "rank=8 update_proj_gap=2": a space or ';' where a comma belongs
            fixed = another_key.sub(lambda m: ", " + m.group(0).lstrip(" \t;"), item)
            raise GaLoreConfigError(
                f"`optim_args` entry {item!r} holds more than one key=value: separate keys with commas, "
                f"e.g. {fixed!r}"
            )
        if any(key == seen for seen, _ in entries):
            raise GaLoreConfigError(f"`optim_args` sets {key!r} twice")
        entries.append((key, raw))
    return entries


def options_from_text(value: object) -> object:
    """``options`` as a dict: ``None`` is empty, a string (the command line) is a JSON object.

    String values of the JSON are parsed by the type of the key's default,
    as ``optim_args`` values are (``{"oversample": "16"}`` gives 16).
    """
    if value is None:
        return {}
    if not isinstance(value, str):
        return value
    try:
        data = json.loads(value)
    except json.JSONDecodeError as err:
        data, reason = None, f" ({err.msg} at position {err.pos})"
    else:
        reason = ""
    if not isinstance(data, dict):
        raise GaLoreConfigError(
            f"`options` must be a dict or a JSON object such as '{{\"oversample\": 16}}', got {value!r}{reason}"
        )
    options = {}
    declared = lowrank_options()
    for key, raw in data.items():
        if isinstance(raw, str) and key in declared and not isinstance(declared[key].default, str):
            try:
                raw = declared[key].parse(raw)
            except GaLoreConfigError:
                pass  # kept as text: the key's own check names it with the valid range
        options[key] = raw
    return options


def parse_typed(key: str, raw: str, hint: Any) -> Any:
    """Turn ``raw`` text into a value of the annotated type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        if type(None) in args and raw.lower() in _NONE:
            return None
        options = [a for a in args if a is not type(None)]
        if any(typing.get_origin(a) is list for a in options):
            if str in options and ";" not in raw and raw.replace("_", "-") == "all-linear":
                return "all-linear"
            return [part.strip() for part in raw.split(";") if part.strip()]
        if len(options) == 1:
            return parse_typed(key, raw, options[0])
        return raw
    if origin is Literal:
        return raw
    if hint is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise GaLoreConfigError(f"`{key}` in `optim_args` must be true or false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            kind = "an integer" if hint is int else "a number"
            raise GaLoreConfigError(f"`{key}` in `optim_args` must be {kind}, got {raw!r}") from None
    if origin is list:
        return [part.strip() for part in raw.split(";") if part.strip()]
    return raw


__all__ = ["options_from_text", "parse_typed", "split_optim_args"]
