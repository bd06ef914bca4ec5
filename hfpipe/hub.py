"""Publishing to the Hugging Face Hub: a model card that says how the model was trained (stages, partition,
precision, ZeRO stage, evaluation results as model-index), then ``create_repo`` + ``upload_folder``.

Everything goes through ``huggingface_hub`` (token from ``token=``, ``HF_TOKEN`` or the stored login; its HTTP client,
which tests replace with a mock transport). Failures come back as one ``PushError`` line that names the repo and the
fix, never the token and never a raw HTTP traceback. Offline mode is checked before anything is written or sent, so
a push under ``HF_HUB_OFFLINE=1`` fails at once and leaves the local folder as it was.
"""

from __future__ import annotations

import glob
import json
import os
import re

from hfpipe._version import __version__
from hfpipe.core.heads import HEADS
from hfpipe.core.lora import ADAPTER_CONFIG, is_adapter_folder

TAGS = ["hfpipe", "deepspeed", "pipeline-parallelism"]
#: task name in a card (an hfpipe head's name, or a task of hfpipe.tasks) -> Hub pipeline tag
PIPELINE_TAGS = {**{h.name: h.pipeline_tag for h in HEADS.values()}, "text2text": "text2text-generation"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class PushError(RuntimeError):
    """A push that did not happen; the message says why and what to do."""


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.upper() in ("1", "ON", "YES", "TRUE") or constants.is_offline_mode()


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and bool(glob.glob(os.path.join(path, "*.safetensors")))


def adapter_card_info(folder: str) -> dict:
    """What a PEFT adapter folder's card says besides the run: PEFT's metadata (``library_name: peft``, the
    ``base_model`` from ``adapter_config.json``, PEFT's ``lora`` / ``base_model:adapter:<base>`` tags) and the task
    from the config's ``task_type``."""
    with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    info = {"library_name": "peft", "adapter": config.get("peft_type", "LORA")}
    if config.get("base_model_name_or_path"):
        info["base_model"] = config["base_model_name_or_path"]
    task = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "sequence-classification", "TOKEN_CLS": "token-classification",
            "QUESTION_ANS": "question-answering", "SEQ_2_SEQ_LM": "text2text"}.get(config.get("task_type"))
    if task:
        info["task"] = task
    return info


# ---------------------------------------------------------------------------------------------------- model card
def hyperparameters(ds_config: dict, args=None) -> dict:
    """The card's training hyperparameters from a resolved DeepSpeed config (and ``PipelineTrainingArguments``)."""
    pipe, opt = ds_config.get("pipeline", {}), ds_config.get("optimizer", {}).get("params", {})
    bf16, fp16 = (ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
    hp = {"num_stages": pipe.get("stages"), "partition_method": pipe.get("partition"),
          "activation_checkpoint_interval": pipe.get("activation_checkpoint_interval"),
          "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32",
          "zero_stage": ds_config.get("zero_optimization", {}).get("stage"),
          "micro_batch_size": ds_config.get("train_micro_batch_size_per_gpu"),
          "gradient_accumulation_steps": ds_config.get("gradient_accumulation_steps"),
          "train_batch_size": ds_config.get("train_batch_size"),
          "gradient_clipping": ds_config.get("gradient_clipping"), "learning_rate": opt.get("lr"),
          "weight_decay": opt.get("weight_decay"), "adam_betas": opt.get("betas"), "adam_epsilon": opt.get("eps")}
    if args is not None:
        hp.update({"lr_scheduler_type": args.lr_scheduler_type, "warmup_steps": args.warmup_steps,
                   "warmup_ratio": args.warmup_ratio, "seed": args.seed})
        hp.update({"max_steps": args.max_steps} if args.max_steps > 0 else {"num_train_epochs": args.num_train_epochs})
    return {k: v for k, v in hp.items() if v is not None}


def card_info_from_run(path: str) -> dict:
    """What a training run left next to ``path`` (the folder or its parent, a trainer ``output_dir``):
    ``ds_config.json`` -> hyperparameters, ``eval_results.json`` / ``train_results.json`` -> metrics."""
    def load(d, name):
        if os.path.isfile(os.path.join(d, name)):
            with open(os.path.join(d, name)) as f:
                return json.load(f)
        return None

    info: dict = {}
    for d in (path, os.path.dirname(os.path.abspath(path))):
        ds = load(d, "ds_config.json")
        if ds and "hyperparameters" not in info:
            info["hyperparameters"] = hyperparameters(ds.get("config", ds))
        metrics = load(d, "eval_results.json") or (load(d, "train_results.json") or {}).get("metrics")
        if metrics and "metrics" not in info:
            info["metrics"] = metrics
    return info


def _eval_metrics(metrics: dict) -> dict:
    return {k[5:] if k.startswith("eval_") else k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.endswith(("runtime", "per_second"))}


def model_card(repo_id: str, card_info: dict):
    """A ``huggingface_hub.ModelCard`` with ``ModelCardData`` metadata and a short body."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name = repo_id.split("/")[-1]
    task = card_info.get("task")
    tag = PIPELINE_TAGS.get(task, task if task in PIPELINE_TAGS.values() else None)
    base = card_info.get("base_model")
    hub_base = base if base and _HUB_ID.match(str(base)) and not os.path.exists(str(base)) else None
    datasets = card_info.get("datasets") or ([card_info["dataset"]] if card_info.get("dataset") else [])
    metrics = _eval_metrics(card_info.get("metrics", {}))
    evals = [EvalResult(task_type=tag, dataset_type=datasets[0] if datasets else "custom",
                        dataset_name=datasets[0] if datasets else "evaluation set", metric_type=k, metric_value=v)
             for k, v in metrics.items()] if tag else None
    peft = card_info.get("library_name") == "peft"
    tags = list(TAGS) + (["lora"] + ([f"base_model:adapter:{hub_base}"] if hub_base else []) if peft else [])
    data = ModelCardData(library_name="peft" if peft else "transformers", base_model=hub_base,
                         datasets=datasets or None, pipeline_tag=tag, tags=tags, model_name=name, eval_results=evals)
    hp = card_info.get("hyperparameters", {})
    load = ("It is a PEFT LoRA adapter: load it with `peft.PeftModel.from_pretrained(AutoModelFor<Task>."
            f"from_pretrained({str(base)!r}), {repo_id!r})`." if peft else "Load it with `transformers` as usual.")
    lines = [f"# {name}", "",
             f"Trained with hfpipe (DeepSpeed pipeline parallelism for Hugging Face models) over "
             f"{hp.get('num_stages', '?')} stages" + (f", fine-tuned from `{base}`" if base else "")
             + (f" on {', '.join(datasets)}" if datasets else "") + f". {load}", ""]
    if metrics:
        lines += ["## Evaluation results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()] + [""]
    if hp:
        lines += ["## Training hyperparameters", ""] + [f"- {k}: {v}" for k, v in hp.items()] + [""]
    lines += ["## Framework versions", "", f"- hfpipe {__version__}"] + [f"- {m} {v}" for m, v in _versions()]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _versions():
    import importlib.metadata as md

    for name in ("transformers", "peft", "deepspeed", "torch"):
        try:
            yield name, md.version(name)
        except md.PackageNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------------------- push
def _hub(what: str, target: str, fn, *args, **kwargs):
    """Call ``fn``; HTTP and network errors become one clean ``PushError`` (no token, no traceback chain)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn(*args, **kwargs)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            msg = "authentication failed: set HF_TOKEN or run `hf auth login`"
        elif status == 403:
            msg = (f"permission denied: the token cannot write to {target.split('@')[0]}; use a token with write "
                   "access to it")
        else:
            msg = f"the Hub answered {status}: {getattr(exc, 'server_message', None) or 'no details'}"
    except ValueError as exc:  # huggingface_hub's own checks, e.g. "Invalid metadata in README.md" (validate-yaml)
        msg = str(exc).replace("\n", " ")
    except OSError as exc:  # httpx transport errors are OSError-like only sometimes; the name is enough
        msg = f"cannot reach the Hub ({type(exc).__name__}); check the network or set HF_ENDPOINT"
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2"):
            raise
        msg = f"cannot reach the Hub ({type(exc).__name__}); check the network or set HF_ENDPOINT"
    raise PushError(f"{what} {target} failed: {msg}.")


def push_to_hub(folder: str, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, card_info: dict | None = None) -> str:
    """Write ``folder/README.md`` (unless ``card_info`` is None and a README is there) and upload ``folder`` to
    ``repo_id`` (created if missing; ``revision``: a branch, created if missing). Returns the repo URL."""
    adapter = is_adapter_folder(folder)
    if not (adapter or is_hf_folder(folder)):
        raise PushError(f"{folder} is not a model folder (config.json and *.safetensors) nor a PEFT adapter folder "
                        "(adapter_config.json and adapter_model.safetensors); export a checkpoint with "
                        "hfpipe.checkpoint.export or `hfpipe push CHECKPOINT --repo-id ...`.")
    if is_offline():
        raise PushError(f"HF_HUB_OFFLINE is set, so nothing was uploaded to {repo_id}; the model stays in {folder}. "
                        f"Unset HF_HUB_OFFLINE and run `hfpipe push {folder} --repo-id {repo_id}`.")
    from huggingface_hub import HfApi

    readme = os.path.join(folder, "README.md")
    if card_info is not None or not os.path.isfile(readme):
        if adapter:  # PEFT's metadata from the adapter itself; the run's info on top (the base as the run named it)
            card_info = {**adapter_card_info(folder), **(card_info or {}), "library_name": "peft"}
        model_card(repo_id, card_info or {}).save(readme)
    api = HfApi(token=token)
    url = str(_hub("creating", repo_id, api.create_repo, repo_id, private=private, exist_ok=True))
    if revision:
        _hub("creating branch", f"{repo_id}@{revision}", api.create_branch, repo_id, branch=revision, exist_ok=True)
    _hub("uploading to", repo_id, api.upload_folder, folder_path=folder, repo_id=repo_id, revision=revision,
         commit_message=commit_message or "Upload model trained with hfpipe")
    return f"{url}/tree/{revision}" if revision else url


def push(path: str, repo_id: str, *, export_dir: str | None = None, base_model: str | None = None,
         dataset: str | None = None, **kwargs) -> str:
    """``hfpipe push``: an HF folder or a PEFT adapter folder (card with PEFT's metadata) is pushed as is; a
    pipeline checkpoint is exported to ``export_dir`` (default ``<path>-hf``) first. The card takes what the run
    left next to ``path`` (``card_info_from_run``)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder; pass a model folder or a pipeline checkpoint-N folder.")
    if is_offline():  # before a possibly long export
        raise PushError(f"HF_HUB_OFFLINE is set, so nothing was exported or uploaded to {repo_id}. Unset "
                        "HF_HUB_OFFLINE and run the command again.")
    folder = path
    if not (is_hf_folder(path) or is_adapter_folder(path)):
        from hfpipe.checkpoint import export
        from hfpipe.core.weights import is_pipeline_checkpoint

        if not is_pipeline_checkpoint(path):
            raise PushError(f"{path} is neither a model folder (config.json and *.safetensors) nor a pipeline "
                            "checkpoint; pass the output_dir/final folder or a checkpoint-N folder.")
        folder = export(path, export_dir or path.rstrip("/\\") + "-hf")
    info = card_info_from_run(path)
    info.update({k: v for k, v in (("base_model", base_model), ("dataset", dataset)) if v})
    return push_to_hub(folder, repo_id, card_info=info, **kwargs)
