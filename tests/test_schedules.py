"""Pipeline schedules (issue 19): ZB-H1 trains exactly like 1F1B and the HF model (loss and every gradient, tied
embeddings, padding, activation checkpointing, pp x dp), its order and the memory/efficiency the theory gives, and
one clear error for a schedule that cannot run."""

import pytest

from hfpipe.core.dsconfig import ConfigError, check_schedule, validate_pipeline_ds_config
from hfpipe.schedules import simulate, zb_h1_order
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


def test_schedule_errors():
    assert check_schedule(None) == "1f1b" and check_schedule("ZB-H1") == "zb-h1"
    with pytest.raises(ConfigError, match=r"schedule='gpipe'.*expected one of 1f1b, zb-h1, dualpipev"):
        check_schedule("gpipe", source="--pipeline_schedule")
    with pytest.raises(ConfigError, match=r"dualpipev.*not available yet.*>= 2 x stages micro-batches \(8 here, "
                                          r"got 4\).*zb-h1"):
        check_schedule("dualpipev", num_stages=4, micro_batches=4)
    with pytest.raises(ConfigError, match=r"zb-h1.*fp16.*use bf16 or fp32"):
        validate_pipeline_ds_config({"pipeline": {"schedule": "zb-h1"}, "fp16": {"enabled": True}}, 2, 2)


# ------------------------------------------------------------------------------------------------- exactness
def check(report):
    assert report["passed"], format_report(report)
    assert report["schedule"] == "zb-h1"
    assert report["loss_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5


@pytest.mark.parametrize("stages,dp,checkpointing", [(4, 1, 0), (2, 2, 1)])
def test_zb_h1_equals_hf(dist_pool, stages, dp, checkpointing):
    """Tied Llama on right-padded batches, 4 micro-batches: 4 stages; 2 stages x 2 replicas with every block
    checkpointed."""
    spec = spec_for("llama", "causal-lm", tie_word_embeddings=True)
    check(verify(spec, stages=stages, dp=dp, micro_batches=4, batch_size=4 * dp, seq_len=10, schedule="zb-h1",
                 activation_checkpoint_interval=checkpointing, pool=dist_pool(stages * dp)))


def train_losses(schedule: str, stages: int, steps: int, bf16: bool = False) -> dict:
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
    pipe = to_pipeline(LlamaForCausalLM(config), num_stages=stages)
    dp = dist.get_world_size() // stages
    m, mbs = 4, 1
    ds = {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": m, "steps_per_print": 10**9,
          "train_batch_size": m * mbs * dp, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "pipeline": {"schedule": schedule}}
    engine, *_ = initialize(pipe, ds)
    head = head_for_class(LlamaForCausalLM)
    losses = []
    for step in range(steps):
        batch = make_batch(config, head, m * mbs * dp, 10, seed=100, padding="right")  # one batch: loss falls
        data = micro_batches(batch, pipe, m, engine.grid.data_parallel_id, dp)
        losses.append(float(engine.train_batch(iter(data))))
    return {"schedule": schedule_of(engine), "losses": losses}


@pytest.mark.parametrize("bf16", [False, True])
def test_zb_h1_loss_curve_equals_1f1b(dist_pool, bf16):
    """Three AdamW steps (clipped, 2 stages x 2 replicas; bf16: DeepSpeed's BF16 optimizer with fp32 gradient
    accumulation): the same loss curve with either schedule."""
    pool = dist_pool(4)
    one = pool.run(train_losses, "1f1b", 2, 3, bf16)
    zb = pool.run(train_losses, "zb-h1", 2, 3, bf16)
    assert [r["schedule"] for r in one + zb] == ["1f1b"] * 4 + ["zb-h1"] * 4
    tol = 1e-2 if bf16 else 1e-5  # bf16: W sums the micro-batch gradients in another order
    assert zb[0]["losses"][0] == pytest.approx(one[0]["losses"][0], rel=1e-6)
    assert zb[0]["losses"] == pytest.approx(one[0]["losses"], rel=tol)
    assert one[0]["losses"][2] < one[0]["losses"][0]  # it trains
