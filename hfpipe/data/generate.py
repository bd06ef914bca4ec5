"""Generates the embedded default data sets of the classification, NER and QA recipes (``python hfpipe/data/generate.py``).

Everything here is invented by this script (fictional people, cities, organisations, reviews), so the files are
license-clean. The one idea: the validation split shares no entity with the training split (disjoint name, city,
organisation, product and adjective pools, and held-out phrasings), so a model that only memorised the training
set scores near chance and the metric measures what was learned, not what was copied.

Output (jsonl, one example a line, ~650 KB in all):
  classification_{train,validation}.jsonl  {"sentence", "label"}                       label: "negative"/"positive"
  ner_{train,validation}.jsonl             {"tokens", "ner_tags"}                      BIO tags over PER/LOC/ORG/DATE
  qa_{train,validation}.jsonl              {"id", "title", "context", "question", "answers": {"text", "answer_start"}}
  qa_v2_{train,validation}.jsonl           the same with unanswerable questions (empty answers), SQuAD v2 style
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261125
SIZES = {"classification": (1000, 250), "ner": (600, 200), "qa": (600, 180), "qa_v2": (300, 100)}

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


def main(out_dir: str = HERE) -> None:
    for name, (n_train, n_val) in SIZES.items():
        for split, n in ((0, n_train), (1, n_val)):
            rng = random.Random(f"{SEED}-{name}-{split}")
            if name == "classification":
                rows = classification(rng, split, n)
            elif name == "ner":
                rows = ner(rng, split, n)
            else:
                rows = qa(rng, split, n, with_unanswerable=name == "qa_v2", prefix=name)
            path = os.path.join(out_dir, f"{name}_{('train', 'validation')[split]}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
