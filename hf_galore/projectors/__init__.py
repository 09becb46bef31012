"""Ways of finding the projection basis, selected by the param-group key ``projector``.

Adding a member is one file with a :class:`BasisFinder` subclass plus one
``register_projector`` line below.
"""

from __future__ import annotations

from ..registry import Registry
from .base import BasisFinder, Side
from .online_pca import OnlinePCAFinder
from .quantized import Int4Codec, Int8Codec
from .randomized import RandomizedFinder
from .storage import register_codec
from .svd import SVDFinder, top_singular_basis

PROJECTORS: Registry[BasisFinder] = Registry("projector", "projector")
register_projector = PROJECTORS.register
get_projector = PROJECTORS.lookup


register_projector(SVDFinder())
register_projector(RandomizedFinder())
register_projector(OnlinePCAFinder())

register_codec(Int8Codec())
register_codec(Int4Codec())

__all__ = ["PROJECTORS", "BasisFinder", "Side", "get_projector", "register_projector", "top_singular_basis"]
