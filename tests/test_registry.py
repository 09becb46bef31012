"""Registries refuse duplicates and name the valid choices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hf_galore import GaLoreConfigError
from hf_galore.optim.schedules import REFRESH_POLICIES
from hf_galore.projectors import PROJECTORS
from hf_galore.projectors.storage import CODECS
from hf_galore.registry import Registry


def test_register_and_lookup():
    registry = Registry("widget", "widget")
    entry = SimpleNamespace(name="a")
    assert registry.register(entry) is entry
    assert registry.lookup("a") is entry


def test_duplicates_are_refused():
    registry = Registry("widget", "widget")
    registry.register(SimpleNamespace(name="a"))
    with pytest.raises(GaLoreConfigError, match="already registered"):
        registry.register(SimpleNamespace(name="a"))


@pytest.mark.parametrize("bad", ["b", None, ["unhashable"]])
def test_unknown_names_list_the_valid_ones(bad):
    registry = Registry("widget", "widget")
    registry.register(SimpleNamespace(name="a"))
    with pytest.raises(GaLoreConfigError, match=r"`widget` must be one of 'a', got"):
        registry.lookup(bad)


@pytest.mark.parametrize(
    "registry,expected",
    [
        (PROJECTORS, {"auto", "svd", "randomized", "online_pca"}),
        (CODECS, {None, "int8", "int4"}),
        (REFRESH_POLICIES, {"fixed", "staggered", "lazy"}),
    ],
)
def test_shipped_members(registry, expected):
    assert set(registry) == expected


def test_unregister_removes_the_entry_and_names_unknown_ones():
    registry = Registry("widget", "widget")
    entry = registry.register(SimpleNamespace(name="a"))
    assert registry.unregister("a") is entry and "a" not in registry
    with pytest.raises(GaLoreConfigError, match="`widget` must be one of"):
        registry.unregister("a")


def test_a_component_whose_option_clashes_is_not_registered():
    from hf_galore.declare import Option, check_positive_int

    clash = SimpleNamespace(name="clashing", options=(Option("oversample", 99, check_positive_int),))
    with pytest.raises(GaLoreConfigError, match="'oversample' is declared by both projector 'randomized'"):
        PROJECTORS.register(clash)
    assert "clashing" not in PROJECTORS
