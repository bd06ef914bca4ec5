"""Data that the model cannot take is refused before the first step, with the split, the value and the fix."""

import pytest
import transformers
from datasets import Dataset

from hfpipe.training.datacheck import DataError, check_dataset, position_limit
from models import family_config


def _bert():
    config = family_config("bert", num_labels=3)
    return config, transformers.AutoModelForSequenceClassification.from_config(config)


def test_position_limit_only_for_position_tables():
    config, model = _bert()
    assert position_limit(model) == config.max_position_embeddings
    llama = transformers.AutoModelForCausalLM.from_config(family_config("llama"))
    assert position_limit(llama) is None  # rotary: no table


@pytest.mark.parametrize("rows, kwargs, message", [
    ([], {}, "the train split has no examples; check --train_file"),
    ([{"input_ids": [1, 2, 3], "labels": 0}, {"input_ids": [1, 500], "labels": 1}], {},
     "train example 1: token id 500 is outside the model's vocabulary (vocab_size=128)"),
    ([{"input_ids": [1] * 600, "labels": 0}], {"max_positions": 512},
     "train example 0 has 600 tokens, more than the model's 512 positions"),
    ([{"input_ids": [1, 2], "labels": 0}, {"input_ids": [3], "labels": 3}], {"num_labels": 3},
     "train split: label 3 in column 'labels' is outside the 3 classes of the model's head (0..2, or -100"),
    ([{"input_ids": [1, 2], "labels": [0, -7]}], {"num_labels": 3},
     "train split: label -7 in column 'labels' is outside the 3 classes"),
])
def test_bad_data_is_one_error(rows, kwargs, message):
    config, _ = _bert()
    data = Dataset.from_list(rows) if rows else Dataset.from_dict({"input_ids": [], "labels": []})
    with pytest.raises(DataError) as exc:
        check_dataset(data, config, split="train", **kwargs)
    assert str(exc.value).startswith(message)


def test_good_data_passes_ignore_index_included():
    config, _ = _bert()
    data = Dataset.from_list([{"input_ids": [1, 127], "labels": [0, -100]}, {"input_ids": [5], "labels": [2]}])
    check_dataset(data, config, split="eval", num_labels=3, max_positions=512)
