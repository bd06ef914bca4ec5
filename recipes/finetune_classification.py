"""Sequence classification (single sentences or pairs; regression when the labels are floats) through a DeepSpeed
pipeline, scored with accuracy and F1 (MSE/Pearson/Spearman for regression).

    deepspeed --num_gpus 2 recipes/finetune_classification.py   # embedded default: pretrained MiniLM, reviews, CPU
    deepspeed --num_gpus 2 recipes/finetune_classification.py --train_file train.csv --validation_file dev.csv \\
        --text_column premise --text_pair_column hypothesis --label_column label
    deepspeed --num_gpus 4 recipes/finetune_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name nyu-mll/glue --dataset_config_name mrpc --deepspeed ds_configs/bf16_zero1.json --num_stages 4 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --learning_rate 2e-5 --max_seq_length 128

Column detection, label mapping and metrics are in ``hfpipe.tasks.classification``.
"""

from hfpipe.tasks.base import ENCODER_EMBEDDED_DEFAULTS, run_recipe
from hfpipe.tasks.classification import ClassificationDataArguments, SequenceClassificationTask

EMBEDDED_DEFAULTS = {**ENCODER_EMBEDDED_DEFAULTS, "learning_rate": 5e-5, "num_train_epochs": 1.0}


def main() -> dict:
    return run_recipe(SequenceClassificationTask, ClassificationDataArguments, "finetune_classification",
                      defaults={"max_seq_length": 128}, embedded_defaults=EMBEDDED_DEFAULTS)


if __name__ == "__main__":
    main()
