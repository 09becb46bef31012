"""Ways of finding the projection basis, selected by the param-group key ``projector``.

Adding a member is one file with a :class:`BasisFinder` subclass plus one
``register_projector`` line below.
"""

from __future__ import annotations

from ..errors import GaLoreConfigError, format_choices
from .base import BasisFinder, Side
from .online_pca import OnlinePCAFinder
from .quantized import Int4Codec, Int8Codec
from .randomized import RandomizedFinder
from .storage import register_codec
from .svd import SVDFinder, top_singular_basis

PROJECTORS: dict[str, BasisFinder] = {}


def register_projector(finder: BasisFinder) -> BasisFinder:
    """Make ``finder`` selectable as ``projector=finder.name``; names are unique."""
    if finder.name in PROJECTORS:
        raise GaLoreConfigError(f"projector {finder.name!r} is already registered")
    PROJECTORS[finder.name] = finder
    return finder


def get_projector(name: str) -> BasisFinder:
    """Look up a registered finder, with the valid names in the error."""
    try:
        return PROJECTORS[name]
    except KeyError:
        raise GaLoreConfigError(
            f"`projector` must be one of {format_choices(PROJECTORS)}, got {name!r}"
        ) from None


register_projector(SVDFinder())
register_projector(RandomizedFinder())
register_projector(OnlinePCAFinder())

register_codec(Int8Codec())
register_codec(Int4Codec())

__all__ = ["BasisFinder", "PROJECTORS", "Side", "get_projector", "register_projector", "top_singular_basis"]
