"""The ``hfpipe`` console script: each subcommand parses its arguments and calls one library function.

Subcommands register themselves with ``@command(name, help)`` on a function ``(subparser) -> runner``; the runner
gets the parsed ``argparse.Namespace`` and returns the exit status. Keep logic in the library, not here.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

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
    p.add_argument("--inputs", help="a .pt or .json dict of input_ids, attention_mask and label fields")
    p.add_argument("--json", action="store_true", help="print the report as JSON on the last line")

    def run(args) -> int:
        from .verify import format_report, verify_dir

        report = verify_dir(args.model, stages=args.stages, micro_batches=args.micro_batches,
                            batch_size=args.batch_size, seq_len=args.seq_len, dp=args.dp, dtype=args.dtype,
                            partition=parse_partition(args.partition), padding=args.padding, inputs=args.inputs)
        print(format_report(report))
        if args.json:
            _print_json_last(report)
        return 0 if report["passed"] else 1

    return run


def parse_partition(value: str):
    """``"0,5,9"`` -> ``[0, 5, 9]``; anything else is a method name."""
    if value and value[0].isdigit():
        return [int(x) for x in value.split(",")]
    return value


# ---------------------------------------------------------------------------------------------------- families
@command("families", "list supported model families and heads")
def _families(p: argparse.ArgumentParser):
    def run(args) -> int:
        from .adapters import supported_families
        from .heads import HEADS

        for model_type, how in supported_families().items():
            print(f"{model_type:<16}{how}")
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
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step (default 4 x stages)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (ZeRO-1 divides optimizer states)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1], default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--attention", choices=["flash", "dense"], default="flash",
                   help="flash: masked keys cost nothing (GPU kernels); dense: every query meets every key")
    p.add_argument("--max-memory-gib", type=float, default=None, help="per-stage memory cap for balanced methods")
    p.add_argument("--compare", action="store_true", help="all partition methods side by side")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on the last line")

    def run(args) -> int:
        from .plan import compare, format_compare, format_plan, plan

        kwargs = dict(stages=args.stages, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                      micro_batches=args.micro_batches, dp=args.dp, zero_stage=args.zero_stage, dtype=args.dtype,
                      activation_checkpointing=args.activation_checkpointing, attention_kernel=args.attention,
                      memory_cap_gib=args.max_memory_gib)
        if args.compare:
            result = compare(args.model, **kwargs)
            print(format_compare(result))
        else:
            result = plan(args.model, partition=parse_partition(args.partition), **kwargs)
            print(format_plan(result))
        if args.json:
            _print_json_last(result)
        return 0

    return run


# ---- more subcommands go above this line, one @command function each (plan, convert, export, ds-config, push) ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfpipe", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"hfpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=setup(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # user errors: one clear line, no traceback
        print(f"hfpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
