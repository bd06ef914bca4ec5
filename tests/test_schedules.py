"""Pipeline schedules (issue 19): ZB-H1 and DualPipeV train exactly like 1F1B and the HF model (loss and every
gradient, tied embeddings, padding, activation checkpointing, pp x dp), a PipelineTrainer run gives 1F1B's loss
curve with each, their orders and the memory/efficiency the theory gives, and one clear error for a schedule that
cannot run."""

import os

import pytest

from hfpipe.core.dsconfig import ConfigError, check_schedule, validate_pipeline_ds_config
from hfpipe.schedules import _simulate_dualpipev, dualpipev_order, orders_table, simulate, zb_h1_order
from hfpipe.verify import format_report, verify

from test_equivalence import spec_for


# ---------------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("p,m", [(2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (3, 5)])
def test_zb_h1_order_and_theory(p, m):
    for i in range(p):
        order = zb_h1_order(p, m, i)
        # every pass once, F/B/W each in micro-batch order, W after its B, B after its F
        for op in "FBW":
            assert [j for o, j in order if o == op] == list(range(m))
        pos = {(o, j): k for k, (o, j) in enumerate(order)}
        assert all(pos[("F", j)] < pos[("B", j)] < pos[("W", j)] for j in range(m))
    zb = simulate("zb-h1", p, m, 1.0, 1.0, 1.0)
    assert zb["step_time"] == 3 * m + p - 1  # the paper's ZB-H1: bubble (p-1)(t_F+t_B-t_W)
    one = simulate("1f1b", p, m, 1.0, 1.0, 1.0)
    assert one["step_time"] == one["ideal_1f1b"] == 3 * (m + p - 1)
    assert one["peak_in_flight"] == [min(p - i, m) for i in range(p)]
    assert max(zb["peak_in_flight"]) == max(one["peak_in_flight"])  # 1F1B's peak activation memory


def test_zb_h1_goal_in_theory():
    r = simulate("zb-h1", 4, 8, 0.02, 0.02, 0.02)
    assert r["ratio"] == pytest.approx(27 / 33)


@pytest.mark.parametrize("p,m,step", [(2, 4, 14.0), (2, 8, 26.0), (3, 6, 22.5), (4, 8, 31.0), (4, 16, 55.0)])
def test_dualpipev_order_and_theory(p, m, step):
    """DeepSpeed's DualPipeVSchedule as the engine runs it: consistent p2p streams (tagged and in NCCL's untagged
    order), inputs before use, no deadlock even if sends wait for their receiver; step time (t_F=1, t_B+t_W=2) below
    1F1B's (m+p-1)*3, and p + 1/2 micro-batches of activations on every rank (1F1B: p on its first stage)."""
    for r in range(p):
        order = dualpipev_order(p, m, r)
        for op in "FB":
            for phase in (0, 1):
                assert [j for o, ph, j in order if (o, ph) == (op, phase)] == list(range(m))
    for rendezvous in (False, True):
        r = _simulate_dualpipev(p, m, 1.0, 2.0, rendezvous=rendezvous)
        assert r["step_time"] == step < 3 * (m + p - 1)
        assert r["peak_in_flight"] == [p + 0.5] * p
    assert simulate("dualpipev", p, m, 1.0, 1.0, 1.0)["step_time"] == step
    if (p, m) == (2, 4):  # rank 0 runs chunk 0 (F0..) and chunk 3 (F0'..), which ends in the loss
        assert orders_table("dualpipev", p, m)[0] == "F0 F1 F2 F0' B0' F1' F3 B1' F2' B0 B2' F3' B1 B3' B2 B3"


def test_schedule_errors():
    assert check_schedule(None) == "1f1b" and check_schedule("ZB-H1") == "zb-h1"
    with pytest.raises(ConfigError, match=r"schedule='gpipe'.*expected one of 1f1b, zb-h1, dualpipev"):
        check_schedule("gpipe", source="--pipeline_schedule")
    with pytest.raises(ConfigError, match=r"dualpipev.*4 micro-batches at 4 stages.*>= 2 x stages micro-batches per "
                                          r"step \(8 here\); use 8 or more \(gradient_accumulation_steps"):
        check_schedule("dualpipev", num_stages=4, micro_batches=4)
    with pytest.raises(ConfigError, match=r"zb-h1.*fp16.*use bf16 or fp32"):
        validate_pipeline_ds_config({"pipeline": {"schedule": "zb-h1"}, "fp16": {"enabled": True}}, 2, 2)
    with pytest.raises(ConfigError, match=r"dualpipev.*fp16.*outside fp16's loss scaler"):
        validate_pipeline_ds_config({"pipeline": {"schedule": "dualpipev"}, "fp16": {"enabled": True},
                                     "gradient_accumulation_steps": 4}, 2, 2)
    from transformers import LlamaForCausalLM

    from hfpipe import to_pipeline

    with pytest.raises(ValueError, match=r"dualpipev.*2 x num_stages = 6 chunks.*4 transformer blocks; use "
                                         r"num_stages <= 2"):  # before any process group
        to_pipeline(spec_for("llama", "causal-lm").hf_config(), model_class=LlamaForCausalLM, num_stages=3,
                    schedule="dualpipev")


def test_plan_predicts_each_schedule():
    """hfpipe plan: bubble from the schedule's simulation (t_B = 2 t_F), activation memory scaled by the
    micro-batches each stage holds; dualpipev plans 2p chunks, rank 0 owning the embedding and the head."""
    from transformers import LlamaForCausalLM

    from hfpipe.plan import plan

    config = spec_for("llama", "causal-lm", tie_word_embeddings=True, num_hidden_layers=8).hf_config()
    runs = {s: plan(config, model_class=LlamaForCausalLM, stages=4, micro_batches=8, seq_len=64, schedule=s)
            for s in ("1f1b", "zb-h1", "dualpipev")}
    assert runs["1f1b"]["bubble_efficiency"] == pytest.approx(8 / 11)
    assert runs["zb-h1"]["bubble_efficiency"] == pytest.approx(24 / simulate("zb-h1", 4, 8, 1.0, 1.0, 1.0)["step_time"])
    v = runs["dualpipev"]
    assert v["bubble_efficiency"] == pytest.approx(24 / 31) and len(v["parts"]) == 2 * 4 + 1
    rank0 = v["stage_rows"][0]
    assert rank0["layers"].startswith("embed") and rank0["layers"].endswith("head")
    assert [r["in_flight"] for r in v["stage_rows"]] == [4.5] * 4
    one = runs["1f1b"]["stage_rows"]
    # every rank holds p + 1/2 micro-batches of half a stage's layers twice: about 1F1B's first stage, 4.5 / 4
    ratio = v["stage_rows"][2]["memory_gib"]["activations"] / one[0]["memory_gib"]["activations"]
    assert 1.0 < ratio < 1.25
    assert sum(r["params"] for r in v["stage_rows"]) == sum(r["params"] for r in one)


# ------------------------------------------------------------------------------------------------- exactness
def check(report, schedule="zb-h1"):
    assert report["passed"], format_report(report)
    assert report["schedule"] == schedule
    assert report["loss_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5


@pytest.mark.parametrize("stages,dp,checkpointing", [(4, 1, 0), (2, 2, 1)])
def test_zb_h1_equals_hf(dist_pool, stages, dp, checkpointing):
    """Tied Llama on right-padded batches, 4 micro-batches: 4 stages; 2 stages x 2 replicas with every block
    checkpointed."""
    spec = spec_for("llama", "causal-lm", tie_word_embeddings=True)
    check(verify(spec, stages=stages, dp=dp, micro_batches=4, batch_size=4 * dp, seq_len=10, schedule="zb-h1",
                 activation_checkpoint_interval=checkpointing, pool=dist_pool(stages * dp)))


@pytest.mark.parametrize("stages,dp,checkpointing,padding", [(4, 1, 0, "right"), (2, 2, 1, "left")])
def test_dualpipev_equals_hf(dist_pool, stages, dp, checkpointing, padding):
    """Tied Llama (8 blocks: 2p chunks at 4 stages; embedding and head both on rank 0), 2p micro-batches: 4 stages
    on right-padded batches; 2 stages x 2 replicas, left-padded, every block checkpointed. Logits, loss and every
    gradient against HF."""
    spec = spec_for("llama", "causal-lm", tie_word_embeddings=True, num_hidden_layers=8)
    check(verify(spec, stages=stages, dp=dp, micro_batches=2 * stages, batch_size=2 * stages * dp, seq_len=10,
                 schedule="dualpipev", activation_checkpoint_interval=checkpointing, padding=padding,
                 pool=dist_pool(stages * dp)), "dualpipev")


def train_losses(schedule: str, stages: int, steps: int, bf16: bool = False, zero: int = 0) -> dict:
    """Runs on every rank: ``steps`` AdamW steps through ``hfpipe.initialize`` with ``schedule``."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from hfpipe import initialize, to_pipeline
    from hfpipe.core.batches import make_batch, micro_batches
    from hfpipe.core.heads import head_for_class
    from hfpipe.schedules import schedule_of

    spec = spec_for("llama", "causal-lm", tie_word_embeddings=True)
    config = spec.hf_config()
    torch.manual_seed(0)
    pipe = to_pipeline(LlamaForCausalLM(config), num_stages=stages, schedule=schedule)
    dp = dist.get_world_size() // stages
    m, mbs = 4, 1
    ds = {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": m, "steps_per_print": 10**9,
          "train_batch_size": m * mbs * dp, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
          "zero_optimization": {"stage": zero}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "pipeline": {"schedule": schedule}}
    engine, *_ = initialize(pipe, ds)
    head = head_for_class(LlamaForCausalLM)
    losses = []
    for step in range(steps):
        batch = make_batch(config, head, m * mbs * dp, 10, seed=100, padding="right")  # one batch: loss falls
        data = micro_batches(batch, pipe, m, engine.grid.data_parallel_id, dp)
        losses.append(float(engine.train_batch(iter(data))))
    return {"schedule": schedule_of(engine), "losses": losses, "optimizer": type(engine.optimizer).__name__}


def trainer_losses(out_dir: str, schedules: list) -> dict:
    """Runs on every rank: three PipelineTrainer steps (tied Llama, 2 stages, 4 micro-batches, clipped AdamW,
    padded LM rows) and one evaluation per schedule, each from the same initial weights and data order (dualpipev
    also resumed from its step-2 checkpoint for the third step); then two
    bf16 + ZeRO-1 steps per schedule through hfpipe.initialize (DeepSpeed's ZeRO optimizer over bf16 parameters)."""
    import torch
    from transformers import LlamaForCausalLM

    from hfpipe import PipelineTrainer, PipelineTrainingArguments
    from hfpipe.schedules import schedule_of

    from test_trainer import _lm_data

    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def __init__(self):
            self.n = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.n += 1

    out = {}
    # dualpipev also saves at step 2 and is resumed from there (its layer files keep their global indices)
    for schedule, resume in [(s, None) for s in schedules] + [("dualpipev", "dualpipev/checkpoint-2")]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(spec_for("llama", "causal-lm", tie_word_embeddings=True).hf_config())
        save = schedule == "dualpipev" and resume is None
        args = PipelineTrainingArguments(
            output_dir=os.path.join(out_dir, schedule + ("-resumed" if resume else "")), num_stages=2,
            per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=3, learning_rate=1e-2,
            warmup_steps=0, max_seq_length=16, train_sampling_strategy="sequential", pipeline_schedule=schedule,
            report_to=[], disable_tqdm=True, plot_curves=False, export_final_model=False,
            save_strategy="steps" if save else "no", save_steps=2, logging_steps=1,
            resume_from_checkpoint=resume and os.path.join(out_dir, resume))
        steps = Steps()
        trainer = PipelineTrainer(model, args, train_dataset=_lm_data(8), callbacks=[steps])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if resume:
            out["dualpipev-resumed"] = {"losses": losses, "steps_run": steps.n}
            continue
        out[schedule] = {"schedule": schedule_of(trainer.engine), "losses": losses,
                         "eval_loss": trainer.evaluate(_lm_data(4, seed=3))["eval_loss"],
                         "tied_ranks": [c["ranks"] for c in trainer.pipe.tied_comms.values()]}
    out["bf16-zero1"] = {s: train_losses(s, 2, 2, bf16=True, zero=1) for s in ("1f1b", "zb-h1", "dualpipev")}
    return out


def test_schedules_loss_curves_equal_1f1b(dist_pool, tmp_path):
    """A PipelineTrainer run with zb-h1 and with dualpipev gives 1F1B's loss curve and eval loss (2 stages; pp x dp
    is covered by the verify tests above), dualpipev resumed from a checkpoint continues it exactly, and so do both
    with bf16 + ZeRO-1 (to bf16 round-off: the micro-batch
    gradients may be summed in another order)."""
    per_rank = dist_pool(2).run(trainer_losses, str(tmp_path), ["1f1b", "zb-h1", "dualpipev"])
    runs = per_rank[0]
    assert {s: runs[s]["schedule"] for s in ("1f1b", "zb-h1", "dualpipev")} == {
        "1f1b": "1f1b", "zb-h1": "zb-h1", "dualpipev": "dualpipev"}
    one = runs["1f1b"]["losses"]
    assert len(one) == 3 and one[2] < one[0]  # it trains
    for schedule in ("zb-h1", "dualpipev"):
        assert runs[schedule]["losses"] == pytest.approx(one, rel=1e-5), schedule
        assert runs[schedule]["eval_loss"] == pytest.approx(runs["1f1b"]["eval_loss"], rel=1e-5), schedule
    # the tied embedding / LM head: across the first and last stage under 1F1B, on rank 0 alone under dualpipev
    assert [len(r) for r in runs["1f1b"]["tied_ranks"]] == [2] and runs["dualpipev"]["tied_ranks"] == [[0]]
    resumed = runs["dualpipev-resumed"]  # one step after checkpoint-2: the uninterrupted third loss
    assert resumed["steps_run"] == 1 and resumed["losses"][-1] == pytest.approx(one[2], rel=1e-6)
    bf16 = runs["bf16-zero1"]
    assert bf16["1f1b"]["optimizer"] == "DeepSpeedZeroOptimizer"
    for schedule in ("zb-h1", "dualpipev"):
        assert bf16[schedule]["schedule"] == schedule
        assert bf16[schedule]["losses"][0] == pytest.approx(bf16["1f1b"]["losses"][0], rel=1e-6)
        assert bf16[schedule]["losses"] == pytest.approx(bf16["1f1b"]["losses"], rel=1e-2)
        assert bf16[schedule]["losses"][1] != bf16[schedule]["losses"][0]  # the step changed the weights


def _generate_from_dualpipev() -> str:
    import torch
    from transformers import LlamaForCausalLM

    from hfpipe import to_pipeline
    from hfpipe.generation import generate

    config = spec_for("llama", "causal-lm", num_hidden_layers=4).hf_config()
    pipe = to_pipeline(LlamaForCausalLM(config), num_stages=2, schedule="dualpipev")
    try:
        generate(pipe, torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    except ValueError as exc:
        return str(exc)
    return "generated"


def test_generation_from_a_dualpipev_pipeline_is_refused(dist_pool):
    """generate() runs the layers once down the stages; a V-shaped module (two chunks per rank) would compute
    garbage, so it is one error naming the fix."""
    said = dist_pool(2).run(_generate_from_dualpipev)
    assert said[0] == said[1] and said[0].startswith("generate: this pipeline was built with schedule='dualpipev'")
    assert "to_pipeline(folder)" in said[0]
