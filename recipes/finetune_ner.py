"""Token classification (NER) through a DeepSpeed pipeline: word tags aligned to sub-tokens, scored with seqeval.

    deepspeed --num_gpus 2 recipes/finetune_ner.py          # embedded default: pretrained MiniLM, templated NER, CPU
    deepspeed --num_gpus 2 recipes/finetune_ner.py --train_file train.jsonl --validation_file dev.jsonl \\
        --text_column tokens --label_column ner_tags --label_all_tokens
    deepspeed --num_gpus 4 recipes/finetune_ner.py --model_name_or_path bert-base-cased --dataset_name conll2003 \\
        --deepspeed ds_configs/bf16_zero1.json --num_stages 4 --per_device_train_batch_size 8 \\
        --gradient_accumulation_steps 4 --learning_rate 3e-5 --max_seq_length 128

Label alignment and the metric are in ``hfpipe.tasks.ner``.
"""

from hfpipe.tasks.base import ENCODER_EMBEDDED_DEFAULTS, run_recipe
from hfpipe.tasks.ner import NERDataArguments, TokenClassificationTask

EMBEDDED_DEFAULTS = {**ENCODER_EMBEDDED_DEFAULTS, "learning_rate": 1e-4, "num_train_epochs": 2.0}


def main() -> dict:
    return run_recipe(TokenClassificationTask, NERDataArguments, "finetune_ner",
                      defaults={"max_seq_length": 128}, embedded_defaults=EMBEDDED_DEFAULTS)


if __name__ == "__main__":
    main()
