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
        (PROJECTORS, {"svd", "randomized", "online_pca"}),
        (CODECS, {None, "int8", "int4"}),
        (REFRESH_POLICIES, {"fixed", "staggered", "lazy"}),
    ],
)
def test_shipped_members(registry, expected):
    assert set(registry) == expected
