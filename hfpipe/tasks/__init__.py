"""Fine-tuning tasks: each module turns raw examples into fixed-shape features, names its ``AutoModelFor...`` class
and turns predictions back into a metric (contract: ``load_raw``, ``model_kwargs``, ``prepare``, ``compute_metrics``).

Encoder tasks: ``SequenceClassificationTask`` (classification.py), ``TokenClassificationTask`` (ner.py),
``QuestionAnsweringTask`` (qa.py); decoder tasks: causal_lm.py, text2text.py. Imported lazily (transformers, datasets).
"""

from hfpipe.tasks.base import default_model_path, load_metric

_LAZY = {
    "SequenceClassificationTask": ".classification", "ClassificationDataArguments": ".classification",
    "TokenClassificationTask": ".ner", "NERDataArguments": ".ner",
    "QuestionAnsweringTask": ".qa", "QADataArguments": ".qa",
    "CausalLMTask": ".causal_lm", "Text2TextTask": ".text2text",
}
__all__ = ["default_model_path", "load_metric", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hfpipe.tasks' has no attribute {name!r}")
