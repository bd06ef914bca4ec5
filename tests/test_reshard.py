"""Resuming at another stage count with the optimizer (issue 17, part 5): a checkpoint written at 2 stages x 2
replicas resumes at 4 stages x 1, and one written there resumes at 2 x 2 again, with the Adam moments and step
resharded by layer (``hfpipe.training.reshard``): the loss curve is the uninterrupted run's."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_config  # noqa: E402

SEQ = 8


def _data(n: int = 16):
    import datasets

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (n, SEQ), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * SEQ] * n,
                                       "labels": ids.tolist()})


def rank_train(out_dir: str, stages: int, resume, max_steps: int):
    """A tiny Llama (tied LM head: its states live on the first and the last stage) in fp32, global batch 8 at any
    layout; Adam at a rate where its moments matter."""
    from transformers import LlamaForCausalLM

    from hfpipe import PipelineTrainer, PipelineTrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", tie_word_embeddings=True))
    dp = 4 // stages
    args = PipelineTrainingArguments(output_dir=out_dir, num_stages=stages, per_device_train_batch_size=2,
                                     gradient_accumulation_steps=4 // dp, max_seq_length=SEQ, report_to=[],
                                     disable_tqdm=True, plot_curves=False, export_final_model=False, logging_steps=1,
                                     max_steps=max_steps, save_strategy="steps", save_steps=2, learning_rate=1e-2,
                                     weight_decay=0.01, train_sampling_strategy="sequential",
                                     resume_from_checkpoint=resume)
    trainer = PipelineTrainer(model, args, train_dataset=_data())
    trainer.train()
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_resume_at_another_stage_count_keeps_the_optimizer(dist_pool, tmp_path):
    pool = dist_pool(4)
    a = pool.run(rank_train, str(tmp_path / "a"), 2, None, 6)[0]  # 2 stages x 2 replicas, uninterrupted
    b = pool.run(rank_train, str(tmp_path / "b"), 4, str(tmp_path / "a" / "checkpoint-2"), 6)[0]  # 2x2 -> 4x1
    c = pool.run(rank_train, str(tmp_path / "c"), 2, str(tmp_path / "b" / "checkpoint-4"), 6)[0]  # 4x1 -> 2x2
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == list(range(1, 7)) and sorted(c) == list(range(1, 7))
    assert a[6] < a[1] - 0.2  # it learns (4.86 -> 4.47)
    resumed = [b[3], b[4], b[5], b[6], c[5], c[6]]
    torch.testing.assert_close(torch.tensor(resumed, dtype=torch.float64),
                               torch.tensor([a[3], a[4], a[5], a[6], a[5], a[6]], dtype=torch.float64), rtol=1e-6,
                               atol=0)
    assert [b[1], b[2]] == [a[1], a[2]]  # log history came from the checkpoint
