"""ROUGE-1/2/L/Lsum as a local ``evaluate`` module (``rouge_score``; no download): load it with
``evaluate.load(os.path.join(os.path.dirname(hfpipe.__file__), "metrics", "rouge"))``.

Same contract as the Hub's ``rouge``: mean F-measure per type; ``rougeLsum`` splits summaries into sentences at
newlines (pass text with one sentence per line for the summary-level score)."""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (rouge_score), averaged over examples."
_KWARGS = """
predictions: list of str. references: list of str, or list of list of str (best reference per prediction).
rouge_types: default ["rouge1", "rouge2", "rougeL", "rougeLsum"]. use_stemmer: Porter stemming (default False).
use_aggregator: mean over examples (default True, deterministic), else per-example lists.
"""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Lin, 2004, ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=[datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                         "references": datasets.Sequence(datasets.Value("string", id="sequence"))}),
                      datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                         "references": datasets.Value("string", id="sequence")})],
        )

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        per_example = {t: [] for t in rouge_types}
        for pred, ref in zip(predictions, references):
            score = scorer.score_multi(ref, pred) if isinstance(ref, list) else scorer.score(ref, pred)
            for t in rouge_types:
                per_example[t].append(float(score[t].fmeasure))
        if not use_aggregator:
            return per_example
        # the plain mean (the Hub module reports the bootstrap median, which resamples randomly)
        return {t: sum(v) / max(1, len(v)) for t, v in per_example.items()}
