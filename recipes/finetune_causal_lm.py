"""Causal-LM fine-tuning through a DeepSpeed pipeline: plain text or instruction data (SFT, loss on the response
only), optional packing, perplexity in evaluation.

    deepspeed --num_gpus 2 recipes/finetune_causal_lm.py                  # synthetic stories, small Llama, CPU
    deepspeed --num_gpus 2 recipes/finetune_causal_lm.py --format sft     # synthetic instructions
    deepspeed --num_gpus 4 recipes/finetune_causal_lm.py --model_name_or_path Qwen/Qwen2.5-0.5B --format sft \\
        --train_file alpaca.json --num_stages 2 --learning_rate 2e-5 --max_seq_length 1024 --packing

No pretrained decoder is available offline, so without --model_name_or_path the recipe trains a 4-block Llama
(hidden 128) from its config with the project's word-level tokenizer (hfpipe/data/text2text). Encoding and perplexity
are in ``hfpipe.tasks.causal_lm``.
"""

from transformers import AutoTokenizer

from hfpipe import PipelineTrainer
from hfpipe.tasks.base import recipe_arguments, save_metrics
from hfpipe.tasks.causal_lm import RECIPE_DEFAULTS, CausalLMDataArguments, CausalLMTask
from hfpipe.tasks.text2text import default_tokenizer, small_decoder_config


def main() -> dict:
    model_args, data_args, args = recipe_arguments(CausalLMDataArguments, "finetune_causal_lm", {}, RECIPE_DEFAULTS)
    task = CausalLMTask(data_args)
    if model_args.model_name_or_path is None:
        tokenizer = default_tokenizer()
        model = small_decoder_config(tokenizer)  # trained from its config
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
        model = model_args.model_name_or_path
    train_ds, eval_ds = task.prepare(tokenizer, task.load_raw(), args.max_seq_length)
    trainer = PipelineTrainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds,
                              compute_metrics=task.compute_metrics(eval_ds), processing_class=tokenizer,
                              model_class=task.auto_class)
    trainer.train()
    metrics = trainer.evaluate()
    save_metrics(metrics, args.output_dir)
    return metrics


if __name__ == "__main__":
    main()
