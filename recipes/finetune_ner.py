"""Token classification (NER) through a DeepSpeed pipeline: word tags aligned to sub-tokens, scored with seqeval.

    deepspeed --num_gpus 2 recipes/finetune_ner.py          # embedded default: pretrained MiniLM, templated NER, CPU
    deepspeed --num_gpus 2 recipes/finetune_ner.py --train_file train.jsonl --validation_file dev.jsonl \\
        --text_column tokens --label_column ner_tags --label_all_tokens
    deepspeed --num_gpus 4 recipes/finetune_ner.py --model_name_or_path bert-base-cased --dataset_name conll2003 \\
        --deepspeed ds_configs/bf16_zero1.json --num_stages 4 --per_device_train_batch_size 8 \\
        --gradient_accumulation_steps 4 --learning_rate 3e-5 --max_seq_length 128

Label alignment and the metric are in ``hfpipe.tasks.ner``.
"""

from hfpipe import PipelineTrainer
from hfpipe.tasks.base import build_model, recipe_arguments, save_metrics
from hfpipe.tasks.ner import NERDataArguments, TokenClassificationTask

EMBEDDED_DEFAULTS = dict(max_seq_length=32, learning_rate=1e-4, num_train_epochs=2.0, per_device_train_batch_size=8,
                         gradient_accumulation_steps=2, per_device_eval_batch_size=25, warmup_ratio=0.1,
                         logging_steps=10, save_strategy="no", report_to=[])


def main() -> dict:
    model_args, data_args, args = recipe_arguments(NERDataArguments, "finetune_ner", {"max_seq_length": 128},
                                                   EMBEDDED_DEFAULTS)
    task = TokenClassificationTask(data_args)
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
