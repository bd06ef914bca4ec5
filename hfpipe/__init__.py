"""hfpipe: train Hugging Face models with DeepSpeed pipeline parallelism, no layer specs written by hand."""

__version__ = "0.1.0"

from .adapters import Adapter, UnsupportedModelError, register_adapter, supported_families  # noqa: E402
from .data import micro_batches  # noqa: E402
from .pipeline import HFPipelineModule, to_pipeline  # noqa: E402

__all__ = ["Adapter", "HFPipelineModule", "UnsupportedModelError", "micro_batches", "register_adapter",
           "supported_families", "to_pipeline", "__version__"]
