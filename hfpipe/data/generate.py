"""Generates every embedded default data set the recipes train on (``python hfpipe/data/generate.py``): the one place
the shipped data comes from, so it can be rebuilt byte for byte.

Everything here is invented by this script (fictional people, cities, organisations, reviews, a made-up language), so
the files are license-clean. The one idea for the encoder sets: the validation split shares no entity with the
training split (disjoint name, city, organisation, product and adjective pools, and held-out phrasings), so a model
that only memorised the training set scores near chance and the metric measures what was learned, not what was
copied. The decoder corpus is a synthetic task a small Llama trained from scratch learns on CPU in minutes:
"summarization" extracts who bought what where from templated two-sentence stories, "translation" maps a small
English grammar to a word-substitution language that also moves adjectives after nouns; it ships with the
word-level tokenizer that covers it.

Output (jsonl, one example a line):
  classification_{train,validation}.jsonl  {"sentence", "label"}                       label: "negative"/"positive"
  ner_{train,validation}.jsonl             {"tokens", "ner_tags"}                      BIO tags over PER/LOC/ORG/DATE
  qa_{train,validation}.jsonl              {"id", "title", "context", "question", "answers": {"text", "answer_start"}}
  qa_v2_{train,validation}.jsonl           the same with unanswerable questions (empty answers), SQuAD v2 style
  text2text/{summarization,translation}_{train,validation}.jsonl   {"source", "target"}
  text2text/tokenizer/                     WordLevel tokenizer (``PreTrainedTokenizerFast``) of that corpus
"""

from __future__ import annotations

import json
import os
import random

from hfpipe.tasks.base import DATA_DIR

SEED = 20261125
SIZES = {"classification": (1000, 250), "ner": (600, 200), "qa": (600, 180), "qa_v2": (300, 100)}
#: decoder corpus: (train, validation) examples per task; seeds 0 (train) and 1 (validation)
TEXT2TEXT_SIZES = (4000, 200)

# --------------------------------------------------------------------------------------------- entity pools
# index 0: train pool, index 1: validation pool (disjoint)
FIRST = (["Mira", "Tomas", "Elena", "Jonah", "Priya", "Anders", "Lucia", "Kofi", "Hana", "Rafael", "Ines", "Oskar",
          "Yara", "Dmitri", "Leila", "Bruno", "Selma", "Arjun", "Nadia", "Felix"],
         ["Greta", "Omar", "Talia", "Viktor", "Amara", "Lorenzo", "Sigrid", "Kenji", "Zofia", "Mateo", "Freya",
          "Idris"])
LAST = (["Kestrel", "Varga", "Holm", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Brandt", "Castell", "Novak",
         "Ashby", "Quint", "Ferreira", "Dahl", "Mbeki", "Sorensen"],
        ["Halloway", "Ibarra", "Petrov", "Nakamura", "Delacroix", "Osei", "Rasmussen", "Whitlock", "Zamora",
         "Kowalczyk"])
CITY = (["Dunmore", "Port Asher", "Velmora", "Kingsreach", "Oldbridge", "Saltmere", "Brightwater", "Elmsford",
         "Carrow", "Redhaven", "Westholm", "Thornby", "Lakemont", "Ashgrove"],
        ["Marrowdale", "Stonebury", "Fenwick", "Greyport", "Hollowmere", "Silverton", "Northgate", "Ravensfield",
         "Eastwick"])
ORG = (["Halden Institute", "Blue Finch Society", "Northwind Labs", "Corvid Press", "Amber Rail Company",
        "Harbor Guild", "Tidewater Bank", "Lantern Theatre", "Meridian College", "Ironleaf Foundry"],
       ["Quarry Hill Museum", "Starling Observatory", "Copperline Works", "Willow Trust", "Granite Union",
        "Solace Hospital", "Beacon Archive"])
JOB = (["cartographer", "engineer", "botanist", "architect", "journalist", "violinist", "surgeon", "chemist",
        "sculptor", "historian"],
       ["geologist", "translator", "librarian", "economist", "pilot", "astronomer", "photographer"])
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _date(rng: random.Random, lo: int = 1920, hi: int = 2015) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(lo, hi)}"


# ------------------------------------------------------------------------------------------ classification
PRODUCT = (["camera", "blender", "jacket", "novel", "laptop", "backpack", "kettle", "headset", "tent", "desk lamp",
            "board game", "coffee grinder"],
           ["bicycle", "umbrella", "keyboard", "cookbook", "mattress", "watch", "scooter", "speaker"])
ASPECT = (["the battery", "the design", "the price", "the delivery", "the material", "the sound", "the manual"],
          ["the packaging", "the colour", "the support team", "the warranty", "the finish"])
POS = (["excellent", "wonderful", "great", "reliable", "impressive", "lovely", "fantastic", "sturdy", "pleasant"],
       ["superb", "delightful", "outstanding", "brilliant", "solid", "charming"])
NEG = (["terrible", "awful", "flimsy", "disappointing", "useless", "poor", "broken", "cheap", "annoying"],
       ["dreadful", "horrible", "faulty", "mediocre", "shoddy", "frustrating"])
CLS_TEMPLATES = (
    ["The {product} is {adj}.", "I found the {product} {adj}, and {aspect} was {adj2} too.",
     "Honestly, {aspect} of this {product} is {adj}.", "What a {adj} {product}!",
     "My new {product} turned out {adj}; {aspect} felt {adj2}.", "{aspect} was {adj} but overall the {product} is {adj2}."],
    ["After a month, the {product} still seems {adj}.", "Would I call this {product} {adj}? Yes, {aspect} is {adj2}.",
     "Friends said the {product} was {adj}, and they were right.", "{aspect} is {adj} and so is the {product}."],
)


def classification(rng: random.Random, split: int, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = (NEG, POS)[label][split]
        template = rng.choice(CLS_TEMPLATES[split] if split == 0 or rng.random() < 0.7 else CLS_TEMPLATES[0])
        if template.startswith("{aspect} was {adj} but"):  # contrast: the overall verdict decides the label
            adj, adj2 = rng.choice((POS, NEG)[label][split]), rng.choice(words)
        else:
            adj, adj2 = rng.choice(words), rng.choice(words)
        text = template.format(product=rng.choice(PRODUCT[split]), aspect=rng.choice(ASPECT[split]), adj=adj,
                               adj2=adj2)
        rows.append({"sentence": text[0].upper() + text[1:], "label": ("negative", "positive")[label]})
    return rows


# ----------------------------------------------------------------------------------------------------- NER
NER_TEMPLATES = (
    ["{PER} joined the {ORG} in {LOC} on {DATE} .", "On {DATE} , {PER} left {LOC} for good .",
     "The {ORG} hired {PER} as its new director .", "{PER} met {PER2} at the {ORG} .",
     "Born in {LOC} on {DATE} , {PER} later moved to {LOC2} .", "Reports from {LOC} say the {ORG} will close .",
     "{PER} spoke in {LOC} about the {ORG} ."],
    ["Since {DATE} , {PER} has led the {ORG} from {LOC} .", "In {LOC} , {PER} and {PER2} founded the {ORG} .",
     "The {ORG} opened an office in {LOC} on {DATE} .", "{PER} travelled from {LOC} to {LOC2} on {DATE} ."],
)


def _person(rng: random.Random, split: int) -> str:
    if rng.random() < 0.3:
        return rng.choice(FIRST[split])
    return f"{rng.choice(FIRST[split])} {rng.choice(LAST[split])}"


def ner(rng: random.Random, split: int, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        template = rng.choice(NER_TEMPLATES[split] if split == 0 or rng.random() < 0.6 else NER_TEMPLATES[0])
        fill = {"PER": _person(rng, split), "PER2": _person(rng, split), "LOC": rng.choice(CITY[split]),
                "LOC2": rng.choice(CITY[split]), "ORG": rng.choice(ORG[split]), "DATE": _date(rng)}
        tokens, tags = [], []
        for piece in template.split():
            if piece.startswith("{") and piece.endswith("}"):
                key = piece[1:-1]
                words = fill[key].split()
                kind = key.rstrip("2")
                tokens += words
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
            else:
                tokens.append(piece[0].upper() + piece[1:] if not tokens else piece)
                tags.append("O")
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


# ------------------------------------------------------------------------------------------------------ QA
# (question templates, answer key); the last phrasing of each type is only used in validation
QUESTIONS = {
    "birthplace": ["Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"],
    "birthdate": ["When was {name} born?", "On what date was {name} born?", "What is {name}'s date of birth?"],
    "job": ["What did {name} work as?", "What was {name}'s profession?", "What was the occupation of {name}?"],
    "employer": ["Where did {name} work?", "Which organisation employed {name}?", "For which institution did {name} work?"],
    "moved_to": ["Which city did {name} move to in {year}?", "Where did {name} move in {year}?",
                 "To what city did {name} relocate in {year}?"],
    "founded": ["What did {name} found?", "What did {name} establish?", "Which group was founded by {name}?"],
}
UNANSWERABLE = ["Where did {name} die?", "Who was {name}'s teacher?", "Which prize did {name} win?",
                "How many children did {name} have?"]


def _bio(rng: random.Random, split: int) -> tuple[str, str, dict]:
    name = f"{rng.choice(FIRST[split])} {rng.choice(LAST[split])}"
    born_in, moved_to = rng.sample(CITY[split], 2)
    employer, founded = rng.sample(ORG[split], 2)
    job, born_on, year = rng.choice(JOB[split]), _date(rng, 1900, 1980), rng.randint(1985, 2020)
    pronoun = rng.choice(["She", "He"])
    facts = {"birthplace": born_in, "birthdate": born_on, "job": job, "employer": f"the {employer}",
             "moved_to": moved_to, "founded": f"the {founded}"}
    sentences = [
        f"{name} was born in {born_in} on {born_on}.",
        f"{pronoun} worked as a {job} at the {employer}." if split == 0 or rng.random() < 0.5 else
        f"For many years {pronoun.lower()} was a {job} at the {employer}.",
        f"In {year} {pronoun.lower()} moved to {moved_to}, where {pronoun.lower()} founded the {founded}."
        if split == 0 or rng.random() < 0.5 else
        f"{pronoun} settled in {moved_to} in {year} and founded the {founded} there.",
    ]
    if rng.random() < 0.5:  # the sentence order varies so that answer positions do
        sentences = [sentences[0], sentences[2], sentences[1]]
    return name, " ".join(sentences), dict(facts, year=str(year))


def qa(rng: random.Random, split: int, n: int, with_unanswerable: bool = False, prefix: str = "qa") -> list[dict]:
    rows = []
    while len(rows) < n:
        name, context, facts = _bio(rng, split)
        kinds = rng.sample(list(QUESTIONS), 3)
        for kind in kinds:
            phrasings = QUESTIONS[kind] if split == 1 else QUESTIONS[kind][:-1]
            question = rng.choice(phrasings).format(name=name, year=facts["year"])
            text = facts[kind]
            start = context.index(text) if kind != "job" else context.index(f" {text} ") + 1
            rows.append({"id": f"{prefix}-{('train', 'validation')[split]}-{len(rows)}", "title": name,
                         "context": context, "question": question,
                         "answers": {"text": [text], "answer_start": [start]}})
        if with_unanswerable and rng.random() < 0.6:
            rows.append({"id": f"{prefix}-{('train', 'validation')[split]}-{len(rows)}", "title": name,
                         "context": context, "question": rng.choice(UNANSWERABLE).format(name=name),
                         "answers": {"text": [], "answer_start": []}})
    return rows[:n]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{path}: {len(rows)} examples")


def write_encoder_sets(out_dir: str = DATA_DIR) -> None:
    for name, (n_train, n_val) in SIZES.items():
        for split, n in ((0, n_train), (1, n_val)):
            rng = random.Random(f"{SEED}-{name}-{split}")
            if name == "classification":
                rows = classification(rng, split, n)
            elif name == "ner":
                rows = ner(rng, split, n)
            else:
                rows = qa(rng, split, n, with_unanswerable=name == "qa_v2", prefix=name)
            _write_jsonl(os.path.join(out_dir, f"{name}_{('train', 'validation')[split]}.jsonl"), rows)


# ------------------------------------------------------------------------------ decoder corpus (text-to-text)
# lower-case, space-separated tokens: a word-level tokenizer covers it exactly
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


def write_text2text(out_dir: str = os.path.join(DATA_DIR, "text2text")) -> None:
    """The decoder corpus and its word-level tokenizer (every word of the corpus, of the text-to-text prompts and of
    hfpipe.tasks.causal_lm's default text / SFT prompts)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from hfpipe.tasks.text2text import TEMPLATES

    os.makedirs(out_dir, exist_ok=True)
    words = set()
    for task in ("summarization", "translation"):
        for split, n, seed in (("train", TEXT2TEXT_SIZES[0], 0), ("validation", TEXT2TEXT_SIZES[1], 1)):
            rows = synthetic_examples(task, n, seed)
            _write_jsonl(os.path.join(out_dir, f"{task}_{split}.jsonl"), rows)
            for row in rows:
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


def main(out_dir: str = DATA_DIR) -> None:
    write_encoder_sets(out_dir)
    write_text2text(os.path.join(out_dir, "text2text"))


if __name__ == "__main__":
    main()
