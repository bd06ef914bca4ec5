"""PipelineTrainer on gloo ranks: one prediction per eval example (p=1, p=2, pp=2 x dp=2, uneven tail), exact resume,
the same loss curve as HF ``Trainer``, LR schedule values, and early config errors."""

import functools
import glob
import os
import shutil
import sys

import pytest
import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_config  # noqa: E402

SEQ = 16


def _cls_data(n: int, seed: int = 0):
    """Sequence classification rows of *different* lengths (the default collator pads them to max_seq_length)."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        length = 6 + i % 7
        ids = torch.randint(2, 128, (length,), generator=g).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(ids[0] % 3)
    return datasets.Dataset.from_dict(rows)


def _lm_data(n: int, seed: int = 1):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (n, SEQ), generator=g)
    lengths = [SEQ - (i * 5) % 9 for i in range(n)]
    mask = torch.tensor([[1] * k + [0] * (SEQ - k) for k in lengths])
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "labels": labels.tolist()})


def _cls_model(seed: int = 0, dropout: bool = False):
    from transformers import BertForSequenceClassification

    from hfpipe.verify import zero_dropout

    config = tiny_config("bert", num_labels=3)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config if dropout else zero_dropout(config)).eval()


def _lm_model():
    # Llama with a tied LM head (the tied weight's gradient is summed across the first and last stage). Not GPT-2:
    # its loss_type is None, so HF Trainer divides by the *unshifted* label count and is not the model's own loss.
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config("llama", tie_word_embeddings=True))


def _args(out_dir, stages, **kw):
    from hfpipe import PipelineTrainingArguments

    base = dict(output_dir=out_dir, num_stages=stages, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                gradient_accumulation_steps=2, max_seq_length=SEQ, report_to=[], disable_tqdm=True,
                plot_curves=False, export_final_model=False, save_strategy="no", logging_steps=1)
    base.update(kw)
    return PipelineTrainingArguments(**base)


# ------------------------------------------------------------------------------------------------- rank functions
def rank_predict(stages: int, n: int, out_dir: str):
    from hfpipe import PipelineTrainer

    calls = []

    def compute_metrics(p):
        calls.append(1)
        return {"num_predictions": len(p.predictions), "calls": len(calls),
                "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = PipelineTrainer(_cls_model(), _args(out_dir, stages), compute_metrics=compute_metrics)
    data = _cls_data(n)
    pred = trainer.predict(data)
    metrics = trainer.evaluate(data)
    return {"stage": trainer.engine.stage_id, "dp_rank": trainer.dp_rank, "predictions": pred.predictions,
            "label_ids": pred.label_ids, "metrics": metrics, "predict_metrics": pred.metrics}


def rank_train(out_dir: str, resume: str | None, init_seed: int, dropout: bool):
    from hfpipe import PipelineTrainer

    args = _args(out_dir, 2, max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3, warmup_steps=2,
                 resume_from_checkpoint=resume)
    trainer = PipelineTrainer(_cls_model(init_seed, dropout).train(), args, train_dataset=_cls_data(16))
    result = trainer.train()
    hist = trainer.state.log_history
    return {"loss": [h["loss"] for h in hist if "loss" in h], "lr": [h["learning_rate"] for h in hist if "loss" in h],
            "steps": [h["step"] for h in hist if "loss" in h], "global_step": result["global_step"]}


class EventRecorder:
    """A TrainerCallback-shaped recorder (duck-typed: any object with on_* methods works)."""

    def __init__(self):
        self.events = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def record(args, state, control, **kwargs):
            self.events.append((name, state.global_step))
        return record


def rank_lm_train(out_dir: str, loss_chunk_tokens: int = 0, outputs: bool = True):
    """``outputs=False``: training and evaluation only (no TensorBoard, curves or exported folders)."""
    from hfpipe import PipelineTrainer

    # evaluation every 2 steps with a different micro-batch size (3) than training (2): the engine's buffers must be
    # reset around it, or training after it breaks (the HF comparison would catch it)
    extra = dict(export_final_model=True, report_to=["tensorboard"], plot_curves=True) if outputs else \
        dict(export_final_model=False, report_to=[])
    args = _args(out_dir, 2, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=4,
                 learning_rate=1e-3, weight_decay=0.1, warmup_steps=1, train_sampling_strategy="sequential",
                 eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=3,
                 loss_chunk_tokens=loss_chunk_tokens, **extra)
    recorder = EventRecorder()
    trainer = PipelineTrainer(_lm_model(), args, train_dataset=_lm_data(8), eval_dataset=_lm_data(5, seed=3),
                              callbacks=[recorder])
    trainer.train()
    if outputs:
        trainer.export_model(os.path.join(out_dir, "live"))  # from the live weights (no checkpoint)
    hist = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": [h["loss"] for h in hist], "lr": [h["learning_rate"] for h in hist],
            "grad_norm": [h["grad_norm"] for h in hist], "events": recorder.events,
            "eval": [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]}


class SnapshotOnSave(TrainerCallback):
    def __init__(self):
        self.trainer, self.saved = None, {}

    def on_save(self, args, state, control, **kwargs):
        self.saved[state.global_step] = {n: p.detach().clone() for n, p in self.trainer.pipe.hf_named_parameters()}


def rank_best_model(out_dir: str):
    from hfpipe import PipelineTrainer

    calls = []

    def compute_metrics(p):  # a score that is best at the first evaluation (step 2)
        calls.append(1)
        return {"score": 10.0 - len(calls)}

    args = _args(out_dir, 2, max_steps=4, learning_rate=1e-2, eval_strategy="steps", eval_steps=2,
                 save_strategy="steps", save_steps=2, save_total_limit=1, metric_for_best_model="score",
                 load_best_model_at_end=True, export_final_model=True)
    snap = SnapshotOnSave()
    trainer = PipelineTrainer(_cls_model(), args, train_dataset=_cls_data(16), eval_dataset=_cls_data(5),
                              compute_metrics=compute_metrics, callbacks=[snap])
    snap.trainer = trainer
    result = trainer.train()
    return {"best": result.get("best_model_checkpoint"), "saved": snap.saved}


# -------------------------------------------------------------------------------------------------------- tests
def _reference_logits(n):
    from hfpipe.training.data import FixedLengthCollator

    model = _cls_model()
    batch = FixedLengthCollator(SEQ)([dict(r) for r in _cls_data(n)])
    with torch.no_grad():
        out = model(**batch)
    return out.logits, float(out.loss)


@pytest.mark.parametrize("world,stages", [(1, 1), (2, 2), (4, 2)], ids=["p1", "p2", "pp2xdp2"])
def test_evaluate_returns_one_prediction_per_example(dist_pool, tmp_path, world, stages):
    n = 13  # eval global batch = 2 x 2 micro-batches x dp: 13 leaves a tail at every world size
    results = dist_pool(world).run(rank_predict, stages, n, str(tmp_path))
    logits, loss = _reference_logits(n)
    assert {(r["stage"], r["dp_rank"]) for r in results} == {(s, d) for s in range(stages)
                                                              for d in range(world // stages)}
    for r in results:  # the same, complete, ordered predictions on every rank
        assert r["predictions"].shape == (n, 3)
        torch.testing.assert_close(torch.from_numpy(r["predictions"]), logits, rtol=1e-5, atol=1e-5)
        assert r["label_ids"].tolist() == _cls_data(n)["labels"]
        m = r["metrics"]
        # compute_metrics runs once per pass (predict, then evaluate) with all n examples
        assert r["predict_metrics"]["test_num_predictions"] == n and r["predict_metrics"]["test_calls"] == 1
        assert m["eval_num_predictions"] == n and m["eval_calls"] == 2
        assert m["eval_loss"] == pytest.approx(loss, rel=1e-5)
        assert m["eval_accuracy"] == pytest.approx(float((logits.argmax(-1) == torch.tensor(
            _cls_data(n)["labels"])).float().mean()))


def test_resume_reproduces_the_uninterrupted_loss_curve(dist_pool, tmp_path):
    pool = dist_pool(2)
    a = pool.run(rank_train, str(tmp_path / "a"), None, 0, True)[0]
    # a different initialisation: every weight, the optimizer, schedule, data position and RNG come from the checkpoint
    b = pool.run(rank_train, str(tmp_path / "b"), str(tmp_path / "a" / "checkpoint-3"), 7, True)[0]
    # "latest" picks the newest checkpoint-N of output_dir
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "c" / "checkpoint-3")
    c = pool.run(rank_train, str(tmp_path / "c"), "latest", 7, True)[0]
    assert c["loss"] == a["loss"]
    assert a["steps"] == list(range(1, 7)) and b["steps"] == list(range(1, 7)) and b["global_step"] == 6
    assert b["loss"] == a["loss"]  # exact in fp32 (dropout on: the RNG states are restored too)
    assert b["lr"] == a["lr"]
    assert len(set(a["loss"])) == 6
    # linear schedule (HF's get_scheduler), 2 warm-up steps of 6: the rate each step used, as HF Trainer logs it
    assert a["lr"] == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "rng_state_1.pth").is_file()
    from transformers import TrainerState

    from hfpipe.training.state import read_state

    state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))  # HF's own file
    assert (state.global_step, state.max_steps, state.train_batch_size, len(state.log_history)) == (3, 6, 4, 3)
    assert read_state(str(ckpt))["data_position"] == {"epoch": 0, "batch_in_epoch": 3, "examples_seen": 12}


@functools.lru_cache(maxsize=1)
def _hf_trainer_reference(tmp: str):
    """HF Trainer on the same model and data (one batch of 8, seen 4 times): ``(model, log rows, eval loss)``; run
    once for both tests that compare with it."""
    from transformers import Trainer, TrainingArguments

    hf_args = TrainingArguments(output_dir=os.path.join(tmp, "hf"), per_device_train_batch_size=8, max_steps=4,
                                learning_rate=1e-3, weight_decay=0.1, warmup_steps=1, lr_scheduler_type="linear",
                                logging_steps=1, optim="adamw_torch", report_to="none", use_cpu=True,
                                save_strategy="no", train_sampling_strategy="sequential", max_grad_norm=1.0,
                                seed=0, disable_tqdm=True)
    hf_model = _lm_model()
    trainer = Trainer(model=hf_model, args=hf_args, train_dataset=_lm_data(8))
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    return hf_model, hist, trainer.evaluate(_lm_data(5, seed=3))["eval_loss"]


def _assert_matches_hf(pipe, tmp_path_factory):
    hf_model, hist, hf_eval = _hf_trainer_reference(str(tmp_path_factory.getbasetemp()))
    hf_loss = [h["loss"] for h in hist]
    assert len(hf_loss) == 4 and hf_loss[0] > hf_loss[-1]
    torch.testing.assert_close(torch.tensor(pipe["loss"]), torch.tensor(hf_loss), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(pipe["lr"]), torch.tensor([h["learning_rate"] for h in hist]))
    # the norm of the whole model (tied weight once), which DeepSpeed's own fp32 pipeline clipping gets wrong
    torch.testing.assert_close(torch.tensor(pipe["grad_norm"]), torch.tensor([h["grad_norm"] for h in hist]),
                               rtol=1e-5, atol=1e-6)
    # eval loss at step 4 (after the 4th update) equals HF's on the 5 eval examples (batch-size-weighted mean)
    assert [s for s, _ in pipe["eval"]] == [2, 4]
    assert pipe["eval"][-1][1] == pytest.approx(hf_eval, rel=1e-5)
    return hf_model


def test_chunked_loss_trainer_matches_hf_trainer(dist_pool, tmp_path, tmp_path_factory):
    """--loss_chunk_tokens 5 (chunks of 2 rows x 2 positions): the same losses, norms and eval loss as HF's."""
    _assert_matches_hf(dist_pool(2).run(rank_lm_train, str(tmp_path / "pipe"), 5, False)[0], tmp_path_factory)


def test_pipeline_trainer_matches_hf_trainer(dist_pool, tmp_path, tmp_path_factory):
    from transformers import LlamaForCausalLM

    pipe = dist_pool(2).run(rank_lm_train, str(tmp_path / "pipe"))[0]
    hf_model = _assert_matches_hf(pipe, tmp_path_factory)
    # logging: callbacks in TrainerCallback order, JSONL, TensorBoard events, PNG curve
    names = [e for e, _ in pipe["events"]]
    assert names[:3] == ["on_init_end", "on_train_begin", "on_epoch_begin"] and names[-1] == "on_train_end"
    assert names.count("on_step_end") == 4 and names.count("on_evaluate") == 2 and names.count("on_log") == 6
    lines = (tmp_path / "pipe" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"tokens_per_second"' in lines[0]
    assert glob.glob(str(tmp_path / "pipe" / "runs" / "*" / "events.out.tfevents.*"))
    assert (tmp_path / "pipe" / "training_curves.png").stat().st_size > 1000
    # the exported folders (from the last checkpoint, and from the live weights) hold the same weights as HF
    # Trainer's model after 4 steps
    ref = dict(hf_model.named_parameters())
    for folder in ("final", "live"):
        exported = LlamaForCausalLM.from_pretrained(str(tmp_path / "pipe" / folder))
        for name, p in exported.named_parameters():
            torch.testing.assert_close(p, ref[name].detach(), rtol=1e-5, atol=1e-6, msg=f"{folder}: {name}")


def test_zero2_config_fails_before_any_process_group(tmp_path):
    import json

    import torch.distributed as dist

    from hfpipe import PipelineTrainer
    from hfpipe.training.config import ConfigError

    path = tmp_path / "z2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="ZeRO stage 2 .* cannot be combined with pipeline parallelism"):
        PipelineTrainer(_cls_model(), _args(str(tmp_path), 2, deepspeed=str(path)))
    assert not dist.is_initialized()


def test_best_checkpoint_is_kept_and_exported(dist_pool, tmp_path):
    from transformers import BertForSequenceClassification

    results = dist_pool(2).run(rank_best_model, str(tmp_path))
    assert results[0]["best"] == str(tmp_path / "checkpoint-2")
    # save_total_limit=1 keeps the newest checkpoint and the best one
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(("checkpoint-", "final"))) == \
        ["checkpoint-2", "checkpoint-4", "final"]
    at_step2 = {n: p for r in results for n, p in r["saved"][2].items()}
    at_step4 = {n: p for r in results for n, p in r["saved"][4].items()}
    exported = dict(BertForSequenceClassification.from_pretrained(str(tmp_path / "final")).named_parameters())
    assert set(at_step2) == set(exported)
    for name, p in exported.items():
        torch.testing.assert_close(p.detach(), at_step2[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(at_step2[n], at_step4[n]) for n in at_step2)  # training went on after step 2
