"""Model families: one small adapter per family, found by ``config.model_type``."""

from .base import Adapter, UnsupportedModelError
from .registry import get_adapter, register_adapter, supported_families
from . import deberta_v2, decoders, encoders  # noqa: F401  (registration)

__all__ = ["Adapter", "UnsupportedModelError", "get_adapter", "register_adapter", "supported_families"]
