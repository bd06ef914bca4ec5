"""``hfpipe verify``: prove that the pipeline trains exactly like the HF model.

One seeded training step runs through the pipeline on ``stages x dp`` CPU ranks (gloo, real DeepSpeed
``PipelineEngine.train_batch`` with its 1F1B schedule, micro-batches, tied-weight all-reduce and data-parallel
all-reduce) and through the HF model in this process on the whole batch. Loss, last-stage logits and every
parameter gradient (mapped back to HF names) are compared. The gradients are captured by a recording optimizer at
the moment DeepSpeed steps, i.e. after every reduction.

Dropout is switched off in both (every ``*dropout*``/``*pdrop*`` config value set to 0) so the two runs see the same
function. Pass criteria: fp32 -- relative loss error and ``max_rel_grad_err`` (max over parameters of
``||g_pipe - g_hf|| / ||g_hf||``, with ``||g_hf||`` floored at 1e-2 of the largest parameter gradient norm so that
gradients that are zero in exact arithmetic, such as an attention key bias or a QA output bias, do not divide round-off by round-off)
both <= 1e-5; bf16 -- both <= 2e-2 (bf16 keeps 8 bits of mantissa and the
pipeline sums micro-batch gradients in a different order than one big batch).

With ``lora=LoraConfig(...)`` the HF side is ``peft.get_peft_model(model, lora)`` (built under the spec's seed with
``init_lora_weights=False``, so that B is not zero and every LoRA gradient is non-trivial) and the pipeline is built
from that ``PeftModel`` (same adapter weights). Compared: loss, logits and every *trainable* gradient, by PEFT's
state-dict keys; the set of trainable parameters and their element count (what reaches the optimizer) must match
PEFT's too.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from hfpipe.core.batches import make_batch
from hfpipe.core.batches import micro_batches as split
from hfpipe.core.heads import head_for_class
from hfpipe.core.lora import hf_key, trainable_count
from hfpipe.launch import DistributedPool
from hfpipe.pipeline import to_pipeline
from hfpipe.schedules import check_schedule, use_schedule

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def zero_dropout(config):
    """A copy of ``config`` with every dropout probability set to 0."""
    config = copy.deepcopy(config)
    for key, value in list(vars(config).items()):
        lowered = key.lower()
        if isinstance(value, float) and ("dropout" in lowered or "pdrop" in lowered) and value > 0:
            setattr(config, key, 0.0)
    # heads that fall back to a hard-coded 0.1 when the config has no classifier_dropout (GenericForTokenClassification)
    config.classifier_dropout = 0.0
    return config


@dataclass
class ModelSpec:
    """A picklable recipe that builds the same HF model in any process."""

    class_name: str
    path: str | None = None
    config: dict | None = None
    seed: int = 0
    dtype: str = "fp32"
    overrides: dict = field(default_factory=dict)

    def model_class(self):
        import transformers

        return getattr(transformers, self.class_name)

    def hf_config(self):
        from transformers import AutoConfig

        if self.path is not None:
            config = AutoConfig.from_pretrained(self.path)
        else:
            d = dict(self.config)
            config = AutoConfig.for_model(d.pop("model_type"), **d)
        for k, v in self.overrides.items():
            setattr(config, k, v)
        return zero_dropout(config)

    def build(self):
        config = self.hf_config()
        cls = self.model_class()
        if self.path is not None:
            model = cls.from_pretrained(self.path, config=config, dtype=DTYPES[self.dtype])
        else:
            torch.manual_seed(self.seed)
            model = cls._from_config(config)
            model = model.to(DTYPES[self.dtype])
        model.train()
        return model


def model_spec_from_dir(path: str, dtype: str = "fp32") -> ModelSpec:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"{path}/config.json lists no `architectures`; save the model with save_pretrained() of a "
                         "task class (e.g. LlamaForCausalLM) so hfpipe knows which head to build.")
    return ModelSpec(class_name=archs[0], path=str(path), dtype=dtype)


# ------------------------------------------------------------------------------------------------------- batches
def load_inputs(path: str) -> dict[str, torch.Tensor]:
    """A user batch from ``.pt`` (dict of tensors) or ``.json`` (dict of nested lists)."""
    if path.endswith(".pt"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif path.endswith(".json"):
        with open(path) as f:
            data = {k: torch.tensor(v) for k, v in json.load(f).items()}
    else:
        raise ValueError(f"--inputs {path}: expected a .pt or .json file holding a dict of input_ids, attention_mask "
                         "and the head's label fields.")
    if "input_ids" not in data:
        raise ValueError(f"--inputs {path} has no input_ids (keys: {sorted(data)}).")
    return data


def with_lora(model, lora, seed: int):
    """``model`` itself, or ``peft.get_peft_model(model, lora)`` with a seeded, non-zero adapter (see the module
    docstring)."""
    if lora is None:
        return model
    import dataclasses

    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, dataclasses.replace(lora, init_lora_weights=False))


def trainable_named_parameters(model, lora) -> list:
    """``(name, parameter)`` compared by verify: all parameters by HF name, or with LoRA the trainable ones of the
    ``PeftModel`` by PEFT's state-dict keys (``hfpipe.core.lora.hf_key``)."""
    if lora is None:
        return list(model.named_parameters())
    return [(hf_key(n), p) for n, p in model.get_base_model().named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------------ per rank
class GradRecorder(torch.optim.Optimizer):
    """An optimizer that records each parameter's gradient when DeepSpeed steps (and changes nothing)."""

    def __init__(self, params):
        super().__init__(list(params), {"lr": 0.0})
        self.grads: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.grads[id(p)] = p.grad.detach().clone()


def ds_config(batch_size: int, micro_batches: int, dp: int) -> dict:
    return {"train_batch_size": batch_size, "train_micro_batch_size_per_gpu": batch_size // (micro_batches * dp),
            "gradient_accumulation_steps": micro_batches, "steps_per_print": 10**9, "gradient_clipping": 0.0}


def rank_step(spec: ModelSpec, batch: dict, stages: int, micro_batches: int, partition="parameters",
              activation_checkpoint_interval: int = 0, lora=None, schedule: str | None = None) -> dict:
    """Runs on every rank: one eval pass (logits) and one train step (loss, gradients) through the pipeline."""
    import deepspeed
    import torch.distributed as dist

    model = with_lora(spec.build(), lora, spec.seed)
    pipe = to_pipeline(model, num_stages=stages, partition_method=partition,
                       activation_checkpoint_interval=activation_checkpoint_interval, schedule=schedule)
    del model
    # with LoRA only the trainable parameters, as hfpipe.initialize passes them (all of them on a stage that trains
    # nothing: an optimizer needs at least one parameter; frozen ones get no gradient to record)
    trainable = [p for p in pipe.parameters() if p.requires_grad] if lora is not None else []
    recorder = GradRecorder(trainable or pipe.parameters())
    dp = dist.get_world_size() // stages
    batch_size = batch["input_ids"].shape[0]
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=recorder, config=ds_config(batch_size, micro_batches, dp))
    use_schedule(engine, schedule)  # "zb-h1": split backward, "dualpipev": two chunks per rank (hfpipe.schedules)
    dp_rank = engine.grid.data_parallel_id
    data = split(batch, pipe, micro_batches, dp_rank, dp)
    outputs = engine.eval_batch(iter(data), compute_loss=False, reduce_output=None)
    loss = engine.train_batch(iter(data))
    result: dict[str, Any] = {"stage": engine.stage_id, "dp_rank": dp_rank, "loss": float(loss),
                              "parts": list(pipe.parts), "logits": None, "grads": {}}
    if engine.is_last_stage():
        if isinstance(outputs[0], (tuple, list)):
            result["logits"] = tuple(torch.cat([o[i] for o in outputs]).float() for i in range(len(outputs[0])))
        else:
            result["logits"] = torch.cat(list(outputs)).float()
    if dp_rank == 0:
        named = [(n, p) for n, p in pipe.hf_named_parameters() if lora is None or p.requires_grad]
        result["grads"] = {name: recorder.grads[id(p)].float() for name, p in named if id(p) in recorder.grads}
        result["params"] = [name for name, _ in named]
        result["trainable"] = trainable_count(pipe)
    del engine, pipe
    return result


# -------------------------------------------------------------------------------------------------------- compare
def reference(spec: ModelSpec, batch: dict, lora=None) -> dict:
    """The HF model (or its ``PeftModel``) on the whole batch: loss, logits, gradients by name."""
    model = with_lora(spec.build(), lora, spec.seed)
    head = head_for_class(spec.model_class())
    out = model(**batch)
    out.loss.backward()
    logits = head.outputs(out)
    logits = tuple(t.detach().float() for t in logits) if isinstance(logits, tuple) else logits.detach().float()
    named = trainable_named_parameters(model, lora)
    grads = {n: p.grad.float() for n, p in named if p.grad is not None}
    return {"loss": float(out.loss.detach()), "logits": logits, "grads": grads, "params": [n for n, _ in named],
            "head": head.name, "trainable": None if lora is None else trainable_count(model)}


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    den = max(float(b.norm()), floor)
    num = float((a - b).norm())
    return num / den if den > 0 else num


def compare(ref: dict, per_rank: list[dict], dtype: str = "fp32") -> dict:
    """The verdict: errors per quantity and ``passed``."""
    grads: dict[str, torch.Tensor] = {}
    pipe_params: set[str] = set()
    logits_parts = []
    for r in per_rank:
        grads.update(r["grads"])
        pipe_params.update(r.get("params", []))
        if r["logits"] is not None:
            logits_parts.append((r["dp_rank"], r["logits"]))
    logits_parts.sort(key=lambda x: x[0])
    if isinstance(logits_parts[0][1], tuple):
        logits = tuple(torch.cat([p[1][i] for p in logits_parts]) for i in range(len(logits_parts[0][1])))
        ref_logits = ref["logits"]
    else:
        logits = (torch.cat([p[1] for p in logits_parts]),)
        ref_logits = (ref["logits"],)
    loss_pipe = per_rank[0]["loss"]
    # Gradients that are zero in exact arithmetic (an attention key bias: softmax ignores a per-query constant) are
    # pure round-off in both runs; their norm is floored at 1e-2 of the largest parameter gradient's norm.
    floor = 1e-2 * max((float(g.norm()) for g in ref["grads"].values()), default=0.0)
    rows = []
    for name in ref["params"]:
        g_hf = ref["grads"].get(name)
        g_pp = grads.get(name)
        if name not in pipe_params:
            rows.append({"name": name, "rel_err": math.inf, "max_abs_err": math.inf, "note": "missing in pipeline"})
            continue
        if g_hf is None and g_pp is None:
            continue
        g_hf = torch.zeros_like(g_pp) if g_hf is None else g_hf
        g_pp = torch.zeros_like(g_hf) if g_pp is None else g_pp
        rows.append({"name": name, "rel_err": _rel(g_pp, g_hf, floor), "max_abs_err": float((g_pp - g_hf).abs().max())})
    extra = sorted(pipe_params - set(ref["params"]))
    for name in extra:
        rows.append({"name": name, "rel_err": math.inf, "max_abs_err": math.inf, "note": "not in the HF model"})
    tol = TOLERANCE[dtype]
    loss_rel = abs(loss_pipe - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
    max_rel = max((r["rel_err"] for r in rows), default=0.0)
    logits_abs = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits))
    logits_rel = max(_rel(a, b) for a, b in zip(logits, ref_logits))
    passed = loss_rel <= tol and max_rel <= tol and logits_rel <= tol
    # parameters (elements) that reach the optimizer: every stage's trainable ones, once per pipeline
    trainable = sum(r.get("trainable", 0) for r in per_rank if r["dp_rank"] == 0)
    passed = passed and ref.get("trainable") in (None, trainable)  # LoRA: as many as PEFT trains
    return {"passed": bool(passed), "loss_hf": ref["loss"],
            "loss_pipeline": loss_pipe, "loss_rel_err": loss_rel, "max_rel_grad_err": max_rel,
            "logits_max_abs_err": logits_abs, "logits_rel_err": logits_rel, "tolerance": tol,
            "num_params": len(rows), "trainable_hf": ref.get("trainable"), "trainable_pipeline": trainable,
            "parts": per_rank[0]["parts"], "worst": sorted(rows, key=lambda r: -r["rel_err"])[:5]}


def check_run_shape(stages: int, dp: int, micro_batches: int, batch_size: int) -> None:
    """Counts >= 1 and a batch that splits into ``micro_batches x dp`` equal micro-batches, checked before any
    model is built (DeepSpeed would assert on it only after the reference ran and the pool started)."""
    for flag, value in (("--stages", stages), ("--dp", dp), ("--micro-batches", micro_batches),
                        ("--batch-size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"{flag} {value}: expected a positive number; set {flag} 1 or more.")
    if batch_size % (micro_batches * dp):
        good = micro_batches * dp * max(1, round(batch_size / (micro_batches * dp)))
        raise ValueError(f"--batch-size {batch_size} does not split into --micro-batches {micro_batches} x --dp {dp} "
                         f"equal micro-batches; use a multiple of {micro_batches * dp} (e.g. --batch-size {good}).")


def verify(spec: ModelSpec, *, stages: int, micro_batches: int = 4, batch_size: int = 8, seq_len: int = 16,
           dp: int = 1, partition="parameters", activation_checkpoint_interval: int = 0, batch: dict | None = None,
           padding: str = "right", pool=None, lora=None, schedule: str | None = None) -> dict:
    """Run the comparison; ``pool`` (a :class:`hfpipe.launch.DistributedPool` of ``stages*dp`` ranks) is created
    and closed here when not given. ``lora``: a ``peft.LoraConfig`` (its ``task_type`` defaults to the head's, so
    that PEFT trains a classification head in full)."""
    check_run_shape(stages, dp, micro_batches, batch_size if batch is None else batch["input_ids"].shape[0])
    check_schedule(schedule, num_stages=stages, micro_batches=micro_batches, source="--schedule")
    head = head_for_class(spec.model_class())
    if batch is None:
        batch = make_batch(spec.hf_config(), head, batch_size, seq_len, padding=padding)
    if lora is not None and lora.task_type is None:
        import dataclasses

        lora = dataclasses.replace(lora, task_type=head.peft_task_type)
    ref = reference(spec, batch, lora)
    own = pool is None
    if own:
        pool = DistributedPool(stages * dp)
    try:
        if pool.world_size != stages * dp:
            raise ValueError(f"pool has {pool.world_size} ranks, the run needs stages x dp = {stages * dp}.")
        per_rank = pool.run(rank_step, spec, batch, stages, micro_batches, partition, activation_checkpoint_interval,
                            lora, schedule)
    finally:
        if own:
            pool.close()
    report = compare(ref, per_rank, spec.dtype)
    report.update({"stages": stages, "dp": dp, "micro_batches": micro_batches, "dtype": spec.dtype,
                   "schedule": check_schedule(schedule),
                   "batch_size": int(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1]),
                   "model": spec.path or spec.class_name, "lora": None if lora is None else lora_summary(lora)})
    return report


def lora_summary(lora) -> dict:
    """The LoRA settings a report names (JSON-friendly)."""
    targets = lora.target_modules
    return {"r": lora.r, "lora_alpha": lora.lora_alpha, "task_type": lora.task_type,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def format_report(report: dict) -> str:
    lines = [
        f"hfpipe verify: {report['model']}  stages={report['stages']} dp={report['dp']} "
        f"micro_batches={report['micro_batches']} schedule={report.get('schedule', '1f1b')} batch={report['batch_size']}x{report['seq_len']} "
        f"dtype={report['dtype']} partition={report['parts']}",
        "",
        f"{'quantity':<34}{'pipeline':>14}{'hf':>14}{'rel err':>12}",
        f"{'loss':<34}{report['loss_pipeline']:>14.8f}{report['loss_hf']:>14.8f}{report['loss_rel_err']:>12.2e}",
        f"{'last-stage logits (max abs ' + format(report['logits_max_abs_err'], '.1e') + ')':<62}"
        f"{report['logits_rel_err']:>12.2e}",
        f"{'gradients (max over ' + str(report['num_params']) + ' params)':<62}{report['max_rel_grad_err']:>12.2e}",
    ]
    if report.get("lora"):
        lines.append(f"lora {report['lora']}: trainable parameters pipeline {report['trainable_pipeline']}, "
                     f"peft {report['trainable_hf']}")
    lines += [
        "",
        "worst gradients:",
    ]
    for row in report["worst"]:
        note = f"  ({row['note']})" if row.get("note") else ""
        lines.append(f"  {row['name']:<58}{row['rel_err']:>12.2e}{note}")
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append("")
    lines.append(f"{verdict}: tolerance {report['tolerance']:.0e} on relative loss, logits and gradient errors.")
    return "\n".join(lines)


def verify_dir(path: str, *, dtype: str = "fp32", inputs: str | None = None, **kwargs) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder; hfpipe verify takes a folder written by save_pretrained().")
    spec = model_spec_from_dir(path, dtype)
    batch = load_inputs(inputs) if inputs else None
    return verify(spec, batch=batch, **kwargs)
