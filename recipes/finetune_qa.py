"""Extractive question answering (SQuAD v1.1 / v2.0) through a DeepSpeed pipeline, scored with exact match and F1.

    deepspeed --num_gpus 2 recipes/finetune_qa.py          # embedded default: pretrained MiniLM, templated QA, CPU
    deepspeed --num_gpus 2 recipes/finetune_qa.py --version_2_with_negative   # default data with unanswerable questions
    deepspeed --num_gpus 4 recipes/finetune_qa.py --model_name_or_path bert-base-uncased --dataset_name squad \\
        --deepspeed ds_configs/bf16_zero1.json --num_stages 4 --per_device_train_batch_size 12 \\
        --gradient_accumulation_steps 4 --learning_rate 3e-5 --num_train_epochs 2 --max_seq_length 384 --doc_stride 128

Windows over long contexts, n-best post-processing and the metric are in ``hfpipe.tasks.qa``.
"""

from hfpipe import PipelineTrainer
from hfpipe.tasks.base import build_model, recipe_arguments, save_metrics
from hfpipe.tasks.qa import QADataArguments, QuestionAnsweringTask

# the embedded default: short contexts (< 60 tokens), a few minutes on 2 CPU ranks
EMBEDDED_DEFAULTS = dict(max_seq_length=64, doc_stride=16, learning_rate=3e-4, num_train_epochs=3.0,
                         per_device_train_batch_size=8, gradient_accumulation_steps=2, per_device_eval_batch_size=16,
                         warmup_ratio=0.1, logging_steps=10, save_strategy="no", report_to=[])


def main() -> dict:
    model_args, data_args, args = recipe_arguments(QADataArguments, "finetune_qa", {"max_seq_length": 384},
                                                   EMBEDDED_DEFAULTS)
    task = QuestionAnsweringTask(data_args)
    raw = task.load_raw()
    model, tokenizer = build_model(task, raw, model_args, args.seed)
    train_ds, eval_ds = task.prepare(tokenizer, raw, args.max_seq_length)
    trainer = PipelineTrainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds,
                              compute_metrics=task.compute_metrics(eval_ds), processing_class=tokenizer)
    trainer.train()  # exports output_dir/final unless --export_final_model false
    metrics = trainer.evaluate()
    save_metrics(metrics, args.output_dir)
    return metrics


if __name__ == "__main__":
    main()
