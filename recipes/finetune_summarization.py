"""Summarization (or --task translation) with a decoder-only model through a DeepSpeed pipeline, scored with ROUGE
(sacreBLEU) on text generated through the pipeline.

    deepspeed --num_gpus 2 recipes/finetune_summarization.py     # embedded default: small Llama, synthetic data, CPU
    deepspeed --num_gpus 4 recipes/finetune_summarization.py --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --train_file train.jsonl --validation_file val.jsonl --source_column document --target_column summary \\
        --num_stages 2 --learning_rate 2e-5 --max_seq_length 1024 --generation_max_length 128

No pretrained decoder is available offline, so without --model_name_or_path the recipe trains a 4-block Llama
(hidden 128) from its config with the project's word-level tokenizer; the embedded data is the project's synthetic
task (hfpipe/data/text2text). Greedy decoding; beams are not implemented. Prompt masking, metrics and the synthetic
task are in ``hfpipe.tasks.text2text``; generation in ``hfpipe.generation``.
"""

import functools
import sys

from transformers import AutoTokenizer

from hfpipe import PipelineTrainer
from hfpipe.generation import generate_continuations
from hfpipe.tasks.base import recipe_arguments, save_metrics
from hfpipe.tasks.text2text import RECIPE_DEFAULTS, Text2TextDataArguments, Text2TextTask, default_tokenizer, small_decoder_config


def _task_from_argv(default: str) -> str:
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--task="):
            return a.split("=", 1)[1]
    return default


def main(default_task: str = "summarization") -> dict:
    task_name = _task_from_argv(default_task)
    model_args, data_args, args = recipe_arguments(Text2TextDataArguments, f"finetune_{task_name}", {"task": task_name},
                                                   RECIPE_DEFAULTS.get(task_name, {}))
    task = Text2TextTask(data_args)
    if model_args.model_name_or_path is None:
        tokenizer = default_tokenizer()
        model = small_decoder_config(tokenizer)  # trained from its config
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
        model = model_args.model_name_or_path
    train_ds, eval_ds = task.prepare(tokenizer, task.load_raw(), args.max_seq_length)
    generation_fn = functools.partial(generate_continuations, max_new_tokens=args.generation_max_length,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    trainer = PipelineTrainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds,
                              compute_metrics=task.compute_metrics(eval_ds), processing_class=tokenizer,
                              model_class=task.auto_class, generation_fn=generation_fn)
    trainer.train()
    metrics = trainer.evaluate()
    save_metrics(metrics, args.output_dir)
    return metrics


if __name__ == "__main__":
    main()
