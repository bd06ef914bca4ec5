"""The ``hfpipe`` console script: each subcommand parses its arguments and calls one library function.

Subcommands register themselves with ``@command(name, help)`` on a function ``(subparser) -> runner``; the runner
gets the parsed ``argparse.Namespace`` and returns the exit status. Keep logic in the library, not here.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from hfpipe.core.partition import parse_partition_method

_COMMANDS: dict[str, tuple[str, Callable]] = {}


def command(name: str, help: str):
    def deco(fn):
        _COMMANDS[name] = (help, fn)
        return fn

    return deco


def _print_json_last(obj) -> None:
    print(json.dumps(obj, default=str))


# -------------------------------------------------------------------------------------------------------- verify
@command("verify", "check that the pipeline trains exactly like the HF model (loss, logits, every gradient)")
def _verify(p: argparse.ArgumentParser):
    p.add_argument("model", help="folder written by save_pretrained() (the class comes from config.architectures)")
    p.add_argument("--stages", type=int, required=True, help="pipeline stages (CPU gloo ranks)")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="global batch size")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (ranks = stages x dp)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--partition", default="parameters",
                   help="uniform | parameters | type:<regex> | comma-separated first layer of each stage")
    p.add_argument("--padding", choices=["right", "left"], default="right")
    p.add_argument("--schedule", default="1f1b", help="pipeline schedule to verify: 1f1b | zb-h1 | dualpipev "
                   "(needs --micro-batches >= 2 x --stages)")
    p.add_argument("--inputs", help="a .pt or .json dict of input_ids, attention_mask and label fields")
    p.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    p.add_argument("--lora-r", type=int, help="compare with peft.get_peft_model(model, LoraConfig(r=R, ...)): loss and "
                   "every trainable gradient")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (PEFT's default: 8)")
    p.add_argument("--lora-target-modules", help="comma-separated module names (q_proj,v_proj) or all-linear; "
                   "default: PEFT's default target modules for the model type")

    def run(args) -> int:
        from hfpipe.verify import format_report, verify_dir

        lora = None
        if args.lora_r is not None:
            from peft import LoraConfig

            from hfpipe.core.lora import module_names

            kwargs = {} if args.lora_alpha is None else {"lora_alpha": args.lora_alpha}
            lora = LoraConfig(r=args.lora_r, target_modules=module_names(args.lora_target_modules), **kwargs)
        report = verify_dir(args.model, stages=args.stages, micro_batches=args.micro_batches,
                            batch_size=args.batch_size, seq_len=args.seq_len, dp=args.dp, dtype=args.dtype,
                            partition=parse_partition_method(args.partition), padding=args.padding,
                            inputs=args.inputs, lora=lora, schedule=args.schedule)
        print(format_report(report))
        if args.json:
            _print_json_last(report)
        return 0 if report["passed"] else 1

    return run


# ---------------------------------------------------------------------------------------------------- families
@command("families", "list supported model families and heads")
def _families(p: argparse.ArgumentParser):
    def run(args) -> int:
        from hfpipe.core.adapters import supported_families
        from hfpipe.core.adapters.registry import family_heads
        from hfpipe.core.heads import HEADS

        for model_type, how in supported_families().items():
            print(f"{model_type:<16}{how:<34}{', '.join(family_heads(model_type))}")
        print(f"\nheads: {', '.join(HEADS)}")
        return 0

    return run


# ---------------------------------------------------------------------------------------------------------- plan
@command("plan", "show how a model would be split into stages: layers, params, FLOPs, memory and imbalance per stage")
def _plan(p: argparse.ArgumentParser):
    p.add_argument("model", help="a model folder or a config.json (no weights needed)")
    p.add_argument("--stages", type=int, required=True, help="pipeline stages")
    p.add_argument("--partition", default="balanced",
                   help="balanced | balanced:blocks | parameters | uniform | type:<regex> | comma-separated first "
                        "layer of each stage")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per example (encoder-decoders: source tokens)")
    p.add_argument("--target-len", type=int, default=None,
                   help="encoder-decoders: decoder (target) tokens per example (default: --seq-len)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step (default 4 x stages)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (ZeRO-1 divides optimizer states)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1], default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--attention", choices=["flash", "dense"], default="flash",
                   help="flash: masked keys cost nothing (GPU kernels); dense: every query meets every key")
    p.add_argument("--max-memory-gib", type=float, default=None, help="per-stage memory cap for balanced methods")
    p.add_argument("--loss-chunk-tokens", type=int, default=None,
                   help="causal LM: plan for the chunked loss (to_pipeline(loss_chunk_tokens=N)): no full logits kept")
    p.add_argument("--lora-r", type=int, default=None,
                   help="plan LoRA training at rank R: the base holds weights only, the adapters train")
    p.add_argument("--lora-target-modules", default=None,
                   help="with --lora-r: comma-separated module names or 'all-linear' (default: PEFT's for the family)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="with --lora-r: QLoRA, the frozen linear weights in 4 bits (nf4, double quantisation)")
    p.add_argument("--schedule", default="1f1b", help="pipeline schedule: 1f1b | zb-h1 | dualpipev (efficiency "
                   "and activation memory per stage follow it; dualpipev: two chunks per rank)")
    p.add_argument("--compare", action="store_true", help="all partition methods side by side")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on the last line")

    def run(args) -> int:
        from hfpipe.plan import compare, format_compare, format_plan, plan

        kwargs = dict(stages=args.stages, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                      micro_batches=args.micro_batches, dp=args.dp, zero_stage=args.zero_stage, dtype=args.dtype,
                      activation_checkpointing=args.activation_checkpointing, attention_kernel=args.attention,
                      memory_cap_gib=args.max_memory_gib, loss_chunk_tokens=args.loss_chunk_tokens,
                      lora_r=args.lora_r, lora_target_modules=args.lora_target_modules, schedule=args.schedule,
                      load_in_4bit=args.load_in_4bit)
        if args.target_len is not None:
            kwargs["target_len"] = args.target_len
        if args.compare:
            result = compare(args.model, **kwargs)
            print(format_compare(result))
        else:
            result = plan(args.model, partition=parse_partition_method(args.partition), **kwargs)
            print(format_plan(result))
        if args.json:
            _print_json_last(result)
        return 0

    return run


# ----------------------------------------------------------------------------------------------------- ds-config
@command("ds-config", "print the DeepSpeed config a run would use and where each value comes from (command line > "
                      "Accelerate > DeepSpeed JSON > defaults); takes any recipe flag as an override")
def _ds_config(p: argparse.ArgumentParser):
    p.add_argument("--accelerate-config", "--accelerate_config", dest="accelerate_config",
                   help="Accelerate YAML, or 'default' ($HF_HOME/accelerate/default_config.yaml); the ACCELERATE_* "
                        "variables of `accelerate launch` are read too")
    p.add_argument("--deepspeed", help="DeepSpeed JSON")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes (default: Accelerate's num_processes, else $WORLD_SIZE, else one replica)")
    p.add_argument("--json", action="store_true", help="print the DeepSpeed JSON on one line (the last)")
    p.set_defaults(_extra_args=True)

    def run(args) -> int:
        from hfpipe.training.config import describe, format_sources

        argv = [*(["--accelerate_config", args.accelerate_config] if args.accelerate_config else []),
                *(["--deepspeed", args.deepspeed] if args.deepspeed else []), *args.extra]
        ds, sources, world, world_src = describe(argv, world_size=args.world_size)
        if args.json:
            _print_json_last(ds)
            return 0
        print(json.dumps(ds, indent=2))  # stdout: the config alone (`hfpipe ds-config ... > ds_config.json`)
        stages = ds["pipeline"]["stages"]
        print(f"world size {world} ({world_src}) = {stages} stages x {world // stages} data-parallel replicas"
              "\nwhere each value comes from (command line > Accelerate > DeepSpeed JSON > defaults):\n"
              + format_sources(ds, sources), file=sys.stderr)
        return 0

    return run


# ---------------------------------------------------------------------------------------------------------- push
@command("push", "upload a model folder (or a pipeline checkpoint, exported first) to the Hugging Face Hub with a "
                 "model card")
def _push(p: argparse.ArgumentParser):
    p.add_argument("path", help="an HF model folder (config.json + *.safetensors, e.g. output_dir/final) or a "
                                "pipeline checkpoint-N folder")
    p.add_argument("--repo-id", required=True, help="user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    p.add_argument("--revision", help="branch to push to (created if missing; default main)")
    p.add_argument("--commit-message")
    p.add_argument("--export-dir", help="where a checkpoint is exported (default: <path>-hf)")
    p.add_argument("--base-model", help="Hub id of the model this was fine-tuned from (model card)")
    p.add_argument("--dataset", help="Hub id of the training dataset (model card)")

    def run(args) -> int:
        from hfpipe.hub import PushError, push

        try:
            url = push(args.path, args.repo_id, export_dir=args.export_dir, base_model=args.base_model,
                       dataset=args.dataset, private=args.private, revision=args.revision,
                       commit_message=args.commit_message)
        except PushError as exc:
            print(f"hfpipe push: error: {exc}", file=sys.stderr)
            return 1
        print(f"pushed {args.path} to {url}")
        return 0

    return run


# ------------------------------------------------------------------------------------------------------- convert
def _model_class(name: str | None):
    from hfpipe.core.weights import transformers_class

    return transformers_class(name, "--model-class") if name else None


def _output_flags(p: argparse.ArgumentParser, what: str) -> None:
    """``--output``/``--overwrite``/``--no-progress``, shared by convert and export."""
    p.add_argument("--output", required=True, help=f"new folder for the {what}")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-nonfinite", action="store_true", help="write weights holding NaN/Inf instead of refusing")


@command("convert", "write an HF model as a DeepSpeed pipeline checkpoint (stage-loadable at any stage count)")
def _convert(p: argparse.ArgumentParser):
    p.add_argument("model", help="HF model folder (safetensors) or a Hub id in the local cache")
    _output_flags(p, "checkpoint")
    p.add_argument("--stages", type=int, default=1, help="pipeline stages recorded as the partition (the files "
                   "load at any stage count)")
    p.add_argument("--partition", default="balanced",
                   help="balanced | balanced:blocks | parameters | uniform | type:<regex> | first layer of each stage")
    p.add_argument("--dtype", default="auto", help="auto (keep the checkpoint's) | fp32 | bf16 | fp16")
    p.add_argument("--model-class", help="task class when config.architectures has none hfpipe supports, e.g. "
                   "BertForSequenceClassification (a missing head is initialised as HF does)")

    def run(args) -> int:
        from hfpipe.checkpoint import convert

        m = convert(args.model, args.output, num_stages=args.stages,
                    partition_method=parse_partition_method(args.partition), dtype=args.dtype,
                    model_class=_model_class(args.model_class), overwrite=args.overwrite, progress=not args.no_progress,
                    allow_nonfinite=args.allow_nonfinite)
        parts = m["partition"]["parts"]
        print(f"wrote {args.output}: {m['architecture']}, {m['num_layers']} layers, {m['partition']['num_stages']} "
              f"stages (first layers {parts[:-1]}), dtype {m['dtype']}")
        if m["missing_keys"]:
            print(f"  initialised (not in the source): {', '.join(m['missing_keys'])}")
        if m["unused_keys"]:
            print(f"  not used by {m['architecture']}: {', '.join(m['unused_keys'])}")
        return 0

    return run


# -------------------------------------------------------------------------------------------------------- export
@command("export", "write a pipeline checkpoint (converted or trained) as an HF folder for from_pretrained")
def _export(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="folder from `hfpipe convert`, a trainer checkpoint-N, or any "
                   "engine.save_checkpoint folder (its 'latest' tag) / tag folder")
    _output_flags(p, "HF model")
    p.add_argument("--dtype", default="auto", help="auto (as saved) | fp32 | bf16 | fp16")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--model", help="HF folder or config.json of the model, when the checkpoint has no "
                   "hfpipe.json/config.json (a bare engine.save_checkpoint); with --merge-lora: the base model "
                   "(default: the one the checkpoint / adapter names)")
    p.add_argument("--model-class", help="task class, with --model")
    p.add_argument("--merge-lora", action="store_true", help="a LoRA checkpoint-N or a PEFT adapter folder: write "
                   "the base with the adapter merged in (PEFT's merge_and_unload) instead of the adapter folder")

    def run(args) -> int:
        from hfpipe.checkpoint import export

        out = export(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite, model=args.model, model_class=_model_class(args.model_class),
                     progress=not args.no_progress, merge_lora=args.merge_lora,
                     allow_nonfinite=args.allow_nonfinite)
        from hfpipe.core.lora import is_adapter_folder

        if is_adapter_folder(out):
            print(f"wrote {out}, a PEFT adapter folder (load it with PeftModel.from_pretrained(base, {out!r}))")
        else:
            print(f"wrote {out} (load it with AutoModelFor<Task>.from_pretrained({out!r}))")
        return 0

    return run


# ---- more subcommands go above this line, one @command function each (plan, convert, export, ds-config, push) ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfpipe", description=__doc__.splitlines()[0])
    from hfpipe._version import __version__

    parser.add_argument("--version", action="version", version=f"hfpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=setup(p))
    return parser


def _libraries_log_to_stderr() -> None:
    """Import DeepSpeed with stdout pointed at stderr: its logger binds its handler to the ``sys.stdout`` of that
    moment, so its messages (the accelerator notice at import, engine logs) stay off stdout, which carries only the
    command's own output (``hfpipe ds-config > cfg.json``, ``--json`` reports). Only after parsing, so ``--help``
    stays instant."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    _libraries_log_to_stderr()
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # user errors: one clear line, no traceback
        print(f"hfpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only folder, a full disk, a path that is a file: the system's reason, one line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"hfpipe {args.command}: error: {exc.strerror or exc}{where}; check the path, its permissions and the "
              "free disk space.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
