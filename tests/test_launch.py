"""The rank pool behind the multi-process tests: every job's process groups are freed when it ends (each DeepSpeed
engine builds its grid anew; left alive, gloo groups kept ~1700 threads per idle rank after a full run)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_config  # noqa: E402


def rank_build_engine():
    from transformers import AutoModelForCausalLM

    from hfpipe import to_pipeline
    from hfpipe.pipeline import initialize

    pipe = to_pipeline(tiny_config("llama"), model_class=AutoModelForCausalLM, num_stages=2,
                       partition_method="uniform")
    engine, *_ = initialize(pipe, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    return engine.stage_id


def rank_threads():
    from torch.distributed import distributed_c10d as c10d

    return len(os.listdir(f"/proc/{os.getpid()}/task")), len(c10d._world.pg_map)


def test_jobs_leave_no_process_groups_or_threads_behind(dist_pool):
    pool = dist_pool(2)
    assert pool.run(rank_build_engine) == [0, 1]
    after_one = pool.run(rank_threads)
    for _ in range(3):
        pool.run(rank_build_engine)
    after_four = pool.run(rank_threads)
    assert after_four == after_one  # threads and groups: back to the same count after every engine
    assert all(groups == 1 for _, groups in after_four)  # only the world group stays
