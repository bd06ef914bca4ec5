"""Model families: one small adapter per family, found by ``config.model_type``."""

from hfpipe.core.adapters.base import Adapter, UnsupportedModelError
from hfpipe.core.adapters.registry import get_adapter, register_adapter, supported_families
from hfpipe.core.adapters import deberta_v2, decoders, encdec, encoders  # noqa: F401  (registration)

__all__ = ["Adapter", "UnsupportedModelError", "get_adapter", "register_adapter", "supported_families"]
