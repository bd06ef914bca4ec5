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

from hfpipe import PipelineTrainer
from hfpipe.tasks.base import build_model, recipe_arguments, save_metrics
from hfpipe.tasks.classification import ClassificationDataArguments, SequenceClassificationTask

EMBEDDED_DEFAULTS = dict(max_seq_length=32, learning_rate=5e-5, num_train_epochs=1.0, per_device_train_batch_size=8,
                         gradient_accumulation_steps=2, per_device_eval_batch_size=25, warmup_ratio=0.1,
                         logging_steps=10, save_strategy="no", report_to=[])


def main() -> dict:
    model_args, data_args, args = recipe_arguments(ClassificationDataArguments, "finetune_classification",
                                                   {"max_seq_length": 128}, EMBEDDED_DEFAULTS)
    task = SequenceClassificationTask(data_args)
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
