"""hfpipe: train Hugging Face models with DeepSpeed pipeline parallelism, no layer specs written by hand."""

from hfpipe._version import __version__  # noqa: E402

from hfpipe.core.adapters import Adapter, UnsupportedModelError, register_adapter, supported_families  # noqa: E402
from hfpipe.core.batches import micro_batches  # noqa: E402
from hfpipe.pipeline import HFPipelineModule, initialize, to_pipeline  # noqa: E402

__all__ = ["Adapter", "HFPipelineModule", "PipelineTrainer", "PipelineTrainingArguments", "UnsupportedModelError",
           "initialize", "micro_batches", "register_adapter", "supported_families", "to_pipeline", "__version__"]

_LAZY = {"PipelineTrainer": "hfpipe.training.trainer", "PipelineTrainingArguments": "hfpipe.training.arguments"}


def __getattr__(name):  # the trainer pulls in tqdm, tensorboard, ...: import it on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hfpipe' has no attribute {name!r}")
