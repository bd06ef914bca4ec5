"""Causal-LM fine-tuning: plain text (every token is a target) or instruction data (SFT: loss on the response only).

Plain text is tokenized per document and either packed into full rows of ``max_seq_length`` (``--packing``, the
run_clm way: no padding, documents separated by EOS) or truncated/padded one document per row. Instruction data --
``prompt``/``response``, ``instruction``/``input``/``output`` (Alpaca) or ``messages`` (chat) -- reuses the
text-to-text encoding (:mod:`hfpipe.tasks.text2text`): labels -100 on the prompt and padding. Evaluation reports
perplexity = exp(mean token negative log-likelihood over the label tokens), computed from the logits the trainer
returns.

The embedded default (no download) is the project's synthetic corpus (``hfpipe/data/text2text``): the stories as
plain text, or the translation pairs as instructions (``--format sft``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from transformers import AutoModelForCausalLM

from hfpipe.tasks.base import TaskDataArguments, load_raw_splits, uses_embedded_default
from hfpipe.tasks.text2text import encode_pair, pack_rows, pad_rows, split_template

ALPACA_TEMPLATE = "### instruction :\n{instruction}\n### response :\n"
#: The embedded default run (small Llama from scratch on the synthetic corpus, 2 CPU ranks): used only when no data
#: is given; command-line flags still win (hfpipe.tasks.base.recipe_arguments).
RECIPE_DEFAULTS = dict(max_steps=200, learning_rate=3e-3, warmup_steps=20, per_device_train_batch_size=16,
                       per_device_eval_batch_size=25, eval_strategy="steps", eval_steps=50, logging_steps=25,
                       max_seq_length=64, max_eval_samples=100, save_strategy="no")


@dataclass
class CausalLMDataArguments(TaskDataArguments):
    format: str = field(default="text", metadata={"help": "text (plain documents) | sft (instruction/response)"})
    train_file: str | None = field(default=None, metadata={"help": "txt/json/jsonl/csv file."})
    text_column: str = field(default="text", metadata={"help": "Plain text column."})
    prompt_template: str = field(default=ALPACA_TEMPLATE, metadata={"help": "SFT prompt with {instruction}."})
    use_chat_template: bool = field(default=False, metadata={"help": "SFT: render prompts with the tokenizer's chat "
                                    "template (``messages`` data always uses it)."})
    packing: bool = field(default=False, metadata={"help": "Concatenate training rows into full max_seq_length rows."})
    validation_split_percentage: int = field(default=5, metadata={"help": "Held-out share when there is no "
                                             "validation split."})


#: the embedded default of each --format: (corpus file stem under hfpipe/data, its rows as this format's columns)
EMBEDDED = {
    "text": ("text2text/summarization", lambda ex: {"text": f"{ex['source']} so {ex['target']}"}),
    "sft": ("text2text/translation",
            lambda ex: {"prompt": f"translate english to synthetic : {ex['source']}", "response": ex["target"]}),
}


class CausalLMTask:
    auto_class = AutoModelForCausalLM

    def __init__(self, data_args: CausalLMDataArguments):
        if data_args.format not in ("text", "sft"):
            raise ValueError(f"--format={data_args.format!r}; expected 'text' or 'sft'.")
        self.args = data_args

    def load_raw(self):
        a = self.args
        stem, to_columns = EMBEDDED[a.format]
        raw = load_raw_splits(a, stem, builders={"txt": "text"}, held_out_percentage=a.validation_split_percentage)
        if uses_embedded_default(a):
            raw = raw.map(to_columns, remove_columns=["source", "target"])
        return raw

    def model_kwargs(self, raw) -> dict:
        return {}

    # ---------------------------------------------------------------------------------------------- encoding
    def _text_rows(self, tokenizer, dataset, max_seq_length, packing):
        if self.args.text_column not in dataset.column_names:
            raise ValueError(f"--text_column={self.args.text_column!r} is not a column; columns: "
                             f"{dataset.column_names}.")
        rows = []
        for text in dataset[self.args.text_column]:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            ids = ids + [tokenizer.eos_token_id] if packing else ids[:max_seq_length - 1] + [tokenizer.eos_token_id]
            rows.append((ids, list(ids)))
        return rows

    def _sft_rows(self, tokenizer, dataset, max_seq_length):
        cols = dataset.column_names
        rows = []
        if "messages" in cols:  # chat: everything before the last assistant turn is the prompt
            for messages in dataset["messages"]:
                *context, last = messages
                prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
                prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                rows.append(encode_pair(tokenizer, prefix, [], "", last["content"], max_seq_length, max_seq_length))
            return rows
        if "instruction" in cols:
            get_prompt = lambda ex: ex["instruction"] + (f"\n{ex['input']}" if ex.get("input") else "")  # noqa: E731
            get_response = lambda ex: ex["output"]  # noqa: E731
        elif "prompt" in cols and ("response" in cols or "completion" in cols):
            key = "response" if "response" in cols else "completion"
            get_prompt, get_response = (lambda ex: ex["prompt"]), (lambda ex: ex[key])
        else:
            raise ValueError(f"SFT data needs prompt/response, prompt/completion, instruction/input/output or "
                             f"messages columns; got {cols}.")
        template = self.args.prompt_template.replace("{instruction}", "{source}")
        prefix, suffix = split_template(tokenizer, template, self.args.use_chat_template)
        budget = max_seq_length // 2
        for ex in dataset:
            rows.append(encode_pair(tokenizer, prefix, suffix, get_prompt(ex), get_response(ex), max_seq_length,
                                    budget))
        return rows

    def encode(self, tokenizer, dataset, max_seq_length: int, packing: bool = False):
        import datasets

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.args.format == "text":
            rows = self._text_rows(tokenizer, dataset, max_seq_length, packing)
        else:
            rows = self._sft_rows(tokenizer, dataset, max_seq_length)
        table = pack_rows(rows, max_seq_length) if packing else pad_rows(rows, tokenizer.pad_token_id, max_seq_length)
        return datasets.Dataset.from_dict(table)

    def prepare(self, tokenizer, raw, max_seq_length: int):
        self.tokenizer = tokenizer
        train = self.encode(tokenizer, raw["train"], max_seq_length, self.args.packing) if "train" in raw else None
        evald = self.encode(tokenizer, raw["validation"], max_seq_length) if "validation" in raw else None
        return train, evald

    def compute_metrics(self, eval_ds) -> Callable:
        """``EvalPrediction(logits, labels) -> {"perplexity", "nll", "token_accuracy"}`` over label tokens."""

        def compute(pred) -> dict:
            import torch

            logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
            labels = torch.as_tensor(np.asarray(pred.label_ids if pred.label_ids is not None else eval_ds["labels"]))
            if logits.dim() != 3:
                raise ValueError(f"perplexity needs logits [N, L, V]; got predictions of shape {tuple(logits.shape)} "
                                 "(was --predict_with_generate set? it is for text-to-text tasks).")
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].long()
            keep = shift_labels != -100
            nll = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="mean")
            acc = (shift_logits[keep].argmax(-1) == shift_labels[keep]).float().mean()
            return {"perplexity": round(float(torch.exp(nll)), 4), "nll": round(float(nll), 5),
                    "token_accuracy": round(100 * float(acc), 2)}

        return compute
