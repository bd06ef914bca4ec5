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
def rank_frozen_peer(timeout_s: float):
    """Stage 1 freezes (sleeps past the timeout) instead of taking part in a pipeline step; stage 0 must end with a
    line naming it. The short timeout is the world group's (DeepSpeed's pipeline sends through it); the groups the
    engine builds get a long one, which their creation needs on a loaded machine (3 s once was not enough)."""
    import time
    from datetime import timedelta

    from transformers import AutoModelForCausalLM

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from hfpipe import to_pipeline
    from hfpipe.launch import PeerTimeout
    from hfpipe.pipeline import initialize

    c10d.default_pg_timeout = timedelta(seconds=300)  # the engine's new groups: time to build them under load
    pipe = to_pipeline(tiny_config("llama"), model_class=AutoModelForCausalLM, num_stages=2,
                       partition_method="uniform")
    engine, *_ = initialize(pipe, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    dist.barrier()
    c10d.default_pg_timeout = timedelta(seconds=timeout_s)  # the world group's, as the message reads it
    if engine.stage_id == 1:
        time.sleep(timeout_s + 2)  # alive (its groups open) until stage 0 has given up
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

    # its own pool (a timed-out group is not reusable), whose world group -- the one DeepSpeed's pipeline sends
    # activations and gradients through -- has the short timeout
    with DistributedPool(2, timeout=180, pg_timeout=5) as pool:
        waited, message = pool.run(rank_frozen_peer, 5)[0]
        pool.close(force=True)
    assert message.startswith("rank 0 (stage 0 of 2): stage 1 stopped answering; no reply within 5 s "
                              "(--ddp_timeout)"), message
    assert 4.5 < waited < 30  # the 5 s timeout, with room for a loaded machine (gloo's default would be 300 s)


# ------------------------------------------------------------------------------- a failed step (issue 17.1)
def rank_failed_step():
    """Two engines from the same seed on the same batch: A's optimizer step raises on its first two calls (every
    rank, after the schedule's communication), B is the reference. What A's later calls raise and return."""
    from transformers import AutoModelForCausalLM

    from hfpipe import to_pipeline
    from hfpipe.core.batches import micro_batches
    from hfpipe.pipeline import initialize

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
              "steps_per_print": 1000, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def engine():
        pipe = to_pipeline(tiny_config("llama"), model_class=AutoModelForCausalLM, num_stages=2,
                           partition_method="uniform", seed=0)
        return pipe, initialize(pipe, config)[0]

    def step(pipe, eng):
        return float(eng.train_batch(iter(micro_batches(batch, pipe, 2, 0, 1))))

    pipe, a = engine()
    real_step, fails = a.optimizer.step, [2]

    def failing_step(*args, **kwargs):
        if fails[0]:
            fails[0] -= 1
            raise RuntimeError(f"step failure {2 - fails[0]}")
        return real_step(*args, **kwargs)

    a.optimizer.step = failing_step
    said = []
    for _ in range(2):
        try:
            step(pipe, a)
        except RuntimeError as e:
            said.append(str(e))
    got = [step(pipe, a) for _ in range(3)]
    pipe_b, b = engine()
    return said, got, [step(pipe_b, b) for _ in range(3)]


def test_after_a_failed_step_the_next_one_raises_its_own_error_or_trains_as_if_it_never_ran(dist_pool):
    said, got, want = dist_pool(2).run(rank_failed_step)[1]
    assert said == ["step failure 1", "step failure 2"]  # not "train_batch timer has already been started"
    assert want[1] < want[0] and len(set(want)) == 3  # the reference learns
    # the failed batches left no gradients behind (Adam's first step hides their scale, its second does not): A's
    # good steps are B's, bit for bit
    assert got == want


# --------------------------------------------------------------- errors after the model loaded (issue 17.3)
def test_an_error_after_the_model_loaded_is_one_line_from_rank_0_and_a_bug_keeps_its_traceback(monkeypatch,
                                                                                                 capsys):
    from types import SimpleNamespace

    from hfpipe.launch import NeverJoined, PeerTimeout
    from hfpipe.training import failfast
    from hfpipe.training.datacheck import check_dataset

    def exits(fn, rank: int):
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(SystemExit) as info:
            with failfast.after_model_load():
                fn()
        return info.value.code, capsys.readouterr().err

    vocab = SimpleNamespace(vocab_size=10)
    bad_ids = lambda: check_dataset([{"input_ids": [1, 12]}], vocab, split="train")  # noqa: E731
    line = ("error: train example 0: token id 12 is outside the model's vocabulary (vocab_size=10); tokenise with "
            "the model's own tokenizer (or resize the embeddings after adding tokens).\n")
    assert exits(bad_ids, 0) == (2, line)
    assert exits(bad_ids, 1) == (2, "")  # every rank finds it; rank 0 says it
    # a rank's own timeout is said by that rank; a node that never joined by rank 0 only
    assert exits(lambda: (_ for _ in ()).throw(PeerTimeout("rank 1: the master did not answer")), 1) \
        == (2, "error: rank 1: the master did not answer\n")
    assert exits(lambda: (_ for _ in ()).throw(NeverJoined("rank(s) 1 never joined")), 1) == (2, "")
    assert exits(lambda: (_ for _ in ()).throw(PermissionError(13, "Permission denied", "/out/x")), 0) \
        == (2, "error: Permission denied: /out/x; check the path, its permissions and the free disk space.\n")
    # bugs: a library's ValueError, a TypeError in hfpipe's own code -- the traceback stays
    import json

    monkeypatch.setenv("RANK", "0")
    for bug, kind in ((lambda: json.loads("{"), json.JSONDecodeError),
                      (lambda: check_dataset(5, vocab, split="train"), TypeError)):
        with pytest.raises(kind):
            with failfast.after_model_load():
                bug()
