"""sacreBLEU as a local ``evaluate`` module (the ``sacrebleu`` package; no download): load it with
``evaluate.load(os.path.join(os.path.dirname(hfpipe.__file__), "metrics", "sacrebleu"))``.

Same contract as the Hub's ``sacrebleu``: corpus BLEU ``score`` (0-100) with ``counts``, ``totals``,
``precisions``, ``bp``, ``sys_len``, ``ref_len``; every prediction needs the same number of references."""

import datasets
import evaluate
import sacrebleu as scb

_KWARGS = """
predictions: list of str. references: list of list of str (same count per prediction).
smooth_method ("exp"), smooth_value, force, lowercase, tokenize (sacrebleu default "13a"), use_effective_order.
"""


class Sacrebleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU computed by sacreBLEU (Post, 2018).",
            citation="Post, 2018, A Call for Clarity in Reporting BLEU Scores.", inputs_description=_KWARGS,
            features=[datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                         "references": datasets.Sequence(datasets.Value("string", id="sequence"),
                                                                         id="references")}),
                      datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                         "references": datasets.Value("string", id="sequence")})],
        )

    def _compute(self, predictions, references, smooth_method="exp", smooth_value=None, force=False, lowercase=False,
                 tokenize=None, use_effective_order=False):
        if references and isinstance(references[0], str):
            references = [[r] for r in references]
        counts = {len(r) for r in references}
        if len(counts) != 1:
            raise ValueError(f"sacrebleu needs the same number of references per prediction; got counts "
                             f"{sorted(counts)}.")
        transposed = [[refs[i] for refs in references] for i in range(counts.pop())]
        bleu = scb.corpus_bleu(predictions, transposed, smooth_method=smooth_method, smooth_value=smooth_value,
                               force=force, lowercase=lowercase, use_effective_order=use_effective_order,
                               **({} if tokenize is None else {"tokenize": tokenize}))
        return {"score": bleu.score, "counts": bleu.counts, "totals": bleu.totals, "precisions": bleu.precisions,
                "bp": bleu.bp, "sys_len": bleu.sys_len, "ref_len": bleu.ref_len}
