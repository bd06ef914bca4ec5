"""Each encoder recipe runs its own ``main()`` on 2 ranks at p=2 on its embedded default (pretrained MiniLM, the
project's generated data) with capped steps and reaches a pinned metric that a broken pipeline, loss or
post-processing cannot: thresholds sit well above chance and below the values measured for these exact settings
(seeded runs; listed per case). The ranks are the test pool's (``run_recipe_in_pool``): the recipe's command line
is the same; the ``deepspeed`` launcher itself is run by the launch tests (accelerate, multi-node, verify CLI)."""

import pytest

from recipe_runs import run_recipe_in_pool

# recipe, extra flags, {metric: (threshold, measured at these settings)}
CASES = [
    # chance: accuracy 0.5 on balanced labels
    ("finetune_classification", ["--max_steps", "10", "--learning_rate", "3e-4"],
     {"eval_accuracy": (0.75, 0.92), "eval_f1": (0.75, 0.924)}),
    # an untrained head finds almost no entity (F1 ~0)
    ("finetune_ner", ["--max_steps", "15", "--learning_rate", "2e-4"],
     {"eval_f1": (0.5, 0.679), "eval_accuracy": (0.75, 0.838)}),
    # an untrained head answers spans that match nothing (EM ~0)
    ("finetune_qa", ["--max_steps", "20"], {"eval_exact_match": (5.0, 10.556), "eval_f1": (12.0, 19.565)}),
]


@pytest.mark.parametrize("recipe, flags, expected", CASES, ids=[c[0] for c in CASES])
def test_recipe_reaches_pinned_metric(dist_pool, recipe, flags, expected, tmp_path):
    metrics = run_recipe_in_pool(dist_pool(2), recipe, tmp_path / "out", *flags)
    for key, (threshold, measured) in expected.items():
        assert metrics[key] >= threshold, f"{key}={metrics[key]:.3f} < {threshold} (measured {measured}): {metrics}"
