"""Extractive question answering (SQuAD v1.1 / v2.0) through a DeepSpeed pipeline, scored with exact match and F1.

    deepspeed --num_gpus 2 recipes/finetune_qa.py          # embedded default: pretrained MiniLM, templated QA, CPU
    deepspeed --num_gpus 2 recipes/finetune_qa.py --version_2_with_negative   # default data with unanswerable questions
    deepspeed --num_gpus 2 recipes/finetune_qa.py --lora_r 8                  # LoRA (PEFT): see LORA_DEFAULTS
    deepspeed --num_gpus 4 recipes/finetune_qa.py --model_name_or_path bert-base-uncased --dataset_name squad \\
        --deepspeed ds_configs/bf16_zero1.json --num_stages 4 --per_device_train_batch_size 12 \\
        --gradient_accumulation_steps 4 --learning_rate 3e-5 --num_train_epochs 2 --max_seq_length 384 --doc_stride 128

Windows over long contexts, n-best post-processing and the metric are in ``hfpipe.tasks.qa``.
"""

from hfpipe.tasks.base import ENCODER_EMBEDDED_DEFAULTS, flag_value, run_recipe
from hfpipe.tasks.qa import QADataArguments, QuestionAnsweringTask

# the embedded default: short contexts (< 60 tokens), a few minutes on 2 CPU ranks
EMBEDDED_DEFAULTS = {**ENCODER_EMBEDDED_DEFAULTS, "max_seq_length": 64, "doc_stride": 16, "learning_rate": 3e-4,
                     "num_train_epochs": 3.0, "per_device_eval_batch_size": 16}


#: with --lora_r R: LoRA's own defaults (any flag still wins): a learning rate for adapters on a frozen base, alpha =
#: 2 x r at r=8, every linear of the blocks (the span head, qa_outputs, trains in full: PEFT's QUESTION_ANS rule)
LORA_DEFAULTS = {"learning_rate": 1e-3, "lora_alpha": 16, "lora_target_modules": "query,key,value,dense"}


def main() -> dict:
    lora = int(flag_value("lora_r", "0")) > 0
    return run_recipe(QuestionAnsweringTask, QADataArguments, "finetune_qa",
                      defaults={"max_seq_length": 384, **(LORA_DEFAULTS if lora else {})},
                      embedded_defaults={**EMBEDDED_DEFAULTS, **(LORA_DEFAULTS if lora else {})})


if __name__ == "__main__":
    main()
