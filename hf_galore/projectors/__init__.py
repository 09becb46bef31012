"""Ways of finding the projection basis, selected by the param-group key ``projector``.

Adding a member is one file with a :class:`BasisFinder` subclass (its
``options`` and ``state_layout`` declared on the class) plus one
``register_projector`` call, here or in the user's own code.
"""

from __future__ import annotations

from ..registry import Registry
from .auto import AutoFinder
from .base import BasisFinder, Side
from .online_pca import OnlinePCAFinder
from .quantized import Int4Codec, Int8Codec
from .randomized import RandomizedFinder
from .storage import register_codec
from .svd import SVDFinder, top_singular_basis

PROJECTORS: Registry[BasisFinder] = Registry("projector", "projector", declares_options=True)
register_projector = PROJECTORS.register
get_projector = PROJECTORS.lookup


register_projector(SVDFinder())
register_projector(RandomizedFinder())
register_projector(OnlinePCAFinder())
register_projector(AutoFinder())

register_codec(Int8Codec())
register_codec(Int4Codec())

__all__ = ["PROJECTORS", "BasisFinder", "Side", "get_projector", "register_projector", "top_singular_basis"]
