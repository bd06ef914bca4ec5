"""Fine-tuning tasks: each module turns raw examples into fixed-shape features, names its ``AutoModelFor...`` class
and turns predictions back into a metric (the contract: ``hfpipe.tasks.base.Task``; ``run_recipe`` runs a task end to
end, which is all a recipe in ``recipes/`` does).

Encoder tasks: ``SequenceClassificationTask`` (classification.py), ``TokenClassificationTask`` (ner.py),
``QuestionAnsweringTask`` (qa.py); decoder tasks: causal_lm.py, text2text.py, with their default model in decoder.py.
Imported lazily (transformers, datasets).
"""

from hfpipe.tasks.base import GenerativeTask, Task, default_model_path, load_metric, run_recipe

_LAZY = {
    "SequenceClassificationTask": ".classification", "ClassificationDataArguments": ".classification",
    "TokenClassificationTask": ".ner", "NERDataArguments": ".ner",
    "QuestionAnsweringTask": ".qa", "QADataArguments": ".qa",
    "CausalLMTask": ".causal_lm", "Text2TextTask": ".text2text",
}
__all__ = ["GenerativeTask", "Task", "default_model_path", "load_metric", "run_recipe", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hfpipe.tasks' has no attribute {name!r}")
