"""A NaN stops training with the step and the stage that produced it, or the step is skipped on request; NaN
weights are refused before the first step. Two fp32 stages of a tiny Llama on the shared rank pool."""

import numpy as np
import pytest
import torch
import transformers

from models import family_config


def _engine(skip: bool, seed: int = 0):
    from hfpipe import initialize, to_pipeline

    torch.manual_seed(seed)
    config = family_config("llama")
    pipe = to_pipeline(transformers.AutoModelForCausalLM.from_config(config), num_stages=2)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
          "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = initialize(pipe, ds)
    return config, pipe, engine


def _data(config, pipe):
    from hfpipe import micro_batches
    from hfpipe.core.batches import make_batch

    torch.manual_seed(5)
    return micro_batches(make_batch(config, "causal-lm", batch_size=4, seq_len=8), pipe, 2)


def rank_nan_at_step(poison_step: int, skip: bool):
    """Stage 1's forward returns NaN during ``poison_step`` (its weights stay finite)."""
    import torch.distributed as dist

    from hfpipe.training.numerics import NonFiniteGuard, NonFiniteLossError

    config, pipe, engine = _engine(skip)
    step = {"now": 0}

    def poison(module, inputs, output):
        if step["now"] == poison_step and engine.stage_id == 1:
            return output * float("nan")
        return None

    engine.module.register_forward_hook(poison)  # first: it stands for the stage's own forward
    guard = NonFiniteGuard(engine, skip=skip)
    out = {"losses": [], "skipped": [], "error": None}
    for s in range(1, 4):
        step["now"] = s
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        try:
            loss = engine.train_batch(iter(_data(config, pipe)))
            out["skipped"].append(guard.after_step(loss, s, describe_stage=lambda st: f"layers of stage {st}"))
        except NonFiniteLossError as exc:
            out["error"] = str(exc)
            break
        out["losses"].append(float(loss))
        if out["skipped"][-1]:
            out["unchanged"] = all(torch.equal(before[n], p) for n, p in engine.module.named_parameters())
    out["skipped_steps"] = guard.skipped_steps
    dist.barrier()
    return out


def rank_nan_weight():
    from hfpipe.core.validate import NonFiniteError
    from hfpipe.training.numerics import check_initial_weights

    _, pipe, engine = _engine(False)
    if engine.stage_id == 1:
        with torch.no_grad():
            next(p for p in engine.module.parameters() if p.dim() == 2)[0, 0] = float("inf")
    try:
        check_initial_weights(engine)
    except NonFiniteError as exc:
        return str(exc)
    return None


def test_nan_loss_stops_naming_step_and_stage(dist_pool):
    results = dist_pool(2).run(rank_nan_at_step, 2, False)
    for r in results:
        assert r["error"] is not None and r["error"].startswith("step 2: the training loss is nan; stage 1 "
                                                               "(layers of stage 1) was the first")
        assert len(r["losses"]) == 1 and r["losses"][0] == pytest.approx(results[0]["losses"][0])


def test_skip_nonfinite_steps_skips_the_update(dist_pool):
    skipped = dist_pool(2).run(rank_nan_at_step, 2, True)
    clean = dist_pool(2).run(rank_nan_at_step, 99, True)
    for r, c in zip(skipped, clean):
        assert r["error"] is None and r["skipped"] == [False, True, False] and r["skipped_steps"] == 1
        assert r["unchanged"]  # the poisoned step moved no weight
        # step 3 after a skipped step 2 trains from step 1's weights: its loss equals the clean run's step 2
        assert r["losses"][2] == pytest.approx(c["losses"][1], rel=1e-6)


def test_nan_weights_refused_before_training(dist_pool):
    messages = dist_pool(2).run(rank_nan_weight)
    for m in messages:
        assert m is not None and m.startswith("the weights of stage 1 hold NaN/Inf before training")
    assert "; here: " in messages[1] and "; here: " not in messages[0]


# --- through PipelineTrainer ---------------------------------------------------------------------------------------

def rank_trainer_guards(out_dir: str):
    """The trainer refuses NaN weights, 0 training steps and labels outside the head before its first step, and
    skips a NaN step with --skip_nonfinite_steps. Returns each error message (the same on every rank)."""
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_trainer import _args, _cls_data, _cls_model

    from hfpipe import PipelineTrainer

    out = {}
    model = _cls_model()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    for key, make in {
        "nan_weight": lambda: PipelineTrainer(model, _args(out_dir, 2), train_dataset=_cls_data(8)),
        "zero_steps": lambda: PipelineTrainer(_cls_model(), _args(out_dir, 2, num_train_epochs=0),
                                              train_dataset=_cls_data(8)),
        "bad_label": lambda: PipelineTrainer(_cls_model(), _args(out_dir, 2),
                                             train_dataset=_cls_data(8).map(lambda r: {"labels": 7})),
    }.items():
        try:
            make()
            out[key] = None
        except ValueError as exc:
            out[key] = str(exc)
    trainer = PipelineTrainer(_cls_model(), _args(out_dir, 2, max_steps=3, skip_nonfinite_steps=True),
                              train_dataset=_cls_data(16))
    calls = {"n": 0}

    def poison(module, inputs, output):  # the second step's forwards (2 micro-batches a step) give NaN on stage 1
        calls["n"] += 1
        return output * float("nan") if trainer.engine.stage_id == 1 and calls["n"] in (3, 4) else None

    hook = trainer.engine.module.register_forward_hook(poison)
    trainer.engine.module._forward_hooks.move_to_end(hook.id, last=False)  # before the guard's own hook
    result = trainer.train()
    out["skipped"] = trainer.nonfinite.skipped_steps
    out["steps"] = result["global_step"]
    out["loss_finite"] = bool(np.isfinite(result["train_loss"]))
    return out


def test_trainer_refuses_nan_weights_zero_steps_and_bad_labels_and_skips(dist_pool, tmp_path):
    for r in dist_pool(2).run(rank_trainer_guards, str(tmp_path)):
        assert r["nan_weight"].startswith("the weights of stage 1 (layers ")
        assert r["zero_steps"].startswith("--num_train_epochs 0 with --max_steps -1 trains 0 steps")
        assert r["bad_label"].startswith("train split: label 7 in column 'labels' is outside the 3 classes")
        assert (r["skipped"], r["steps"], r["loss_finite"]) == (1, 3, True)


# --- export of a bf16 run --------------------------------------------------------------------------------------

def rank_bf16_export(out_dir: str, export_dtype: str):
    """Two bf16 ZeRO-1 steps; output_dir/final against the optimizer's fp32 masters."""
    import sys

    from deepspeed.utils import safe_get_full_fp32_param

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_trainer import _args, _cls_data, _cls_model

    from hfpipe import PipelineTrainer

    args = _args(out_dir, 2, max_steps=2, bf16=True, learning_rate=1e-3, export_final_model=True,
                 export_dtype=export_dtype, save_strategy="steps", save_steps=2)
    trainer = PipelineTrainer(_cls_model(), args, train_dataset=_cls_data(16))
    trainer.train()
    return {name: (safe_get_full_fp32_param(p).clone(), p.detach().clone())
            for name, p in trainer.pipe.hf_named_parameters()}


@pytest.mark.parametrize("export_dtype", ["auto"])  # "bf16" casts the same masters (not worth a second run)
def test_bf16_run_exports_its_fp32_masters(dist_pool, tmp_path, export_dtype):
    from safetensors.torch import load_file

    per_rank = dist_pool(2).run(rank_bf16_export, str(tmp_path), export_dtype)
    live = {k: v for r in per_rank for k, v in r.items()}
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    master, module = live[name]
    assert module.dtype == torch.bfloat16 and not torch.equal(master, module.float())  # masters hold more bits
    want = master if export_dtype == "auto" else master.to(torch.bfloat16)
    assert saved[name].dtype == want.dtype and torch.equal(saved[name], want)


class _Fp16Engine:
    """The parts of a DeepSpeed fp16 engine that hfpipe's logs read, driven by DeepSpeed's own code: the dynamic
    loss scale (``LossScaleConfig`` + ``FP16_UnfusedOptimizer._update_scale``) and the engine's overflow count
    (``DeepSpeedEngine._get_optimizer_loss_scale``). fp16 is refused on CPU, so no real fp16 engine runs here."""

    def __init__(self):
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.fp16.loss_scaler import (INITIAL_LOSS_SCALE, MIN_LOSS_SCALE, SCALE_WINDOW,
                                                         LossScaleConfig)
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        self.optimizer = type("Opt", (), {"_update_scale": FP16_UnfusedOptimizer._update_scale, "verbose": False})()
        self.optimizer.loss_scale_config = LossScaleConfig(
            torch.float16, True, 1.0, {INITIAL_LOSS_SCALE: 2.0 ** 16, SCALE_WINDOW: 1000, MIN_LOSS_SCALE: 1.0})
        self._get_optimizer_loss_scale = DeepSpeedEngine._get_optimizer_loss_scale.__get__(self)
        self.skipped_steps = 0

    def fp16_enabled(self):
        return True

    def step(self, overflow: bool):  # what DeepSpeed's optimizer step and _take_model_step do with an overflow
        self.optimizer._update_scale(overflow)
        self.optimizer.loss_scale_config.cur_iter += 1
        self.skipped_steps += int(overflow)

    def get_global_grad_norm(self):
        return None


def test_fp16_overflow_skips_and_loss_scale_drops_are_logged():
    from types import SimpleNamespace

    from hfpipe.training.numerics import fp16_logs
    from hfpipe.training.trainer import PipelineTrainer

    engine = _Fp16Engine()
    start = fp16_logs(engine)
    assert start == {"skipped_overflow_steps": 0, "loss_scale": 2.0 ** 16}  # DeepSpeed's initial_scale_power 16
    for overflow in (True, True, False):
        engine.step(overflow)
    trainer = SimpleNamespace(engine=engine, nonfinite=SimpleNamespace(skipped_steps=0), global_batch_size=4,
                              needs_data=False)
    logs = PipelineTrainer._train_logs(trainer, [2.5, 2.0, 1.5], 0, 1.0, 1e-3)
    assert (logs["loss"], logs["skipped_overflow_steps"], logs["loss_scale"]) == (2.0, 2, 2.0 ** 14)  # halved twice
    assert logs["samples_per_second"] == 12.0
    assert fp16_logs(SimpleNamespace(fp16_enabled=lambda: False)) == {}  # bf16/fp32: no scale to report
