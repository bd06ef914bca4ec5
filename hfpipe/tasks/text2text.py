"""Text-to-text (summarization, translation) with decoder-only models.

A decoder learns ``source -> target`` when both are joined into one sequence -- ``prompt(source) + target + EOS`` --
and the loss sees only the target: labels are -100 on the prompt and on padding, so ``ForCausalLMLoss`` averages
over target tokens exactly as HF does for the same ``labels``. Evaluation generates from the prompt alone
(``hfpipe.generation``: the prompt is the part of each row before its first supervised label) and scores the
continuation with ROUGE (summarization) or sacreBLEU (translation), both local ``evaluate`` modules.

No pretrained decoder can be downloaded here, so the embedded default is a synthetic task the project ships
(``hfpipe/data/text2text/``): "summarization" extracts who bought what where from templated two-sentence stories,
"translation" maps a small English grammar to a word-substitution language that also moves adjectives after nouns.
It comes with a word-level tokenizer (``tokenizers`` ``WordLevel`` wrapped in ``PreTrainedTokenizerFast``) so a small
Llama trained from its config learns it on CPU in minutes. ``--train_file/--validation_file`` (json/jsonl/csv) or
``--dataset_name`` take real data.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from transformers import AutoModelForCausalLM

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "text2text")
METRICS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metrics")
TEMPLATES = {
    "summarization": "summarize : {source} \nsummary : ",
    "translation": "translate {source_lang} to {target_lang} : {source} \n{target_lang} : ",
}
SOURCE_COLUMNS = {"summarization": ("source", "document", "article", "text", "dialogue"),
                  "translation": ("source", "src")}
TARGET_COLUMNS = {"summarization": ("target", "summary", "highlights", "abstract"),
                  "translation": ("target", "tgt")}


@dataclass
class Text2TextDataArguments:
    task: str = field(default="summarization", metadata={"help": "summarization | translation"})
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets Hub name (needs network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "json/jsonl/csv with source and target columns."})
    validation_file: str | None = field(default=None, metadata={"help": "Like --train_file, for evaluation."})
    source_column: str | None = field(default=None, metadata={"help": "Source column (default: first of "
                                      "source/document/article/text/... that exists)."})
    target_column: str | None = field(default=None, metadata={"help": "Target column (default: first of "
                                      "target/summary/highlights/... that exists)."})
    source_lang: str = field(default="english", metadata={"help": "Translation: source language; with a WMT-style "
                             "'translation' column, its key (e.g. en)."})
    target_lang: str = field(default="synthetic", metadata={"help": "Translation: target language / key."})
    prompt_template: str | None = field(default=None, metadata={"help": "Prompt with {source} (and {source_lang}, "
                                        "{target_lang}); the target follows it. Default per task."})
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap the prompt as a user turn with the "
                                    "tokenizer's chat template (instruct models)."})
    max_target_length: int = field(default=64, metadata={"help": "Target tokens kept (EOS included)."})
    packing: bool = field(default=False, metadata={"help": "Concatenate training examples into full rows of "
                          "max_seq_length (no padding; examples attend to their predecessors in the row)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})


# ------------------------------------------------------------------------------------------- synthetic default
_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
          "peggy", "rupert", "sybil", "trent", "victor", "wendy"]
_CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar", "perth", "riga", "seoul"]
_ITEMS = ["apples", "books", "shoes", "lamps", "chairs", "coats", "bikes", "clocks", "maps", "rugs", "kites", "cups"]
_JOBS = ["baker", "teacher", "pilot", "nurse", "farmer", "painter", "doctor", "tailor"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_ADJS = ["red", "old", "new", "small", "large", "green", "cheap", "blue"]
_PLACES = ["market", "shop", "fair", "port", "mall"]
_NUMS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]
_WEATHER = ["sunny", "rainy", "cold", "windy", "warm"]


def _story(rng: random.Random) -> tuple[str, str]:
    name, other = rng.sample(_NAMES, 2)
    city, item = rng.choice(_CITIES), rng.choice(_ITEMS)
    f = dict(name=name, other=other, city=city, item=item, job=rng.choice(_JOBS), day=rng.choice(_DAYS),
             adj=rng.choice(_ADJS), place=rng.choice(_PLACES), num=rng.choice(_NUMS), price=rng.choice(_NUMS),
             weather=rng.choice(_WEATHER))
    key = rng.choice([
        "on {day} , {name} the {job} from {city} bought {num} {adj} {item} at the {place} for {price} coins .",
        "{name} , a {job} living in {city} , bought {num} {adj} {item} at the {place} on {day} .",
        "at the {place} in {city} , the {job} {name} bought {num} {adj} {item} on {day} .",
    ]).format(**f)
    noise = rng.choice(["the weather was {weather} and {other} stayed at home .",
                        "{other} the {job} sold {num} {item} to a friend .",
                        "it was {weather} all day in {city} ."]).format(**f)
    source = f"{key} {noise}" if rng.random() < 0.5 else f"{noise} {key}"
    return source, f"{name} bought {item} in {city} ."


_EN_NOUNS = ["cat", "dog", "bird", "fish", "horse", "child", "farmer", "king", "queen", "girl", "boy", "teacher"]
_EN_VERBS = ["sees", "likes", "follows", "helps", "finds", "feeds", "calls", "paints"]
_EN_ADJS = ["big", "small", "red", "happy", "old", "young", "quick", "lazy"]
_EN_ADVS = ["today", "often", "quietly", "again", "slowly", "now"]
_SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "ta", "vu", "ze", "bo", "da"]


def _lexicon() -> dict[str, str]:
    """Deterministic English -> synthetic word map (two syllables per word, no collisions)."""
    rng = random.Random(1234)
    words = ["the", "a", "and"] + _EN_NOUNS + _EN_VERBS + _EN_ADJS + _EN_ADVS
    pool = [a + b for a in _SYLLABLES for b in _SYLLABLES]
    rng.shuffle(pool)
    return dict(zip(words, pool))


def _sentence(rng: random.Random, lex: dict[str, str]) -> tuple[str, str]:
    def phrase():
        det, noun = rng.choice(["the", "a"]), rng.choice(_EN_NOUNS)
        adjs = rng.sample(_EN_ADJS, rng.choice([0, 1, 1, 2]))
        # target grammar: adjectives follow the noun, in reverse order
        return [det, *adjs, noun], [lex[det], lex[noun], *[lex[a] for a in reversed(adjs)]]

    subj_en, subj_x = phrase()
    obj_en, obj_x = phrase()
    verb = rng.choice(_EN_VERBS)
    en, xx = subj_en + [verb] + obj_en, subj_x + [lex[verb]] + obj_x
    if rng.random() < 0.5:
        adv = rng.choice(_EN_ADVS)
        en, xx = en + [adv], [lex[adv]] + xx  # adverbs move to the front
    return " ".join(en) + " .", " ".join(xx) + " ."


def synthetic_examples(task: str, n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    if task == "summarization":
        pairs = [_story(rng) for _ in range(n)]
    else:
        lex = _lexicon()
        pairs = [_sentence(rng, lex) for _ in range(n)]
    return [{"source": s, "target": t} for s, t in pairs]


def build_default_data(out_dir: str = DATA_DIR, train: int = 4000, validation: int = 200) -> None:
    """(Re)write the shipped synthetic data and its word-level tokenizer (deterministic)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    words = set()
    for task in ("summarization", "translation"):
        for split, n, seed in (("train", train, 0), ("validation", validation, 1)):
            rows = synthetic_examples(task, n, seed)
            with open(os.path.join(out_dir, f"{task}_{split}.jsonl"), "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                    words.update(row["source"].split() + row["target"].split())
    for template in TEMPLATES.values():
        words.update(template.format(source="", source_lang="english", target_lang="synthetic").split())
    words.update(["###", "instruction", "response", "so"])  # hfpipe.tasks.causal_lm's default text / SFT prompts
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(words - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(os.path.join(out_dir, "tokenizer"))


def default_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(DATA_DIR, "tokenizer"))


def small_decoder_config(tokenizer, **overrides):
    """The small Llama the recipes train from scratch on the synthetic default (4 blocks, hidden 128)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


#: Settings of the recipes' embedded default run (small Llama from scratch on the synthetic data, 2 CPU ranks);
#: applied only when no data is given, and any command-line flag still wins (hfpipe.tasks.base.recipe_arguments).
RECIPE_DEFAULTS = {
    "summarization": dict(max_steps=300, learning_rate=3e-3, warmup_steps=20, per_device_train_batch_size=16,
                          per_device_eval_batch_size=25, eval_strategy="steps", eval_steps=50, logging_steps=25,
                          max_seq_length=48, predict_with_generate=True, generation_max_length=12,
                          max_eval_samples=100, save_strategy="no"),
    "translation": dict(max_steps=400, learning_rate=3e-3, warmup_steps=20, per_device_train_batch_size=16,
                        per_device_eval_batch_size=25, eval_strategy="steps", eval_steps=50, logging_steps=25,
                        max_seq_length=40, predict_with_generate=True, generation_max_length=16,
                        max_eval_samples=100, save_strategy="no"),
}


# ------------------------------------------------------------------------------------------------ tokenization
def load_text2text(args: Text2TextDataArguments, default_prefix: str):
    """``DatasetDict`` with ``train``/``validation`` from --dataset_name, files, or the shipped default."""
    import datasets

    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_file or args.validation_file:
        files = {k: v for k, v in (("train", args.train_file), ("validation", args.validation_file)) if v}
        ext = os.path.splitext(next(iter(files.values())))[1].lstrip(".")
        raw = datasets.load_dataset({"jsonl": "json"}.get(ext, ext), data_files=files)
    else:
        files = {s: os.path.join(DATA_DIR, f"{default_prefix}_{s}.jsonl") for s in ("train", "validation")}
        raw = datasets.load_dataset("json", data_files=files)
    if "validation" not in raw and "test" in raw:
        raw["validation"] = raw["test"]
    for split, cap in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if cap is not None and split in raw:
            raw[split] = raw[split].select(range(min(cap, len(raw[split]))))
    return raw


def split_template(tokenizer, template: str, use_chat_template: bool, **fields) -> tuple[list[int], list[int]]:
    """Token ids before and after ``{source}`` in the rendered prompt (BOS / chat markup included), so the source
    alone can be truncated to fit ``max_seq_length``."""
    marker = "\x00SOURCE\x00"
    text = template.format(source=marker, **fields)
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--use_chat_template needs a tokenizer with a chat template; {type(tokenizer).__name__} "
                             "has none. Drop the flag or use an instruct model's tokenizer.")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        before, after = text.split(marker)
        return (tokenizer(before, add_special_tokens=False)["input_ids"],
                tokenizer(after, add_special_tokens=False)["input_ids"])
    before, after = text.split(marker)
    with_specials = tokenizer(before, add_special_tokens=True)["input_ids"]
    plain = tokenizer(before, add_special_tokens=False)["input_ids"]
    # keep special tokens the tokenizer adds at the start (BOS); drop any it appends at the end (EOS of BERT-likes)
    cut = len(with_specials) - len(plain)
    lead = with_specials[:cut] if with_specials[cut:] == plain else with_specials[:1]
    return lead + plain, tokenizer(after, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prefix: list[int], suffix: list[int], source: str, target: str, max_seq_length: int,
                max_target_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, unpadded: prompt (labels -100) then target + EOS (labels = ids)."""
    target_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"][:max_target_length - 1]
    target_ids = target_ids + [tokenizer.eos_token_id]
    budget = max_seq_length - len(prefix) - len(suffix) - len(target_ids)
    if budget < 1:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for the source after the prompt template "
                         f"({len(prefix) + len(suffix)} tokens) and a target of {len(target_ids)} tokens; raise "
                         "--max_seq_length or lower --max_target_length.")
    source_ids = tokenizer(source.strip(), add_special_tokens=False)["input_ids"][:budget]
    prompt = prefix + source_ids + suffix
    return prompt + target_ids, [-100] * len(prompt) + target_ids


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, length: int) -> dict[str, list[list[int]]]:
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        n = length - len(ids)
        out["input_ids"].append(ids + [pad_id] * n)
        out["attention_mask"].append([1] * len(ids) + [0] * n)
        out["labels"].append(labels + [-100] * n)
    return out


def pack_rows(rows: list[tuple[list[int], list[int]]], length: int) -> dict[str, list[list[int]]]:
    """Concatenate examples and cut full rows of ``length`` (the remainder is dropped)."""
    ids = [t for r, _ in rows for t in r]
    labels = [t for _, r in rows for t in r]
    n = len(ids) // length
    return {"input_ids": [ids[i * length:(i + 1) * length] for i in range(n)],
            "attention_mask": [[1] * length for _ in range(n)],
            "labels": [labels[i * length:(i + 1) * length] for i in range(n)]}


def _pick(columns, explicit: str | None, candidates, what: str) -> str:
    if explicit:
        if explicit not in columns:
            raise ValueError(f"--{what}_column={explicit!r} is not a column of the data; columns: {list(columns)}.")
        return explicit
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(f"no {what} column among {list(columns)}; pass --{what}_column.")


# ---------------------------------------------------------------------------------------------------------- task
class Text2TextTask:
    """Summarization / translation with a decoder-only model (``AutoModelForCausalLM``)."""

    auto_class = AutoModelForCausalLM

    def __init__(self, data_args: Text2TextDataArguments):
        if data_args.task not in TEMPLATES:
            raise ValueError(f"--task={data_args.task!r}; expected one of {sorted(TEMPLATES)}.")
        self.args = data_args
        self.task = data_args.task
        self.template = data_args.prompt_template or TEMPLATES[self.task]
        self.uses_default_data = not (data_args.dataset_name or data_args.train_file or data_args.validation_file)

    def load_raw(self):
        return load_text2text(self.args, self.task)

    def model_kwargs(self, raw) -> dict:
        return {}

    def _columns(self, dataset) -> tuple[Callable, Callable]:
        cols = dataset.column_names
        a = self.args
        if self.task == "translation" and "translation" in cols and not (a.source_column or a.target_column):
            return (lambda ex: ex["translation"][a.source_lang]), (lambda ex: ex["translation"][a.target_lang])
        src = _pick(cols, a.source_column, SOURCE_COLUMNS[self.task], "source")
        tgt = _pick(cols, a.target_column, TARGET_COLUMNS[self.task], "target")
        return (lambda ex: ex[src]), (lambda ex: ex[tgt])

    def encode(self, tokenizer, dataset, max_seq_length: int, packing: bool = False):
        """Tokenized ``datasets.Dataset`` (input_ids, attention_mask, labels), right-padded to max_seq_length."""
        import datasets

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        prefix, suffix = split_template(tokenizer, self.template, self.args.use_chat_template,
                                        source_lang=self.args.source_lang, target_lang=self.args.target_lang)
        get_src, get_tgt = self._columns(dataset)
        rows = [encode_pair(tokenizer, prefix, suffix, get_src(ex), get_tgt(ex), max_seq_length,
                            self.args.max_target_length) for ex in dataset]
        table = pack_rows(rows, max_seq_length) if packing else pad_rows(rows, tokenizer.pad_token_id, max_seq_length)
        return datasets.Dataset.from_dict(table)

    def prepare(self, tokenizer, raw, max_seq_length: int):
        train = self.encode(tokenizer, raw["train"], max_seq_length, self.args.packing) if "train" in raw else None
        evald = self.encode(tokenizer, raw["validation"], max_seq_length) if "validation" in raw else None
        self.tokenizer = tokenizer
        return train, evald

    def generation_kwargs(self, max_new_tokens: int) -> dict:
        return {"max_new_tokens": max_new_tokens}

    def compute_metrics(self, eval_ds) -> Callable:
        """``EvalPrediction -> {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"}`` (summarization) or
        ``{"bleu", "gen_len"}`` (translation). Predictions are generated ids (``--predict_with_generate``), or logits
        / argmax ids of the teacher-forced pass (then the metric reads the next-token predictions on target
        positions)."""
        import evaluate

        tokenizer = self.tokenizer
        name = "rouge" if self.task == "summarization" else "sacrebleu"
        metric = evaluate.load(os.path.join(METRICS_DIR, name))
        references = [tokenizer.decode([t for t in row if t != -100], skip_special_tokens=True).strip()
                      for row in np.asarray(eval_ds["labels"])]

        def compute(pred) -> dict:
            preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            preds = np.asarray(preds)
            labels = np.asarray(pred.label_ids) if pred.label_ids is not None else None
            if preds.ndim == 3:  # teacher-forced logits
                preds = preds.argmax(-1)
            if labels is not None and preds.shape == labels.shape:
                # teacher forcing (logits, or ids as wide as the rows; generated ids are --generation_max_length
                # wide): token t+1 is predicted at t; keep target positions only
                texts = [tokenizer.decode([p for p, l in zip(row[:-1], lab[1:]) if l != -100],
                                          skip_special_tokens=True) for row, lab in zip(preds, labels)]
            else:
                texts = [tokenizer.decode(_until_eos(row, tokenizer.eos_token_id), skip_special_tokens=True)
                         for row in preds]
            texts = [t.strip() for t in texts]
            refs = references[:len(texts)]
            if name == "rouge":
                scores = metric.compute(predictions=texts, references=refs)
                out = {k: round(100 * float(v), 2) for k, v in scores.items()}
            else:
                out = {"bleu": round(float(metric.compute(predictions=texts, references=[[r] for r in refs])["score"]),
                                     2)}
            out["gen_len"] = float(np.mean([len(t.split()) for t in texts])) if texts else 0.0
            return out

        return compute


def _until_eos(row, eos_id) -> list[int]:
    row = [int(t) for t in row if int(t) >= 0]
    return row[:row.index(eos_id)] if eos_id in row else row

