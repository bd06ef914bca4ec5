"""``PipelineTrainingArguments``: a ``transformers.TrainingArguments`` plus the pipeline's fields.

It *is* a ``TrainingArguments`` (subclass), so every flag a Trainer user types parses with its HF meaning and
default (``--do_train``, ``--optim``, fractional ``--save_steps``, ``--report_to all``, ...). Each HF field the
pipeline cannot honour as HF does is either mapped (:data:`MAPPED`: ``--gradient_checkpointing`` -> activation
checkpointing, ``--optim adamw_torch[_fused]`` -> the DeepSpeed optimizer) or refused in ``__post_init__`` with one
line naming why and the alternative (:data:`REFUSED`); the README's Trainer section lists both. HF's device set-up
(``Accelerate``'s ``PartialState``, which would join a process group) and its DeepSpeed plugin are skipped: the
pipeline joins the group itself and merges DeepSpeed settings with one precedence rule (``hfpipe.training.config``).

``per_device_train_batch_size`` is DeepSpeed's micro-batch and ``gradient_accumulation_steps`` the number of
micro-batches per optimizer step (the pipeline's schedule length). :func:`parse_args` parses with
``HfArgumentParser`` (an args ``.json``/``.yaml`` file as the single argument too), takes recipe defaults through
``set_defaults`` (so ``--help`` shows them) and records which fields were typed.
"""

from __future__ import annotations

import argparse
import math
import dataclasses
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

from transformers import HfArgumentParser, TrainingArguments


class ArgumentsError(ValueError):
    """A bad command line or args file: one line, exit status 2 (``hfpipe.training.failfast``)."""


#: HF field -> what the pipeline does with it (README "Trainer flags" table, mapped rows)
MAPPED = {
    "gradient_checkpointing": "activation checkpointing of every layer (--activation_checkpoint_interval 1)",
    "activation_checkpointing": "the same as --gradient_checkpointing",
    "optim": "adamw_torch / adamw_torch_fused -> DeepSpeed's optimizer (torch AdamW; fused: torch's fused kernel)",
    "deepspeed": "a DeepSpeed JSON merged below the command line (hfpipe.training.config)",
    "warmup_steps": "HF's meaning: a value < 1 is a ratio of the training steps",
    "logging_steps": "HF's meaning (< 1: ratio of the training steps); save_steps and eval_steps too",
    "report_to": "transformers' own integration callbacks (all, none, tensorboard, wandb, mlflow, ...)",
    "lr_scheduler_type": "transformers.get_scheduler (with --lr_scheduler_kwargs)",
    "logging_dir": "TensorBoard's folder (HF 4.x flag; transformers 5 reads $TENSORBOARD_LOGGING_DIR)",
    "overwrite_output_dir": "start afresh; without it a run resumes from the last checkpoint in output_dir",
    "local_rank": "set by the launcher; the pipeline reads the process group",
}

#: HF field -> (value that is fine, why refused and what to use instead)
REFUSED = {
    "fsdp": ("", "FSDP shards differently from a DeepSpeed pipeline; use --num_stages (and ZeRO-1 in "
                 "--deepspeed) to split the model"),
    "fsdp_config": (None, "FSDP shards differently from a DeepSpeed pipeline; use --num_stages"),
    "torch_compile": (False, "the pipeline engine runs eager layers; remove --torch_compile"),
    "use_liger_kernel": (False, "Liger kernels patch the HF model, which the pipeline rebuilds; remove "
                                "--use_liger_kernel"),
    "neftune_noise_alpha": (None, "NEFTune hooks the HF embedding module, not the pipeline's; remove it"),
    "label_smoothing_factor": (0.0, "the pipeline computes the model's own loss; remove it"),
    "auto_find_batch_size": (False, "the pipeline's buffers are sized once; set --per_device_train_batch_size"),
    "bf16_full_eval": (False, "evaluation runs in the training precision; use --bf16"),
    "fp16_full_eval": (False, "evaluation runs in the training precision; use --fp16"),
    "save_only_model": (False, "checkpoints hold the DeepSpeed engine state; export with output_dir/final"),
    "eval_delay": (0, "evaluate from a later step with --eval_steps"),
    "label_names": (None, "the pipeline's head names its label columns"),
    "prediction_loss_only": (False, "evaluation returns metrics and predictions; ignore the ones you do not need"),
    "parallelism_config": (None, "the pipeline's parallelism is --num_stages x --dp"),
}
#: --optim values the pipeline maps (DeepSpeed's optimizer with torch AdamW)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
#: --lr_scheduler_type values that need a metric each step (not supported by the pipeline loop)
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


@dataclass
class PipelineTrainingArguments(TrainingArguments):
    num_stages: int | None = field(default=None, metadata={"help": "Pipeline stages; default: all processes of a "
                                                                   "data-parallel replica (world size / --dp)."})
    dp: int | None = field(default=None, metadata={"help": "Data-parallel replicas (default: world size / "
                                                           "--num_stages, or 1 when --num_stages is unset)."})
    accelerate_config: str | None = field(
        default=None, metadata={"help": "Accelerate config YAML, or 'default' ($HF_HOME/accelerate/default_config"
                                        ".yaml); the ACCELERATE_* variables of `accelerate launch` are read too."})
    partition_method: str = field(
        default="balanced", metadata={"help": "balanced | balanced:blocks | parameters | uniform | type:<regex> | "
                                                "comma-separated first layer index of each stage."})
    loss_chunk_tokens: int = field(default=0, metadata={"help": "Causal LM: compute the training loss over N tokens "
                                   "at a time (logits recomputed in backward), never holding the full tokens x vocab "
                                   "fp32 logits; 0: HF's loss on full logits."})
    activation_checkpoint_interval: int = field(default=0, metadata={"help": "Checkpoint activations every N "
                                                                             "layers (0: off; --gradient_checkpointing"
                                                                             " sets 1)."})
    pipeline_schedule: str = field(default="1f1b", metadata={"help": "Pipeline schedule: 1f1b (DeepSpeed's) | "
                                   "zb-h1 (zero-bubble: backward split into input and weight passes, 1F1B's peak "
                                   "memory) | dualpipev (not available yet)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of the training steps (HF 4.x "
                                                               "flag; transformers 5: --warmup_steps < 1)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Ignore checkpoints in output_dir (without "
                                                                        "it, a run resumes from the last one)."})
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard log folder (default: HF's, "
                                                                    "output_dir/runs/<time>_<host>)."})
    max_seq_length: int = field(default=384, metadata={"help": "Every batch is padded to this length (the pipeline "
                                                               "reuses buffers sized for the first shape)."})
    export_final_model: bool = field(default=True, metadata={"help": "Write an HF folder to output_dir/final."})
    predict_with_generate: bool = field(default=False, metadata={"help": "Evaluate on generated ids "
                                                                          "(text-to-text)."})
    generation_max_length: int = field(default=64, metadata={"help": "Max new tokens with "
                                                                     "--predict_with_generate."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (PEFT's r): train PEFT LoRA adapters on a frozen "
                                                     "base, output_dir/final a PEFT adapter folder; 0: off."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha (scaling alpha / r); default 8, PEFT's "
                                                           "default (many recipes use 2 x r, e.g. 16 at r=8)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input (PEFT's lora_dropout)."})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names (q_proj,v_proj) or all-linear; unset: PEFT's "
                                        "default target modules for the model type."})
    lora_modules_to_save: str | None = field(
        default=None, metadata={"help": "Comma-separated modules trained in full besides the adapters (PEFT adds "
                                        "the task head of sequence classification itself)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA (with --lora_r): each stage stores its frozen "
                                                            "linear weights in 4 bits as it loads them (bitsandbytes "
                                                            "nf4, double quantisation, bf16 compute)."})
    peft_config: str | None = field(
        default=None, metadata={"help": "A PEFT adapter_config.json (or a folder holding one) to train instead of "
                                        "the --lora_* flags; --lora_* flags set besides it must agree with it."})
    peft_adapter: str | None = field(
        default=None, metadata={"help": "A PEFT adapter folder or Hub id to continue training (its config is the "
                                        "LoRA config; each rank reads only its own stage's adapter tensors)."})
    merge_lora: bool = field(default=False, metadata={"help": "With LoRA: also write output_dir/merged, the base with "
                                                              "the adapter merged in (PEFT's merge_and_unload), "
                                                              "loadable with from_pretrained."})
    plot_curves: bool = field(default=True, metadata={"help": "Write output_dir/training_curves.png at the end."})
    export_dtype: str = field(default="auto", metadata={"help": "dtype of output_dir/final: auto (the fp32 master "
                              "weights of a bf16/fp16 run, the weights' own dtype otherwise) | fp32 | bf16 | fp16."})
    skip_nonfinite_steps: bool = field(default=False, metadata={"help": "Skip an optimizer step whose gradients "
                                       "hold NaN/Inf (counted in the logs) instead of stopping the run with the step "
                                       "and the stage that produced it."})

    def __post_init__(self):
        for name, (fine, why) in REFUSED.items():
            value = getattr(self, name, fine)
            if not (value == fine or value in (None, "", [], {}, False)):
                raise ArgumentsError(f"--{name} {value!r} is not supported by the pipeline trainer: {why}.")
        if str(self.optim) not in OPTIMIZERS:
            raise ArgumentsError(f"--optim {self.optim}: the pipeline trains with DeepSpeed's optimizer (torch "
                                 f"AdamW); use --optim {' or '.join(OPTIMIZERS)}.")
        if str(self.lr_scheduler_type) in METRIC_SCHEDULERS:
            raise ArgumentsError(f"--lr_scheduler_type {self.lr_scheduler_type} steps on an eval metric, which the "
                                 "pipeline loop does not feed it; use linear, cosine, constant_with_warmup, ...")
        if str(getattr(self, "save_strategy", "")) == "best":
            raise ArgumentsError("--save_strategy best is not supported; use --save_strategy steps with "
                                 "--metric_for_best_model (the best checkpoint is kept by --save_total_limit).")
        if self.train_sampling_strategy not in ("random", "sequential"):
            raise ArgumentsError(f"--train_sampling_strategy {self.train_sampling_strategy!r}: expected 'random' or "
                                 "'sequential'.")
        for name in ("num_stages", "dp"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ArgumentsError(f"--{name} {getattr(self, name)}: expected a positive number.")
        if self.export_dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ArgumentsError(f"--export_dtype {self.export_dtype!r}: expected auto, fp32, bf16 or fp16.")
        for name in ("learning_rate", "activation_checkpoint_interval", "weight_decay", "max_grad_norm",
                     "loss_chunk_tokens", "warmup_steps", "max_seq_length"):
            if getattr(self, name) < 0 or (name == "max_seq_length" and self.max_seq_length == 0):
                raise ArgumentsError(f"--{name} {getattr(self, name)}: expected a "
                                     f"{'positive' if name == 'max_seq_length' else 'non-negative'} number.")
        if self.logging_dir:
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", self.logging_dir)  # where HF's TensorBoard writes
        # HF's own bf16 check wants a GPU; the pipeline trains bf16 on CPU ranks too (DeepSpeed decides)
        deepspeed, bf16 = self.deepspeed, self.bf16
        self.deepspeed, self.bf16 = None, False  # no HF DeepSpeed plugin: hfpipe.training.config merges the JSON
        saved_env = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        try:
            super().__post_init__()
        except ValueError as exc:
            raise ArgumentsError(str(exc).replace("\n", " ")) from None
        finally:
            self.deepspeed, self.bf16 = deepspeed, bf16
            if saved_env is not None:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = saved_env
        if bf16:
            self.mixed_precision = "bf16"
        if self.activation_checkpointing and not self.activation_checkpoint_interval:
            self.activation_checkpoint_interval = 1
        if self.load_best_model_at_end and self.metric_for_best_model == "loss":
            self.metric_for_best_model = "eval_loss"
        self.lora_config()  # bad LoRA flags: one error now, before any model loads

    @cached_property
    def _setup_devices(self):
        """The rank's device without Accelerate's ``PartialState`` (which would join a process group before the
        pipeline does): the local GPU when there is one, else the CPU."""
        import torch

        self._n_gpu = 1 if torch.cuda.is_available() and not self.use_cpu else 0
        if self._n_gpu:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")

    def steps(self, name: str, max_steps: int) -> int:
        """``logging_steps`` / ``save_steps`` / ``eval_steps`` in optimizer steps: a value < 1 is a ratio of
        ``max_steps`` (rounded up, as HF Trainer does); 0 / None: never."""
        value = getattr(self, name)
        if not value:
            return 0
        return int(math.ceil(max_steps * value)) if value < 1 else int(value)

    def warmup(self, max_steps: int) -> int:
        """Warm-up steps: ``--warmup_steps`` (< 1: a ratio, HF 5), else ``--warmup_ratio``."""
        if self.warmup_steps:
            return self.steps("warmup_steps", max_steps)
        return math.ceil(self.warmup_ratio * max_steps)

    def lora_config(self, task_type: str | None = None):
        """The ``peft.LoraConfig`` the ``--lora_*`` / ``--peft_config`` flags ask for (``None``: LoRA off);
        ``task_type`` (the head's) where the config names none (``hfpipe.core.lora.to_lora_config``)."""
        from hfpipe.core.lora import LoraConfigError, to_lora_config

        config = to_lora_config(self, task_type)
        if self.load_in_4bit and config is None:
            raise LoraConfigError("--load_in_4bit quantises the frozen base, which trains only through adapters "
                                  "(QLoRA). Fix: add --lora_r R (e.g. 8) or --peft_config adapter_config.json.")
        if self.load_in_4bit and getattr(self, "merge_lora", False):
            raise LoraConfigError("--merge_lora with --load_in_4bit: merging would round the adapter into the nf4 "
                                  "base. Fix: drop --merge_lora and merge the saved adapter into the "
                                  "full-precision base afterwards (hfpipe export --merge-lora).")
        return config

    @property
    def partition(self):
        """``partition_method`` with ``"0,5,9"`` turned into ``[0, 5, 9]``."""
        from hfpipe.core.partition import parse_partition_method

        return parse_partition_method(self.partition_method)


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` whose errors raise :class:`ArgumentsError` (one line, the caller decides which rank
    prints it) instead of printing usage and exiting on every rank."""

    def error(self, message):
        raise ArgumentsError(f"{message}; see --help.")


def parser(dataclass_types: Sequence[type] = (PipelineTrainingArguments,), defaults: dict | None = None,
           **kwargs) -> HfArgumentParser:
    """The ``HfArgumentParser`` of ``dataclass_types`` with ``defaults`` set through ``set_defaults`` (``--help``
    shows them; a default naming no field is an error)."""
    p = _Parser(list(dataclass_types), **kwargs)
    if defaults:
        dests = {a.dest for a in p._actions}
        unknown = sorted(set(defaults) - dests)
        if unknown:
            raise ArgumentsError(f"recipe defaults {unknown} match no argument field.")
        p.set_defaults(**defaults)
    return p


def parse_args(dataclass_types: Sequence[type] = (PipelineTrainingArguments,), argv: Sequence[str] | None = None,
               defaults: dict | None = None):
    """``HfArgumentParser(dataclass_types)`` over ``argv`` (default ``sys.argv[1:]``), or over the args file when
    ``argv`` is one ``.json``/``.yaml``/``.yml`` path (as HF's example scripts accept); ``defaults`` through
    ``set_defaults``. Each ``PipelineTrainingArguments`` remembers the fields the user named
    (``_explicit_fields``: flags typed, or keys of the file), which count as explicit even when equal to their
    default (``hfpipe.training.config``). Unknown flags and bad values: :class:`ArgumentsError`."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(dataclass_types, defaults)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        out, named = _parse_file(p, argv[0], defaults or {})
    else:
        out = p.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        *out, remaining = out
        if remaining:
            raise ArgumentsError(f"unrecognized arguments: {' '.join(remaining)}; see --help.")
        named = _named(p, argv)
    for obj in out:
        if isinstance(obj, PipelineTrainingArguments):
            obj._explicit_fields = named & {f.name for f in dataclasses.fields(obj)}
    return tuple(out)


def _parse_file(p: HfArgumentParser, path: str, defaults: dict):
    import json

    if not os.path.isfile(path):
        raise ArgumentsError(f"args file {path}: no such file; pass a .json or .yaml file of argument names and "
                             "values, or the flags themselves.")
    with open(path) as f:
        try:
            if path.endswith(".json"):
                data = json.load(f)
            else:
                import yaml

                data = yaml.safe_load(f)
        except Exception as exc:  # noqa: BLE001 -- any parse error of the file: one line
            raise ArgumentsError(f"args file {path} does not parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ArgumentsError(f"args file {path}: expected a mapping of argument names to values, got "
                             f"{type(data).__name__}.")
    try:
        out = p.parse_dict({**defaults, **data})
    except ValueError as exc:
        raise ArgumentsError(f"args file {path}: {exc}") from None
    return out, set(data)


def _named(p: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations the command line names (argparse itself decides: abbreviations, ``--no_x``, ``--a=b``): the
    same parse with every default suppressed leaves only what was given."""
    saved = [(a, a.default) for a in p._actions]
    saved_defaults = dict(p._defaults)
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        p._defaults.clear()
        ns, _ = p.parse_known_args(argv)
    finally:
        for a, d in saved:
            a.default = d
        p._defaults.update(saved_defaults)
    return set(vars(ns))


def explicit_fields(args) -> set[str]:
    """Fields of ``args`` the user set: those :func:`parse_args` saw named; for arguments built in Python, every
    field whose value differs from its default. (Values a recipe writes into parsed arguments afterwards are recipe
    defaults, not explicit.)"""
    pre = getattr(args, "_explicit_fields", None)
    if pre is not None:
        return set(pre)
    out = set()
    for f in dataclasses.fields(args):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            continue
        if getattr(args, f.name, default) != default:
            out.add(f.name)
    return out
