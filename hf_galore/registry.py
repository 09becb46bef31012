"""Name -> entry registries (projectors, basis codecs, refresh policies, memory methods).

Registries are data: a dict filled by ``register``, which refuses duplicates,
and looked up by ``lookup``, whose error names the key and lists the valid
names, so a typo never falls through to a default.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import GaLoreConfigError, format_choices

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A dict of ``entry.name -> entry`` for the user-facing key ``key``."""

    def __init__(self, key: str, what: str) -> None:
        super().__init__()
        self.key = key
        self.what = what

    def register(self, entry: T) -> T:
        """Make ``entry`` selectable as ``<key>=entry.name``; names are unique."""
        name = entry.name  # type: ignore[attr-defined]
        if name in self:
            raise GaLoreConfigError(f"{self.what} {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: object) -> T:
        """The entry registered as ``name``, or an error listing the valid names."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise GaLoreConfigError(f"`{self.key}` must be one of {format_choices(self)}, got {name!r}") from None
