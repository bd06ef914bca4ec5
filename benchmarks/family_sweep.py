"""Every ``base_model_pp_plan`` family of the installed transformers, through ``hfpipe verify`` once.

The automatic adapter (``hfpipe.core.adapters.pp_plan``) accepts any family whose config declares
``base_model_pp_plan``; the test-suite checks a dozen of them against HF. This sweep checks all of them: per family a
tiny config (the family's defaults shrunk by attribute name, plus the few family-specific fixes in ``FIXES``), the
task class (causal LM, else sequence / token classification), the adapter's acceptance check on the meta device,
then one ``hfpipe verify`` at 2 stages (loss, logits and every gradient vs the HF model, fp32, 1e-5 relative). Each
family is one job of one 2-rank pool (``hfpipe.launch.DistributedPool``; a family that crashes or hangs a rank gets
a fresh pool). It writes ``benchmarks/results/family_sweep.{json,md}``: verified / refused (with the adapter's
one-line reason) / failed (what broke) / no task class. A family that fails here belongs in
``pp_plan.REFUSED_FAMILIES`` (refused before anything runs) until it is fixed.

    python benchmarks/family_sweep.py [--families llama gemma3_text ...] [--timeout 300]

With ``--families`` only those rows of the existing table are replaced.

Not part of the test-suite (about 130 families; minutes); the suite checks that the refusals are consulted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: config attribute -> tiny value (set only where the family's config has the attribute)
SHRINK = {
    "vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "num_hidden_layers": 4, "num_layers": 4, "n_layer": 4,
    "hidden_size": 32, "n_embd": 32, "d_model": 32,
    "intermediate_size": 64, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "n_inner": 64,
    "num_attention_heads": 4, "n_head": 4, "num_key_value_heads": 2, "head_dim": 8,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "num_experts_per_token": 2, "moe_topk": 2, "n_shared_experts": 1, "n_group": 1, "num_expert_group": 1,
    "topk_group": 1, "zero_expert_num": 2, "first_k_dense_replace": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "qk_head_dim": 8,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_head_dim": 8, "linear_num_heads": 4,
    "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "model_max_length": 64,
    "sliding_window": 6, "rotary_dim": 4, "use_cache": False,
}
#: set even where the family's default is ``None`` (MoE sizes that a default leaves open)
ALWAYS = ("head_dim", "num_experts_per_tok", "n_routed_experts", "n_shared_experts")

#: per family: attributes the generic shrink gets wrong
FIXES: dict[str, dict] = {
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"] * 2},
    "dots3_note_text": {"num_key_value_heads": 4}, "glm5_next_text": {"num_key_value_heads": 4},
    "esmc": {"num_key_value_heads": 4}, "mistral4": {"head_dim": 16}, "codegen": {"pad_token_id": 0},
    "gemma3n_text": {"num_kv_shared_layers": 0},
}


def tiny_config(model_type: str):
    """The family's default config with every size shrunk (``SHRINK``, ``FIXES``); per-layer lists cut to 4."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type)
    full = defaults.to_dict()
    n_layers = next((full[k] for k in ("num_hidden_layers", "num_layers", "n_layer") if k in full), None)
    kwargs = {}
    for key, value in SHRINK.items():
        if key in full and (full[key] is not None or key in ALWAYS):
            kwargs[key] = value
    if "kv_lora_rank" in full:  # multi-head latent attention: the rotary part is the head_dim RoPE sees
        kwargs.update(qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, head_dim=8, num_key_value_heads=4)
    for key, value in full.items():  # per-layer lists (layer_types, mlp_only_layers, ...): recomputed or cut
        if isinstance(value, list) and n_layers and len(value) == n_layers:
            kwargs[key] = value[:4]
    kwargs.update(FIXES.get(model_type, {}))
    return AutoConfig.for_model(model_type, **kwargs)


def task_class(config):
    """The causal LM of the family, else its sequence / token classifier, else ``None``."""
    import transformers

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification,
                 transformers.AutoModelForTokenClassification):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    return None


def plan_families() -> list[str]:
    """``model_type`` of every config class of the installed transformers that declares ``base_model_pp_plan``."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    out = []
    for model_type, name in CONFIG_MAPPING_NAMES.items():
        try:
            cls = getattr(transformers, name)
        except Exception:  # noqa: BLE001  (a config that cannot import here is not installed)
            continue
        if getattr(cls, "base_model_pp_plan", None):
            out.append(model_type)
    return sorted(out)


def _last_line(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]


def _hf_runs(config, cls) -> None:
    """HF's own model on the tiny config: built, and one forward with labels (raises if HF cannot)."""
    import torch

    from hfpipe.core.batches import make_batch
    from hfpipe.core.heads import head_for_class

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls._from_config(config)
        model(**make_batch(config, head_for_class(cls), 2, 12)).loss.backward()
    del model, torch


def check_family(model_type: str, pool_factory) -> dict:
    """One row of the table for ``model_type``."""
    from hfpipe.core.builder import prepare
    from hfpipe.core.meta import UnsupportedModelError
    from hfpipe.launch import RankError
    from hfpipe.verify import ModelSpec, verify

    row = {"model_type": model_type, "class": None, "status": None, "reason": "", "loss_rel_err": None,
           "max_rel_grad_err": None, "seconds": None}
    start = time.time()
    from transformers import AutoConfig

    cls = task_class(AutoConfig.for_model(model_type))
    if cls is None:
        row.update(status="no task class", reason="transformers has no causal-LM or classification class for it "
                   "(a sub-model of a composite model)")
        return row
    row["class"] = cls.__name__
    try:
        config = tiny_config(model_type)
    except Exception as e:  # noqa: BLE001
        row.update(status="no tiny config", reason=_last_line(e))
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare(config, cls)
    except UnsupportedModelError as e:
        row.update(status="refused", reason=str(e).splitlines()[0])
        return row
    except Exception as e:  # noqa: BLE001  (not a clean refusal: a failure to fix or refuse, unless HF fails too)
        try:
            _hf_runs(config, cls)
        except Exception as hf:  # noqa: BLE001
            row.update(status="no tiny config", reason="HF model: " + _last_line(hf))
            return row
        row.update(status="failed", reason="acceptance: " + _last_line(e))
        return row
    try:
        _hf_runs(config, cls)
    except Exception as e:  # noqa: BLE001  (HF's own model cannot run this tiny config: nothing to compare with)
        row.update(status="no tiny config", reason="HF model: " + _last_line(e))
        return row
    spec = ModelSpec(class_name=cls.__name__, config=config.to_dict(), seed=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = verify(spec, stages=2, micro_batches=2, batch_size=4, seq_len=12, pool=pool_factory())
    except RankError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        row.update(status="failed", reason=(lines[-1] if lines else "rank error")[:300])
        return row
    except Exception as e:  # noqa: BLE001
        row.update(status="failed", reason=_last_line(e))
        return row
    row.update(loss_rel_err=report["loss_rel_err"], max_rel_grad_err=report["max_rel_grad_err"],
               seconds=round(time.time() - start, 1))
    if report["passed"]:
        row["status"] = "verified"
    else:
        worst = report["worst"][0] if report["worst"] else {}
        row.update(status="failed", reason=f"loss rel err {report['loss_rel_err']:.1e}, max grad rel err "
                   f"{report['max_rel_grad_err']:.1e} (worst {worst.get('name')})")
    return row


def markdown(rows: list[dict], env: dict) -> str:
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"# base_model_pp_plan family sweep (transformers {env['transformers']}, {env['date']})", "",
             "hfpipe verify at 2 stages, fp32, tiny config, loss and every gradient <= 1e-5 relative to HF. "
             + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), "",
             "| model_type | class | result | loss rel err | max grad rel err | reason |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda x: "" if x is None else f"{x:.1e}")
        reason = r["reason"].replace("|", "\\|")
        lines.append(f"| {r['model_type']} | {r['class'] or ''} | {r['status']} | {fmt(r['loss_rel_err'])} | "
                     f"{fmt(r['max_rel_grad_err'])} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import transformers
    from datetime import datetime, timezone

    from hfpipe.launch import DistributedPool

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", help="model types (default: every base_model_pp_plan family)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a family may take on the ranks")
    parser.add_argument("--out", default=RESULTS, help="folder for family_sweep.json / .md")
    args = parser.parse_args(argv)
    families = args.families or plan_families()
    pool = {"p": None}

    def pool_factory():
        if pool["p"] is None or not pool["p"].alive:
            pool["p"] = DistributedPool(2, timeout=args.timeout)
        return pool["p"]

    rows = []
    try:
        for i, model_type in enumerate(families):
            row = check_family(model_type, pool_factory)
            rows.append(row)
            print(f"[{i + 1}/{len(families)}] {model_type:<32} {row['status']:<14} {row['reason'][:150]}", flush=True)
    finally:
        if pool["p"] is not None:
            pool["p"].close(force=True)
    env = {"transformers": transformers.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    os.makedirs(args.out, exist_ok=True)
    stem = "family_sweep"
    previous = os.path.join(args.out, f"{stem}.json")
    if args.families and os.path.isfile(previous):  # a re-run of some families updates their rows of the table
        with open(previous) as f:
            old = {r["model_type"]: r for r in json.load(f)["rows"]}
        old.update({r["model_type"]: r for r in rows})
        rows = [old[k] for k in sorted(old)]
    for ext, text in (("json", json.dumps({"env": env, "rows": rows}, indent=1)), ("md", markdown(rows, env))):
        path = os.path.join(args.out, f"{stem}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
