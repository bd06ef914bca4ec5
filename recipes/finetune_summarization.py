"""Summarization (or --task translation) with a decoder-only model through a DeepSpeed pipeline, scored with ROUGE
(sacreBLEU) on text generated through the pipeline.

    deepspeed --num_gpus 2 recipes/finetune_summarization.py     # embedded default: small Llama, synthetic data, CPU
    deepspeed --num_gpus 4 recipes/finetune_summarization.py --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --train_file train.jsonl --validation_file val.jsonl --source_column document --target_column summary \\
        --num_stages 2 --learning_rate 2e-5 --max_seq_length 1024 --generation_max_length 128

Encoder-decoders take run_summarization.py's flags (T5, BART, ...: AutoModelForSeq2SeqLM)::

    deepspeed --num_gpus 2 recipes/finetune_summarization.py --model_type t5   # embedded: small T5 from scratch
    deepspeed --num_gpus 4 recipes/finetune_summarization.py --model_name_or_path google-t5/t5-small \
        --source_prefix "summarize: " --text_column article --summary_column highlights --dataset_name cnn_dailymail \
        --dataset_config_name 3.0.0 --max_source_length 512 --max_seq_length 512 --max_target_length 128 \
        --val_max_target_length 128 --predict_with_generate --num_beams 1 --num_stages 2

No pretrained decoder is available offline, so without --model_name_or_path the recipe trains a 4-block Llama
(hidden 128) from its config with the project's word-level tokenizer; the embedded data is the project's synthetic
task (hfpipe/data/text2text). Greedy decoding; beams are not implemented. Prompt masking and metrics are in
``hfpipe.tasks.text2text``, the default model in ``hfpipe.tasks.decoder``, the synthetic task in
``hfpipe/data/generate.py``; generation in ``hfpipe.generation``.
"""

from hfpipe.tasks.base import flag_value, run_recipe
from hfpipe.tasks.text2text import (RECIPE_DEFAULTS, RECIPE_DEFAULTS_T5, Text2TextDataArguments, Text2TextTask,
                                    build_text2text)


def main(default_task: str = "summarization") -> dict:
    task = flag_value("task", default_task)  # the run's name and defaults depend on it
    defaults = RECIPE_DEFAULTS_T5 if flag_value("model_type", "llama") == "t5" else RECIPE_DEFAULTS
    return run_recipe(Text2TextTask, Text2TextDataArguments, f"finetune_{task}", defaults={"task": task},
                      embedded_defaults=defaults.get(task, {}), build=build_text2text)


if __name__ == "__main__":
    main()
