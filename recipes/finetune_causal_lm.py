"""Causal-LM fine-tuning through a DeepSpeed pipeline: plain text or instruction data (SFT, loss on the response
only), optional packing, perplexity in evaluation.

    deepspeed --num_gpus 2 recipes/finetune_causal_lm.py                  # synthetic stories, small Llama, CPU
    deepspeed --num_gpus 2 recipes/finetune_causal_lm.py --format sft     # synthetic instructions
    deepspeed --num_gpus 2 recipes/finetune_causal_lm.py --lora_r 8 --load_in_4bit   # QLoRA: see LORA_DEFAULTS
    deepspeed --num_gpus 4 recipes/finetune_causal_lm.py --model_name_or_path Qwen/Qwen2.5-0.5B --format sft \\
        --train_file alpaca.json --num_stages 2 --learning_rate 2e-5 --max_seq_length 1024 --packing

No pretrained decoder is available offline, so without --model_name_or_path the recipe trains a 4-block Llama
(hidden 128) from its config with the project's word-level tokenizer (hfpipe/data/text2text). Encoding and perplexity
are in ``hfpipe.tasks.causal_lm``, the default model in ``hfpipe.tasks.decoder``.
"""

from hfpipe.tasks.base import flag_value, run_recipe
from hfpipe.tasks.causal_lm import RECIPE_DEFAULTS, CausalLMDataArguments, CausalLMTask
from hfpipe.tasks.decoder import build_decoder


#: with --lora_r R: LoRA's own defaults (any flag still wins): alpha = 2 x r at r=8 on every linear of the blocks
#: (PEFT's all-linear: the LM head stays frozen); add --load_in_4bit for QLoRA
LORA_DEFAULTS = {"learning_rate": 2e-3, "lora_alpha": 16, "lora_target_modules": "all-linear"}


def main() -> dict:
    lora = int(flag_value("lora_r", "0")) > 0
    return run_recipe(CausalLMTask, CausalLMDataArguments, "finetune_causal_lm",
                      defaults=LORA_DEFAULTS if lora else {},
                      embedded_defaults={**RECIPE_DEFAULTS, **(LORA_DEFAULTS if lora else {})}, build=build_decoder)


if __name__ == "__main__":
    main()
