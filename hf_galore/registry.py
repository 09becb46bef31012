"""Name -> entry registries (projectors, basis codecs, refresh policies, base optimizers, memory methods).

Registries are data: a dict filled by ``register``, which refuses duplicates,
and looked up by ``lookup``, whose error names the key and lists the valid
names, so a typo never falls through to a default. Entries of the component
registries carry their own declarations (``options``, see ``hf_galore.declare``);
``register`` refuses an entry whose option clashes with one another registered
component already declares, before it is selectable.
"""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

from .declare import merge_options
from .errors import GaLoreConfigError, format_choices

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A dict of ``entry.name -> entry`` for the user-facing key ``key``.

    ``declares_options``: entries carry ``options`` (group keys) that every
    low-rank group accepts; they must agree across all such registries.
    """

    #: every registry whose entries declare group keys, in creation order
    declaring: ClassVar[list[Registry]] = []

    def __init__(self, key: str, what: str, *, declares_options: bool = False) -> None:
        super().__init__()
        self.key = key
        self.what = what
        if declares_options:
            Registry.declaring.append(self)

    def register(self, entry: T) -> T:
        """Make ``entry`` selectable as ``<key>=entry.name``; names are unique."""
        name = entry.name  # type: ignore[attr-defined]
        if name in self:
            raise GaLoreConfigError(f"{self.what} {name!r} is already registered")
        if self in Registry.declaring:
            merge_options([*declared_options(), (f"{self.what} {name!r}", getattr(entry, "options", ()))])
        self[name] = entry
        return entry

    def unregister(self, name: object) -> T:
        """Remove and return the entry registered as ``name`` (tests, plugins that unload)."""
        entry = self.lookup(name)
        del self[name]
        return entry

    def lookup(self, name: object) -> T:
        """The entry registered as ``name``, or an error listing the valid names."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise GaLoreConfigError(f"`{self.key}` must be one of {format_choices(self)}, got {name!r}") from None


def declared_options() -> list[tuple[str, tuple]]:
    """``(component, options)`` of every entry of every option-declaring registry."""
    return [
        (f"{registry.what} {name!r}", tuple(getattr(entry, "options", ())))
        for registry in Registry.declaring
        for name, entry in registry.items()
    ]
