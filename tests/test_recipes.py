"""Each encoder recipe runs under the DeepSpeed launcher at p=2 on its embedded default (pretrained MiniLM, the
project's generated data) with capped steps and reaches a pinned metric that a broken pipeline, loss or
post-processing cannot: thresholds sit well above chance and below the values measured for these exact settings
(seeded runs; listed per case)."""

import pytest

from recipe_runs import LIMIT, run_recipe

# recipe, extra flags, {metric: (threshold, measured at these settings)}
CASES = [
    # chance: accuracy 0.5 on balanced labels
    ("finetune_classification", ["--max_steps", "30"], {"eval_accuracy": (0.65, 0.756), "eval_f1": (0.65, 0.799)}),
    # an untrained head finds almost no entity (F1 ~0)
    ("finetune_ner", ["--max_steps", "30"], {"eval_f1": (0.6, 0.797), "eval_accuracy": (0.75, 0.871)}),
    # an untrained head answers spans that match nothing (EM ~0)
    ("finetune_qa", ["--max_steps", "40"], {"eval_exact_match": (20.0, 35.0), "eval_f1": (28.0, 43.2)}),
]


@pytest.mark.launches
@pytest.mark.timeout(LIMIT + 60)
@pytest.mark.parametrize("recipe, flags, expected", CASES, ids=[c[0] for c in CASES])
def test_recipe_reaches_pinned_metric(recipe, flags, expected, tmp_path):
    metrics = run_recipe(recipe, tmp_path / "out", *flags)
    for key, (threshold, measured) in expected.items():
        assert metrics[key] >= threshold, f"{key}={metrics[key]:.3f} < {threshold} (measured {measured}): {metrics}"
