"""Declarations: option checks and parsing, merged options, state tensor bytes."""

from __future__ import annotations

import pytest
import torch

from hf_galore.declare import (
    Option,
    StateTensor,
    at_least,
    check_fraction,
    check_positive_int,
    layout_bytes,
    merge_options,
    one_of,
    parse_text,
)
from hf_galore.errors import GaLoreConfigError


@pytest.mark.parametrize(
    "default,raw,expected",
    [(8, "16", 16), (0.5, "0.25", 0.25), (True, "off", False), (False, "YES", True), (None, "none", None),
     (None, "int8", "int8"), ("std", "full", "full")],
)
def test_text_is_parsed_by_the_type_of_the_default(default, raw, expected):
    value = parse_text("key", raw, default)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("default,raw,message", [(8, "1.5", "an integer"), (0.5, "x", "a number"),
                                                  (True, "maybe", "true or false")])
def test_text_that_does_not_parse_names_the_key_and_the_form(default, raw, message):
    with pytest.raises(GaLoreConfigError, match=f"`key` in `optim_args` must be {message}, got '{raw}'"):
        parse_text("key", raw, default)


def test_checks_name_the_key_the_value_and_the_range():
    with pytest.raises(GaLoreConfigError, match=r"`n` must be a positive integer \(>= 1\), got True"):
        Option("n", 1, check_positive_int).validate(True)
    with pytest.raises(GaLoreConfigError, match=r"`f` must be in \[0, 1\], got 1.5"):
        check_fraction("f", 1.5)
    with pytest.raises(GaLoreConfigError, match="`g` must be >= 1, got 0.5"):
        at_least(1)("g", 0.5)
    with pytest.raises(GaLoreConfigError, match="`c` must be one of 'a', 'b', got 'z'"):
        one_of("a", "b")("c", "z")
    assert one_of("a", "b")("c", "a") == "a"


def test_the_same_key_may_be_declared_twice_only_the_same_way():
    shared = Option("k", 1, check_positive_int, "help")
    assert merge_options([("a", (shared,)), ("b", (Option("k", 1, check_positive_int, "help"),))]) == {"k": shared}
    with pytest.raises(GaLoreConfigError, match="'k' is declared by both a \\(default 1\\) and b \\(default 2\\)"):
        merge_options([("a", (shared,)), ("b", (Option("k", 2, check_positive_int, "help"),))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int64])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5)])
def test_state_tensor_bytes_are_those_of_the_tensor(shape, dtype):
    assert StateTensor(shape, dtype).nbytes == torch.empty(shape, dtype=dtype).nbytes
    layout = {"a": StateTensor(shape, dtype), "b": StateTensor((2,), torch.float32)}
    assert layout_bytes(layout) == torch.empty(shape, dtype=dtype).nbytes + 8
