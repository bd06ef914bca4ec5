"""Translation with a decoder-only model through a DeepSpeed pipeline, scored with sacreBLEU on generated text.

    deepspeed --num_gpus 2 recipes/finetune_translation.py     # embedded default: synthetic word-substitution language
    deepspeed --num_gpus 4 recipes/finetune_translation.py --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --dataset_name wmt16 --dataset_config_name ro-en --source_lang en --target_lang ro

    deepspeed --num_gpus 2 recipes/finetune_translation.py --model_type t5     # embedded: small T5 from scratch
    deepspeed --num_gpus 2 recipes/finetune_translation.py --model_name_or_path Helsinki-NLP/opus-mt-en-ro \
        --dataset_name wmt16 --dataset_config_name ro-en --source_lang en --target_lang ro \
        --max_source_length 128 --max_target_length 128 --max_seq_length 128 --predict_with_generate

The same recipe as finetune_summarization.py with ``--task translation`` (one code path, see that file).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_summarization import main  # noqa: E402

if __name__ == "__main__":
    main(default_task="translation")
