"""hfpipe: train Hugging Face models with DeepSpeed pipeline parallelism, no layer specs written by hand.

The public names load on first use (PEP 562), so ``import hfpipe`` -- and the ``hfpipe`` command, whose modules sit
below this package -- does not pay for torch, transformers and DeepSpeed until a name that needs them is used.
"""

import importlib

from hfpipe._version import __version__

_LAZY = {
    "Adapter": "hfpipe.core.adapters", "UnsupportedModelError": "hfpipe.core.adapters",
    "register_adapter": "hfpipe.core.adapters", "supported_families": "hfpipe.core.adapters",
    "micro_batches": "hfpipe.core.batches",
    "HFPipelineModule": "hfpipe.pipeline", "initialize": "hfpipe.pipeline", "to_pipeline": "hfpipe.pipeline",
    "PipelineTrainer": "hfpipe.training.trainer", "PipelineTrainingArguments": "hfpipe.training.arguments",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'hfpipe' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
