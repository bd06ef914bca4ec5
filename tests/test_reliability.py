"""Checkpoints that never half-load (issue 17, part 3): a folder counts only with its completion marker; ``latest``
skips (and names) incomplete and damaged ones; a killed save costs nothing (``save_total_limit`` prunes only after
the new folder is complete) and the next run removes its leftovers."""

import contextlib
import io
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_config  # noqa: E402

SEQ = 12


class KilledSave(RuntimeError):
    pass


def _data(n: int = 16):
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (n, SEQ), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * SEQ] * n,
                                       "labels": (ids[:, 0] % 3).tolist()})


def rank_train(out_dir: str, resume, max_steps: int, save_total_limit=None, kill_save_at=None):
    """Train a tiny BERT classifier at 2 stages; ``kill_save_at``: the save of that step dies after DeepSpeed wrote
    its files (as a kill -9 there would leave them). Returns losses by step and what hfpipe said."""
    from transformers import BertForSequenceClassification

    from hfpipe import PipelineTrainer, PipelineTrainingArguments
    from hfpipe.verify import zero_dropout

    torch.manual_seed(0)
    model = BertForSequenceClassification(zero_dropout(tiny_config("bert", num_labels=3))).train()
    args = PipelineTrainingArguments(output_dir=out_dir, num_stages=2, per_device_train_batch_size=2,
                                     gradient_accumulation_steps=2, max_seq_length=SEQ, report_to=[],
                                     disable_tqdm=True, plot_curves=False, export_final_model=False, logging_steps=1,
                                     max_steps=max_steps, save_strategy="steps", save_steps=2, learning_rate=1e-3,
                                     save_total_limit=save_total_limit, resume_from_checkpoint=resume)
    trainer = PipelineTrainer(model, args, train_dataset=_data())
    if kill_save_at is not None:
        save = trainer.engine.save_checkpoint

        def dying_save(path, **kw):
            save(path, **kw)
            if trainer.state.global_step == kill_save_at:
                raise KilledSave(path)
        trainer.engine.save_checkpoint = dying_save
    said = io.StringIO()
    killed = False
    with contextlib.redirect_stdout(said):
        try:
            trainer.train()
        except KilledSave:
            killed = True
    return {"loss": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}, "killed": killed,
            "said": said.getvalue()}


def _listing(out):
    return sorted(p for p in os.listdir(out) if p.startswith(("checkpoint-", ".")) or ".tmp-" in p)


def test_killed_save_and_damaged_state_fall_back_to_the_last_complete_checkpoint(dist_pool, tmp_path):
    from hfpipe.training.checkpointing import COMPLETE_MARKER, STATE_FILE

    pool, out = dist_pool(2), tmp_path / "run"
    a = pool.run(rank_train, str(out), None, 4)[0]
    assert sorted(a["loss"]) == [1, 2, 3, 4] and len(set(a["loss"].values())) == 4
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file()
    # a truncated trainer_state.json (e.g. a disk that filled up): resume falls back to checkpoint-2
    state = out / "checkpoint-4" / STATE_FILE
    state.write_text(state.read_text()[:40])
    # this run's save at step 6 dies after DeepSpeed's files (before the marker); save_total_limit=1
    b = pool.run(rank_train, str(out), "latest", 6, 1, 6)[0]
    assert b["killed"]
    assert f"skipping incomplete checkpoint {out}/checkpoint-4: {STATE_FILE} is damaged" in b["said"]
    assert f"checkpoint {out}/checkpoint-4 is damaged" in b["said"]  # reported, not removed
    assert [b["loss"][s] for s in (3, 4)] == [a["loss"][s] for s in (3, 4)]  # resumed exactly from step 2
    # the killed save never cost the previous complete checkpoint (pruning waits for the marker)
    assert _listing(out) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file() and not (out / "checkpoint-6" / COMPLETE_MARKER).exists()
    assert json.loads((out / "checkpoint-4" / STATE_FILE).read_text())["global_step"] == 4
    # leftovers of a killed convert / JSON write
    (out / ".ckpt.tmp-0badc0de").mkdir()
    (out / ".ckpt.tmp-0badc0de" / "layer_00-model_states.pt").write_bytes(b"\0" * 8)
    (out / "checkpoint-4" / f"{STATE_FILE}.tmp-12345").write_text("{")
    c = pool.run(rank_train, str(out), "latest", 6, 1)[0]
    assert not c["killed"]
    assert f"skipping incomplete checkpoint {out}/checkpoint-6: no {COMPLETE_MARKER}" in c["said"]
    assert f"removed incomplete checkpoint {out}/checkpoint-6" in c["said"]
    assert f"removed stale temporary {out}/.ckpt.tmp-0badc0de" in c["said"]
    assert [c["loss"][s] for s in (5, 6)] == [b["loss"][s] for s in (5, 6)]  # from step 4, exactly
    assert _listing(out) == ["checkpoint-6"]  # complete, so checkpoint-4 was pruned after it
    assert (out / "checkpoint-6" / COMPLETE_MARKER).is_file()


def test_explicit_incomplete_checkpoint_is_one_clear_error(tmp_path):
    from hfpipe.training.checkpointing import COMPLETE_MARKER, STATE_FILE, find_checkpoint, write_json_atomic

    for step, complete in ((2, True), (4, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "latest").write_text(f"global_step{step}")
        write_json_atomic(str(d / STATE_FILE), {"global_step": step})
        if complete:
            write_json_atomic(str(d / COMPLETE_MARKER), {"global_step": step})
    assert not list(tmp_path.glob("*/*.tmp-*"))  # the temporary names were renamed away
    assert find_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(FileNotFoundError, match=rf"checkpoint-4: not a complete checkpoint: no {COMPLETE_MARKER} "
                                                r"\(a save that did not finish\); resume from .*checkpoint-2"):
        find_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-N folder"):
        find_checkpoint("latest", str(tmp_path / "checkpoint-4"))


# ------------------------------------------------------------------------------------------ timeouts (part 4)
def rank_frozen_peer(freeze_s: float):
    """Stage 1 freezes (sleeps) instead of taking part in a pipeline step; stage 0 must end with a line naming it."""
    import time

    from transformers import AutoModelForCausalLM

    import torch.distributed as dist

    from hfpipe import to_pipeline
    from hfpipe.launch import PeerTimeout
    from hfpipe.pipeline import initialize

    pipe = to_pipeline(tiny_config("llama"), model_class=AutoModelForCausalLM, num_stages=2,
                       partition_method="uniform")
    engine, *_ = initialize(pipe, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    dist.barrier()
    if engine.stage_id == 1:
        time.sleep(freeze_s)
        return None
    from hfpipe.core.batches import micro_batches

    ids = torch.randint(1, 100, (2, 8))
    data = micro_batches({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, pipe, 2, 0, 1)
    t0 = time.monotonic()
    try:
        engine.train_batch(iter(data))
    except PeerTimeout as e:
        return time.monotonic() - t0, str(e)
    return time.monotonic() - t0, "no timeout"


def test_a_frozen_stage_ends_the_run_within_the_timeout_naming_it():
    from hfpipe.launch import DistributedPool

    # 15 s, not less: the same timeout covers building the groups, which a loaded suite once made take over 3 s
    with DistributedPool(2, timeout=180, pg_timeout=15) as pool:  # its own pool: a timed-out group is not reusable
        # stage 1 never joins the step (it sleeps, then idles in the pool): the 3 s limit, not the length of the
        # freeze, decides when stage 0 stops
        waited, message = pool.run(rank_frozen_peer, 16)[0]
        pool.close(force=True)
    assert message.startswith("rank 0 (stage 0 of 2): stage 1 stopped answering; no reply within 15 s "
                              "(--ddp_timeout)"), message
    assert 14 < waited < 60  # the 15 s timeout, with room for a loaded machine (gloo's default would be 300 s)
