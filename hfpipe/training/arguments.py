"""``PipelineTrainingArguments``: the trainer's settings, one dataclass parsed with ``transformers.HfArgumentParser``.

Names follow HF ``TrainingArguments`` so that flags users know keep their meaning; the pipeline adds
``--num_stages``, ``--partition_method`` and ``--activation_checkpoint_interval``. Defaults run on a CPU machine.
``per_device_train_batch_size`` is DeepSpeed's micro-batch and ``gradient_accumulation_steps`` the number of
micro-batches per optimizer step (the pipeline's schedule length). How these merge with an Accelerate config and a
DeepSpeed JSON is in ``hfpipe.training.config``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Sequence


def _default_report_to() -> list[str]:
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []


@dataclass
class PipelineTrainingArguments:
    output_dir: str = field(default="out", metadata={"help": "Where checkpoints, logs and the final model go."})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON (e.g. ds_configs/cpu_fp32.json)."})
    accelerate_config: str | None = field(
        default=None, metadata={"help": "Accelerate config YAML, or 'default' ($HF_HOME/accelerate/default_config"
                                        ".yaml); the ACCELERATE_* variables of `accelerate launch` are read too."})
    num_stages: int = field(default=2, metadata={"help": "Pipeline stages; world size / stages = data-parallel "
                                                         "replicas."})
    partition_method: str = field(
        default="balanced", metadata={"help": "balanced | balanced:blocks | parameters | uniform | type:<regex> | "
                                                "comma-separated first layer index of each stage."})
    loss_chunk_tokens: int = field(default=0, metadata={"help": "Causal LM: compute the training loss over N tokens "
                                   "at a time (logits recomputed in backward), never holding the full tokens x vocab "
                                   "fp32 logits; 0: HF's loss on full logits."})
    activation_checkpoint_interval: int = field(default=0, metadata={"help": "Checkpoint activations every N "
                                                                             "layers (0: off)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Micro-batch size (DeepSpeed "
                                                                          "train_micro_batch_size_per_gpu)."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Micro-batch size for evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step; use "
                                                                          ">= num_stages to keep the pipeline busy."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not applied to biases and "
                                                               "norms, as in HF Trainer)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Any transformers.get_scheduler name "
                                                                       "(linear, cosine, constant, ...)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of the training steps."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps (overrides --warmup_ratio)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to run (> 0 overrides epochs)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs when --max_steps is not set."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (DeepSpeed gradient_clipping; "
                                                                "0: off)."})
    train_sampling_strategy: str = field(default="random", metadata={"help": "random (seeded per epoch) | "
                                                                             "sequential."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_strategy: str = field(default="no", metadata={"help": "no | steps | epoch."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (eval_strategy=steps; "
                                                                   "default: logging_steps)."})
    save_strategy: str = field(default="steps", metadata={"help": "no | steps | epoch."})
    save_steps: int | None = field(default=None, metadata={"help": "Checkpoint every N steps (None: only at the "
                                                                   "end)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints (the best one "
                                                                         "is kept too)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint-N folder, or 'latest' for the newest one in output_dir."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, shuffling and dropout."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (fp32 gradient accumulation)."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with dynamic loss scaling."})
    report_to: list[str] = field(default_factory=_default_report_to,
                                 metadata={"help": "Trackers: tensorboard, wandb, mlflow (those installed), or none."})
    run_name: str | None = field(default=None, metadata={"help": "Run name for trackers."})
    max_seq_length: int = field(default=384, metadata={"help": "Every batch is padded to this length (the pipeline "
                                                               "reuses buffers sized for the first shape)."})
    metric_for_best_model: str | None = field(default=None, metadata={"help": "Metric that picks the best "
                                                                              "checkpoint (e.g. eval_f1)."})
    greater_is_better: bool | None = field(default=None, metadata={"help": "Default: True unless the metric is a "
                                                                           "loss."})
    load_best_model_at_end: bool = field(default=False, metadata={"help": "Export the best checkpoint instead of "
                                                                          "the last."})
    export_final_model: bool = field(default=True, metadata={"help": "Write an HF folder to output_dir/final."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the exported model to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id for --push_to_hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
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
    peft_config: str | None = field(
        default=None, metadata={"help": "A PEFT adapter_config.json (or a folder holding one) to train instead of "
                                        "the --lora_* flags; --lora_* flags set besides it must agree with it."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    plot_curves: bool = field(default=True, metadata={"help": "Write output_dir/training_curves.png at the end."})

    def __post_init__(self):
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) not in ("no", "steps", "epoch"):
                raise ValueError(f"--{name} {getattr(self, name)!r}: expected 'no', 'steps' or 'epoch'.")
        if self.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(f"--train_sampling_strategy {self.train_sampling_strategy!r}: expected 'random' or "
                             "'sequential'.")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if self.report_to in (["none"], ["None"]):
            self.report_to = []
        if self.greater_is_better is None and self.metric_for_best_model:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.load_best_model_at_end and not self.metric_for_best_model:
            self.metric_for_best_model = "eval_loss"
            self.greater_is_better = False
        self.lora_config()  # bad LoRA flags: one error now, before any model loads

    def lora_config(self, task_type: str | None = None):
        """The ``peft.LoraConfig`` the ``--lora_*`` / ``--peft_config`` flags ask for (``None``: LoRA off);
        ``task_type`` (the head's) where the config names none (``hfpipe.core.lora.to_lora_config``)."""
        from hfpipe.core.lora import to_lora_config

        return to_lora_config(self, task_type)

    @property
    def partition(self):
        """``partition_method`` with ``"0,5,9"`` turned into ``[0, 5, 9]``."""
        from hfpipe.core.partition import parse_partition_method

        return parse_partition_method(self.partition_method)


def parse_args(dataclass_types: Sequence[type] = (PipelineTrainingArguments,), argv: Sequence[str] | None = None):
    """``HfArgumentParser(dataclass_types).parse_args_into_dataclasses(argv)``, remembering which
    ``PipelineTrainingArguments`` fields were named on the command line (they count as explicit even when equal to
    their default; see ``hfpipe.training.config``)."""
    import sys

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    out = HfArgumentParser(list(dataclass_types)).parse_args_into_dataclasses(args=argv)
    for obj in out:
        if isinstance(obj, PipelineTrainingArguments):
            obj._explicit_fields = set()
            obj._explicit_fields = explicit_fields(obj, argv)
    return out


def explicit_fields(args, argv: Sequence[str] | None = None) -> set[str]:
    """Fields of ``args`` the user set: named in ``argv``; for arguments not parsed by
    :func:`parse_args` also every field whose value differs from the dataclass default. (Values a
    recipe writes into parsed arguments afterwards are recipe defaults, not explicit.)"""
    defaults = {}
    for f in dataclasses.fields(args):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            defaults[f.name] = f.default_factory()  # type: ignore[misc]
    pre = getattr(args, "_explicit_fields", None)
    if pre is not None:  # parsed by hfpipe.training.arguments.parse_args: exactly the flags that were typed
        out = set(pre)
    else:
        out = {name for name, default in defaults.items() if getattr(args, name) != default}
    if argv:
        flags = set()
        for tok in argv:
            if tok.startswith("--"):
                flags.add(tok[2:].split("=", 1)[0].replace("-", "_"))
        for name in defaults:
            if name in flags or f"no_{name}" in flags:
                out.add(name)
    return out
