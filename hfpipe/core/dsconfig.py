"""Up-front checks of a DeepSpeed config for a pipeline, before any process group is joined.

DeepSpeed discovers some incompatibilities late (ZeRO-2/3 with a pipeline fails deep inside the engine) or not at
all; these checks say the value, what was expected and the fix. Independent of ``hfpipe.training.config`` so that
``hfpipe.initialize`` and the trainer can both call it.
"""

from __future__ import annotations


def validate_pipeline_ds_config(config: dict, num_stages: int, world_size: int) -> None:
    """Raise ``ValueError`` when ``config`` cannot drive a pipeline of ``num_stages`` stages on ``world_size`` ranks."""
    if num_stages < 1 or world_size % num_stages:
        raise ValueError(f"world size {world_size} is not a multiple of num_stages={num_stages}; launch a multiple "
                         f"of {num_stages} processes (the rest is data parallelism).")
    dp = world_size // num_stages
    stage = int((config.get("zero_optimization") or {}).get("stage", 0) or 0)
    if stage >= 2:
        raise ValueError(f"zero_optimization.stage={stage} is incompatible with pipeline parallelism (DeepSpeed "
                         "partitions gradients/parameters across data-parallel ranks, which the pipeline engine does "
                         "not support); use stage 0 or 1.")
    fp16 = bool((config.get("fp16") or {}).get("enabled", False))
    bf16 = bool((config.get("bf16") or {}).get("enabled", False))
    if fp16 and bf16:
        raise ValueError("both fp16.enabled and bf16.enabled are true in the DeepSpeed config; enable at most one.")
    train = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    if None not in (train, micro, accum) and train != micro * accum * dp:
        raise ValueError(f"train_batch_size={train} != train_micro_batch_size_per_gpu={micro} x "
                         f"gradient_accumulation_steps={accum} x data-parallel size {dp} (= {micro * accum * dp}); "
                         "set train_batch_size to that product or adjust the other two.")
